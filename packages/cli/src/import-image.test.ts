import { randomBytes, randomInt } from 'node:crypto';
import { constants } from 'node:fs';
import { mkdtemp, open, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DirectoryBackend, Store } from '@lifeboat/store';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DiskImage } from './disk-image.js';
import { importImage, ReadAhead, readChangedEarly } from './import-image.js';
import { pageAlignedShared } from '@lifeboat/protocol/direct-io';
import { restorePoint } from './restore-point.js';

const K = 1024;
const MiB = 1024 * K;
const CHUNK = 64 * K;
let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lifeboat-import-image-'));
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** A fresh store (cheap KDF) holding the image at `path` as disk m/d's first point. */
async function storeWithImport(storeDir: string, path: string, chunkSize?: number): Promise<Store> {
  const store = await Store.init({
    backend: new DirectoryBackend({ path: storeDir }),
    passphrase: 'p',
    kdfCost: 1024,
    ...(chunkSize === undefined ? {} : { chunkSize }),
  });
  const first = await DiskImage.open(path);
  try {
    await importImage({ store, image: first, machine: 'm', disk: 'd' });
  } finally {
    await first.close();
  }
  return store;
}

describe('importImage', () => {
  it('reads many changed extents at once (small blocks, a ring that wraps) byte-exact', async () => {
    const path = join(dir, 'disk.raw');
    const size = 24 * MiB;
    const disk = Buffer.alloc(size);
    // Data everywhere except a hole in the middle (never written: sparse).
    randomBytes(8 * MiB).copy(disk, 0);
    randomBytes(8 * MiB).copy(disk, 16 * MiB);
    const fh = await open(path, 'w');
    await fh.write(disk, 0, 8 * MiB, 0);
    await fh.write(disk, 16 * MiB, 8 * MiB, 16 * MiB);
    await fh.truncate(size);
    const store = await storeWithImport(join(dir, 'store'), path);
    try {
      // Rewrite a few hundred scattered ranges: single chunks, runs of several (several
      // blocks of reading), unaligned pieces, some turned into zeros, some into the hole.
      const changed: Array<{ offset: number; length: number }> = [];
      for (let i = 0; i < 200; i++) {
        const offset = randomInt(size / CHUNK - 8) * CHUNK + (i % 7 === 0 ? 512 * randomInt(8) : 0);
        const length = i % 11 === 0 ? 5 * CHUNK : i % 5 === 0 ? 4096 : CHUNK;
        const bytes = i % 13 === 0 ? Buffer.alloc(length) : randomBytes(length);
        bytes.copy(disk, offset);
        await fh.write(bytes, 0, length, offset);
        changed.push({ offset, length });
      }
      await fh.close();
      // Small blocks so the ring (three blocks) wraps many times and several reads overlap.
      const image = await DiskImage.open(path, { sniffRaw: true });
      // Reads finish in a shuffled order, as they may on a busy disk: a read given space still
      // held by another would then show up as wrong bytes.
      const read = image.read.bind(image);
      image.read = async (...args) => {
        await new Promise((r) => setTimeout(r, randomInt(3)));
        const bytes = await read(...args);
        await new Promise((r) => setTimeout(r, randomInt(3)));
        return bytes;
      };
      const result = await importImage({
        store,
        image,
        machine: 'm',
        disk: 'd',
        changed,
        blockBytes: 128 * K,
      });
      await image.close();
      expect(result.base).toBeDefined();
      // Only the chunks the ranges touch are read.
      const bound = changed.reduce((sum, c) => sum + c.length + 2 * CHUNK, 0);
      expect(result.bytesRead).toBeLessThanOrEqual(bound);
      const reader = await store.openPoint(result.point.id);
      const got = await reader.readAt(0, size);
      if (!got.equals(disk)) {
        let i = 0;
        while (got[i] === disk[i]) i++;
        expect.fail(`the point differs from the image first at byte ${i}`);
      }
    } finally {
      await fh.close().catch(() => undefined);
      await store.close();
    }
  });
});

describe('readChangedEarly', () => {
  it('hands its reads to the import when they are the ones it needs, and is ignored when not', async () => {
    const path = join(dir, 'early.raw');
    const size = 16 * MiB;
    const disk = randomBytes(size);
    const fh = await open(path, 'w');
    await fh.write(disk, 0, size, 0);
    for (const chunkSize of [CHUNK, 2 * CHUNK]) {
      const store = await storeWithImport(join(dir, `store-early-${chunkSize}`), path, chunkSize);
      try {
        const changed: Array<{ offset: number; length: number }> = [];
        for (let i = 0; i < 60; i++) {
          const offset = randomInt(size / CHUNK) * CHUNK + (i % 4 === 0 ? 512 : 0);
          const length = Math.min(i % 9 === 0 ? 3 * CHUNK : CHUNK, size - offset);
          const bytes = randomBytes(length);
          bytes.copy(disk, offset);
          await fh.write(bytes, 0, length, offset);
          changed.push({ offset, length });
        }
        const image = await DiskImage.open(path, { sniffRaw: true });
        // Started with the default chunk size, as the CLI does before the store is open.
        const early = readChangedEarly(image, changed, CHUNK);
        expect(early).toBeDefined();
        let taken: boolean | undefined;
        const result = await importImage({
          store,
          image,
          machine: 'm',
          disk: 'd',
          changed,
          early: {
            take: (img, blocks) => {
              const reads = early?.take(img, blocks);
              taken = reads !== undefined;
              return reads;
            },
          },
        });
        await image.close();
        expect(taken, `chunk size ${chunkSize}`).toBe(chunkSize === CHUNK);
        const got = await (await store.openPoint(result.point.id)).readAt(0, size);
        expect(got.equals(disk), `chunk size ${chunkSize}`).toBe(true);
      } finally {
        await store.close();
      }
    }
    await fh.close();
  });
});

/** A store holding `disk` (written to the file `name`.raw first) as disk m/d's first point. */
async function storeHolding(
  name: string,
  disk: Buffer,
): Promise<{ store: Store; pointId: string }> {
  const path = join(dir, `${name}.raw`);
  await writeFile(path, disk);
  const store = await storeWithImport(join(dir, `store-${name}`), path);
  const point = await store.latestPoint('m', 'd');
  if (point === undefined) throw new Error('the import committed no point');
  return { store, pointId: point.id };
}

describe('restorePoint', () => {
  it('writes a point byte-exact while datasyncs of what it wrote run in the background', async () => {
    const disk = randomBytes(12 * MiB);
    disk.fill(0, 4 * MiB, 6 * MiB); // a zero range stays a hole
    const { store, pointId } = await storeHolding('restore', disk);
    try {
      const out = join(dir, 'restored.raw');
      // A datasync after every 1 MiB block: many overlap the reads and writes that follow.
      const result = await restorePoint({
        store,
        pointId,
        out,
        blockBytes: 1 * MiB,
        syncEveryBytes: 1,
      });
      expect(result.bytesData).toBe(10 * MiB);
      expect((await readFile(out)).equals(disk)).toBe(true);
    } finally {
      await store.close();
    }
  });

  it('writes whole pages with direct I/O where the file system takes it, and a partial tail through the page cache', async () => {
    // A disk whose size is not whole pages: its last chunk is partial.
    const disk = randomBytes(6 * MiB + 1024);
    disk.fill(0, 2 * MiB, 3 * MiB);
    const { store, pointId } = await storeHolding('direct', disk);
    try {
      // Whether this directory takes direct I/O, found out on its own: an aligned page written
      // with O_DIRECT from page-aligned memory.
      const probe = join(dir, 'direct-probe');
      const takesDirect = await (async () => {
        const h = await open(
          probe,
          constants.O_WRONLY | constants.O_CREAT | constants.O_DIRECT,
        ).catch(() => undefined);
        if (h === undefined) return false;
        try {
          await h.write(Buffer.from(pageAlignedShared(4096)), 0, 4096, 0);
          return true;
        } catch {
          return false;
        } finally {
          await h.close();
          await rm(probe);
        }
      })();
      const out = join(dir, 'direct-restored.raw');
      const result = await restorePoint({ store, pointId, out, blockBytes: 1 * MiB });
      expect((await readFile(out)).equals(disk)).toBe(true);
      expect((await stat(out)).size).toBe(disk.length);
      expect(result.bytesData).toBe(disk.length - 1 * MiB);
      // Every 1 MiB block went direct, the last 1024 bytes (a partial page) not, if the file system can.
      expect(result.bytesDirect).toBe(takesDirect ? result.bytesData - 1024 : 0);
      // And with memory that is not page-aligned, direct writes would have failed: the reason
      // for the ring's WebAssembly memory. (An odd address: malloc's are 16 bytes past a page
      // almost always, but not always, and an offset of 16 once landed on a page boundary.)
      if (takesDirect) {
        const h = await open(probe, constants.O_WRONLY | constants.O_CREAT | constants.O_DIRECT);
        try {
          await expect(
            h.write(Buffer.alloc(8192).subarray(1, 1 + 4096), 0, 4096, 0),
          ).rejects.toThrow(/EINVAL/);
        } finally {
          await h.close();
          await rm(probe);
        }
      }
    } finally {
      await store.close();
    }
  });

  it('reads every block into its ring, whether one or eight reads are ahead, and never into fresh memory', async () => {
    const path = join(dir, 'ring.raw');
    const block = 256 * K;
    const data = randomBytes(20 * block);
    const fh = await open(path, 'w');
    await fh.write(data, 0, data.length, 0);
    await fh.close();
    const image = await DiskImage.open(path, { format: 'raw' });
    try {
      const entry = { start: 0, length: data.length, zero: false, data: true, depth: 0, offset: 0 };
      // Whole blocks, and blocks of uneven sizes whose ends do not fall on the ring's.
      for (const sizes of [
        Array.from({ length: 20 }, () => block),
        Array.from({ length: 40 }, (_, i) => (i % 3 === 0 ? 64 * K : 128 * K)),
      ]) {
        const blocks: Array<{
          piece: { kind: 'data'; offset: number; length: number; entry: typeof entry };
          offset: number;
          length: number;
        }> = [];
        let at = 0;
        for (const length of sizes) {
          if (at + length > data.length) break;
          blocks.push({ piece: { kind: 'data', offset: at, length, entry }, offset: at, length });
          at += length;
        }
        for (const maxReads of [1, 8]) {
          const ring = Buffer.allocUnsafe(3 * block);
          const reads = new ReadAhead(image, blocks, ring, maxReads);
          for (const b of blocks) {
            const got = await reads.next();
            // (Compared as a boolean: a diff of two 768 KiB buffers takes minutes to print.)
            expect(got?.buffer === ring.buffer, `block at ${b.offset}, ${maxReads} ahead`).toBe(
              true,
            );
            expect(got?.equals(data.subarray(b.offset, b.offset + b.length))).toBe(true);
            reads.release();
          }
        }
      }
    } finally {
      await image.close();
    }
  });
});
