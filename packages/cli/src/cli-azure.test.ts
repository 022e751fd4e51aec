import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startAzurite } from '@lifeboat/testing';
import type { Azurite } from '@lifeboat/testing';
import type { CliInput } from './cli-context.js';
import { runCli } from './main.js';

let azurite: Azurite;
let dir: string;

async function lifeboat(
  args: string[],
  env: Record<string, string>,
): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const stdin = Object.assign(new EventEmitter(), {
    isTTY: false,
    resume: () => undefined,
    pause: () => undefined,
  }) as CliInput;
  const code = await runCli(args, {
    io: {
      stdout: { write: (s: string) => (out += s) },
      stderr: { write: (s: string) => (err += s), isTTY: false },
      stdin,
      env: { LIFEBOAT_PASSPHRASE: 'azure pass', ...env },
      cwd: dir,
    },
  });
  return { code, out, err };
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lifeboat-cli-azure-'));
  azurite = await startAzurite();
});

afterAll(async () => {
  await azurite?.stop();
  await rm(dir, { recursive: true, force: true });
});

describe('lifeboat store on an Azure Blob container (Azurite)', () => {
  it('inits, imports and restores through a container URL and a connection string', async () => {
    const env = {
      LIFEBOAT_STORE: `${azurite.blobEndpoint}/lifeboat-cli`,
      AZURE_STORAGE_CONNECTION_STRING: azurite.connectionString,
    };
    const init = await lifeboat(['store', 'init', '--kdf-cost', '1024'], env);
    expect(init.err).toBe('');
    expect(init.code).toBe(0);

    const image = join(dir, 'disk.raw');
    const data = Buffer.concat([
      randomBytes(300 * 1024),
      Buffer.alloc(200 * 1024),
      randomBytes(12 * 1024),
    ]);
    await writeFile(image, data);
    const imp = await lifeboat(['store', 'import', image, '--json'], env);
    expect(imp.err).toBe('');
    const { point } = JSON.parse(imp.out) as { point: { id: string } };
    const out = join(dir, 'restored.raw');
    expect((await lifeboat(['store', 'restore', point.id, out], env)).code).toBe(0);
    expect((await readFile(out)).equals(data)).toBe(true);

    // The store is found again by URL alone, and a wrong account is refused before any request.
    const points = await lifeboat(['store', 'points', '--json'], env);
    expect((JSON.parse(points.out) as { points: unknown[] }).points).toHaveLength(1);
    const other = await lifeboat(['store', 'points'], {
      ...env,
      LIFEBOAT_STORE: `${azurite.blobEndpoint.replace('devstoreaccount1', 'someoneelse')}/lifeboat-cli`,
    });
    expect(other.code).toBe(1);
    expect(other.err).toMatch(/^error LB_CLI_AZURE_MISMATCH: /);
  });
});
