import { open, rename, stat, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
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
}

/**
 * Writes a point as a sparse raw image: data extents are read from the store and written at
 * their offsets, zero extents stay holes. It streams with a bounded read-ahead, writes into a
 * temporary file beside `out`, fsyncs and renames, so `out` is never a half-restored disk.
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
    // depth + 1 buffers in turn (depth being read, one being written), in shared memory: the
    // store's crypto threads decrypt straight into them, and nothing is allocated per block.
    const ring = Buffer.from(new SharedArrayBuffer((depth + 1) * block));
    const inFlight: Array<Promise<Buffer>> = [];
    let nextToRead = 0;
    const fill = (): void => {
      while (inFlight.length < depth && nextToRead < blocks.length) {
        const i = nextToRead++;
        const b = blocks[i] as { offset: number; length: number };
        const at = (i % (depth + 1)) * block;
        const target = ring.subarray(at, at + b.length);
        const p = reader.readInto(b.offset, target).then(() => target);
        p.catch(() => undefined);
        inFlight.push(p);
      }
    };
    for (let i = 0; i < blocks.length; i++) {
      if (signal?.aborted === true) {
        throw new LifeboatError('LB_CLI_ABORTED', `Restore interrupted; ${out} was not written.`);
      }
      fill();
      const data = await (inFlight.shift() as Promise<Buffer>);
      const b = blocks[i] as { offset: number; length: number };
      let written = 0;
      while (written < data.length) {
        const { bytesWritten } = await fh.write(
          data,
          written,
          data.length - written,
          b.offset + written,
        );
        written += bytesWritten;
      }
      done += data.length;
      sinceSync += data.length;
      if (sinceSync >= syncEvery && syncing === undefined) backgroundSync();
      options.onProgress?.(done, total);
    }
    await syncing;
    if (syncFailure !== undefined) throw syncFailure;
    // The tail of the disk may be a hole: truncate gives the file its full logical size.
    await fh.truncate(reader.size);
    await fh.sync();
    ok = true;
  } finally {
    await syncing;
    await fh.close();
    if (!ok) await unlink(tmp).catch(() => undefined);
  }
  await rename(tmp, out);
  return { point: reader.point, out, size: reader.size, bytesData: done };
}
