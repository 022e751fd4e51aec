import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { DirectoryBackend } from './directory-backend.js';
import type { ObjectWriter, PutOptions } from './object-backend.js';
import { spareBuffers } from './pack-writer.js';
import { Store } from './store.js';
import { TEST_PASSPHRASE, pseudoRandom } from './test-support.js';

const CS = 4096;
const PACK = 16 * 1024;
const SIZE = CS * 256;

/**
 * A directory whose writes read the caller's bytes late, as an upload that is still going (or
 * retried) does: `put` after a pause, and a piecewise object only at its commit, each piece
 * still the caller's buffer. A pack buffer handed to another writer before its backend was done
 * with it would land in the store with that writer's bytes.
 */
class LateReadingBackend extends DirectoryBackend {
  override async put(key: string, data: Uint8Array, options?: PutOptions): Promise<void> {
    await new Promise((r) => setTimeout(r, 5));
    return super.put(key, data, options);
  }

  override async openWrite(key: string): Promise<ObjectWriter> {
    const pieces: Uint8Array[] = [];
    return {
      append: async (data) => {
        pieces.push(data);
      },
      commit: async () => {
        await new Promise((r) => setTimeout(r, 5));
        const w = await super.openWrite(key);
        try {
          for (const p of pieces) await w.append(p);
          await w.commit();
        } catch (err) {
          await w.abort();
          throw err;
        }
      },
      abort: async () => undefined,
    };
  }
}

let dir: string | undefined;
afterEach(async () => {
  vi.restoreAllMocks();
  if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  dir = undefined;
});

describe("pack buffers shared by a thread's write sessions", () => {
  it('go from one session to the next only once their packs are written: every point reads back exact', async () => {
    dir = await mkdtemp(join(tmpdir(), 'lifeboat-packbuf-'));
    const backend = new LateReadingBackend({ path: dir });
    const store = await Store.init({
      backend,
      passphrase: TEST_PASSPHRASE,
      kdfCost: 1024,
      chunkSize: CS,
      packSize: PACK,
    });
    const points: Array<{ id: string; disk: string; data: Buffer }> = [];
    const bases = new Map<string, string>();
    const disks = new Map<string, Buffer>();
    // A point after every 8 chunks (32 KiB and their tree nodes: three packs of 16 KiB).
    const cut = async (disk: string, n: number): Promise<void> => {
      const data = disks.get(disk) ?? Buffer.alloc(SIZE);
      disks.set(disk, data);
      const s = await store.beginWrite({
        machine: 'm',
        disk,
        size: SIZE,
        base: bases.get(disk) ?? null,
      });
      for (let i = 0; i < 8; i++) {
        const at = ((n * 8 + i) * 7 + disk.length) % (SIZE / CS);
        const bytes = pseudoRandom(CS, disk.charCodeAt(2) * 1000 + n * 8 + i + 1);
        bytes.copy(data, at * CS);
        await s.write(at * CS, bytes);
      }
      const p = await s.commit();
      bases.set(disk, p.id);
      points.push({ id: p.id, disk, data: Buffer.from(data) });
    };
    const alloc = vi.spyOn(Buffer, 'allocUnsafe');
    const packBuffers = (): number => alloc.mock.calls.filter(([n]) => n >= PACK).length;
    // One disk, one session after another: the first session's buffers serve all the others.
    for (let n = 0; n < 12; n++) await cut('vda', n);
    expect(packBuffers()).toBeLessThanOrEqual(3);
    expect(spareBuffers().length).toBeLessThanOrEqual(3);
    // Three disks at once: buffers go from session to session while others' packs are written.
    await Promise.all(
      ['vdb', 'vdc', 'vdd'].map(async (disk) => {
        for (let n = 0; n < 12; n++) await cut(disk, n);
      }),
    );
    expect(spareBuffers().length).toBeLessThanOrEqual(3);
    await store.close();

    const again = await Store.open({
      backend: new DirectoryBackend({ path: dir }),
      passphrase: TEST_PASSPHRASE,
    });
    try {
      for (const p of points) {
        const r = await again.openPoint(p.id);
        expect((await r.readAt(0, SIZE)).equals(p.data), `point ${p.id} of ${p.disk}`).toBe(true);
      }
      const report = await again.verify();
      expect(report.ok).toBe(true);
    } finally {
      await again.close();
    }
  });
});
