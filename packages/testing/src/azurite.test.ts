import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { connect } from 'node:net';
import { afterAll, describe, expect, it } from 'vitest';
import { startAzurite, type Azurite } from './azurite.js';

/** Resolves true when a TCP connection to the port succeeds, false when it is refused. */
function answers(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect(port, '127.0.0.1');
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

describe('startAzurite', () => {
  let azurite: Azurite | undefined;
  afterAll(async () => {
    await azurite?.stop();
  });

  it('listens on an ephemeral port, goes down on kill, comes back on the same port', async () => {
    azurite = await startAzurite();
    expect(azurite.port).toBeGreaterThan(0);
    expect(azurite.connectionString).toContain(`BlobEndpoint=${azurite.blobEndpoint};`);
    expect(await answers(azurite.port)).toBe(true);

    await azurite.kill();
    expect(azurite.running).toBe(false);
    expect(await answers(azurite.port)).toBe(false);

    await azurite.restart();
    expect(azurite.running).toBe(true);
    expect(await answers(azurite.port)).toBe(true);

    expect(existsSync(azurite.location)).toBe(true);
    await azurite.stop();
    expect(existsSync(azurite.location)).toBe(false);
    expect(azurite.running).toBe(false);
    expect(await answers(azurite.port)).toBe(false);
  });
});

describe('startAzurite when the test process dies', () => {
  it('ends Azurite and removes its directory when its parent is killed without stopping it', async () => {
    // A parent that starts Azurite, reports it, and is then killed with SIGKILL (no exit handler runs).
    const script = `import { startAzurite } from ${JSON.stringify(new URL('./azurite.ts', import.meta.url).pathname)};
const a = await startAzurite();
console.log(JSON.stringify({ port: a.port, location: a.location }));
setInterval(() => {}, 1000);`;
    const parent = spawn(
      process.execPath,
      ['--import', 'tsx', '--input-type=module', '-e', script],
      {
        stdio: ['ignore', 'pipe', 'inherit'],
      },
    );
    try {
      const line = await new Promise<string>((resolve, reject) => {
        let out = '';
        parent.stdout?.on('data', (c: Buffer) => {
          out += c.toString();
          if (out.includes('\n')) resolve(out.split('\n')[0] ?? '');
        });
        parent.once('exit', (code) =>
          reject(new Error(`parent exited (${code}) before reporting: ${out}`)),
        );
      });
      const { port, location } = JSON.parse(line) as { port: number; location: string };
      expect(await answers(port)).toBe(true);
      parent.kill('SIGKILL');
      const deadline = Date.now() + 60_000;
      while ((await answers(port)) || existsSync(location)) {
        if (Date.now() > deadline) throw new Error('the orphaned Azurite is still there');
        await new Promise((r) => setTimeout(r, 200));
      }
    } finally {
      parent.kill('SIGKILL');
    }
  });
});
