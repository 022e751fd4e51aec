import { LifeboatError, isLifeboatError } from '@lifeboat/protocol';
import type { PointExtent, PointReader } from '@lifeboat/store';

/** A failed read of a point, as the job reports it. */
export interface PointReadFault {
  pointId: string;
  /** The range the client asked for. */
  offset: number;
  length: number;
  /** The store's error code (`LB_STORE_*`), or `LB_RECOVERY_READ` for an unknown error. */
  code: string;
  message: string;
}

/** Options for {@link CachedPointSource}. */
export interface CachedPointSourceOptions {
  /** Size of a cache block; use the store's chunk size so a block is one chunk. @default 65536 */
  blockSize?: number;
  /** Bytes of blocks kept in memory (least recently used out first). @default 67108864 */
  cacheBytes?: number;
  /** Blocks read ahead once reads are sequential. @default 16 */
  readAheadBlocks?: number;
  /**
   * A store read that has not answered after this long fails (`LB_RECOVERY_READ_TIMEOUT`, an
   * I/O error for the guest) instead of holding every later read of its blocks for good, and
   * the next read of them asks the store again. Longer than the Azure backend's whole retry
   * budget, so only a store that truly hangs (a stuck network file system) meets it.
   * @default 300000
   */
  readTimeoutMs?: number;
  /** Called for each failed read (the NBD client gets an I/O error for it). */
  onFault?: (fault: PointReadFault) => void;
}

/**
 * The NBD source of one recovery point: `size`, `readAt` and `extents` over a
 * {@link PointReader}, with a block cache sized by option and read-ahead when the client
 * reads sequentially (a booting guest and a hydration both do). A failed read rejects with
 * the store's error (so the NBD server answers EIO, never zeros) and is reported to `onFault`.
 */
export class CachedPointSource {
  /** Logical size of the point's disk in bytes. */
  readonly size: number;
  /** Every failed read so far, oldest first. */
  readonly faults: PointReadFault[] = [];
  /** Blocks served from memory, for figures. */
  hits = 0;
  /** Blocks read from the store, for figures. */
  misses = 0;
  private readonly blockSize: number;
  private readonly maxBlocks: number;
  private readonly readAheadBlocks: number;
  private readonly onFault: ((fault: PointReadFault) => void) | undefined;
  private readonly readTimeoutMs: number;
  // Insertion order is recency order: a hit re-inserts. Values are promises so concurrent
  // readers (and read-ahead) of one block share a single store read.
  private readonly blocks = new Map<number, Promise<Buffer>>();
  private nextSequential = -1;
  private streak = 0;
  private prefetchedTo = -1;

  constructor(
    private readonly reader: PointReader,
    options: CachedPointSourceOptions = {},
  ) {
    this.size = reader.size;
    this.blockSize = options.blockSize ?? 65536;
    this.maxBlocks = Math.max(
      1,
      Math.floor((options.cacheBytes ?? 64 * 1024 * 1024) / this.blockSize),
    );
    this.readAheadBlocks = Math.max(
      0,
      Math.min(options.readAheadBlocks ?? 16, Math.floor(this.maxBlocks / 2)),
    );
    this.onFault = options.onFault;
    this.readTimeoutMs = options.readTimeoutMs ?? 300_000;
  }

  /** The point this source serves. */
  get pointId(): string {
    return this.reader.point.id;
  }

  /** Reads `length` bytes at `offset`; rejects with the store's error for a damaged range. */
  async readAt(offset: number, length: number): Promise<Buffer> {
    if (length === 0) return Buffer.alloc(0);
    const first = Math.floor(offset / this.blockSize);
    const last = Math.floor((offset + length - 1) / this.blockSize);
    this.noteAccess(offset, length, last);
    try {
      // All blocks at once: the store merges adjacent chunks into one ranged read and opens
      // them in parallel (one after another, a 4 MiB read waited for 64 round trips).
      const parts = await Promise.all(this.blocksOf(first, last));
      const whole = parts.length === 1 ? parts[0]! : (adjacent(parts) ?? Buffer.concat(parts));
      const start = offset - first * this.blockSize;
      return whole.subarray(start, start + length);
    } catch (err) {
      const fault: PointReadFault = {
        pointId: this.reader.point.id,
        offset,
        length,
        code: isLifeboatError(err) ? err.code : 'LB_RECOVERY_READ',
        message: err instanceof Error ? err.message : String(err),
      };
      this.faults.push(fault);
      this.onFault?.(fault);
      throw err;
    }
  }

  /** The point's allocation map, for NBD block status. */
  extents(): AsyncIterable<PointExtent> {
    return this.reader.extents();
  }

  private noteAccess(offset: number, length: number, lastBlock: number): void {
    this.streak = offset === this.nextSequential ? this.streak + 1 : 0;
    this.nextSequential = offset + length;
    if (this.streak === 0) this.prefetchedTo = -1;
    if (this.streak < 2 || this.readAheadBlocks === 0) return;
    // Keep the window `readAheadBlocks` ahead of the reader, fetching only what is new.
    const end = Math.min(lastBlock + this.readAheadBlocks, this.lastBlock());
    const from = Math.max(lastBlock + 1, this.prefetchedTo + 1);
    // A failed read-ahead is forgotten (blocksOf drops it); a real read retries and reports.
    if (from <= end) for (const p of this.blocksOf(from, end, false)) p.catch(() => undefined);
    this.prefetchedTo = Math.max(this.prefetchedTo, end);
  }

  private lastBlock(): number {
    return Math.ceil(this.size / this.blockSize) - 1;
  }

  /**
   * Blocks first..last: cached ones as they are, each run of missing ones read with one
   * readInto into one piece of shared memory (the store merges its chunks into one ranged
   * read, and its crypto threads write the plaintext straight there), kept as one view per block.
   */
  private blocksOf(first: number, last: number, countHit = true): Array<Promise<Buffer>> {
    const out: Array<Promise<Buffer>> = [];
    let runStart = -1;
    const flushRun = (end: number): void => {
      if (runStart < 0) return;
      const a = runStart;
      runStart = -1;
      const start = a * this.blockSize;
      const stop = Math.min(this.size, (end + 1) * this.blockSize);
      const buf = Buffer.from(new SharedArrayBuffer(stop - start));
      const read = this.timed(this.reader.readInto(start, buf), start, stop - start);
      for (let b = a; b <= end; b++) {
        const at = (b - a) * this.blockSize;
        const pending = read.then(() =>
          buf.subarray(at, Math.min(at + this.blockSize, buf.length)),
        );
        this.misses++;
        this.remember(b, pending);
        out.push(pending);
      }
    };
    for (let b = first; b <= last; b++) {
      const cached = this.blocks.get(b);
      if (cached !== undefined) {
        flushRun(b - 1);
        this.blocks.delete(b);
        this.blocks.set(b, cached);
        if (countHit) this.hits++;
        out.push(cached);
      } else if (runStart < 0) {
        runStart = b;
      }
    }
    flushRun(last);
    return out;
  }

  /** `read`, or a timeout error once it has taken longer than the read timeout. */
  private timed(read: Promise<void>, offset: number, length: number): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        const seconds = Math.round(this.readTimeoutMs / 100) / 10;
        reject(
          new LifeboatError(
            'LB_RECOVERY_READ_TIMEOUT',
            `Reading ${length} bytes at offset ${offset} of point ${this.reader.point.id} got no answer from the store in ${seconds} s; the guest got an I/O error for it. Check that the store's disk or container answers (lifeboat store verify); the next read asks the store again.`,
            {
              details: {
                pointId: this.reader.point.id,
                offset,
                length,
                timeoutMs: this.readTimeoutMs,
              },
            },
          ),
        );
      }, this.readTimeoutMs);
      timer.unref();
    });
    // The store's read cannot be called off: if it answers late, its bytes are dropped.
    read.catch(() => undefined);
    return Promise.race([read, timeout]).finally(() => clearTimeout(timer));
  }

  private remember(index: number, pending: Promise<Buffer>): void {
    this.blocks.set(index, pending);
    pending.catch(() => {
      if (this.blocks.get(index) === pending) this.blocks.delete(index);
    });
    while (this.blocks.size > this.maxBlocks) {
      const oldest = this.blocks.keys().next().value;
      if (oldest === undefined) break;
      this.blocks.delete(oldest);
    }
  }
}

/** One view over `parts` when they lie back to back in one buffer (blocks read together): no copy. */
function adjacent(parts: readonly Buffer[]): Buffer | undefined {
  const first = parts[0];
  if (first === undefined) return undefined;
  let end = first.byteOffset + first.byteLength;
  for (let i = 1; i < parts.length; i++) {
    const p = parts[i] as Buffer;
    if (p.buffer !== first.buffer || p.byteOffset !== end) return undefined;
    end += p.byteLength;
  }
  return Buffer.from(first.buffer, first.byteOffset, end - first.byteOffset);
}
