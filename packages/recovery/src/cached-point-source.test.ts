import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LifeboatError } from '@lifeboat/protocol';
import { DirectoryBackend, Store, type PointInfo, type PointReader } from '@lifeboat/store';
import { CachedPointSource } from './cached-point-source.js';

const CS = 65536;
let dir: string;
let store: Store;
let point: PointInfo;
const data = randomBytes(32 * CS);

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lb-cache-'));
  store = await Store.init({
    backend: new DirectoryBackend({ path: dir }),
    passphrase: 'p',
    kdfCost: 1024,
  });
  const s = await store.beginWrite({ machine: 'm', disk: 'd', size: data.length, base: null });
  await s.write(0, data);
  point = await s.commit();
});
afterAll(async () => {
  await store.close();
  await rm(dir, { recursive: true, force: true });
});

describe('CachedPointSource', () => {
  it('serves any range byte-exact and reads each chunk from the store once while it is cached', async () => {
    const src = new CachedPointSource(await store.openPoint(point.id), {
      blockSize: CS,
      readAheadBlocks: 0,
    });
    for (const [off, len] of [
      [0, 1],
      [CS - 10, 20],
      [5 * CS + 7, 3 * CS],
      [data.length - 4096, 4096],
    ] as const) {
      expect((await src.readAt(off, len)).equals(data.subarray(off, off + len))).toBe(true);
    }
    const misses = src.misses;
    await src.readAt(5 * CS, CS);
    expect(src.misses).toBe(misses);
    expect(src.hits).toBeGreaterThan(0);
  });

  it('reads ahead once reads are sequential, and keeps within its cache size', async () => {
    const src = new CachedPointSource(await store.openPoint(point.id), {
      blockSize: CS,
      cacheBytes: 8 * CS,
      readAheadBlocks: 4,
    });
    const out: Buffer[] = [];
    for (let off = 0; off < 16 * CS; off += CS / 2) {
      out.push(await src.readAt(off, CS / 2));
    }
    expect(Buffer.concat(out).equals(data.subarray(0, 16 * CS))).toBe(true);
    // With read-ahead, most blocks were already in memory when the reader reached them.
    expect(src.hits).toBeGreaterThan(16);
    const missesBefore = src.misses;
    await src.readAt(0, 1); // evicted long ago: 8 blocks of cache
    expect(src.misses).toBe(missesBefore + 1);
  });

  it('passes a store error through (never zeros) and records point and range', async () => {
    const real = await store.openPoint(point.id);
    const failing: PointReader = {
      ...real,
      point: real.point,
      size: real.size,
      extents: () => real.extents(),
      readAt: async (offset, length) => {
        if (offset < 3 * CS && offset + length > 2 * CS) {
          throw new LifeboatError('LB_STORE_CORRUPT_CHUNK', 'damaged', { details: { offset } });
        }
        return real.readAt(offset, length);
      },
      readInto: async (offset, target) => {
        if (offset < 3 * CS && offset + target.length > 2 * CS) {
          throw new LifeboatError('LB_STORE_CORRUPT_CHUNK', 'damaged', { details: { offset } });
        }
        return real.readInto(offset, target);
      },
    };
    const faults: unknown[] = [];
    const src = new CachedPointSource(failing, { blockSize: CS, onFault: (f) => faults.push(f) });
    await expect(src.readAt(2 * CS + 100, 10)).rejects.toMatchObject({
      code: 'LB_STORE_CORRUPT_CHUNK',
    });
    expect(src.faults).toEqual([
      {
        pointId: point.id,
        offset: 2 * CS + 100,
        length: 10,
        code: 'LB_STORE_CORRUPT_CHUNK',
        message: 'damaged',
      },
    ]);
    expect(faults).toHaveLength(1);
    // A failed block is not cached: the next read asks the store again (and fails again).
    await expect(src.readAt(2 * CS, 1)).rejects.toMatchObject({ code: 'LB_STORE_CORRUPT_CHUNK' });
    expect((await src.readAt(CS, CS)).equals(data.subarray(CS, 2 * CS))).toBe(true);
  });
  it('fails a read the store never answers after its timeout, and asks the store again next time', async () => {
    const real = await store.openPoint(point.id);
    // A store that stops answering for reads of chunk 4, until it comes back.
    let hung = true;
    const stuck: Array<() => void> = [];
    const hanging: PointReader = {
      ...real,
      point: real.point,
      size: real.size,
      extents: () => real.extents(),
      readAt: (offset, length) => real.readAt(offset, length),
      readInto: async (offset, target) => {
        if (hung && offset <= 4 * CS && offset + target.length > 4 * CS) {
          await new Promise<void>((resolve) => stuck.push(resolve));
        }
        return real.readInto(offset, target);
      },
    };
    const faults: Array<{ code: string }> = [];
    const src = new CachedPointSource(hanging, {
      blockSize: CS,
      readAheadBlocks: 0,
      readTimeoutMs: 200,
      onFault: (f) => faults.push(f),
    });
    const started = Date.now();
    await expect(src.readAt(4 * CS + 10, 100)).rejects.toMatchObject({
      code: 'LB_RECOVERY_READ_TIMEOUT',
      details: { pointId: point.id, offset: 4 * CS, length: CS, timeoutMs: 200 },
    });
    expect(Date.now() - started).toBeGreaterThanOrEqual(190);
    expect(faults.map((f) => f.code)).toEqual(['LB_RECOVERY_READ_TIMEOUT']);
    // Other blocks are served meanwhile.
    expect((await src.readAt(CS, CS)).equals(data.subarray(CS, 2 * CS))).toBe(true);
    // The store answers again: the timed-out block is read anew, byte-exact, not from the hung read.
    hung = false;
    expect((await src.readAt(4 * CS, CS)).equals(data.subarray(4 * CS, 5 * CS))).toBe(true);
    for (const release of stuck) release();
  });
});
