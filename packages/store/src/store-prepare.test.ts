import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { isLifeboatError } from '@lifeboat/protocol';
import { DirectoryBackend } from './directory-backend.js';
import { Store } from './store.js';
import type { PointInfo } from './store-types.js';
import type { TempStore } from './test-support.js';
import { pseudoRandom, tempStore } from './test-support.js';

const CS = 4096;
let t: TempStore | undefined;
afterEach(async () => {
  await t?.cleanup();
  t = undefined;
});

async function lockObjects(dir: string): Promise<string[]> {
  return (await readdir(join(dir, 'locks'))).filter((n) => !n.startsWith('.'));
}

async function codeOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'resolved';
  } catch (err) {
    return isLifeboatError(err) ? err.code : String(err);
  }
}

describe('Store.open with prepareWrite', () => {
  it('takes the disk lock while the key unwraps, and the session of that disk uses it', async () => {
    t = await tempStore({ chunkSize: CS });
    const first = await t.store.beginWrite({ machine: 'm', disk: 'd', size: 16 * CS });
    await first.write(0, pseudoRandom(16 * CS, 1));
    const base = await first.commit();
    await t.store.close();

    const store = await t.reopen(undefined, { prepareWrite: { machine: 'm', disk: 'd' } });
    // Held before any session began: a second opener's writer of the disk is refused.
    expect(await lockObjects(t.dir)).toHaveLength(1);
    const other = await t.reopen();
    expect(await codeOf(other.beginWrite({ machine: 'm', disk: 'd', size: 16 * CS }))).toBe(
      'LB_STORE_DISK_BUSY',
    );
    const s = await store.beginWrite({ machine: 'm', disk: 'd', size: 16 * CS });
    // The session took the prepared lock: still one lock object.
    expect(await lockObjects(t.dir)).toHaveLength(1);
    const change = pseudoRandom(CS, 2);
    await s.write(3 * CS, change);
    const point = await s.commit();
    expect(point.parent).toBe(base.id);
    expect(await lockObjects(t.dir)).toHaveLength(0);
    const want = Buffer.from(pseudoRandom(16 * CS, 1));
    change.copy(want, 3 * CS);
    expect((await (await other.openPoint(point.id)).readAt(0, 16 * CS)).equals(want)).toBe(true);
    // The lock is taken once: the next session of the disk takes a fresh one.
    const again = await store.beginWrite({ machine: 'm', disk: 'd', size: 16 * CS });
    expect(await lockObjects(t.dir)).toHaveLength(1);
    await again.abort();
    expect(await lockObjects(t.dir)).toHaveLength(0);
  });

  it('lets the lock go when the passphrase is wrong, when no session uses it, and after another disk is written', async () => {
    t = await tempStore({ chunkSize: CS });
    await t.store.close();
    expect(
      await codeOf(t.reopen('not the passphrase', { prepareWrite: { machine: 'm', disk: 'd' } })),
    ).toBe('LB_STORE_WRONG_PASSPHRASE');
    expect(await lockObjects(t.dir)).toHaveLength(0);

    const store = await t.reopen(undefined, { prepareWrite: { machine: 'm', disk: 'd' } });
    // A session of another disk takes its own lock and leaves the prepared one alone.
    const s = await store.beginWrite({ machine: 'm', disk: 'e', size: 4 * CS });
    expect(await lockObjects(t.dir)).toHaveLength(2);
    await s.commit();
    expect(await lockObjects(t.dir)).toHaveLength(1);
    await store.close();
    expect(await lockObjects(t.dir)).toHaveLength(0);
  });

  it('when the prepared lock was refused, beginWrite tries again and then writes', async () => {
    t = await tempStore({ chunkSize: CS });
    const holder = await t.store.beginWrite({ machine: 'm', disk: 'd', size: 4 * CS });
    const store = await t.reopen(undefined, {
      prepareWrite: { machine: 'm', disk: 'd' },
      locks: { sharedWaitMs: 100 },
    });
    await holder.abort();
    const s = await store.beginWrite({ machine: 'm', disk: 'd', size: 4 * CS });
    await s.write(0, pseudoRandom(CS, 3));
    await s.commit();
    expect(await lockObjects(t.dir)).toHaveLength(0);
  });
});

describe('a write session on a store with a long history', () => {
  it('lists neither index/ nor points/ per session when its base is named and no gc ran, and lists index/ again after a gc', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'lifeboat-history-'));
    const backend = new DirectoryBackend({ path: dir });
    const listed: string[] = [];
    const listKeys = backend.listKeys.bind(backend);
    backend.listKeys = (prefix: string) => {
      listed.push(prefix);
      return listKeys(prefix);
    };
    const store = await Store.init({
      backend,
      passphrase: 'history',
      kdfCost: 1024,
      chunkSize: CS,
    });
    try {
      let last: PointInfo | undefined;
      const expected = Buffer.alloc(64 * CS);
      for (let i = 0; i < 40; i++) {
        const s = await store.beginWrite({
          machine: 'm',
          disk: 'd',
          size: 64 * CS,
          base: last?.id ?? null,
        });
        const data = pseudoRandom(CS, i + 1);
        data.copy(expected, (i % 64) * CS);
        await s.write((i % 64) * CS, data);
        last = await s.commit();
        // The first session loads the index; after that, gc's mark (one read) says it is
        // still true, and the listing waits for its minute.
        if (i >= 1) expect(listed.filter((p) => p !== 'locks/')).toEqual([]);
        listed.length = 0;
      }
      expect((await store.listPoints({ machine: 'm' })).length).toBe(40);
      const reader = await store.openPoint(last!.id);
      expect(Buffer.from(await reader.readAt(0, 64 * CS))).toEqual(expected);
      // Another handle's gc replaces the mark: the next session lists index/ again.
      const other = await Store.open({
        backend: new DirectoryBackend({ path: dir }),
        passphrase: 'history',
      });
      await other.gc();
      await other.close();
      listed.length = 0;
      const s = await store.beginWrite({ machine: 'm', disk: 'd', size: 64 * CS, base: last!.id });
      await s.abort();
      expect(listed.filter((p) => p === 'index/')).toEqual(['index/']);
    } finally {
      await store.close();
      await rm(dir, { recursive: true, force: true });
    }
  });
});
