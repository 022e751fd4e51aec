import { afterEach, describe, expect, it, vi } from 'vitest';
import { pseudoRandom, tempStore } from './test-support.js';
import type { TempStore } from './test-support.js';

const CS = 4096;
let t: TempStore | undefined;
afterEach(async () => {
  await t?.cleanup();
  t = undefined;
});

describe('tree nodes a session wrote', () => {
  it('serve the next session of the disk from memory, and its point reads back exact', async () => {
    t = await tempStore({ chunkSize: CS, packSize: 64 * 1024, treeFanout: 16 });
    const store = t.store;
    const size = CS * 16 * 40; // 40 leaves, 3 levels
    const disk = Buffer.alloc(size);
    const s1 = await store.beginWrite({ machine: 'm', disk: 'vda', size });
    for (let l = 0; l < 40; l += 3) {
      const bytes = pseudoRandom(CS * 2, l + 1);
      bytes.copy(disk, l * 16 * CS);
      await s1.write(l * 16 * CS, bytes);
    }
    await s1.commit({ cut: 'c1' });

    // The next cut changes other chunks of the same leaves: the base's leaves and upper nodes
    // are the ones the first session wrote, so nothing of the tree is read from the packs.
    const getRange = vi.spyOn(store.backend, 'getRange');
    const s2 = await store.beginWrite({ machine: 'm', disk: 'vda', size, base: 'latest' });
    for (let l = 0; l < 40; l += 3) {
      const bytes = pseudoRandom(CS, 100 + l);
      bytes.copy(disk, (l * 16 + 5) * CS);
      await s2.write((l * 16 + 5) * CS, bytes);
    }
    const p2 = await s2.commit({ cut: 'c2' });
    expect(getRange).not.toHaveBeenCalled();
    getRange.mockRestore();

    const again = await t.reopen();
    const r = await again.openPoint(p2.id);
    expect((await r.readAt(0, size)).equals(disk)).toBe(true);
  });
});
