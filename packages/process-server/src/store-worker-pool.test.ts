import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DirectoryBackend, Store } from '@lifeboat/store';
import type { WriteSession } from '@lifeboat/store';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { frameBufferPool } from '@lifeboat/protocol';
import { StoreWorkerPool } from './store-worker-pool.js';

const CHUNK = 65536;

describe('StoreWorkerPool', () => {
  let dir: string;
  const passphrase = 'pool-passphrase';
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'lb-pool-'));
    const s = await Store.init({
      backend: new DirectoryBackend({ path: dir }),
      passphrase,
      kdfCost: 1024,
    });
    await s.close();
  });
  afterAll(async () => {
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });

  /** The first `length` bytes of point `id`, read back by a store of its own. */
  async function readBack(id: string, length: number): Promise<Buffer> {
    const store = await Store.open({ backend: new DirectoryBackend({ path: dir }), passphrase });
    try {
      return Buffer.from(await (await store.openPoint(id)).readAt(0, length));
    } finally {
      await store.close();
    }
  }

  /** The worker thread that holds each machine's write lock now (from the lock objects). */
  async function threadsOf(): Promise<Map<string, number>> {
    const out = new Map<string, number>();
    for (const name of await readdir(join(dir, 'locks'))) {
      if (name.startsWith('.')) continue;
      const r = JSON.parse(await readFile(join(dir, 'locks', name), 'utf8')) as {
        machine?: string;
        thread?: number;
      };
      if (r.machine !== undefined && r.thread !== undefined) out.set(r.machine, r.thread);
    }
    return out;
  }

  it('spreads write sessions over the threads by their open sessions, and a machine that moves keeps its history', async () => {
    const pool = new StoreWorkerPool({ spec: { kind: 'directory', path: dir, passphrase } });
    try {
      const begin = (machine: string): Promise<WriteSession> =>
        pool.forMachine(machine).beginWrite({ machine, disk: 'd', size: 4 * CHUNK });
      const first = randomBytes(CHUNK);
      // Two sessions at once: one per thread, whatever the machines' names hash to.
      const m1 = await begin('m1');
      const m2 = await begin('m2');
      let t = await threadsOf();
      expect(t.get('m1')).not.toBe(t.get('m2'));
      const threadOfM1 = t.get('m1');
      await m1.write(0, Buffer.from(first));
      await m1.commit({ cut: 'c1' });
      // m1's thread now runs two sessions, m2's one: m1's next session moves to m2's thread.
      const m3 = await begin('m3');
      const m4 = await begin('m4');
      t = await threadsOf();
      expect(t.get('m3')).toBe(threadOfM1);
      expect(t.get('m4')).toBe(threadOfM1);
      const again = await begin('m1');
      t = await threadsOf();
      expect(t.get('m1')).not.toBe(threadOfM1);
      // Its base is the point the other thread committed.
      const second = randomBytes(CHUNK);
      await again.write(CHUNK, Buffer.from(second));
      const point = await again.commit({ cut: 'c2' });
      for (const s of [m2, m3, m4]) await s.abort();
      expect(await readBack(point.id, 2 * CHUNK)).toEqual(Buffer.concat([first, second]));
    } finally {
      await pool.close();
    }
  });

  it("gets each write's buffer back for the frame pool, and reusing it at once loses no byte", async () => {
    const pool = new StoreWorkerPool({ spec: { kind: 'directory', path: dir, passphrase } });
    frameBufferPool.clear();
    try {
      const extent = 4 * CHUNK;
      const s = await pool.forMachine('reuse').beginWrite({
        machine: 'reuse',
        disk: 'd',
        size: 16 * extent,
      });
      const expected: Buffer[] = [];
      const given = frameBufferPool.counters.given;
      const allocated = frameBufferPool.counters.allocated;
      for (let i = 0; i < 16; i++) {
        // Each write's buffer is the one the previous writes gave back, refilled at once.
        const b = frameBufferPool.take(extent);
        randomBytes(extent).copy(b);
        expected.push(Buffer.from(b));
        await s.write(i * extent, b);
        expect(b.length).toBe(0); // transferred, not copied
      }
      const point = await s.commit({ cut: 'r1' });
      expect(frameBufferPool.counters.given - given).toBe(16);
      // Writes pipeline (up to 4 MiB in flight), so a few buffers were new; most were reused.
      expect(frameBufferPool.counters.allocated - allocated).toBeLessThan(16);
      expect((await readBack(point.id, 16 * extent)).equals(Buffer.concat(expected))).toBe(true);
    } finally {
      await pool.close();
    }
  });
  it('passes a prefetch hint to the worker, and the point written after it reads back exact', async () => {
    const pool = new StoreWorkerPool({ spec: { kind: 'directory', path: dir, passphrase } });
    try {
      // A base with data in 16 leaves of the tree (256 chunks a leaf), then one chunk changed
      // in each, told first.
      const size = 16 * 256 * CHUNK;
      const expected = Buffer.alloc(size);
      const write = async (offsets: number[], cut: string): Promise<string> => {
        const s = await pool.forMachine('hint').beginWrite({ machine: 'hint', disk: 'd', size });
        await s.prefetch?.(offsets.map((offset) => ({ offset, length: CHUNK })));
        for (const offset of offsets) {
          const data = randomBytes(CHUNK);
          data.copy(expected, offset);
          await s.write(offset, data);
        }
        return (await s.commit({ cut })).id;
      };
      await write(
        Array.from({ length: 16 }, (_, l) => l * 256 * CHUNK),
        'hint-1',
      );
      const id = await write(
        Array.from({ length: 16 }, (_, l) => (l * 256 + 7) * CHUNK),
        'hint-2',
      );
      expect((await readBack(id, size)).equals(expected)).toBe(true);
    } finally {
      await pool.close();
    }
  });

  it('survives a session whose write failed being aborted: the thread stays up and serves the next session', async () => {
    const pool = new StoreWorkerPool({ spec: { kind: 'directory', path: dir, passphrase } });
    try {
      const size = 4 * CHUNK;
      const bad = await pool.forMachine('fails').beginWrite({ machine: 'fails', disk: 'd', size });
      // Past the disk's end: the store refuses it, and the session has failed.
      await expect(
        (async () => {
          await bad.write(size, randomBytes(CHUNK));
          await bad.commit({ cut: 'never' });
        })(),
      ).rejects.toThrow();
      await bad.abort();
      // Give a dying thread the time to be noticed.
      await new Promise((r) => setTimeout(r, 300));
      expect(pool.health()).toMatchObject({ alive: pool.health().count, restarts: 0 });
      const good = await pool.forMachine('fails').beginWrite({ machine: 'fails', disk: 'd', size });
      const data = randomBytes(size);
      // A whole buffer is transferred to the thread (detached here): write a copy.
      await good.write(0, Buffer.from(data));
      const id = (await good.commit({ cut: 'after' })).id;
      expect((await readBack(id, size)).equals(data)).toBe(true);
    } finally {
      await pool.close();
    }
  });
});
