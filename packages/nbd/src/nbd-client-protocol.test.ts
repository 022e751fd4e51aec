import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { isLifeboatError } from '@lifeboat/protocol';
import { NbdClient } from './nbd-client.js';
import { NBD } from './nbd-constants.js';
import { SocketReader } from './socket-reader.js';

// Real servers never break the protocol, so a tiny fake server is the one way to prove the
// client refuses malformed replies instead of hanging or returning made-up data.

let dir: string;
let server: Server | undefined;
const sockets = new Set<Socket>();

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lifeboat-nbd-fake-'));
});
afterEach(async () => {
  for (const s of sockets) s.destroy();
  sockets.clear();
  await new Promise<void>((r) => (server ? server.close(() => r()) : r()));
  server = undefined;
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

interface Request {
  type: number;
  cookie: Buffer;
  offset: number;
  length: number;
}

/** A fake server: `greeting` bytes, then answers options sanely, then `onRequest` per request. */
async function fake(
  onRequest: (s: Socket, req: Request) => void,
  greeting?: Buffer,
): Promise<string> {
  const path = join(dir, `f${Math.random().toString(36).slice(2)}.sock`);
  server = createServer((s) => {
    sockets.add(s);
    s.on('error', () => undefined);
    const r = new SocketReader(s);
    void (async () => {
      const hello = Buffer.alloc(18);
      hello.writeBigUInt64BE(NBD.INIT_MAGIC, 0);
      hello.writeBigUInt64BE(NBD.OPTS_MAGIC, 8);
      hello.writeUInt16BE(NBD.FLAG_FIXED_NEWSTYLE | NBD.FLAG_NO_ZEROES, 16);
      s.write(greeting ?? hello);
      await r.read(4);
      for (;;) {
        const h = await r.read(16);
        const opt = h.readUInt32BE(8);
        await r.read(h.readUInt32BE(12));
        const rep = (type: number, data = Buffer.alloc(0)): void => {
          const b = Buffer.alloc(20);
          b.writeBigUInt64BE(NBD.REP_MAGIC, 0);
          b.writeUInt32BE(opt, 8);
          b.writeUInt32BE(type, 12);
          b.writeUInt32BE(data.length, 16);
          s.write(Buffer.concat([b, data]));
        };
        if (opt === NBD.OPT_GO) {
          const info = Buffer.alloc(12);
          info.writeUInt16BE(NBD.INFO_EXPORT, 0);
          info.writeBigUInt64BE(1048576n, 2);
          info.writeUInt16BE(NBD.FLAG_HAS_FLAGS, 10);
          rep(NBD.REP_INFO, info);
          rep(NBD.REP_ACK);
          break;
        }
        if (opt === NBD.OPT_SET_META_CONTEXT) {
          const m = Buffer.concat([Buffer.from([0, 0, 0, 7]), Buffer.from('base:allocation')]);
          rep(NBD.REP_META_CONTEXT, m);
        }
        rep(NBD.REP_ACK);
      }
      for (;;) {
        const q = await r.read(28);
        onRequest(s, {
          type: q.readUInt16BE(6),
          cookie: q.subarray(8, 16),
          offset: Number(q.readBigUInt64BE(16)),
          length: q.readUInt32BE(24),
        });
      }
    })().catch(() => undefined);
  });
  await new Promise<void>((r) => server?.listen(path, r));
  return path;
}

function chunk(req: Request, flags: number, type: number, payload: Buffer): Buffer {
  const h = Buffer.alloc(20);
  h.writeUInt32BE(NBD.STRUCTURED_REPLY_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  req.cookie.copy(h, 8);
  h.writeUInt32BE(payload.length, 16);
  return Buffer.concat([h, payload]);
}

function offsetData(req: Request, at: number, data: Buffer, done = true): Buffer {
  const off = Buffer.alloc(8);
  off.writeBigUInt64BE(BigInt(at));
  return chunk(
    req,
    done ? NBD.REPLY_FLAG_DONE : 0,
    NBD.REPLY_TYPE_OFFSET_DATA,
    Buffer.concat([off, data]),
  );
}

async function code(p: Promise<unknown>): Promise<string> {
  return p.then(
    () => 'success',
    (e: unknown) => (isLifeboatError(e) ? e.code : String(e)),
  );
}

describe('NbdClient refuses protocol violations', () => {
  it('rejects a server that is not NBD', async () => {
    const path = await fake(() => undefined, Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n'));
    expect(await code(NbdClient.connect({ path }))).toBe('LB_NBD_HANDSHAKE');
  });

  it('rejects a truncated greeting as a lost connection', async () => {
    const path = await fake(() => undefined, Buffer.from('NBDMAG'));
    // The fake then waits for client flags that never come: close it from our side.
    const p = code(NbdClient.connect({ path }, { connectTimeoutMs: 500 }));
    expect(await p).toBe('LB_NBD_CONNECT');
  });

  it('works with a well-behaved fake (sanity check of the fake itself)', async () => {
    const path = await fake((s, req) =>
      s.write(offsetData(req, req.offset, Buffer.alloc(req.length, 9))),
    );
    const c = await NbdClient.connect({ path });
    expect((await c.readAt(100, 50)).equals(Buffer.alloc(50, 9))).toBe(true);
    await c.close();
  });

  it('assembles a read from hole and data chunks in any order', async () => {
    const path = await fake((s, req) => {
      const hole = Buffer.alloc(12);
      hole.writeBigUInt64BE(BigInt(req.offset), 0);
      hole.writeUInt32BE(100, 8);
      s.write(offsetData(req, req.offset + 100, Buffer.alloc(req.length - 100, 0xee), false));
      s.write(chunk(req, NBD.REPLY_FLAG_DONE, NBD.REPLY_TYPE_OFFSET_HOLE, hole));
    });
    const c = await NbdClient.connect({ path });
    const got = await c.readAt(1000, 300);
    expect(got.subarray(0, 100).equals(Buffer.alloc(100))).toBe(true);
    expect(got.subarray(100).equals(Buffer.alloc(200, 0xee))).toBe(true);
    await c.close();
  });

  it('fails on a bad reply magic and on an unknown cookie', async () => {
    let path = await fake((s) => s.write(Buffer.alloc(20, 0x55)));
    let c = await NbdClient.connect({ path });
    expect(await code(c.readAt(0, 10))).toBe('LB_NBD_PROTOCOL');
    expect(await code(c.readAt(0, 10))).toBe('LB_NBD_PROTOCOL');
    c.destroy();
    await new Promise<void>((r) => server?.close(() => r()));
    path = await fake((s, req) => {
      const bad = { ...req, cookie: Buffer.from('deadbeefdeadbeef', 'hex') };
      s.write(offsetData(bad, req.offset, Buffer.alloc(req.length)));
    });
    c = await NbdClient.connect({ path });
    expect(await code(c.readAt(0, 10))).toBe('LB_NBD_PROTOCOL');
    c.destroy();
  });

  it('fails a read whose chunks do not cover the range, or overrun it', async () => {
    let path = await fake((s, req) =>
      s.write(offsetData(req, req.offset, Buffer.alloc(req.length - 1))),
    );
    let c = await NbdClient.connect({ path });
    expect(await code(c.readAt(0, 10))).toBe('LB_NBD_PROTOCOL');
    c.destroy();
    await new Promise<void>((r) => server?.close(() => r()));
    path = await fake((s, req) =>
      s.write(offsetData(req, req.offset + 5, Buffer.alloc(req.length))),
    );
    c = await NbdClient.connect({ path });
    expect(await code(c.readAt(0, 10))).toBe('LB_NBD_PROTOCOL');
    c.destroy();
  });

  it('treats a reply cut short by a closed connection as lost, never as data', async () => {
    const path = await fake((s, req) => {
      const full = offsetData(req, req.offset, Buffer.alloc(req.length, 1));
      s.end(full.subarray(0, full.length - 3));
    });
    const c = await NbdClient.connect({ path });
    expect(await code(c.readAt(0, 4096))).toBe('LB_NBD_CONNECTION_LOST');
    c.destroy();
  });

  it('keeps the server error message of an error chunk', async () => {
    const path = await fake((s, req) => {
      const msg = Buffer.from('bad sector');
      const p = Buffer.alloc(6 + msg.length + 8);
      p.writeUInt32BE(NBD.EIO, 0);
      p.writeUInt16BE(msg.length, 4);
      msg.copy(p, 6);
      p.writeBigUInt64BE(BigInt(req.offset + 3), 6 + msg.length);
      // Data for the range first, then the error: the read must still fail.
      s.write(offsetData(req, req.offset, Buffer.alloc(req.length), false));
      s.write(chunk(req, NBD.REPLY_FLAG_DONE, NBD.REPLY_TYPE_ERROR_OFFSET, p));
    });
    const c = await NbdClient.connect({ path });
    const err = await c.readAt(8, 10).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(isLifeboatError(err, 'LB_NBD_IO')).toBe(true);
    expect(isLifeboatError(err) && err.details).toMatchObject({
      serverMessage: 'bad sector',
      errorOffset: 11,
    });
    // The connection survives a request error.
    await c.close();
  });

  it('fails block status with a zero-length extent or a malformed chunk', async () => {
    const path = await fake((s, req) => {
      const p = Buffer.alloc(4 + 8);
      p.writeUInt32BE(7, 0);
      p.writeUInt32BE(0, 4);
      s.write(chunk(req, NBD.REPLY_FLAG_DONE, NBD.REPLY_TYPE_BLOCK_STATUS, p));
    });
    const c = await NbdClient.connect({ path }, { metaContexts: ['base:allocation'] });
    expect(await code(c.blockStatus('base:allocation', 0, 4096))).toBe('LB_NBD_PROTOCOL');
    c.destroy();
  });

  it('refuses an oversized chunk before reading it', async () => {
    const path = await fake((s, req) => {
      const h = chunk(req, NBD.REPLY_FLAG_DONE, NBD.REPLY_TYPE_OFFSET_DATA, Buffer.alloc(0));
      h.writeUInt32BE(0xfffffff0, 16);
      s.write(h);
    });
    const c = await NbdClient.connect({ path });
    expect(await code(c.readAt(0, 10))).toBe('LB_NBD_PROTOCOL');
    c.destroy();
  });
});
