import { randomBytes, randomUUID } from 'node:crypto';
import { isLifeboatError } from '@lifeboat/protocol';
import { DirectoryBackend, Store, type ObjectBackend } from '@lifeboat/store';
import { AzureBlobBackend } from '@lifeboat/store-azure';
import { makeTempDir, startAzurite, type Azurite } from '@lifeboat/testing';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

/** One place objects live; `open()` gives a new backend on it each time (another process's view). */
interface Location {
  open(): ObjectBackend;
  cleanup(): Promise<void>;
}

const PASSPHRASE = 'conformance passphrase';
const CHUNK = 4096;
/** Small packs so that a few hundred KiB make several of them. */
const PACK = 64 * 1024;

async function codeOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'resolved';
  } catch (err) {
    return isLifeboatError(err) ? err.code : `not a LifeboatError: ${String(err)}`;
  }
}

async function readAll(stream: NodeJS.ReadableStream): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of stream) parts.push(c as Buffer);
  return Buffer.concat(parts);
}

async function packBytes(backend: ObjectBackend): Promise<{ count: number; bytes: number }> {
  let count = 0;
  let bytes = 0;
  for await (const o of backend.list('packs/')) {
    count++;
    bytes += o.size;
  }
  return { count, bytes };
}

/**
 * Store-level checks run on every backend: they prove the store needs nothing from a backend
 * beyond the ObjectBackend contract. The exhaustive store tests live in packages/store.
 */
function describeStoreConformance(name: string, makeLocation: () => Promise<Location>): void {
  describe(`Store conformance: ${name}`, () => {
    let location: Location | undefined;
    const stores: Store[] = [];
    afterEach(async () => {
      for (const s of stores.splice(0)) await s.close().catch(() => undefined);
      await location?.cleanup();
      location = undefined;
    });
    const fresh = async (): Promise<Location> => (location = await makeLocation());
    const init = async (loc: Location): Promise<Store> => {
      const s = await Store.init({
        backend: loc.open(),
        passphrase: PASSPHRASE,
        chunkSize: CHUNK,
        packSize: PACK,
        kdfCost: 1024,
      });
      stores.push(s);
      return s;
    };
    const open = async (loc: Location, passphrase = PASSPHRASE): Promise<Store> => {
      const s = await Store.open({ backend: loc.open(), passphrase });
      stores.push(s);
      return s;
    };

    it('inits and opens a store, refusing a second init, a wrong passphrase and an empty location', async () => {
      const empty = await fresh();
      expect(await codeOf(Store.open({ backend: empty.open(), passphrase: PASSPHRASE }))).toBe(
        'LB_STORE_NOT_FOUND',
      );
      const created = await init(empty);
      const again = await open(empty);
      expect(again.id).toBe(created.id);
      expect(again.chunkSize).toBe(CHUNK);
      expect(again.location).toBe(empty.open().location);
      expect(
        await codeOf(Store.init({ backend: empty.open(), passphrase: PASSPHRASE, kdfCost: 1024 })),
      ).toBe('LB_STORE_EXISTS');
      expect(await codeOf(Store.open({ backend: empty.open(), passphrase: 'wrong' }))).toBe(
        'LB_STORE_WRONG_PASSPHRASE',
      );
    });

    it('commits points that read back byte-exact from another opening of the store', async () => {
      const loc = await fresh();
      const store = await init(loc);
      const size = 96 * CHUNK + 512;
      const disk = Buffer.alloc(size);
      randomBytes(40 * CHUNK).copy(disk, 0);
      randomBytes(20 * CHUNK + 512).copy(disk, 76 * CHUNK);
      const s1 = await store.beginWrite({ machine: 'm1', disk: 'vda', size });
      await s1.write(0, disk.subarray(0, 40 * CHUNK));
      await s1.write(76 * CHUNK, disk.subarray(76 * CHUNK));
      const p1 = await s1.commit({ kind: 'crash' });
      const first = Buffer.from(disk);

      // A second point: a partial chunk, a zeroed range and the last sector change.
      const s2 = await store.beginWrite({ machine: 'm1', disk: 'vda', size });
      const patch = randomBytes(1500);
      await s2.write(5 * CHUNK + 300, patch);
      patch.copy(disk, 5 * CHUNK + 300);
      await s2.writeZeroes(10 * CHUNK, 4 * CHUNK);
      disk.fill(0, 10 * CHUNK, 14 * CHUNK);
      const tail = randomBytes(512);
      await s2.write(size - 512, tail);
      tail.copy(disk, size - 512);
      const p2 = await s2.commit({ kind: 'app' });

      const reader = await open(loc);
      expect((await reader.listPoints({ machine: 'm1', disk: 'vda' })).map((p) => p.id)).toEqual([
        p1.id,
        p2.id,
      ]);
      const r2 = await reader.openPoint(p2.id);
      expect((await r2.readAt(0, size)).equals(disk)).toBe(true);
      expect((await readAll(r2.stream())).equals(disk)).toBe(true);
      const r1 = await reader.openPoint(p1.id);
      expect((await r1.readAt(0, size)).equals(first)).toBe(true);
      expect(
        (await r1.readAt(5 * CHUNK, 2 * CHUNK)).equals(first.subarray(5 * CHUNK, 7 * CHUNK)),
      ).toBe(true);
    });

    it('stores data shared by disks of different machines once', async () => {
      const loc = await fresh();
      const store = await init(loc);
      const size = 128 * CHUNK;
      const data = randomBytes(size);
      const a = await store.beginWrite({ machine: 'm1', disk: 'vda', size });
      await a.write(0, data);
      await a.commit();
      const afterOne = await packBytes(loc.open());
      const b = await store.beginWrite({ machine: 'm2', disk: 'sdb', size });
      await b.write(0, data);
      const pb = await b.commit();
      const afterTwo = await packBytes(loc.open());
      // The second disk adds at most its tree nodes, not its data.
      expect(afterTwo.bytes - afterOne.bytes).toBeLessThan(size / 10);
      const stats = await store.stats();
      expect(stats.logicalBytes).toBe(2 * size);
      expect(stats.uniqueBytes).toBe(size);
      expect(stats.dedupRatio).toBeGreaterThan(1.5);
      expect((await (await store.openPoint(pb.id)).readAt(0, size)).equals(data)).toBe(true);
    });

    it('detects a changed byte in a pack: verify names the point, a read fails rather than returning wrong data', async () => {
      const loc = await fresh();
      const store = await init(loc);
      const size = 32 * CHUNK;
      const s = await store.beginWrite({ machine: 'm1', disk: 'vda', size });
      await s.write(0, randomBytes(size));
      const point = await s.commit();
      const backend = loc.open();
      const packs: string[] = [];
      for await (const o of backend.list('packs/')) packs.push(o.key);
      expect(packs.length).toBeGreaterThan(0);
      const key = packs[0] ?? '';
      const damaged = await backend.get(key);
      // Early in the pack: inside the first stored chunk, not its trailer.
      damaged[64] = (damaged[64] ?? 0) ^ 0x01;
      await backend.put(key, damaged, { overwrite: true });
      await backend.close();

      const fresh2 = await open(loc);
      const report = await fresh2.verify();
      expect(report.ok).toBe(false);
      expect(report.faults.length).toBeGreaterThan(0);
      const fault = report.faults[0];
      expect(fault?.code).toMatch(/^LB_STORE_/);
      expect(fault?.points).toContain(point.id);
      expect(await codeOf((await fresh2.openPoint(point.id)).readAt(0, size))).toMatch(
        /^LB_STORE_/,
      );
    });

    it('prunes old points and gc frees their data, keeping the kept points byte-exact', async () => {
      const loc = await fresh();
      const store = await init(loc);
      const size = 48 * CHUNK;
      const now = new Date('2026-11-25T12:00:00Z');
      const day = 86_400_000;
      let latest = Buffer.alloc(0);
      let latestId = '';
      for (const age of [4, 3, 2, 0]) {
        // Every point rewrites the whole disk, so data of removed points becomes garbage.
        latest = randomBytes(size);
        const s = await store.beginWrite({ machine: 'm1', disk: 'vda', size });
        await s.write(0, latest);
        latestId = (await s.commit({ time: new Date(now.getTime() - age * day) })).id;
      }
      const before = await packBytes(loc.open());
      const pruned = await store.prune({ rules: [{ for: '1d' }] }, { now });
      expect(pruned.removed.length).toBe(3);
      expect(pruned.kept.map((p) => p.id)).toEqual([latestId]);
      const gc = await store.gc();
      expect(gc.bytesFreed).toBeGreaterThan(0);
      const after = await packBytes(loc.open());
      expect(after.bytes).toBeLessThan(before.bytes / 2);

      const reader = await open(loc);
      expect((await reader.listPoints()).map((p) => p.id)).toEqual([latestId]);
      expect((await (await reader.openPoint(latestId)).readAt(0, size)).equals(latest)).toBe(true);
      expect((await reader.verify()).ok).toBe(true);
    });
  });
}

describeStoreConformance('DirectoryBackend', async () => {
  const dir = await makeTempDir('lifeboat-store-');
  return { open: () => new DirectoryBackend({ path: dir.path }), cleanup: () => dir.remove() };
});

describeStoreConformance('DirectoryBackend (direct writes)', async () => {
  const dir = await makeTempDir('lifeboat-store-');
  return {
    open: () => new DirectoryBackend({ path: dir.path, directWrites: true }),
    cleanup: () => dir.remove(),
  };
});

describe('on Azure Blob Storage (Azurite)', () => {
  let azurite: Azurite | undefined;
  beforeAll(async () => {
    azurite = await startAzurite();
  });
  afterAll(async () => {
    await azurite?.stop();
  });

  describeStoreConformance('AzureBlobBackend', async () => {
    if (azurite === undefined) throw new Error('Azurite did not start');
    const connectionString = azurite.connectionString;
    const container = `store-${randomUUID()}`;
    const opened: AzureBlobBackend[] = [];
    return {
      open: () => {
        const b = new AzureBlobBackend({ connectionString, container, createContainer: true });
        opened.push(b);
        return b;
      },
      // The container dies with Azurite's data directory in afterAll.
      cleanup: async () => {
        await Promise.allSettled(opened.map((b) => b.close()));
      },
    };
  });
});
