import { afterEach, describe, expect, it } from 'vitest';
import { isLifeboatError } from '@lifeboat/protocol';
import type { TempStore } from './test-support.js';
import { pseudoRandom, tempStore } from './test-support.js';

const CS = 4096;
let t: TempStore | undefined;
afterEach(async () => {
  await t?.cleanup();
  t = undefined;
});

async function readAll(stream: NodeJS.ReadableStream): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of stream) parts.push(c as Buffer);
  return Buffer.concat(parts);
}

describe('Store end to end', () => {
  it('writes, commits, lists and reads points byte-exact; a second point shares unchanged data', async () => {
    t = await tempStore({ chunkSize: CS, packSize: 64 * 1024 });
    const store = t.store;
    const size = CS * 300 + 512;
    const disk = Buffer.alloc(size);
    pseudoRandom(CS * 100, 1).copy(disk, 0);
    pseudoRandom(CS * 50, 2).copy(disk, CS * 200);
    const s = await store.beginWrite({ machine: 'm1', disk: 'vda', size });
    await s.write(0, disk.subarray(0, CS * 100));
    await s.write(CS * 200, disk.subarray(CS * 200, CS * 250));
    const p1 = await s.commit({ kind: 'app', labels: { a: 'b' }, cut: 'c1' });
    expect(p1.size).toBe(size);
    expect(p1.kind).toBe('app');

    // Second point: a partial write in the middle of a chunk and a zero range.
    const s2 = await store.beginWrite({ machine: 'm1', disk: 'vda', size });
    const patch = pseudoRandom(1000, 3);
    await s2.write(CS * 10 + 100, patch);
    patch.copy(disk, CS * 10 + 100);
    await s2.writeZeroes(CS * 20, CS * 5 + 7 * 512);
    disk.fill(0, CS * 20, CS * 25 + 7 * 512);
    await s2.write(size - 512, Buffer.alloc(512, 0xaa));
    disk.fill(0xaa, size - 512);
    const p2 = await s2.commit();
    expect(p2.parent).toBe(p1.id);

    const again = await t.reopen();
    const points = await again.listPoints();
    expect(points.map((p) => p.id)).toEqual([p1.id, p2.id]);
    expect((await again.latestPoint('m1', 'vda'))?.id).toBe(p2.id);
    const r2 = await again.openPoint(p2.id);
    expect((await r2.readAt(0, size)).equals(disk)).toBe(true);
    expect((await readAll(r2.stream())).equals(disk)).toBe(true);
    expect(
      (await readAll(r2.stream({ start: 5000, end: 70000 }))).equals(disk.subarray(5000, 70000)),
    ).toBe(true);
    const r1 = await again.openPoint(p1.id);
    const before = await r1.readAt(CS * 10, CS);
    expect(before.equals(pseudoRandom(CS * 100, 1).subarray(CS * 10, CS * 11))).toBe(true);
    const extents = [];
    for await (const e of r2.extents()) extents.push(e);
    expect(extents[0]).toEqual({ offset: 0, length: CS * 20, zero: false });
    expect(extents[1]).toEqual({ offset: CS * 20, length: CS * 5, zero: true });
    const ids = [];
    for await (const c of r2.chunkIds()) ids.push(c);
    expect(ids.length).toBe(301);
    expect(ids[0]?.id).toBe(again.chunkIdOf(disk.subarray(0, CS)));
    expect(ids[150]?.id).toBeNull();
  });

  it('rejects a wrong passphrase with LB_STORE_WRONG_PASSPHRASE', async () => {
    t = await tempStore();
    await expect(t.reopen('nope')).rejects.toSatisfy((e) =>
      isLifeboatError(e, 'LB_STORE_WRONG_PASSPHRASE'),
    );
  });
});
