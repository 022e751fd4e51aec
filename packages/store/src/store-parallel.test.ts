import { afterEach, describe, expect, it } from 'vitest';
import { isLifeboatError } from '@lifeboat/protocol';
import { CryptoPool } from './crypto-pool.js';
import { DirectoryBackend } from './directory-backend.js';
import { packKey } from './object-format.js';
import { SEAL_OVERHEAD } from './store-crypto.js';
import { Store } from './store.js';
import type { PointInfo, WriteSession } from './store-types.js';
import type { TempStore } from './test-support.js';
import { TEST_PASSPHRASE, pseudoRandom, tempStore } from './test-support.js';

const CS = 4096;

let t: TempStore | undefined;
afterEach(async () => {
  await t?.cleanup();
  t = undefined;
});

async function until(cond: () => boolean, what: string, ms = 30_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** A seeded sequence of writes (whole, partial, repeated content), zeros, trims and resizes. */
async function scramble(
  w: WriteSession,
  model: { buf: Buffer },
  seed: number,
  steps: number,
): Promise<void> {
  let x = seed;
  const rnd = (n: number): number => {
    x = (x * 1103515245 + 12345) >>> 0;
    return x % n;
  };
  for (let s = 0; s < steps; s++) {
    const size = model.buf.length;
    const kind = rnd(10);
    if (kind < 5) {
      // Whole chunks, often repeating content already written (duplicates in flight).
      const at = rnd(size / CS) * CS;
      const n = Math.min(size - at, (1 + rnd(48)) * CS);
      const data = Buffer.alloc(n);
      for (let c = 0; c < n; c += CS) pseudoRandom(CS, 1 + rnd(24)).copy(data, c);
      await w.write(at, data);
      data.copy(model.buf, at);
    } else if (kind < 7) {
      const at = rnd(size);
      const n = Math.min(size - at, 1 + rnd(3 * CS));
      const data = pseudoRandom(n, 100 + rnd(1000));
      await w.write(at, data);
      data.copy(model.buf, at);
    } else if (kind < 9) {
      const at = rnd(size);
      const n = Math.min(size - at, 1 + rnd(8 * CS));
      await (kind === 7 ? w.writeZeroes(at, n) : w.trim(at, n));
      model.buf.fill(0, at, at + n);
    } else {
      const sectors = 8 + rnd((700 * CS) / 512);
      await w.resize(sectors * 512);
      const grown = Buffer.alloc(sectors * 512);
      model.buf.copy(grown, 0, 0, Math.min(grown.length, model.buf.length));
      model.buf = grown;
    }
  }
}

async function readAll(store: Store, p: PointInfo): Promise<{ readAt: Buffer; stream: Buffer }> {
  const r = await store.openPoint(p.id);
  const parts: Buffer[] = [];
  for await (const c of r.stream()) parts.push(c as Buffer);
  return { readAt: await r.readAt(0, r.size), stream: Buffer.concat(parts) };
}

describe('the parallel paths: crypto threads for writes and reads', () => {
  it('many threads and tiny packs give byte-exact points, the same chunk ids as one thread, and a valid store', async () => {
    t = await tempStore({
      chunkSize: CS,
      packSize: 16 * 1024,
      treeFanout: 8,
      indexEveryBlobs: 6,
      cryptoThreads: 4,
      parallelMinBytes: 0,
    });
    const store = t.store;
    const models = [{ buf: Buffer.alloc(512 * CS) }, { buf: Buffer.alloc(300 * CS + 512) }];
    const points: Array<{ p: PointInfo; want: Buffer }> = [];
    for (let round = 0; round < 3; round++) {
      // Two disks written at once through the same pool and slots.
      const done = await Promise.all(
        models.map(async (m, d) => {
          const w = await store.beginWrite({ machine: 'm', disk: `d${d}`, size: m.buf.length });
          await scramble(w, m, 1 + round * 10 + d, 40);
          return { p: await w.commit(), want: Buffer.from(m.buf) };
        }),
      );
      points.push(...done);
    }
    expect(store.cryptoPool?.ready).toBe(true);
    for (const { p, want } of points) {
      const got = await readAll(store, p);
      expect(got.readAt.equals(want), `readAt of ${p.disk}`).toBe(true);
      expect(got.stream.equals(want), `stream of ${p.disk}`).toBe(true);
    }
    // readInto, into shared memory (the threads write straight into it) and into a plain
    // buffer, at offsets and lengths that cut chunks and cross zero ranges.
    const shared = Buffer.from(new SharedArrayBuffer(64 * CS));
    for (const { p, want } of points) {
      const r = await store.openPoint(p.id);
      for (const [at, n] of [
        [0, 64 * CS],
        [Math.min(CS * 3 + 100, want.length), 20 * CS + 7],
        [Math.max(0, want.length - 5 * CS - 1), 5 * CS + 1],
      ] as Array<[number, number]>) {
        const len = Math.min(n, want.length - at);
        for (const target of [shared.subarray(0, len), Buffer.alloc(len, 0xee)]) {
          target.fill(0xee);
          await r.readInto(at, target);
          expect(target.equals(want.subarray(at, at + len)), `readInto ${at}+${len}`).toBe(true);
        }
      }
    }
    expect((await store.verify()).ok).toBe(true);
    // The same store read on the calling thread alone: same bytes, and the ids a single
    // thread computes for the content.
    const single = await t.reopen(TEST_PASSPHRASE, { cryptoThreads: 0 });
    for (const { p, want } of points) {
      expect((await readAll(single, p)).readAt.equals(want)).toBe(true);
      const r = await single.openPoint(p.id);
      for await (const c of r.chunkIds()) {
        const chunk = Buffer.alloc(CS);
        want.copy(chunk, 0, c.offset, Math.min(c.offset + CS, want.length));
        if (c.id !== null) expect(c.id).toBe(single.chunkIdOf(chunk));
        else expect(chunk.every((b) => b === 0)).toBe(true);
      }
    }
    await single.gc();
    for (const { p, want } of points)
      expect((await readAll(store, p)).readAt.equals(want)).toBe(true);
  }, 120_000);

  it('a crypto thread that dies mid-import fails the session clearly and shows no point; the next session works', async () => {
    t = await tempStore({ chunkSize: 65536, cryptoThreads: 2, parallelMinBytes: 0 });
    const store = t.store;
    const size = 64 * 1024 * 1024;
    const base = await store.beginWrite({ machine: 'm', disk: 'vda', size });
    await base.write(0, pseudoRandom(4 * 1024 * 1024, 7));
    const first = await base.commit();
    await until(() => store.cryptoPool?.ready === true, 'the crypto threads');
    const w = await store.beginWrite({ machine: 'm', disk: 'vda', size });
    await w.write(0, pseudoRandom(2 * 1024 * 1024, 8));
    store.cryptoPool?.crashNextForTest();
    let failure: unknown;
    try {
      for (let pos = 2 * 1024 * 1024; pos < size; pos += 2 * 1024 * 1024) {
        await w.write(pos, pseudoRandom(2 * 1024 * 1024, pos));
      }
      await w.commit();
    } catch (err) {
      failure = err;
    }
    expect(isLifeboatError(failure, 'LB_STORE_WORKER_FAILED'), String(failure)).toBe(true);
    expect((failure as Error).message).toMatch(/crypto thread stopped/);
    await expect(w.commit()).rejects.toSatisfy((e: unknown) => isLifeboatError(e));
    await w.abort();
    expect((await store.listPoints()).map((p) => p.id)).toEqual([first.id]);
    // The pool replaces the dead threads; the disk is free again.
    const again = await store.beginWrite({ machine: 'm', disk: 'vda', size });
    const data = pseudoRandom(8 * 1024 * 1024, 9);
    await again.write(0, data);
    const p = await again.commit();
    const want = Buffer.alloc(size);
    data.copy(want);
    expect((await (await store.openPoint(p.id)).readAt(0, size)).equals(want)).toBe(true);
    await store.gc();
    expect((await store.verify()).ok).toBe(true);
  }, 120_000);

  it('reads on threads: adjacent chunks of concurrent reads are merged, a damaged chunk names its point and offset', async () => {
    t = await tempStore({ chunkSize: CS, cryptoThreads: 2, parallelMinBytes: 0 });
    const data = pseudoRandom(256 * CS, 3);
    const w = await t.store.beginWrite({ machine: 'm', disk: 'vda', size: data.length });
    await w.write(0, data);
    const p = await w.commit();
    let ranges = 0;
    const backend = new DirectoryBackend({ path: t.dir });
    const getRange = backend.getRange.bind(backend);
    backend.getRange = (key, offset, length, signal) => {
      if (key.startsWith('packs/')) ranges++;
      return getRange(key, offset, length, signal);
    };
    const getRangeInto = backend.getRangeInto.bind(backend);
    backend.getRangeInto = (key, offset, target, signal) => {
      if (key.startsWith('packs/')) ranges++;
      return getRangeInto(key, offset, target, signal);
    };
    const s = await Store.open({
      backend,
      passphrase: TEST_PASSPHRASE,
      cryptoThreads: 2,
      parallelMinBytes: 0,
    });
    try {
      const r = await s.openPoint(p.id);
      await r.readAt(0, CS); // loads the tree; starts the threads
      await until(() => s.cryptoPool?.ready === true, 'the crypto threads');
      // 64 single-chunk reads at once (a read-ahead): far fewer ranged reads than chunks.
      ranges = 0;
      const reads = Array.from({ length: 64 }, (_, i) => r.readAt((64 + i) * CS, CS));
      const got = await Promise.all(reads);
      got.forEach((b, i) =>
        expect(b.equals(data.subarray((64 + i) * CS, (65 + i) * CS))).toBe(true),
      );
      expect(ranges).toBeGreaterThan(0);
      expect(ranges).toBeLessThanOrEqual(4);
      // A flipped byte in chunk 200's sealed bytes: that read fails, naming it; others succeed.
      const id = Buffer.from(s.chunkIdOf(data.subarray(200 * CS, 201 * CS)), 'hex');
      const loc = s.index.get(id);
      if (loc === undefined) throw new Error('chunk 200 not indexed');
      const { readFile, writeFile } = await import('node:fs/promises');
      const { join } = await import('node:path');
      const file = join(t.dir, ...packKey(loc.pack).split('/'));
      const buf = await readFile(file);
      buf[loc.offset + 30] = (buf[loc.offset + 30] ?? 0) ^ 1;
      await writeFile(file, buf);
      const fresh = await Store.open({
        backend: new DirectoryBackend({ path: t.dir }),
        passphrase: TEST_PASSPHRASE,
        cryptoPool: s.cryptoPool as CryptoPool,
      });
      try {
        const r2 = await fresh.openPoint(p.id);
        const results = await Promise.allSettled(
          Array.from({ length: 16 }, (_, i) => r2.readAt((192 + i) * CS, CS)),
        );
        results.forEach((res, i) => {
          if (192 + i === 200) {
            expect(res.status).toBe('rejected');
            const err = (res as PromiseRejectedResult).reason as unknown;
            expect(isLifeboatError(err, 'LB_STORE_CORRUPT_CHUNK')).toBe(true);
            expect((err as { details: unknown }).details).toMatchObject({
              point: p.id,
              offset: 200 * CS,
              object: packKey(loc.pack),
            });
          } else {
            expect(res.status).toBe('fulfilled');
          }
        });
      } finally {
        await fresh.close();
      }
    } finally {
      await s.close();
    }
  }, 120_000);

  it('one pool serves several stores, each with its own keys', async () => {
    const pool = new CryptoPool({ threads: 2, slotBytes: CS + SEAL_OVERHEAD + 64 });
    const a = await tempStore({ chunkSize: CS, cryptoPool: pool, parallelMinBytes: 0 });
    const b = await tempStore({ chunkSize: CS, cryptoPool: pool, parallelMinBytes: 0 });
    try {
      const data = pseudoRandom(128 * CS, 5);
      const ps = await Promise.all(
        [a, b].map(async (x) => {
          const w = await x.store.beginWrite({ machine: 'm', disk: 'vda', size: data.length });
          await w.write(0, data);
          return w.commit();
        }),
      );
      for (const [i, x] of [a, b].entries()) {
        const got = await (await x.store.openPoint((ps[i] as PointInfo).id)).readAt(0, data.length);
        expect(got.equals(data)).toBe(true);
        expect((await x.store.verify()).ok).toBe(true);
      }
      // Same content, different stores: different keyed ids.
      expect(a.store.chunkIdOf(data.subarray(0, CS))).not.toBe(
        b.store.chunkIdOf(data.subarray(0, CS)),
      );
    } finally {
      await a.cleanup();
      await b.cleanup();
      await pool.close();
    }
  }, 120_000);
});
