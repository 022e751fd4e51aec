import { LifeboatError } from '@lifeboat/protocol';
import type { CommitOptions, PointInfo, StoreApi, WriteSession } from '@lifeboat/store';
import type { ByteRange } from './byte-ranges.js';
import { alignRanges } from './byte-ranges.js';
import type { DiskImage } from './disk-image.js';
import { coarsenRawMap, planImport } from './import-plan.js';
import type { ImportPiece } from './import-plan.js';

/** Options of {@link importImage}. */
export interface ImportImageOptions {
  store: StoreApi;
  image: DiskImage;
  machine: string;
  disk: string;
  /**
   * Only these ranges changed since the disk's latest point: read just them and commit on top
   * of that point. Undefined imports the whole image as a new full point.
   */
  changed?: readonly ByteRange[];
  /** Metadata of the point. */
  commit?: CommitOptions;
  /** Called as bytes are read: done and total bytes of data to read. */
  onProgress?: (done: number, total: number) => void;
  signal?: AbortSignal;
  /** Bytes read from the image per request (a multiple of the chunk size). @default 2 MiB */
  blockBytes?: number;
}

/** What {@link importImage} did. */
export interface ImportResult {
  point: PointInfo;
  /** The point this one was written on top of (changed-extents import). */
  base?: string;
  /** Bytes read from the image. */
  bytesRead: number;
  /** Bytes written to the store as data (excluding all-zero chunks). */
  bytesData: number;
  /** Bytes of the range imported that were zero or unallocated (not read, or read as zeros). */
  bytesZero: number;
  /** Logical bytes covered by the import (the disk, or the changed ranges). */
  bytesCovered: number;
}

const DEFAULT_BLOCK = 2 * 1024 * 1024;

/**
 * Imports a disk image into the store as a new recovery point: reads the allocated, non-zero
 * data (or only the changed ranges), writes it into a write session, and commits. Memory stays
 * bounded: three blocks are held (one being read, one being written, one spare).
 */
export async function importImage(options: ImportImageOptions): Promise<ImportResult> {
  const { store, image, machine, disk, signal } = options;
  const size = image.info.size;
  const chunk = store.chunkSize;
  const block = Math.max(chunk, Math.floor((options.blockBytes ?? DEFAULT_BLOCK) / chunk) * chunk);
  let baseId: string | undefined;
  let changedRanges = options.changed;
  if (options.changed !== undefined) {
    const latest = await store.latestPoint(machine, disk);
    if (latest === undefined) {
      throw new LifeboatError(
        'LB_CLI_NO_BASE_POINT',
        `Disk ${disk} of machine ${machine} has no point yet, so changed extents have nothing to apply to. Import the whole image first (without --changed-extents).`,
        { details: { machine, disk } },
      );
    }
    baseId = latest.id;
    // A disk that grew since its base point: the new tail is new data whether listed or not.
    if (size > latest.size) {
      changedRanges = [...options.changed, { offset: latest.size, length: size - latest.size }];
    }
  }
  let map = await image.map();
  if (image.info.format === 'raw') map = coarsenRawMap(map, chunk, size);
  const ranges =
    changedRanges === undefined
      ? [{ offset: 0, length: size }]
      : alignRanges(changedRanges, chunk, size);
  const pieces = planImport(map, ranges);
  const total = pieces.reduce((sum, p) => sum + (p.kind === 'data' ? p.length : 0), 0);
  const covered = ranges.reduce((sum, r) => sum + r.length, 0);

  const session = await store.beginWrite({
    machine,
    disk,
    size,
    base: baseId ?? null,
  });
  const writer = new ChunkWriter(session, chunk, baseId !== undefined);
  let bytesRead = 0;
  try {
    if (session.size !== size) await session.resize(size);
    options.onProgress?.(0, total);
    const blocks = splitBlocks(pieces, block);
    // Three buffers in turn (one read ahead, one being written, one free): a session is done
    // with a buffer when its write resolves, and reusing them spares the kernel faulting in
    // fresh pages for every block. Views into one allocation, so none is ever transferred.
    const ring = Buffer.allocUnsafe(3 * block);
    const read = (i: number): Promise<Buffer> | undefined => {
      const b = blocks[i];
      if (b === undefined || b.piece.kind !== 'data') return undefined;
      const slot = (i % 3) * block;
      return image.read(b.piece.entry, b.offset, b.length, ring.subarray(slot, slot + block));
    };
    // Read-ahead of one block overlaps image I/O with the store's hashing and encryption.
    let next = read(0);
    next?.catch(() => undefined);
    for (let i = 0; i < blocks.length; i++) {
      if (signal?.aborted === true) {
        throw new LifeboatError('LB_CLI_ABORTED', 'Import interrupted; no point was committed.');
      }
      const b = blocks[i] as Block;
      const current = next;
      next = read(i + 1);
      next?.catch(() => undefined);
      if (current === undefined) {
        await writer.zeroes(b.offset, b.length);
        continue;
      }
      const data = await current;
      bytesRead += data.length;
      await writer.data(b.offset, data);
      options.onProgress?.(bytesRead, total);
    }
    const point = await session.commit({
      ...options.commit,
      labels: {
        ...options.commit?.labels,
        ...(options.changed === undefined ? {} : { import: 'changed-extents' }),
      },
    });
    return {
      point,
      ...(baseId === undefined ? {} : { base: baseId }),
      bytesRead,
      bytesData: writer.dataBytes,
      bytesZero: covered - writer.dataBytes,
      bytesCovered: covered,
    };
  } catch (err) {
    await session.abort().catch(() => undefined);
    throw err;
  }
}

interface Block {
  piece: ImportPiece;
  offset: number;
  length: number;
}

// Splits data pieces at multiples of `block` so reads stay bounded and chunk-aligned.
function splitBlocks(pieces: readonly ImportPiece[], block: number): Block[] {
  const out: Block[] = [];
  for (const piece of pieces) {
    if (piece.kind === 'zero') {
      out.push({ piece, offset: piece.offset, length: piece.length });
      continue;
    }
    let pos = piece.offset;
    const end = piece.offset + piece.length;
    while (pos < end) {
      const to = Math.min(end, (Math.floor(pos / block) + 1) * block);
      out.push({ piece, offset: pos, length: to - pos });
      pos = to;
    }
  }
  return out;
}

/**
 * Feeds a write session: all-zero chunks found in the data become zero ranges (nothing is
 * stored for them), runs of other chunks go in one write. On a full import (no base) zero
 * ranges are simply skipped, as the new disk starts all zeros.
 */
class ChunkWriter {
  dataBytes = 0;
  private readonly zero: Buffer;

  constructor(
    private readonly session: WriteSession,
    private readonly chunk: number,
    private readonly hasBase: boolean,
  ) {
    this.zero = Buffer.alloc(chunk);
  }

  async zeroes(offset: number, length: number): Promise<void> {
    if (this.hasBase && length > 0) await this.session.writeZeroes(offset, length);
  }

  async data(offset: number, buf: Buffer): Promise<void> {
    let runStart = 0;
    let runZero: boolean | undefined;
    let pos = 0;
    while (pos < buf.length) {
      // Pieces of chunks at the edges are compared by themselves.
      const abs = offset + pos;
      const to = Math.min(buf.length, (Math.floor(abs / this.chunk) + 1) * this.chunk - offset);
      const part = buf.subarray(pos, to);
      const isZero = part.equals(this.zero.subarray(0, part.length));
      if (runZero !== undefined && isZero !== runZero) {
        await this.flush(offset, buf, runStart, pos, runZero);
        runStart = pos;
      }
      runZero = isZero;
      pos = to;
    }
    if (runZero !== undefined) await this.flush(offset, buf, runStart, pos, runZero);
  }

  private async flush(
    offset: number,
    buf: Buffer,
    from: number,
    to: number,
    zero: boolean,
  ): Promise<void> {
    if (zero) await this.zeroes(offset + from, to - from);
    else {
      this.dataBytes += to - from;
      await this.session.write(offset + from, buf.subarray(from, to));
    }
  }
}
