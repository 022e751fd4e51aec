import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isLifeboatError, type LifeboatError } from '@lifeboat/protocol';
import { NbdClient, type NbdExtent } from './nbd-client.js';
import { BASE_ALLOCATION, NBD, dirtyBitmapContext } from './nbd-constants.js';
import { run, startUntilSocket, type TestChild } from './test-children.js';

const KiB = 1024;
const MiB = 1024 * KiB;

let dir: string;
const children: TestChild[] = [];

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lifeboat-nbd-client-'));
});
afterAll(async () => {
  await Promise.all(children.map((c) => c.stop()));
  await rm(dir, { recursive: true, force: true });
});

async function start(cmd: string, args: string[], sock: string): Promise<TestChild> {
  const c = await startUntilSocket(cmd, args, sock);
  children.push(c);
  return c;
}

async function expectCode(p: Promise<unknown>, code: string): Promise<LifeboatError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!isLifeboatError(err, code)) {
    throw new Error(`expected ${code}, got ${err === undefined ? 'success' : String(err)}`);
  }
  return err;
}

/** The image's bytes as QEMU itself reads them. */
async function qemuRead(image: string): Promise<Buffer> {
  const raw = `${image}.${Date.now()}.raw`;
  await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, raw]);
  const b = await readFile(raw);
  await rm(raw);
  return b;
}

describe('NbdClient against qemu-nbd', () => {
  let image: string;
  let sock: string;
  let expected: Buffer;

  beforeAll(async () => {
    image = join(dir, 'a.qcow2');
    sock = join(dir, 'a.sock');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', image, '4M']);
    await run('qemu-img', ['bitmap', '--add', image, 'b0']);
    await run('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'write -P 0xab 0 64k',
      '-c',
      'write -P 0xcd 1M 128k',
      '-c',
      'write -z 2M 64k',
      '-c',
      'write -P 0x11 3M 4k',
      image,
    ]);
    expected = Buffer.alloc(4 * MiB);
    expected.fill(0xab, 0, 64 * KiB);
    expected.fill(0xcd, MiB, MiB + 128 * KiB);
    expected.fill(0x11, 3 * MiB, 3 * MiB + 4 * KiB);
    await start(
      'qemu-nbd',
      ['--persistent', '--shared=8', '-f', 'qcow2', '-x', 'disk', '-B', 'b0', '-k', sock, image],
      sock,
    );
  });

  it('lists the export and describes it', async () => {
    const list = await NbdClient.listExports({ path: sock });
    expect(list.map((e) => e.name)).toEqual(['disk']);
    const info = await NbdClient.info({ path: sock }, 'disk');
    expect(info.size).toBe(4 * MiB);
    expect(info.blockSize.minimum).toBeGreaterThanOrEqual(1);
    const contexts = await NbdClient.listMetaContexts({ path: sock }, 'disk');
    expect(contexts).toContain(BASE_ALLOCATION);
    expect(contexts).toContain(dirtyBitmapContext('b0'));
  });

  it('reads the bytes QEMU wrote, whole and in small pipelined pieces', async () => {
    const c = await NbdClient.connect(
      { path: sock },
      { exportName: 'disk', maxRequestBytes: 64 * KiB },
    );
    try {
      expect(c.size).toBe(4 * MiB);
      expect(c.structuredReplies).toBe(true);
      expect((await c.readAt(0, 4 * MiB)).equals(expected)).toBe(true);
      const pieces = await Promise.all(
        [0, 1, 2, 3].map((i) => c.readAt(i * MiB + 4096, 300 * KiB)),
      );
      pieces.forEach((p, i) =>
        expect(p.equals(expected.subarray(i * MiB + 4096, i * MiB + 4096 + 300 * KiB))).toBe(true),
      );
    } finally {
      await c.close();
    }
  });

  it('reads over simple replies too', async () => {
    const c = await NbdClient.connect(
      { path: sock },
      { exportName: 'disk', structuredReplies: false },
    );
    try {
      expect(c.structuredReplies).toBe(false);
      expect(
        (await c.readAt(MiB - 512, 2 * KiB)).equals(expected.subarray(MiB - 512, MiB + 1536)),
      ).toBe(true);
    } finally {
      await c.close();
    }
  });

  it('reports allocation (data, zero, hole) and the dirty bitmap', async () => {
    const bitmap = dirtyBitmapContext('b0');
    const c = await NbdClient.connect(
      { path: sock },
      { exportName: 'disk', metaContexts: [BASE_ALLOCATION, bitmap] },
    );
    try {
      const alloc: NbdExtent[] = [];
      for await (const e of c.extents(BASE_ALLOCATION)) alloc.push(e);
      // Extents tile the whole export.
      expect(alloc[0]?.offset).toBe(0);
      expect(alloc.reduce((s, e) => s + e.length, 0)).toBe(4 * MiB);
      const flagsAt = (off: number): number =>
        alloc.find((e) => e.offset <= off && off < e.offset + e.length)?.flags ?? -1;
      expect(flagsAt(0)).toBe(0);
      expect(flagsAt(MiB + 64 * KiB)).toBe(0);
      expect(flagsAt(512 * KiB) & NBD.STATE_ZERO).toBe(NBD.STATE_ZERO);
      expect(flagsAt(512 * KiB) & NBD.STATE_HOLE).toBe(NBD.STATE_HOLE);
      expect(flagsAt(2 * MiB) & NBD.STATE_ZERO).toBe(NBD.STATE_ZERO);
      expect(flagsAt(3 * MiB)).toBe(0);

      const dirty: number[][] = [];
      for await (const e of c.extents(bitmap))
        if (e.flags & NBD.STATE_DIRTY) dirty.push([e.offset, e.length]);
      // qcow2's default bitmap granularity is 64 KiB: the 4 KiB write dirties one whole granule.
      expect(dirty).toEqual([
        [0, 64 * KiB],
        [MiB, 128 * KiB],
        [2 * MiB, 64 * KiB],
        [3 * MiB, 64 * KiB],
      ]);
      // Every dirty extent read with reads ahead, in order, in pieces.
      const dirtyRanges = (async function* () {
        for await (const e of c.extents(bitmap)) if (e.flags & NBD.STATE_DIRTY) yield e;
      })();
      const pieces: { offset: number; data: Buffer }[] = [];
      for await (const p of c.readRanges(dirtyRanges, { pieceBytes: 48 * KiB, readAhead: 3 })) {
        pieces.push(p);
      }
      expect(pieces.reduce((s, p) => s + p.data.length, 0)).toBe(320 * KiB);
      for (const p of pieces) {
        expect(p.data.length).toBeLessThanOrEqual(48 * KiB);
        expect(p.data.equals(expected.subarray(p.offset, p.offset + p.data.length))).toBe(true);
      }
      expect(pieces.map((p) => p.offset)).toEqual(
        [...pieces.map((p) => p.offset)].sort((a, b) => a - b),
      );
      // A range in the middle is clipped to what was asked.
      const part = await c.blockStatus(BASE_ALLOCATION, 32 * KiB, 64 * KiB);
      expect(part[0]).toEqual({ offset: 32 * KiB, length: 32 * KiB, flags: 0 });
      expect(part.reduce((s, e) => s + e.length, 0)).toBeLessThanOrEqual(64 * KiB);
    } finally {
      await c.close();
    }
  });

  it('refuses an unknown export, a missing bitmap and a context it did not negotiate', async () => {
    await expectCode(
      NbdClient.connect({ path: sock }, { exportName: 'nope' }),
      'LB_NBD_EXPORT_UNKNOWN',
    );
    await expectCode(
      NbdClient.connect(
        { path: sock },
        { exportName: 'disk', metaContexts: [dirtyBitmapContext('gone')] },
      ),
      'LB_NBD_META_CONTEXT_UNAVAILABLE',
    );
    const c = await NbdClient.connect({ path: sock }, { exportName: 'disk' });
    try {
      await expectCode(c.blockStatus(BASE_ALLOCATION, 0, 4096), 'LB_NBD_META_CONTEXT_UNAVAILABLE');
      await expectCode(c.readAt(4 * MiB - 10, 20), 'LB_NBD_BAD_ARGUMENT');
      await expectCode(c.readAt(-1, 20), 'LB_NBD_BAD_ARGUMENT');
    } finally {
      await c.close();
    }
    await expectCode(c.readAt(0, 10), 'LB_NBD_CLOSED');
    await expectCode(NbdClient.connect({ path: join(dir, 'no-such.sock') }), 'LB_NBD_CONNECT');
  });
});

describe('NbdClient writes to qemu-nbd', () => {
  it('writes with and without FUA, writes zeroes, trims and flushes; QEMU reads the result', async () => {
    const image = join(dir, 'w.qcow2');
    const sock = join(dir, 'w.sock');
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', image, '2M']);
    await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x77 0 2M', image]);
    const q = await start(
      'qemu-nbd',
      ['--persistent', '--shared=4', '-f', 'qcow2', '--discard=unmap', '-k', sock, image],
      sock,
    );
    const c = await NbdClient.connect({ path: sock }, { maxRequestBytes: 128 * KiB });
    const expected = Buffer.alloc(2 * MiB, 0x77);
    try {
      expect(c.readOnly).toBe(false);
      const a = Buffer.alloc(300 * KiB);
      for (let i = 0; i < a.length; i++) a[i] = (i * 7) & 0xff;
      await c.write(10 * KiB, a);
      a.copy(expected, 10 * KiB);
      await c.write(MiB, Buffer.alloc(4 * KiB, 0x42), { fua: true });
      expected.fill(0x42, MiB, MiB + 4 * KiB);
      await c.writeZeroes(1536 * KiB, 128 * KiB);
      expected.fill(0, 1536 * KiB, 1664 * KiB);
      await c.trim(1920 * KiB, 64 * KiB);
      await c.flush();
      const back = await c.readAt(0, 2 * MiB);
      // A trimmed range may read as anything; compare everything else.
      expect(back.subarray(0, 1920 * KiB).equals(expected.subarray(0, 1920 * KiB))).toBe(true);
    } finally {
      await c.close();
      await q.stop();
    }
    const onDisk = await qemuRead(image);
    expect(onDisk.subarray(0, 1920 * KiB).equals(expected.subarray(0, 1920 * KiB))).toBe(true);
  });
});

describe('NbdClient against nbdkit (error injection)', () => {
  it('surfaces injected read and write errors with codes, never as zeros', async () => {
    const sock = join(dir, 'err.sock');
    await start(
      'nbdkit',
      [
        '-f',
        '-U',
        sock,
        '--filter=error',
        'memory',
        '1M',
        'error=EIO',
        'error-pread-rate=100%',
        'error-pwrite=ENOSPC',
        'error-pwrite-rate=100%',
      ],
      sock,
    );
    const c = await NbdClient.connect({ path: sock });
    try {
      const e = await expectCode(c.readAt(4096, 8192), 'LB_NBD_IO');
      expect(e.details['errnoName']).toBe('EIO');
      await expectCode(c.write(0, Buffer.alloc(4096, 1)), 'LB_NBD_NO_SPACE');
      const all = async (): Promise<void> => {
        for await (const _ of c.readRanges([{ offset: 0, length: 64 * 1024 }], {
          pieceBytes: 4096,
        })) {
          throw new Error('a piece was yielded although every read fails');
        }
      };
      await expectCode(all(), 'LB_NBD_IO');
      // The connection stays usable after request errors.
      await expectCode(c.readAt(0, 512), 'LB_NBD_IO');
    } finally {
      await c.close();
    }
  });

  it('maps EPERM from a read-only export', async () => {
    const sock = join(dir, 'ro.sock');
    await start('nbdkit', ['-f', '-r', '-U', sock, 'memory', '1M'], sock);
    const c = await NbdClient.connect({ path: sock });
    try {
      expect(c.readOnly).toBe(true);
      await expectCode(c.write(0, Buffer.alloc(512)), 'LB_NBD_PERMISSION');
      expect((await c.readAt(0, 512)).equals(Buffer.alloc(512))).toBe(true);
    } finally {
      await c.close();
    }
  });

  it('rejects every request in flight when the server dies, without hanging', async () => {
    const sock = join(dir, 'slow.sock');
    const k = await start(
      'nbdkit',
      ['-f', '-U', sock, '--filter=delay', 'memory', '1M', 'rdelay=30'],
      sock,
    );
    const c = await NbdClient.connect({ path: sock });
    const reads = [0, 1, 2, 3].map((i) => c.readAt(i * 4096, 4096));
    const settled = Promise.allSettled(reads);
    // Give the requests time to reach the server, then kill it under them.
    await new Promise((r) => setTimeout(r, 300));
    await k.stop();
    const results = await settled;
    for (const r of results) {
      expect(r.status).toBe('rejected');
      expect(isLifeboatError((r as PromiseRejectedResult).reason, 'LB_NBD_CONNECTION_LOST')).toBe(
        true,
      );
    }
    await expectCode(c.readAt(0, 512), 'LB_NBD_CONNECTION_LOST');
    c.destroy();
  });
});

describe('NbdClient against qemu-nbd writing back a test file', () => {
  it('reads a raw file exported by qemu-nbd byte for byte', async () => {
    const raw = join(dir, 'r.img');
    const data = Buffer.alloc(3 * MiB + 512);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE(i, i);
    await writeFile(raw, data);
    const sock = join(dir, 'r.sock');
    const q = await start('qemu-nbd', ['--persistent', '-r', '-f', 'raw', '-k', sock, raw], sock);
    const c = await NbdClient.connect({ path: sock });
    try {
      expect(c.size).toBe(data.length);
      expect((await c.readAt(0, data.length)).equals(data)).toBe(true);
    } finally {
      await c.close();
      await q.stop();
    }
  });
});

describe('NbdClient honours server limits', () => {
  /** nbdkit's pattern plugin: each 8-byte word holds its own offset, big-endian. */
  function pattern(offset: number, length: number): Buffer {
    const start = offset - (offset % 8);
    const b = Buffer.alloc(Math.ceil((offset + length - start) / 8) * 8);
    for (let i = 0; i < b.length; i += 8) b.writeBigUInt64BE(BigInt(start + i), i);
    return b.subarray(offset - start, offset - start + length);
  }

  it('keeps to the advertised block sizes (the server errors on any violation)', async () => {
    const sock = join(dir, 'bs.sock');
    await start(
      'nbdkit',
      [
        '-f',
        '-U',
        sock,
        '--filter=blocksize-policy',
        'memory',
        '1M',
        'blocksize-minimum=4096',
        'blocksize-preferred=4096',
        'blocksize-maximum=65536',
        'blocksize-error-policy=error',
      ],
      sock,
    );
    const c = await NbdClient.connect({ path: sock });
    try {
      expect(c.blockSize).toEqual({ minimum: 4096, preferred: 4096, maximum: 65536 });
      // One 1 MiB write: split into pieces of at most the maximum.
      await c.write(0, pattern(0, MiB));
      // Unaligned and bigger than the maximum: served from aligned, split requests.
      expect((await c.readAt(1000, 200_000)).equals(pattern(1000, 200_000))).toBe(true);
      expect((await c.readAt(MiB - 10, 10)).equals(pattern(MiB - 10, 10))).toBe(true);
      await expectCode(c.write(100, Buffer.alloc(10)), 'LB_NBD_BAD_ARGUMENT');
    } finally {
      await c.close();
    }
  });

  it('drops a connection whose server stops answering, with LB_NBD_TIMEOUT', async () => {
    const sock = join(dir, 'stuck.sock');
    await start('nbdkit', ['-f', '-U', sock, '--filter=delay', 'memory', '1M', 'rdelay=30'], sock);
    const c = await NbdClient.connect({ path: sock }, { requestTimeoutMs: 300 });
    const a = c.readAt(0, 512);
    const b = c.readAt(4096, 512);
    await expectCode(a, 'LB_NBD_TIMEOUT');
    await expectCode(b, 'LB_NBD_TIMEOUT');
    c.destroy();
  });
});
