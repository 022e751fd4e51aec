import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EventEmitter } from 'node:events';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isLifeboatError } from '@lifeboat/protocol';
import type { CliInput, CliIo } from './cli-context.js';
import { parseStoreLocation, readPassphrase, resolveConfig, resolveVaultConfig } from './config.js';

function io(env: Record<string, string> = {}, tty = false): CliIo {
  const stdin = Object.assign(new EventEmitter(), {
    isTTY: tty,
    resume: () => undefined,
    pause: () => undefined,
  }) as CliInput;
  return {
    stdout: { write: () => true },
    stderr: { write: () => true, isTTY: false },
    stdin,
    env,
    cwd: '/srv',
  };
}

function codeOf(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    if (isLifeboatError(err)) return err.code;
    throw err;
  }
  return 'no error';
}

const AZURITE_CS =
  'DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;';

describe('store location', () => {
  it('takes a directory relative to the working directory', () => {
    expect(parseStoreLocation('data/store', undefined, '/srv')).toEqual({
      kind: 'directory',
      path: '/srv/data/store',
    });
    expect(parseStoreLocation('dir:/x', undefined, '/srv')).toEqual({
      kind: 'directory',
      path: '/x',
    });
  });

  it('parses Azure and Azurite container URLs', () => {
    expect(
      parseStoreLocation(
        'https://acct1.blob.core.windows.net/backups',
        'AccountName=acct1;AccountKey=k',
        '/',
      ),
    ).toMatchObject({ kind: 'azure', account: 'acct1', container: 'backups' });
    expect(
      parseStoreLocation('http://127.0.0.1:10000/devstoreaccount1/lb-store', AZURITE_CS, '/'),
    ).toMatchObject({
      kind: 'azure',
      account: 'devstoreaccount1',
      container: 'lb-store',
      connectionString: AZURITE_CS,
    });
  });

  it('rejects bad URLs, missing credentials and a mismatched account', () => {
    expect(
      codeOf(() => parseStoreLocation('https://acct1.blob.core.windows.net/', AZURITE_CS, '/')),
    ).toBe('LB_CLI_BAD_STORE_URL');
    expect(
      codeOf(() =>
        parseStoreLocation('http://127.0.0.1:1/devstoreaccount1/UPPER', AZURITE_CS, '/'),
      ),
    ).toBe('LB_CLI_BAD_STORE_URL');
    expect(
      codeOf(() => parseStoreLocation('http://127.0.0.1:1/devstoreaccount1/c1c', undefined, '/')),
    ).toBe('LB_CLI_NO_AZURE_CREDENTIALS');
    expect(
      codeOf(() => parseStoreLocation('https://other.blob.core.windows.net/c1c', AZURITE_CS, '/')),
    ).toBe('LB_CLI_AZURE_MISMATCH');
  });

  it('comes from --store, else LIFEBOAT_STORE, with the connection string from the environment', () => {
    const env = { LIFEBOAT_STORE: '/env/store', AZURE_STORAGE_CONNECTION_STRING: AZURITE_CS };
    expect(resolveConfig({}, io(env)).store).toEqual({ kind: 'directory', path: '/env/store' });
    expect(resolveConfig({ store: '/flag' }, io(env)).store).toEqual({
      kind: 'directory',
      path: '/flag',
    });
    const az = resolveConfig({ store: 'http://127.0.0.1:9/devstoreaccount1/box' }, io(env)).store;
    expect(az).toMatchObject({ kind: 'azure', connectionString: AZURITE_CS });
    expect(resolveConfig({}, io()).store).toBeUndefined();
  });

  it('is frozen', () => {
    const config = resolveConfig({ store: '/s' }, io());
    expect(Object.isFrozen(config)).toBe(true);
    expect(Object.isFrozen(config.store)).toBe(true);
  });
});

describe('passphrase', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'lifeboat-cli-config-'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('prefers --passphrase-file over LIFEBOAT_PASSPHRASE and reads its first line', async () => {
    const file = join(dir, 'pass');
    await writeFile(file, 'from file\nignored\n');
    const env = { LIFEBOAT_PASSPHRASE: 'from env' };
    const missing = { code: 'LB_CLI_NO_PASSPHRASE', message: 'none' };
    const c1 = resolveConfig({ passphraseFile: file }, io(env));
    expect(await readPassphrase(c1.passphrase, { prompt: '' }, io(env), missing)).toBe('from file');
    const c2 = resolveConfig({}, io(env));
    expect(await readPassphrase(c2.passphrase, { prompt: '' }, io(env), missing)).toBe('from env');
  });

  it('refuses to prompt when stdin is not a terminal', async () => {
    const config = resolveConfig({}, io());
    expect(config.passphrase).toEqual({ kind: 'none' });
    await expect(
      readPassphrase(config.passphrase, { prompt: '' }, io(), {
        code: 'LB_CLI_NO_PASSPHRASE',
        message: 'x',
      }),
    ).rejects.toMatchObject({ code: 'LB_CLI_NO_PASSPHRASE' });
    expect(resolveConfig({}, io({}, true)).passphrase).toEqual({ kind: 'prompt' });
  });

  it('rejects an empty or missing passphrase file', async () => {
    const empty = join(dir, 'empty');
    await writeFile(empty, '\n');
    const missing = { code: 'LB_CLI_NO_PASSPHRASE', message: 'x' };
    await expect(
      readPassphrase(
        resolveConfig({ passphraseFile: empty }, io()).passphrase,
        { prompt: '' },
        io(),
        missing,
      ),
    ).rejects.toMatchObject({ code: 'LB_CLI_EMPTY_PASSPHRASE' });
    await expect(
      readPassphrase(
        resolveConfig({ passphraseFile: join(dir, 'nope') }, io()).passphrase,
        { prompt: '' },
        io(),
        missing,
      ),
    ).rejects.toMatchObject({ code: 'LB_CLI_PASSPHRASE_FILE' });
  });

  it('prompts without echo on a terminal', async () => {
    const term = io({}, true);
    const echoed: string[] = [];
    term.stderr = { write: (s: string) => echoed.push(s), isTTY: true };
    const modes: boolean[] = [];
    (term.stdin as { setRawMode?: (m: boolean) => void }).setRawMode = (m) => void modes.push(m);
    const config = resolveConfig({}, term);
    const answer = readPassphrase(config.passphrase, { prompt: 'pass: ' }, term, {
      code: 'LB_CLI_NO_PASSPHRASE',
      message: 'x',
    });
    term.stdin.emit('data', 'se');
    term.stdin.emit('data', 'cretx\u007f\r');
    expect(await answer).toBe('secret');
    expect(echoed.join('')).toBe('pass: \n');
    expect(modes).toEqual([true, false]);
  });
});

describe('the environment', () => {
  it('gives the vault commands their URL and token, the options winning', () => {
    const env = { LIFEBOAT_VAULT_URL: 'http://vault.example:9440/', LIFEBOAT_VAULT_TOKEN: 'lbt_x' };
    expect(resolveVaultConfig({}, io(env))).toEqual({
      url: 'http://vault.example:9440',
      token: 'lbt_x',
    });
    expect(resolveVaultConfig({ vaultUrl: 'http://other:1', token: 'lbs_y' }, io(env))).toEqual({
      url: 'http://other:1',
      token: 'lbs_y',
    });
    expect(resolveVaultConfig({}, io({ LIFEBOAT_VAULT_TOKEN: '' }))).toEqual({
      url: 'http://127.0.0.1:9440',
      token: undefined,
    });
  });

  it('is read by config.ts alone (the convention every package follows)', async () => {
    const root = join(import.meta.dirname, '..', '..');
    const offenders: string[] = [];
    for (const pkg of await readdir(root)) {
      // integration-tests ships nothing: its fixtures start the CLI as a user's shell would, with
      // the test's own environment plus the session's variables.
      if (pkg === 'integration-tests') continue;
      const src = join(root, pkg, 'src');
      const files = await readdir(src, { recursive: true }).catch(() => [] as string[]);
      for (const f of files) {
        if (!/\.tsx?$/.test(f) || /\.test\.tsx?$/.test(f)) continue;
        if (pkg === 'cli' && f === 'config.ts') continue;
        const text = await readFile(join(src, f), 'utf8');
        if (/process\.env|\bio\.env\b|ctx\.io\.env/.test(text)) offenders.push(`${pkg}/src/${f}`);
      }
    }
    expect(offenders).toEqual([]);
  });
});
