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
