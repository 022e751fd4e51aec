import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { isLifeboatError } from '@lifeboat/protocol';
import { packKey } from './object-format.js';
import { warmPackBuffer } from './pack-writer.js';
import { BlobType } from './store-crypto.js';
import type { Store } from './store.js';
import type { PointInfo, WriteSession } from './store-types.js';
import { pseudoRandom, tempStore } from './test-support.js';
import type { TempStore } from './test-support.js';

const CS = 4096;
const F = 16;
const LEAVES = 40;
const SIZE = CS * F * LEAVES;
const PACK = 64 * 1024;

let t: TempStore | undefined;
afterEach(async () => {
  vi.restoreAllMocks();
  await t?.cleanup();
  t = undefined;
});

/** A store whose one point fills the whole disk (40 leaves, 3 levels), reopened: no node cached. */
async function based(): Promise<{ store: Store; disk: Buffer; p1: PointInfo }> {
  t = await tempStore({ chunkSize: CS, packSize: PACK, treeFanout: F });
  const disk = pseudoRandom(SIZE, 1);
  const s1 = await t.store.beginWrite({ machine: 'm', disk: 'vda', size: SIZE });
  await s1.write(0, disk);
  const p1 = await s1.commit();
  return { store: await t.reopen(), disk, p1 };
}

/** The session's prefetch, which every store session has (it is optional in the interface). */
function prefetch(
  s: WriteSession,
  ranges: ReadonlyArray<{ offset: number; length: number }>,
): Promise<void> {
  if (s.prefetch === undefined) throw new Error('a store write session has prefetch');
  return s.prefetch(ranges);
}

/** One chunk in every third leaf, as a changed-extents list would give them. */
const changed = Array.from({ length: Math.ceil(LEAVES / 3) }, (_, i) => ({
  offset: (i * 3 * F + 5) * CS,
  length: CS,
}));

/** Counts the store's reads of pack ranges, and the most in flight at once. */
function countReads(store: Store): { calls: () => number; maxInFlight: () => number } {
  const original = store.backend.getRange.bind(store.backend);
  let calls = 0;
  let inFlight = 0;
  let max = 0;
  vi.spyOn(store.backend, 'getRange').mockImplementation(async (...args) => {
    calls++;
    inFlight++;
    max = Math.max(max, inFlight);
    try {
      return await original(...args);
    } finally {
      inFlight--;
    }
  });
  return { calls: () => calls, maxInFlight: () => max };
}

async function writeChanged(
  store: Store,
  disk: Buffer,
  hint: boolean,
): Promise<{ readsDuringWrites: number; maxInFlight: number; point: PointInfo }> {
  const s = await store.beginWrite({ machine: 'm', disk: 'vda', size: SIZE });
  const reads = countReads(store);
  if (hint) await prefetch(s, changed);
  const before = reads.calls();
  for (const [i, r] of changed.entries()) {
    const bytes = pseudoRandom(r.length, 100 + i);
    bytes.copy(disk, r.offset);
    await s.write(r.offset, bytes);
  }
  const readsDuringWrites = reads.calls() - before;
  const point = await s.commit();
  return { readsDuringWrites, maxInFlight: reads.maxInFlight(), point };
}

describe('write session prefetch of the base tree', () => {
  it('reads the leaves of the ranges to be written at once; the writes then read nothing, and the point reads back exact', async () => {
    const { store, disk } = await based();
    const r = await writeChanged(store, disk, true);
    expect(r.readsDuringWrites).toBe(0);
    expect(r.maxInFlight).toBeGreaterThan(1);
    const back = await (await t!.reopen()).openPoint(r.point.id);
    expect((await back.readAt(0, SIZE)).equals(disk)).toBe(true);
  });

  it('without it the same writes read their leaves one at a time (what it saves)', async () => {
    const { store, disk } = await based();
    const r = await writeChanged(store, disk, false);
    expect(r.readsDuringWrites).toBeGreaterThanOrEqual(changed.length);
    expect(r.maxInFlight).toBe(1);
    const back = await (await t!.reopen()).openPoint(r.point.id);
    expect((await back.readAt(0, SIZE)).equals(disk)).toBe(true);
  });

  it('leaves a damaged tree to the write that needs it: prefetch resolves, the write fails with the corruption code, nothing commits', async () => {
    const { disk, p1 } = await based();
    for (const [, l] of [...t!.store.index.entries()].filter(([, x]) => x.type === BlobType.Tree)) {
      const file = join(t!.dir, ...packKey(l.pack).split('/'));
      const buf = await readFile(file);
      buf[l.offset + 15] = (buf[l.offset + 15] ?? 0) ^ 0x40;
      await writeFile(file, buf);
    }
    const store = await t!.reopen();
    const s = await store.beginWrite({ machine: 'm', disk: 'vda', size: SIZE });
    await expect(prefetch(s, changed)).resolves.toBeUndefined();
    const first = changed[0]!;
    const err: unknown = await s.write(first.offset, pseudoRandom(CS, 9)).catch((e: unknown) => e);
    expect(isLifeboatError(err, 'LB_STORE_CORRUPT_TREE')).toBe(true);
    await s.abort();
    expect((await store.listPoints()).map((p) => p.id)).toEqual([p1.id]);
    expect(disk.length).toBe(SIZE);
  });

  it('a session aborted while its prefetch runs ends cleanly, and the disk can be written again', async () => {
    const { store, disk, p1 } = await based();
    const s = await store.beginWrite({ machine: 'm', disk: 'vda', size: SIZE });
    const pending = prefetch(s, changed);
    await s.abort();
    await expect(pending).resolves.toBeUndefined();
    const again = await store.beginWrite({ machine: 'm', disk: 'vda', size: SIZE });
    await again.write(0, pseudoRandom(CS, 5));
    const p2 = await again.commit();
    pseudoRandom(CS, 5).copy(disk, 0);
    expect((await (await store.openPoint(p2.id)).readAt(0, SIZE)).equals(disk)).toBe(true);
    expect(p2.parent).toBe(p1.id);
  });

  it('ignores what it cannot use: no base, empty and out-of-range ranges', async () => {
    t = await tempStore({ chunkSize: CS, packSize: PACK, treeFanout: F });
    const s = await t.store.beginWrite({ machine: 'm', disk: 'vdb', size: SIZE });
    await expect(prefetch(s, changed)).resolves.toBeUndefined();
    await expect(
      prefetch(s, [
        { offset: 0, length: 0 },
        { offset: SIZE * 4, length: CS },
        { offset: -1, length: CS },
      ]),
    ).resolves.toBeUndefined();
    await s.write(0, pseudoRandom(CS, 3));
    const p = await s.commit();
    expect((await (await t.store.openPoint(p.id)).readAt(0, CS)).equals(pseudoRandom(CS, 3))).toBe(
      true,
    );
  });
});

describe('a pack buffer warmed ahead', () => {
  it('is taken by the first pack writer and handed on to the next, which allocate no pack buffer; what they pack reads back exact', async () => {
    t = await tempStore({ chunkSize: CS, packSize: PACK, treeFanout: F });
    await warmPackBuffer(PACK);
    const alloc = vi.spyOn(Buffer, 'allocUnsafe');
    const packBuffers = (): number => alloc.mock.calls.filter(([n]) => n >= PACK).length;
    const one = async (seed: number): Promise<void> => {
      const s = await t!.store.beginWrite({ machine: 'm', disk: `d${seed}`, size: SIZE });
      await s.write(CS * seed, pseudoRandom(CS * 3, seed));
      const p = await s.commit();
      const back = await (await t!.reopen()).openPoint(p.id);
      expect((await back.readAt(CS * seed, CS * 3)).equals(pseudoRandom(CS * 3, seed))).toBe(true);
    };
    await one(1);
    expect(packBuffers()).toBe(0);
    // Its pack written, the buffer goes to the next writer: still none allocated.
    await one(2);
    expect(packBuffers()).toBe(0);
  });
});
