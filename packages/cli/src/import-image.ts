import { setImmediate as setImmediateCallback } from 'node:timers';
import { setImmediate } from 'node:timers/promises';
import { LifeboatError } from '@lifeboat/protocol/errors';
import type { CommitOptions, PointInfo, StoreApi, WriteSession } from '@lifeboat/store';
import type { ByteRange } from './byte-ranges.js';
import { alignRanges } from './byte-ranges.js';
import type { DiskImage, ImageMapEntry } from './disk-image.js';
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
  /**
   * Reads of the changed ranges started before the store was open ({@link readChangedEarly}):
   * used when they turn out to be exactly the reads this import needs, otherwise ignored.
   */
  early?: EarlyReads;
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
/** Bytes imported between two turns of the event loop (see the import loop). */
const TURN_EVERY = 512 * 1024;

/**
 * Imports a disk image into the store as a new recovery point: reads the allocated, non-zero
 * data (or only the changed ranges), writes it into a write session, and commits. Memory stays
 * bounded: three blocks are held (one being read, one being written, one spare).
 */
export async function importImage(options: ImportImageOptions): Promise<ImportResult> {
  const { store, image, machine, disk, signal } = options;
  const size = image.info.size;
  const chunk = store.chunkSize;
  const block = readBlockBytes(chunk, options.blockBytes);
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
  // A raw image's changed ranges are simply read: holes read as zeros, which the writer turns
  // into zero ranges anyway, so `qemu-img map` (a process, 20-30 ms) would only save reading
  // the holes of a few ranges. A whole import skips holes by the map.
  let map: ImageMapEntry[];
  if (image.info.format === 'raw' && changedRanges !== undefined) {
    map = wholeRawMap(size);
  } else {
    map = await image.map();
    if (image.info.format === 'raw') map = coarsenRawMap(map, chunk, size);
  }
  const ranges =
    changedRanges === undefined
      ? [{ offset: 0, length: size }]
      : alignRanges(changedRanges, chunk, size);
  const pieces = planImport(map, ranges);
  const total = pieces.reduce((sum, p) => sum + (p.kind === 'data' ? p.length : 0), 0);
  const covered = ranges.reduce((sum, r) => sum + r.length, 0);
  const blocks = splitBlocks(pieces, block);
  const early = options.early?.take(image, blocks);

  const session = await store.beginWrite({
    machine,
    disk,
    size,
    base: baseId ?? null,
  });
  // Changed extents land all over the base tree: read its leaves for them at once.
  if (baseId !== undefined) void session.prefetch?.(ranges);
  const writer = new ChunkWriter(session, chunk, baseId !== undefined);
  let bytesRead = 0;
  let sinceTurn = 0;
  let turned = false;
  const markTurned = (): void => {
    turned = true;
  };
  try {
    if (session.size !== size) await session.resize(size);
    options.onProgress?.(0, total);
    // A whole import reads one block ahead of the writer: more reads in flight made the main
    // thread's garbage collection run several times as often (measured: 47 full collections
    // instead of 5 for a 2 GiB import). Changed extents are many small ranges: read several at
    // once, or each waits its turn. Reusing one ring spares the kernel faulting in fresh pages
    // for every block.
    const reads =
      early ??
      new ReadAhead(
        image,
        blocks,
        Buffer.allocUnsafe(3 * block),
        changedRanges === undefined ? 1 : 8,
      );
    for (let i = 0; i < blocks.length; i++) {
      if (signal?.aborted === true) {
        throw new LifeboatError('LB_CLI_ABORTED', 'Import interrupted; no point was committed.');
      }
      const b = blocks[i] as Block;
      const current = reads.next();
      if (current === undefined) {
        await writer.zeroes(b.offset, b.length);
        continue;
      }
      const data = await current;
      bytesRead += data.length;
      await writer.data(b.offset, data);
      // The session is done with the bytes once its write resolves: the space is free again.
      reads.release();
      options.onProgress?.(bytesRead, total);
      // Reads made ahead resolve at once, and so do writes into the session's pack buffer: the
      // loop could run for the whole import without the event loop turning, and the pack's
      // pieces, written to the backend one after another from I/O callbacks, would wait for it
      // and pile up for the commit (measured: 21 MB of changed extents went to disk at 1 MiB
      // per 4-7 ms while the loop ran, against 0.5-1 ms when it lets I/O in).
      // A loop whose reads do wait (a whole import) lets the event loop turn by itself.
      sinceTurn += data.length;
      if (sinceTurn >= TURN_EVERY) {
        if (!turned) await setImmediate();
        sinceTurn = 0;
        turned = false;
        setImmediateCallback(markTurned);
      }
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

/** Most bytes {@link readChangedEarly} reads ahead of the store (its ring). */
const EARLY_RING_MAX = 32 * 1024 * 1024;

/** Reads started by {@link readChangedEarly}, for {@link importImage} to take over. */
export interface EarlyReads {
  /** The reads, when they are exactly `blocks` of `image`; undefined otherwise. */
  take(image: DiskImage, blocks: readonly Block[]): ReadAhead | undefined;
}

/**
 * Starts reading the changed ranges of a raw image before the store is open, assuming the
 * store's chunk size is `chunk` (the default): the key's unwrapping (scrypt, on the thread
 * pool) leaves the main thread idle meanwhile, and for a changed-extents import reading is a
 * good part of the work. Up to 32 MiB is read ahead (the ring), the rest as the import goes.
 * Only raw images: their map is known without `qemu-img`.
 */
export function readChangedEarly(
  image: DiskImage,
  changed: readonly ByteRange[],
  chunk: number,
  blockBytes?: number,
): EarlyReads | undefined {
  if (image.info.format !== 'raw') return undefined;
  const size = image.info.size;
  const block = readBlockBytes(chunk, blockBytes);
  const blocks = splitBlocks(
    planImport(wholeRawMap(size), alignRanges(changed, chunk, size)),
    block,
  );
  let bytes = 0;
  for (const b of blocks) if (b.piece.kind === 'data') bytes += b.length;
  const ringBytes = Math.max(3 * block, Math.min(EARLY_RING_MAX, bytes));
  const reads = new ReadAhead(image, blocks, Buffer.allocUnsafe(ringBytes), Infinity, 8);
  let taken = false;
  return {
    take(img, wanted) {
      if (taken || img !== image || !sameBlocks(blocks, wanted)) return undefined;
      taken = true;
      return reads;
    },
  };
}

/** Bytes of one read: `blockBytes` (2 MiB by default) rounded down to whole chunks, at least one. */
function readBlockBytes(chunk: number, blockBytes = DEFAULT_BLOCK): number {
  return Math.max(chunk, Math.floor(blockBytes / chunk) * chunk);
}

/** The map of a raw file read as it is: all data (its holes read as zeros). */
function wholeRawMap(size: number): ImageMapEntry[] {
  return [{ start: 0, length: size, zero: false, data: true, depth: 0, offset: 0 }];
}

function sameBlocks(a: readonly Block[], b: readonly Block[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) {
    const x = a[i] as Block;
    const y = b[i] as Block;
    if (x.offset !== y.offset || x.length !== y.length || x.piece.kind !== y.piece.kind)
      return false;
  }
  return true;
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
 * Reads the data blocks of an import ahead, in order, into one ring buffer used first in,
 * first out: up to `maxReads` reads ahead (at most `maxInFlight` of them unfinished) and never
 * more than the ring's bytes held, so memory stays bounded (the ring) while many small ranges
 * (changed extents) are read at once instead of one after the other. Views of one allocation, so none is transferred.
 */
export class ReadAhead {
  private readonly ringBytes: number;
  private readonly pending: Array<{ read: Promise<Buffer> | undefined; bytes: number }> = [];
  /** Next block to start reading. */
  private issued = 0;
  /** Where the next read goes in the ring, and the ring's bytes held by reads not released. */
  private tail = 0;
  private held = 0;
  /** Bytes of the block handed out last, freed by {@link release}. */
  private current = 0;
  /** Reads started and not finished. */
  private inFlight = 0;

  constructor(
    private readonly image: DiskImage,
    private readonly blocks: readonly Block[],
    private readonly ring: Buffer,
    /** Reads started and not yet handed out, at most. */
    private readonly maxReads: number,
    /**
     * Reads not yet finished, at most (finished ones wait in the ring until handed out); by
     * default only `maxReads` limits them.
     */
    private readonly maxInFlight = Infinity,
  ) {
    this.ringBytes = ring.length;
    this.issue();
  }

  /** The next block's bytes, or undefined for a zero block (nothing to read). */
  next(): Promise<Buffer> | undefined {
    this.issue();
    const p = this.pending.shift();
    if (p === undefined) throw new Error('ReadAhead: no block left');
    this.current = p.bytes;
    this.issue();
    return p.read;
  }

  /** The block handed out last is done with: its ring space is free. */
  release(): void {
    this.held -= this.current;
    this.current = 0;
    if (this.held === 0) this.tail = 0;
    this.issue();
  }

  private issue(): void {
    while (
      this.issued < this.blocks.length &&
      this.pending.length < this.maxReads &&
      this.inFlight < this.maxInFlight
    ) {
      const b = this.blocks[this.issued] as Block;
      if (b.piece.kind !== 'data') {
        this.pending.push({ read: undefined, bytes: 0 });
        this.issued++;
        continue;
      }
      let at = this.tail;
      // A read never wraps: the end of the ring it cannot use is held along with it. A tail
      // exactly at the ring's end wraps too (it wasted nothing; reading there got an empty
      // view, so every third block was read into fresh memory instead of the ring).
      let waste = 0;
      if (at + b.length > this.ringBytes) {
        waste = this.ringBytes - at;
        at = 0;
      }
      if (this.held + waste + b.length > this.ringBytes) break;
      this.held += waste + b.length;
      this.tail = at + b.length;
      const read = this.image.read(
        b.piece.entry,
        b.offset,
        b.length,
        this.ring.subarray(at, at + b.length),
      );
      this.inFlight++;
      read.then(
        () => {
          this.inFlight--;
          this.issue();
        },
        () => {
          // The import sees the error when it takes this read; read no further.
          this.issued = this.blocks.length;
        },
      );
      this.pending.push({ read, bytes: waste + b.length });
      this.issued++;
    }
  }
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
