import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LifeboatError, isLifeboatError } from '@lifeboat/protocol';
import { NbdClient, type NbdExtent } from './nbd-client.js';
import { BASE_ALLOCATION, NBD } from './nbd-constants.js';
import { exportSourceFromReader, type NbdExportSource } from './nbd-export-source.js';
import { NbdServer, type NbdSourceErrorContext } from './nbd-server.js';
import { SocketReader } from './socket-reader.js';
import { run } from './test-children.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 8 * MiB;

let dir: string;
let sock: string;
let server: NbdServer;
let disk: Buffer;
const sourceErrors: NbdSourceErrorContext[] = [];

/** A sparse disk: data at [0,1M) and [5M,5M+192K), zeros elsewhere; an extent map to match. */
function makeDisk(): { buf: Buffer; map: { offset: number; length: number; zero: boolean }[] } {
  const buf = Buffer.alloc(SIZE);
  for (let i = 0; i < MiB; i += 4) buf.writeUInt32LE((i * 2654435761) >>> 0, i);
  buf.fill(0x5c, 5 * MiB, 5 * MiB + 192 * KiB);
  return {
    buf,
    map: [
      { offset: 0, length: MiB, zero: false },
      { offset: MiB, length: 4 * MiB, zero: true },
      { offset: 5 * MiB, length: 192 * KiB, zero: false },
      { offset: 5 * MiB + 192 * KiB, length: SIZE - 5 * MiB - 192 * KiB, zero: true },
    ],
  };
}

/** A source that fails reads touching [2M, 2M+4K) and reads slowly at 7M. */
function brokenSource(buf: Buffer): NbdExportSource {
  return {
    size: buf.length,
    readAt: async (offset, length) => {
      if (offset < 2 * MiB + 4 * KiB && offset + length > 2 * MiB) {
        throw new LifeboatError('LB_STORE_CORRUPT_CHUNK_TEST', 'chunk failed its check');
      }
      if (offset === 7 * MiB) await new Promise((r) => setTimeout(r, 300));
      return buf.subarray(offset, offset + length);
    },
  };
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lifeboat-nbd-server-'));
  sock = join(dir, 'srv.sock');
  const d = makeDisk();
  disk = d.buf;
  server = new NbdServer({ onSourceError: (_e, where) => sourceErrors.push(where) });
  // The store's PointReader shape: whole-disk extents() and readAt().
  server.addExport(
    'point',
    exportSourceFromReader({
      size: SIZE,
      readAt: (o, l) => Promise.resolve(disk.subarray(o, o + l)),
      extents: async function* () {
        yield* d.map;
      },
    }),
    { description: 'a recovery point' },
  );
  server.addExport('broken', brokenSource(disk));
  await server.listen({ path: sock });
  await writeFile(join(dir, 'expected.raw'), disk);
});

afterAll(async () => {
  await server.close();
  await rm(dir, { recursive: true, force: true });
});

const uri = (name: string): string => `nbd+unix:///${name}?socket=${sock}`;

async function fails(p: Promise<unknown>): Promise<string> {
  return p.then(
    () => 'success',
    (e: unknown) => (isLifeboatError(e) ? e.code : String(e)),
  );
}

describe('NbdServer with QEMU and libnbd clients', () => {
  it('qemu-img reads the size, compares and converts byte for byte', async () => {
    const info = JSON.parse(await run('qemu-img', ['info', '--output=json', uri('point')])) as {
      'virtual-size': number;
    };
    expect(info['virtual-size']).toBe(SIZE);
    await run('qemu-img', [
      'compare',
      '-f',
      'raw',
      '-F',
      'raw',
      uri('point'),
      join(dir, 'expected.raw'),
    ]);
    const out = join(dir, 'converted.raw');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri('point'), out]);
    expect((await readFile(out)).equals(disk)).toBe(true);
  });

  it('qemu-io -r verifies patterns through the export', async () => {
    const out = await run('qemu-io', [
      '-r',
      '-f',
      'raw',
      '-c',
      'read -P 0x5c 5M 192k',
      '-c',
      'read -P 0 6M 64k',
      uri('point'),
    ]);
    expect(out).not.toMatch(/fail/i);
    // Prove qemu-io would notice a wrong pattern, so the check above can fail.
    const bad = await run('qemu-io', [
      '-r',
      '-f',
      'raw',
      '-c',
      'read -P 0x5d 5M 4k',
      uri('point'),
    ]).then(
      (o) => o,
      (e: unknown) => String(e),
    );
    expect(bad).toMatch(/Pattern verification failed/);
  });

  it('nbdinfo lists the exports and maps holes; nbdcopy copies the bytes', async () => {
    const list = await run('nbdinfo', ['--list', '--json', `nbd+unix://?socket=${sock}`]);
    const names = (
      JSON.parse(list) as { exports: { 'export-name': string; description?: string }[] }
    ).exports;
    expect(names.map((e) => e['export-name']).sort()).toEqual(['broken', 'point']);
    const map = JSON.parse(await run('nbdinfo', ['--map', '--json', uri('point')])) as {
      offset: number;
      length: number;
      type: number;
    }[];
    expect(map).toEqual([
      { offset: 0, length: MiB, type: 0, description: 'data' },
      { offset: MiB, length: 4 * MiB, type: 3, description: 'hole,zero' },
      { offset: 5 * MiB, length: 192 * KiB, type: 0, description: 'data' },
      {
        offset: 5 * MiB + 192 * KiB,
        length: SIZE - 5 * MiB - 192 * KiB,
        type: 3,
        description: 'hole,zero',
      },
    ]);
    const out = join(dir, 'copied.raw');
    await run('nbdcopy', [uri('point'), out]);
    expect((await readFile(out)).equals(disk)).toBe(true);
  });

  it('backs a qcow2 overlay that takes the writes, as a recovery boot does', async () => {
    const overlay = join(dir, 'boot.qcow2');
    await run('qemu-img', [
      'create',
      '-q',
      '-f',
      'qcow2',
      '-F',
      'raw',
      '-b',
      uri('point'),
      overlay,
    ]);
    await run('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'write -P 0x99 5M 64k',
      '-c',
      'write -P 0x98 2M 4k',
      overlay,
    ]);
    const expected = Buffer.from(disk);
    expected.fill(0x99, 5 * MiB, 5 * MiB + 64 * KiB);
    expected.fill(0x98, 2 * MiB, 2 * MiB + 4 * KiB);
    const out = join(dir, 'boot.raw');
    await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', overlay, out]);
    expect((await readFile(out)).equals(expected)).toBe(true);
    // The export itself is untouched.
    await run('qemu-img', [
      'compare',
      '-f',
      'raw',
      '-F',
      'raw',
      uri('point'),
      join(dir, 'expected.raw'),
    ]);
  });

  it('a source read error reaches QEMU as an I/O error, never as zeros', async () => {
    const out = join(dir, 'broken.raw');
    const err = await run('qemu-img', [
      'convert',
      '-f',
      'raw',
      '-O',
      'raw',
      uri('broken'),
      out,
    ]).then(
      () => 'converted',
      (e: unknown) => String(e),
    );
    expect(err).toMatch(/Input\/output error/);
    expect(sourceErrors.some((w) => w.exportName === 'broken' && w.operation === 'read')).toBe(
      true,
    );
  });
});

describe('NbdServer with the project client', () => {
  it('serves reads, block status and several connections at once, over UNIX and TCP', async () => {
    const tcp = new NbdServer();
    tcp.addExport('point', {
      size: SIZE,
      readAt: (o, l) => Promise.resolve(disk.subarray(o, o + l)),
    });
    const addr = await tcp.listen({ host: '127.0.0.1', port: 0 });
    try {
      expect('port' in addr && addr.port > 0).toBe(true);
      const port = 'port' in addr ? addr.port : 0;
      // QEMU's own client over TCP.
      await run('qemu-img', [
        'compare',
        '-f',
        'raw',
        '-F',
        'raw',
        `nbd://127.0.0.1:${port}/point`,
        join(dir, 'expected.raw'),
      ]);
      const clients = await Promise.all([
        NbdClient.connect({ path: sock }, { exportName: 'point', metaContexts: [BASE_ALLOCATION] }),
        NbdClient.connect({ path: sock }, { exportName: 'point', structuredReplies: false }),
        NbdClient.connect(addr, { exportName: 'point', metaContexts: [BASE_ALLOCATION] }),
      ]);
      const [a, b, c] = clients as [NbdClient, NbdClient, NbdClient];
      expect(a.readOnly).toBe(true);
      expect(server.connections).toBeGreaterThanOrEqual(2);
      const reads = await Promise.all([
        a.readAt(0, SIZE),
        b.readAt(MiB - 100, 300),
        c.readAt(0, SIZE),
      ]);
      expect(reads[0].equals(disk)).toBe(true);
      expect(reads[1].equals(disk.subarray(MiB - 100, MiB + 200))).toBe(true);
      expect(reads[2].equals(disk)).toBe(true);
      const ext: NbdExtent[] = [];
      for await (const e of a.extents(BASE_ALLOCATION)) ext.push(e);
      expect(ext.map((e) => [e.offset, e.length, e.flags])).toEqual([
        [0, MiB, 0],
        [MiB, 4 * MiB, 3],
        [5 * MiB, 192 * KiB, 0],
        [5 * MiB + 192 * KiB, SIZE - 5 * MiB - 192 * KiB, 3],
      ]);
      // Without an extent map the whole range is data.
      const all: NbdExtent[] = [];
      for await (const e of c.extents(BASE_ALLOCATION)) all.push(e);
      expect(all).toEqual([{ offset: 0, length: SIZE, flags: 0 }]);
      expect(await fails(a.write(0, Buffer.alloc(512)))).toBe('LB_NBD_PERMISSION');
      await Promise.all(clients.map((x) => x.close()));
    } finally {
      await tcp.close();
    }
  });

  it('refuses a UNIX socket path longer than the kernel allows instead of truncating it', async () => {
    const long = join(dir, `${'x'.repeat(120)}.sock`);
    const s = new NbdServer();
    expect(await fails(s.listen({ path: long }))).toBe('LB_NBD_LISTEN');
    expect(await fails(NbdClient.connect({ path: long }))).toBe('LB_NBD_CONNECT');
  });

  it('answers a failing read with EIO for that request only', async () => {
    const c = await NbdClient.connect({ path: sock }, { exportName: 'broken' });
    try {
      const bad = c.readAt(2 * MiB, 8 * KiB);
      const good = c.readAt(3 * MiB, 8 * KiB);
      expect(await fails(bad)).toBe('LB_NBD_IO');
      expect((await good).equals(disk.subarray(3 * MiB, 3 * MiB + 8 * KiB))).toBe(true);
    } finally {
      await c.close();
    }
    const s = await NbdClient.connect(
      { path: sock },
      { exportName: 'broken', structuredReplies: false },
    );
    expect(await fails(s.readAt(2 * MiB, 512))).toBe('LB_NBD_IO');
    await s.close();
  });

  it('lists exports and meta contexts, refuses unknown exports', async () => {
    const list = await NbdClient.listExports({ path: sock });
    expect(list).toContainEqual({ name: 'point', description: 'a recovery point' });
    expect(await NbdClient.listMetaContexts({ path: sock }, 'point')).toEqual([BASE_ALLOCATION]);
    expect(await fails(NbdClient.connect({ path: sock }, { exportName: 'nope' }))).toBe(
      'LB_NBD_EXPORT_UNKNOWN',
    );
    expect(
      await fails(
        NbdClient.connect(
          { path: sock },
          { exportName: 'point', metaContexts: ['qemu:dirty-bitmap:x'] },
        ),
      ),
    ).toBe('LB_NBD_META_CONTEXT_UNAVAILABLE');
    const info = await NbdClient.info({ path: sock }, 'point');
    expect(info).toMatchObject({ size: SIZE, description: 'a recovery point' });
  });
});

/** A raw connection for sending malformed input. */
class Raw {
  readonly s: Socket;
  readonly r: SocketReader;
  private constructor(s: Socket) {
    this.s = s;
    this.r = new SocketReader(s);
  }
  static async open(flags = NBD.FLAG_C_FIXED_NEWSTYLE | NBD.FLAG_C_NO_ZEROES): Promise<Raw> {
    const s = connect({ path: sock });
    s.on('error', () => undefined);
    await new Promise((r) => s.once('connect', r));
    const raw = new Raw(s);
    const hello = await raw.r.read(18);
    expect(hello.readBigUInt64BE(0)).toBe(NBD.INIT_MAGIC);
    const f = Buffer.alloc(4);
    f.writeUInt32BE(flags);
    s.write(f);
    return raw;
  }
  option(opt: number, data: Buffer, magic: bigint = NBD.OPTS_MAGIC): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(magic, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(data.length, 12);
    this.s.write(Buffer.concat([h, data]));
  }
  async reply(): Promise<{ opt: number; type: number; data: Buffer }> {
    const h = await this.r.read(20);
    expect(h.readBigUInt64BE(0)).toBe(NBD.REP_MAGIC);
    return {
      opt: h.readUInt32BE(8),
      type: h.readUInt32BE(12),
      data: await this.r.read(h.readUInt32BE(16)),
    };
  }
  async go(name: string, structured: boolean): Promise<void> {
    if (structured) {
      this.option(NBD.OPT_STRUCTURED_REPLY, Buffer.alloc(0));
      expect((await this.reply()).type).toBe(NBD.REP_ACK);
    }
    const n = Buffer.from(name);
    const d = Buffer.alloc(4 + n.length + 2);
    d.writeUInt32BE(n.length);
    n.copy(d, 4);
    this.option(NBD.OPT_GO, d);
    for (;;) if ((await this.reply()).type === NBD.REP_ACK) break;
  }
  request(
    type: number,
    offset: number,
    length: number,
    magic: number = NBD.REQUEST_MAGIC,
    flags = 0,
  ): void {
    const q = Buffer.alloc(28);
    q.writeUInt32BE(magic, 0);
    q.writeUInt16BE(flags, 4);
    q.writeUInt16BE(type, 6);
    q.writeBigUInt64BE(42n, 8);
    q.writeBigUInt64BE(BigInt(offset), 16);
    q.writeUInt32BE(length, 24);
    this.s.write(q);
  }
  /** Resolves when the server closed the connection. */
  async closed(): Promise<boolean> {
    return this.r.read(1).then(
      () => false,
      () => true,
    );
  }
}

describe('NbdServer refuses bad client input and keeps serving', () => {
  it('answers unknown, oversized and malformed options with the right errors', async () => {
    const c = await Raw.open();
    c.option(99, Buffer.from('x'));
    expect((await c.reply()).type).toBe(NBD.REP_ERR_UNSUP);
    c.option(NBD.OPT_STARTTLS, Buffer.alloc(0));
    expect((await c.reply()).type).toBe(NBD.REP_ERR_UNSUP);
    c.option(NBD.OPT_GO, Buffer.alloc(100 * KiB));
    expect((await c.reply()).type).toBe(NBD.REP_ERR_TOO_BIG);
    c.option(NBD.OPT_GO, Buffer.from([0, 0, 0, 200, 1, 2]));
    expect((await c.reply()).type).toBe(NBD.REP_ERR_INVALID);
    c.option(NBD.OPT_LIST, Buffer.from('junk'));
    expect((await c.reply()).type).toBe(NBD.REP_ERR_INVALID);
    c.option(NBD.OPT_SET_META_CONTEXT, Buffer.alloc(8));
    // Meta contexts before structured replies are invalid.
    expect((await c.reply()).type).toBe(NBD.REP_ERR_INVALID);
    const n = Buffer.from('nope');
    const d = Buffer.alloc(4 + n.length + 2);
    d.writeUInt32BE(n.length);
    n.copy(d, 4);
    c.option(NBD.OPT_INFO, d);
    expect((await c.reply()).type).toBe(NBD.REP_ERR_UNKNOWN);
    // Still in negotiation after all that: the export is reachable.
    await c.go('point', true);
    c.request(NBD.CMD_READ, 0, 16);
    const h = await c.r.read(20);
    expect(h.readUInt32BE(0)).toBe(NBD.STRUCTURED_REPLY_MAGIC);
    expect(h.readUInt16BE(6)).toBe(NBD.REPLY_TYPE_OFFSET_DATA);
    expect((await c.r.read(h.readUInt32BE(16))).subarray(8).equals(disk.subarray(0, 16))).toBe(
      true,
    );
    c.request(NBD.CMD_DISC, 0, 0);
    expect(await c.closed()).toBe(true);
  });

  it('hangs up on bad option magic, unknown client flags and a bad request magic', async () => {
    const a = await Raw.open();
    a.option(NBD.OPT_LIST, Buffer.alloc(0), 0x1234n);
    expect(await a.closed()).toBe(true);
    const b = await Raw.open(0x80);
    expect(await b.closed()).toBe(true);
    const ab = await Raw.open();
    ab.option(NBD.OPT_ABORT, Buffer.alloc(0));
    expect((await ab.reply()).type).toBe(NBD.REP_ACK);
    expect(await ab.closed()).toBe(true);
    const c = await Raw.open();
    await c.go('point', false);
    c.request(NBD.CMD_READ, 0, 16, 0xdeadbeef);
    expect(await c.closed()).toBe(true);
  });

  it('answers oversized, out-of-range, write and unknown requests with NBD errors', async () => {
    const c = await Raw.open();
    await c.go('point', false);
    const errnoOf = async (): Promise<number> => {
      const h = await c.r.read(16);
      expect(h.readUInt32BE(0)).toBe(NBD.SIMPLE_REPLY_MAGIC);
      return h.readUInt32BE(4);
    };
    c.request(NBD.CMD_READ, 0, 64 * MiB);
    expect(await errnoOf()).toBe(NBD.EINVAL);
    c.request(NBD.CMD_READ, SIZE - 8, 16);
    expect(await errnoOf()).toBe(NBD.EINVAL);
    c.request(NBD.CMD_READ, Number.MAX_SAFE_INTEGER, 16);
    expect(await errnoOf()).toBe(NBD.EINVAL);
    c.request(NBD.CMD_WRITE, 0, 4);
    c.s.write(Buffer.from('abcd'));
    expect(await errnoOf()).toBe(NBD.EPERM);
    c.request(NBD.CMD_TRIM, 0, 4096);
    expect(await errnoOf()).toBe(NBD.EPERM);
    c.request(NBD.CMD_BLOCK_STATUS, 0, 4096);
    expect(await errnoOf()).toBe(NBD.EINVAL);
    c.request(77, 0, 0);
    expect(await errnoOf()).toBe(NBD.EINVAL);
    c.request(NBD.CMD_FLUSH, 0, 0);
    expect(await errnoOf()).toBe(0);
    c.request(NBD.CMD_READ, 0, 16, NBD.REQUEST_MAGIC, 0x4000);
    expect(await errnoOf()).toBe(NBD.EINVAL);
    c.request(NBD.CMD_READ, 0, 16, NBD.REQUEST_MAGIC, NBD.CMD_FLAG_FUA);
    expect(await errnoOf()).toBe(0);
    expect((await c.r.read(16)).equals(disk.subarray(0, 16))).toBe(true);
    // A write larger than the maximum block size: refused, then the connection ends.
    c.request(NBD.CMD_WRITE, 0, 0x7fffffff);
    expect(await errnoOf()).toBe(NBD.EINVAL);
    expect(await c.closed()).toBe(true);
  });

  it('counts the requests waiting for their source, with the age of the oldest', async () => {
    expect(server.pendingRequests).toEqual({ count: 0, oldestMs: 0 });
    const c = await NbdClient.connect({ path: sock }, { exportName: 'broken' });
    const slow = c.readAt(7 * MiB, 4096); // the source takes 300 ms
    const fast = c.readAt(0, 4096);
    expect((await fast).equals(disk.subarray(0, 4096))).toBe(true);
    await new Promise((r) => setTimeout(r, 120));
    const waiting = server.pendingRequests;
    expect(waiting.count).toBe(1);
    expect(waiting.oldestMs).toBeGreaterThanOrEqual(100);
    expect((await slow).equals(disk.subarray(7 * MiB, 7 * MiB + 4096))).toBe(true);
    expect(server.pendingRequests).toEqual({ count: 0, oldestMs: 0 });
    // A failed read is answered too, and no longer counted.
    await expect(c.readAt(2 * MiB, 4096)).rejects.toThrow();
    expect(server.pendingRequests.count).toBe(0);
    await c.close();
  });

  it('survives a client that vanishes mid-request and one that never finishes the handshake', async () => {
    const c = await Raw.open();
    await c.go('broken', true);
    c.request(NBD.CMD_READ, 7 * MiB, 4096); // slow read on the server side
    c.s.destroy();
    const idle = connect({ path: sock });
    idle.on('error', () => undefined);
    idle.write(Buffer.from('NBD')); // a truncated client flags field, then silence
    await new Promise((r) => setTimeout(r, 400));
    const ok = await NbdClient.connect({ path: sock }, { exportName: 'point' });
    expect((await ok.readAt(5 * MiB, 4096)).equals(disk.subarray(5 * MiB, 5 * MiB + 4096))).toBe(
      true,
    );
    await ok.close();
    idle.destroy();
  });
});
