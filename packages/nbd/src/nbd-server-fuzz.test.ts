import { mkdtemp, rm } from 'node:fs/promises';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient } from './nbd-client.js';
import { NBD } from './nbd-constants.js';
import { NbdServer } from './nbd-server.js';

let dir: string;
let sock: string;
let server: NbdServer;
const disk = Buffer.alloc(1024 * 1024, 0x3c);

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lifeboat-nbd-fuzz-'));
  sock = join(dir, 's.sock');
  server = new NbdServer({ handshakeTimeoutMs: 2000 });
  server.addExport('', { size: disk.length, readAt: async (o, l) => disk.subarray(o, o + l) });
  await server.listen({ path: sock });
});
afterAll(async () => {
  await server.close();
  await rm(dir, { recursive: true, force: true });
});

/** Sends bytes after the greeting, collects what comes back for a moment, then hangs up. */
function poke(bytes: Uint8Array): Promise<void> {
  return new Promise((resolve) => {
    const s = connect({ path: sock });
    s.on('error', () => undefined);
    s.on('data', () => undefined);
    s.once('connect', () => s.write(bytes));
    const t = setTimeout(() => s.destroy(), 30);
    s.once('close', () => {
      clearTimeout(t);
      resolve();
    });
  });
}

function header(opt: number, len: number): Buffer {
  const h = Buffer.alloc(16);
  h.writeBigUInt64BE(NBD.OPTS_MAGIC, 0);
  h.writeUInt32BE(opt >>> 0, 8);
  h.writeUInt32BE(len >>> 0, 12);
  return h;
}

describe('NbdServer under random client input', () => {
  it('never crashes and keeps serving well-behaved clients', async () => {
    const flags = Buffer.from([0, 0, 0, NBD.FLAG_C_FIXED_NEWSTYLE | NBD.FLAG_C_NO_ZEROES]);
    // Plausible options (known codes, random payloads and lengths), then random requests.
    const option = fc
      .record({
        opt: fc.oneof(fc.integer({ min: 0, max: 12 }), fc.integer({ min: 0, max: 0xffffffff })),
        data: fc.uint8Array({ maxLength: 64 }),
        lie: fc.boolean(),
      })
      .map(({ opt, data, lie }) =>
        Buffer.concat([header(opt, lie ? data.length + 7 : data.length), data]),
      );
    const request = fc
      .record({
        type: fc.integer({ min: 0, max: 10 }),
        offset: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
        length: fc.integer({ min: 0, max: 0xffffffff }),
      })
      .map(({ type, offset, length }) => {
        const q = Buffer.alloc(28);
        q.writeUInt32BE(NBD.REQUEST_MAGIC, 0);
        q.writeUInt16BE(type, 6);
        q.writeBigUInt64BE(offset, 16);
        q.writeUInt32BE(length, 24);
        return q;
      });
    const go = Buffer.concat([header(NBD.OPT_GO, 6), Buffer.alloc(6)]);
    await fc.assert(
      fc.asyncProperty(
        fc.array(option, { maxLength: 4 }),
        fc.boolean(),
        fc.array(request, { maxLength: 4 }),
        fc.uint8Array({ maxLength: 40 }),
        async (opts, attach, reqs, junk) => {
          await poke(Buffer.concat([flags, ...opts, ...(attach ? [go, ...reqs] : []), junk]));
        },
      ),
      { numRuns: 150 },
    );
    const c = await NbdClient.connect({ path: sock });
    expect((await c.readAt(1000, 5000)).equals(disk.subarray(1000, 6000))).toBe(true);
    await c.close();
    // Every connection, however it ended, was cleaned up.
    for (let i = 0; i < 200 && server.connections > 0; i++)
      await new Promise((r) => setTimeout(r, 25));
    expect(server.connections).toBe(0);
  });
});
