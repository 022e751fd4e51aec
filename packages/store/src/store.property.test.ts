import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { CryptoPool } from './crypto-pool.js';
import { SEAL_OVERHEAD } from './store-crypto.js';
import { pseudoRandom, tempStore } from './test-support.js';
import type { Store, StoreExtraOptions } from './store.js';
import type { PointInfo } from './store-types.js';

const CS = 4096;
const MAX_CHUNKS = 40;

type SessOp =
  | { t: 'write'; at: number; len: number; seed: number }
  | { t: 'zero' | 'trim'; at: number; len: number }
  | { t: 'resize'; sectors: number };

type Step =
  | {
      t: 'session';
      disk: number;
      sectors: number;
      ops: SessOp[];
      end: 'commit' | 'abort';
      gap: number;
      app: boolean;
    }
  | { t: 'prune'; allFor: number; everyFor: number; every: number }
  | { t: 'gc' }
  | { t: 'delete'; pick: number };

// Sizes cluster on a few values (some not chunk-aligned) so shrink-then-grow happens often.
const sectors = fc.oneof(
  fc.integer({ min: 1, max: (MAX_CHUNKS * CS) / 512 }),
  fc.constantFrom(8, 24, 80, 81, 200, (MAX_CHUNKS * CS) / 512),
);
const len = fc.oneof(fc.integer({ min: 1, max: 3 * CS }), fc.constantFrom(CS, 2 * CS, 8 * CS));
const sessOp: fc.Arbitrary<SessOp> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc.record({
      t: fc.constant('write' as const),
      at: fc.nat(),
      len,
      seed: fc.integer({ min: 1, max: 1e9 }),
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      t: fc.constantFrom('zero' as const, 'trim' as const),
      at: fc.nat(),
      len,
    }),
  },
  { weight: 2, arbitrary: fc.record({ t: fc.constant('resize' as const), sectors }) },
);
const step: fc.Arbitrary<Step> = fc.oneof(
  {
    weight: 8,
    arbitrary: fc.record({
      t: fc.constant('session' as const),
      disk: fc.integer({ min: 0, max: 1 }),
      sectors,
      ops: fc.array(sessOp, { maxLength: 6 }),
      end: fc.constantFrom('commit' as const, 'commit' as const, 'abort' as const),
      gap: fc.integer({ min: 1, max: 7200 }),
      app: fc.boolean(),
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      t: fc.constant('prune' as const),
      allFor: fc.integer({ min: 1, max: 7200 }),
      everyFor: fc.integer({ min: 1, max: 100_000 }),
      every: fc.integer({ min: 60, max: 7200 }),
    }),
  },
  { weight: 2, arbitrary: fc.constant({ t: 'gc' as const }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant('delete' as const), pick: fc.nat() }) },
);

function resized(buf: Buffer, size: number): Buffer {
  const out = Buffer.alloc(size);
  buf.copy(out, 0, 0, Math.min(size, buf.length));
  return out;
}

async function check(store: Store, model: Map<string, Buffer>): Promise<void> {
  const points = await store.listPoints();
  expect(points.map((p) => p.id).sort()).toEqual([...model.keys()].sort());
  for (const p of points) {
    const want = model.get(p.id) as Buffer;
    expect(p.size).toBe(want.length);
    const r = await store.openPoint(p.id);
    expect((await r.readAt(0, want.length)).equals(want), `point ${p.id}`).toBe(true);
    for await (const e of r.extents()) {
      if (e.zero)
        expect(want.subarray(e.offset, e.offset + e.length).every((b) => b === 0)).toBe(true);
    }
  }
}

// One pool for every run of the threaded variant: threads start once, stores come and go.
const pool = new CryptoPool({
  threads: 3,
  slotBytes: CS + SEAL_OVERHEAD + 64,
  arenaBytes: 40 * CS,
});
afterAll(() => pool.close());

describe('property: any sequence of writes, commits, crashes and prunes keeps every kept point byte-exact', () => {
  it('matches a Buffer-per-point model', async () => {
    await runModel({ cryptoThreads: 0 }, 40);
  }, 120_000);

  it('matches the model with the crypto threads doing the work (few slots, so writers wait for them)', async () => {
    pool.start();
    while (!pool.ready) await new Promise((r) => setTimeout(r, 10));
    await runModel({ cryptoPool: pool, parallelMinBytes: 0 }, 25);
  }, 120_000);
});

async function runModel(
  extra: StoreExtraOptions & { cryptoThreads?: number },
  numRuns: number,
): Promise<void> {
  let time = Date.UTC(2026, 0, 1);
  await fc.assert(
    fc.asyncProperty(
      fc.array(step, { minLength: 1, maxLength: 10 }),
      fc.constantFrom(4, 8, 256),
      async (steps, fanout) => {
        const t = await tempStore({
          chunkSize: CS,
          packSize: 16 * 1024,
          treeFanout: fanout,
          indexEveryBlobs: 6,
          ...extra,
        });
        try {
          const store = t.store;
          const model = new Map<string, Buffer>();
          const info = new Map<string, PointInfo>();
          for (const s of steps) {
            if (s.t === 'session') {
              const disk = `d${s.disk}`;
              const latest = [...info.values()]
                .filter((p) => p.disk === disk)
                .sort((a, b) => a.time.getTime() - b.time.getTime())
                .pop();
              let buf = resized(
                latest === undefined ? Buffer.alloc(0) : (model.get(latest.id) as Buffer),
                s.sectors * 512,
              );
              const w = await store.beginWrite({ machine: 'm', disk, size: buf.length });
              for (const op of s.ops) {
                if (op.t === 'resize') {
                  await w.resize(op.sectors * 512);
                  buf = resized(buf, op.sectors * 512);
                  continue;
                }
                const at = op.at % buf.length;
                const n = Math.min(op.len, buf.length - at);
                if (op.t === 'write') {
                  const data = pseudoRandom(n, op.seed);
                  await w.write(at, data);
                  data.copy(buf, at);
                } else {
                  await (op.t === 'zero' ? w.writeZeroes(at, n) : w.trim(at, n));
                  buf.fill(0, at, at + n);
                }
              }
              if (s.end === 'abort') {
                // A crashed session: whatever it uploaded stays as garbage for gc.
                await w.abort();
              } else {
                time += s.gap * 1000;
                const p = await w.commit({ time: new Date(time), kind: s.app ? 'app' : 'crash' });
                model.set(p.id, buf);
                info.set(p.id, p);
              }
            } else if (s.t === 'prune') {
              const report = await store.prune({
                rules: [{ for: `${s.allFor}s` }, { for: `${s.everyFor}s`, every: `${s.every}s` }],
              });
              for (const p of report.removed) {
                model.delete(p.id);
                info.delete(p.id);
              }
              // The newest point of every disk survives any policy.
              for (const disk of ['d0', 'd1']) {
                const newest = [...report.kept, ...report.removed]
                  .filter((p) => p.disk === disk)
                  .sort((a, b) => a.time.getTime() - b.time.getTime())
                  .pop();
                if (newest !== undefined) expect(report.kept.map((p) => p.id)).toContain(newest.id);
              }
            } else if (s.t === 'gc') {
              await store.gc();
            } else {
              const ids = [...model.keys()];
              const id = ids[s.pick % Math.max(1, ids.length)];
              if (id !== undefined) {
                await store.deletePoints([id]);
                model.delete(id);
                info.delete(id);
              }
            }
            await check(store, model);
          }
          await store.gc();
          await check(store, model);
          expect((await store.verify()).ok).toBe(true);
          await check(await t.reopen(), model);
        } finally {
          await t.cleanup();
        }
      },
    ),
    { numRuns },
  );
}
