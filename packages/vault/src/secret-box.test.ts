import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { makeTempDir, type TempDir } from '@lifeboat/testing';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SecretBox } from './secret-box.js';

// Issue 5: "stored credentials encrypted with a key the vault keeps out of the database".
describe('SecretBox', () => {
  let tmp: TempDir;
  beforeAll(async () => {
    tmp = await makeTempDir('lifeboat-secret-box-');
  });
  afterAll(async () => {
    await tmp?.remove();
  });

  it('creates its key file 0600, seals without the plaintext, and opens only with that key', async () => {
    const keyFile = join(tmp.path, 'a', 'secret.key');
    const box = await SecretBox.open(keyFile);
    expect((await stat(keyFile)).mode & 0o777).toBe(0o600);
    const sealed = box.seal('hunter2-password');
    expect(sealed).not.toContain('hunter2');
    expect(box.seal('hunter2-password')).not.toBe(sealed); // a new IV each time
    expect(box.open(sealed)).toBe('hunter2-password');
    // The same file opens it again (a restart); another key does not, and says so.
    expect((await SecretBox.open(keyFile)).open(sealed)).toBe('hunter2-password');
    const other = await SecretBox.open(join(tmp.path, 'b', 'secret.key'));
    expect(() => other.open(sealed)).toThrow(
      expect.objectContaining({ code: 'LB_VAULT_SECRET_UNREADABLE' }),
    );
    // A changed byte is an error, never garbage.
    const parts = sealed.split('.');
    const body = Buffer.from(parts[3] ?? '', 'base64url');
    body[0] = (body[0] ?? 0) ^ 1;
    parts[3] = body.toString('base64url');
    expect(() => box.open(parts.join('.'))).toThrow(
      expect.objectContaining({ code: 'LB_VAULT_SECRET_UNREADABLE' }),
    );
    expect(() => box.open('not sealed')).toThrow(
      expect.objectContaining({ code: 'LB_VAULT_SECRET_UNREADABLE' }),
    );
    expect((await readFile(keyFile, 'utf8')).trim()).toMatch(/^[A-Za-z0-9+/]{43}=$/);
  });

  it('refuses a key file that is not a 32-byte key', async () => {
    const keyFile = join(tmp.path, 'short.key');
    await writeFile(keyFile, Buffer.alloc(16).toString('base64'));
    await expect(SecretBox.open(keyFile)).rejects.toMatchObject({ code: 'LB_VAULT_SECRET_KEY' });
  });
});
