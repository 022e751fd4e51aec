import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { isLifeboatError } from '@lifeboat/protocol';
import { pseudoRandom, tempStore } from './test-support.js';
import type { TempStore } from './test-support.js';

const CS = 4096;
const SIZE = CS * 8;

let t: TempStore | undefined;
afterEach(async () => {
  vi.restoreAllMocks();
  await t?.cleanup();
  t = undefined;
});

describe('the point of a cut', () => {
  it('is found by one read of the object its cut names, whatever the other points', async () => {
    t = await tempStore({ chunkSize: CS, packSize: 64 * 1024 });
    for (let i = 0; i < 12; i++) {
      const s = await t.store.beginWrite({ machine: `m${i % 3}`, disk: 'vda', size: SIZE });
      await s.write(0, pseudoRandom(CS, i));
      await s.commit(i % 2 === 0 ? { cut: `cut-${i}` } : {});
    }
    const s = await t.store.beginWrite({ machine: 'web', disk: 'vdb', size: SIZE });
    await s.write(CS, pseudoRandom(CS, 99));
    const p = await s.commit({ cut: 'c-42', kind: 'app' });

    const store = await t.reopen();
    const get = vi.spyOn(store.backend, 'get');
    const found = await store.findCutPoint('web', 'vdb', 'c-42');
    expect(found).toMatchObject({
      id: p.id,
      machine: 'web',
      disk: 'vdb',
      cut: 'c-42',
      kind: 'app',
    });
    expect(get.mock.calls.map(([key]) => key)).toEqual([`points/${p.id}`]);
    // Another machine, disk or cut names another object: not found.
    expect(await store.findCutPoint('web', 'vda', 'c-42')).toBeUndefined();
    expect(await store.findCutPoint('db', 'vdb', 'c-42')).toBeUndefined();
    expect(await store.findCutPoint('web', 'vdb', 'c-43')).toBeUndefined();
    const back = await store.openPoint(found!.id);
    expect((await back.readAt(CS, CS)).equals(pseudoRandom(CS, 99))).toBe(true);
  });

  it('is committed once: a second commit of the cut is refused with LB_STORE_POINT_EXISTS and changes nothing', async () => {
    t = await tempStore({ chunkSize: CS, packSize: 64 * 1024 });
    const first = await t.store.beginWrite({ machine: 'web', disk: 'vda', size: SIZE });
    await first.write(0, pseudoRandom(SIZE, 1));
    const p1 = await first.commit({ cut: 'c1' });

    const again = await t.store.beginWrite({ machine: 'web', disk: 'vda', size: SIZE, base: null });
    await again.write(0, pseudoRandom(SIZE, 2));
    const err: unknown = await again.commit({ cut: 'c1' }).catch((e: unknown) => e);
    expect(isLifeboatError(err, 'LB_STORE_POINT_EXISTS')).toBe(true);
    expect((err as { details: Record<string, unknown> }).details).toMatchObject({
      point: p1.id,
      machine: 'web',
      disk: 'vda',
      cut: 'c1',
    });
    const store = await t.reopen();
    expect((await store.listPoints()).map((p) => p.id)).toEqual([p1.id]);
    const r = await store.openPoint(p1.id);
    expect((await r.readAt(0, SIZE)).equals(pseudoRandom(SIZE, 1))).toBe(true);
    // The refused session left only garbage: gc removes it, the point still reads.
    await store.gc();
    expect(
      (await (await store.openPoint(p1.id)).readAt(0, SIZE)).equals(pseudoRandom(SIZE, 1)),
    ).toBe(true);
    // The disk is free for the next cut.
    const next = await store.beginWrite({ machine: 'web', disk: 'vda', size: SIZE });
    await next.write(0, pseudoRandom(CS, 3));
    expect((await next.commit({ cut: 'c2' })).parent).toBe(p1.id);
  });

  it('names nothing readable: the object name is keyed, and points without a cut keep random names', async () => {
    t = await tempStore({ chunkSize: CS, packSize: 64 * 1024 });
    const other = await tempStore({ chunkSize: CS, packSize: 64 * 1024 });
    try {
      const ids: string[] = [];
      for (const ts of [t, other]) {
        const s = await ts.store.beginWrite({ machine: 'web', disk: 'vda', size: SIZE });
        await s.write(0, pseudoRandom(CS, 5));
        ids.push((await s.commit({ cut: 'same-cut' })).id);
      }
      // The same machine, disk and cut in two stores: two unrelated names.
      expect(ids[0]).toMatch(/^[0-9a-f]{32}$/);
      expect(ids[0]).not.toBe(ids[1]);
      const s = await t.store.beginWrite({ machine: 'web', disk: 'vda', size: SIZE });
      await s.write(0, pseudoRandom(CS, 6));
      const plain = await s.commit();
      expect(plain.id).toMatch(/^[0-9a-f]{32}$/);
      expect((await readdir(join(t.dir, 'points'))).sort()).toEqual([ids[0], plain.id].sort());
    } finally {
      await other.cleanup();
    }
  });
});
