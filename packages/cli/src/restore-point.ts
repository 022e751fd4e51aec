import { constants } from 'node:fs';
import { open, rename, stat, unlink } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import {
  DIRECT_IO_ALIGN,
  O_DIRECT,
  directIoRefused,
  pageAlignedShared,
  writeFully,
} from '@lifeboat/protocol/direct-io';
import { LifeboatError } from '@lifeboat/protocol/errors';
import type { PointInfo, StoreApi } from '@lifeboat/store';

/** Options of {@link restorePoint}. */
export interface RestorePointOptions {
  store: StoreApi;
  /** Id of the point to restore. */
  pointId: string;
  /** Raw image file to write; must not exist unless `force`. */
  out: string;
  /** Replace an existing file. @default false */
  force?: boolean;
  /** Called as data is written: done and total bytes of non-zero data. */
  onProgress?: (done: number, total: number) => void;
  signal?: AbortSignal;
  /** Bytes per read from the store. @default 1 MiB */
  blockBytes?: number;
  /** Reads from the store in flight at once. @default 8 */
  readAhead?: number;
  /** Bytes written between background datasyncs (see restorePoint). @default 128 MiB */
  syncEveryBytes?: number;
}

/** What {@link restorePoint} wrote. */
export interface RestoreResult {
  point: PointInfo;
  out: string;
  /** Logical size of the file. */
  size: number;
  /** Bytes of data written (the rest are holes). */
  bytesData: number;
  /** Of those, bytes written with direct I/O (O_DIRECT), past the page cache. */
  bytesDirect: number;
}

/** Writes of a restore in flight at once. */
const WRITES_IN_FLIGHT = 4;

/**
 * Writes a point as a sparse raw image: data extents are read from the store and written at
 * their offsets, zero extents stay holes. It streams with a bounded read-ahead, writes into a
 * temporary file beside `out`, fsyncs and renames, so `out` is never a half-restored disk.
 *
 * Where the file system takes it, the data goes out with direct I/O (O_DIRECT) from the
 * read-ahead ring, past the page cache: a restore is as large as a disk, and copying it into
 * the page cache cost more than the decryption (on the development VM the kernel's time for
 * it swung from 0.9 to 2.4 s for 1.5 GiB, as fresh memory had to be faulted in), and would
 * evict what the machine had cached for nothing. Ranges that are not whole pages (a disk's
 * last partial chunk) go through the page cache.
 */
export async function restorePoint(options: RestorePointOptions): Promise<RestoreResult> {
  const { store, out, signal } = options;
  // 1 MiB reads, 8 in flight: with the store's crypto threads 8 kept them busy where 4 left gaps.
  const block = options.blockBytes ?? 1024 * 1024;
  const depth = Math.max(1, options.readAhead ?? 8);
  const syncEvery = Math.max(1, options.syncEveryBytes ?? 128 * 1024 * 1024);
  const existing = await stat(out).catch(() => undefined);
  if (existing !== undefined) {
    if (!existing.isFile()) {
      throw new LifeboatError(
        'LB_CLI_RESTORE_TARGET',
        `${out} exists and is not a regular file. Restore into a new file (a raw image).`,
        { details: { out } },
      );
    }
    if (options.force !== true) {
      throw new LifeboatError(
        'LB_CLI_RESTORE_TARGET',
        `${out} already exists. Choose another path, or pass --force to replace it.`,
        { details: { out } },
      );
    }
  }
  const reader = await store.openPoint(options.pointId);
  const extents: Array<{ offset: number; length: number }> = [];
  let total = 0;
  for await (const e of reader.extents()) {
    if (e.zero) continue;
    extents.push({ offset: e.offset, length: e.length });
    total += e.length;
  }
  const blocks: Array<{ offset: number; length: number }> = [];
  for (const e of extents) {
    for (let pos = e.offset; pos < e.offset + e.length;) {
      const to = Math.min(e.offset + e.length, (Math.floor(pos / block) + 1) * block);
      blocks.push({ offset: pos, length: to - pos });
      pos = to;
    }
  }
  const tmp = join(dirname(out), `.${basename(out)}.lifeboat-partial-${process.pid}`);
  const fh = await open(tmp, 'wx', 0o600);
  const directHandle = await openDirect(tmp);
  let direct = directHandle;
  let bytesDirect = 0;
  let done = 0;
  let ok = false;
  // The kernel starts writing a file's pages to disk only when it must, so a plain restore
  // ends with one long fsync of everything. A datasync every `syncEveryBytes`, in the
  // background (one at a time), has the disk write while blocks are still read and decrypted.
  let syncing: Promise<void> | undefined;
  let syncFailure: unknown;
  let sinceSync = 0;
  const backgroundSync = (): void => {
    sinceSync = 0;
    syncing = fh.datasync().then(
      () => {
        syncing = undefined;
      },
      (err: unknown) => {
        syncFailure ??= err;
        syncing = undefined;
      },
    );
  };
  try {
    options.onProgress?.(0, total);
    // depth + WRITES_IN_FLIGHT buffers in turn (depth being read, the others being written),
    // in shared memory: the store's crypto threads decrypt straight into them, and nothing is
    // allocated per block. Page-aligned, as direct I/O needs.
    const slots = depth + WRITES_IN_FLIGHT;
    const ring = Buffer.from(pageAlignedShared(slots * block));
    const inFlight: Array<Promise<Buffer>> = [];
    let nextToRead = 0;
    const fill = (): void => {
      while (inFlight.length < depth && nextToRead < blocks.length) {
        const i = nextToRead++;
        const b = blocks[i] as { offset: number; length: number };
        const at = (i % slots) * block;
        const target = ring.subarray(at, at + b.length);
        const p = reader.readInto(b.offset, target).then(() => target);
        p.catch(() => undefined);
        inFlight.push(p);
      }
    };
    // A direct write returns once the device has the data, so several are kept in flight to
    // give it a queue to work on (one at a time left it idle between writes).
    const writing: Array<Promise<void>> = [];
    const writeBlock = async (data: Buffer, at: number): Promise<void> => {
      const handle = direct;
      if (
        handle !== undefined &&
        at % DIRECT_IO_ALIGN === 0 &&
        data.length % DIRECT_IO_ALIGN === 0
      ) {
        try {
          await writeFully(handle, data, at);
          bytesDirect += data.length;
        } catch (err) {
          if (!directIoRefused(err)) throw err;
          // The file system refuses direct I/O after all: the page cache from here on (the
          // handle is closed at the end, once no write uses it).
          direct = undefined;
          await writeFully(fh, data, at);
        }
      } else {
        await writeFully(fh, data, at);
      }
      done += data.length;
      sinceSync += data.length;
      if (sinceSync >= syncEvery && syncing === undefined) backgroundSync();
      options.onProgress?.(done, total);
    };
    try {
      for (let i = 0; i < blocks.length; i++) {
        if (signal?.aborted === true) {
          throw new LifeboatError('LB_CLI_ABORTED', `Restore interrupted; ${out} was not written.`);
        }
        fill();
        const data = await (inFlight.shift() as Promise<Buffer>);
        const b = blocks[i] as { offset: number; length: number };
        const w = writeBlock(data, b.offset);
        w.catch(() => undefined);
        writing.push(w);
        // The block WRITES_IN_FLIGHT back is written: its slot of the ring is free again.
        if (writing.length >= WRITES_IN_FLIGHT) await writing.shift();
      }
      await Promise.all(writing);
    } finally {
      await Promise.allSettled(writing);
    }
    await syncing;
    if (syncFailure !== undefined) throw syncFailure;
    // The tail of the disk may be a hole: truncate gives the file its full logical size.
    await fh.truncate(reader.size);
    // One fsync makes the whole file durable, whichever handle wrote it: the direct writes are
    // on the device already, and it flushes the device's cache and the file's metadata.
    await fh.sync();
    ok = true;
  } finally {
    await syncing;
    await directHandle?.close();
    await fh.close();
    if (!ok) await unlink(tmp).catch(() => undefined);
  }
  await rename(tmp, out);
  return { point: reader.point, out, size: reader.size, bytesData: done, bytesDirect };
}

/** A second handle on `path` for direct I/O, or undefined where the platform or file system has none. */
async function openDirect(path: string): Promise<FileHandle | undefined> {
  if (O_DIRECT === undefined) return undefined;
  return open(path, constants.O_WRONLY | O_DIRECT).catch(() => undefined);
}
