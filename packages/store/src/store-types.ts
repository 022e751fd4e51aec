import type { ObjectBackend } from './object-backend.js';

/** Crash-consistent (a cut of the disks as they were) or app-consistent (file systems frozen). */
export type PointKind = 'crash' | 'app';

/** A committed recovery point of one disk. */
export interface PointInfo {
  /** Stable id of the point (hex). */
  id: string;
  /** The protected machine's id. */
  machine: string;
  /** The disk's name within the machine (e.g. `vda`, or an image file name on import). */
  disk: string;
  /** When the cut was taken (agent's clock), not when it was committed. */
  time: Date;
  /** When the point was committed to the store. */
  committedAt: Date;
  /** Crash- or app-consistent. */
  kind: PointKind;
  /** Logical size of the disk at this point, in bytes. */
  size: number;
  /** Id shared by the points of all disks of one machine taken at one consistent cut. */
  cut?: string;
  /** Consistency group: machines whose cuts are taken together. */
  consistencyGroup?: string;
  /** Free-form labels. */
  labels: Record<string, string>;
  /** The point this one was written on top of, if any. */
  parent?: string;
}

/** Selects points in {@link Store.listPoints}. Every given field must match. */
export interface PointFilter {
  machine?: string;
  disk?: string;
  kind?: PointKind;
  consistencyGroup?: string;
  cut?: string;
  /** Only points taken at or after this time. */
  since?: Date;
  /** Only points taken at or before this time. */
  until?: Date;
}

/** Options for {@link Store.init}. */
export interface StoreInitOptions {
  /** Where the objects live. */
  backend: ObjectBackend;
  /** Wraps the random master key (scrypt). */
  passphrase: string;
  /** Chunk size in bytes, a power of two from 4 KiB to 1 MiB; fixed for the store's life. @default 65536 */
  chunkSize?: number;
  /** Target size of a pack object in bytes. @default 16777216 */
  packSize?: number;
  /** scrypt cost parameter N (a power of two). Tests may lower it. @default 32768 */
  kdfCost?: number;
  /** Worker threads for hashing, compression and encryption; see {@link StoreOpenOptions.cryptoThreads}. */
  cryptoThreads?: number;
}

/** Options for {@link Store.open}. */
export interface StoreOpenOptions {
  /** Where the objects live. */
  backend: ObjectBackend;
  /** The passphrase given at init (or set later by changePassphrase). */
  passphrase: string;
  /** Bytes of decrypted chunks kept in memory for readers. @default 67108864 */
  cacheBytes?: number;
  /**
   * Worker threads that hash, compress, encrypt and decrypt data chunks, started once the
   * store has moved more than a few MiB (small work stays on the calling thread). 0 keeps all
   * of it on the calling thread: use 0 where the caller already runs one store per thread
   * (the process server's store workers do).
   * @default the number of cores (os.availableParallelism()), at most 4
   */
  cryptoThreads?: number;
  /**
   * The disk a write session will begin on right after opening: its write lock is taken while
   * the passphrase's key is derived (scrypt: most of an open's time), so that beginWrite of
   * this disk finds it held. A lock that cannot be taken then is simply taken (or refused) again
   * by beginWrite; one that no session uses is released when the store closes. @default none
   */
  prepareWrite?: { machine: string; disk: string };
}

/** Begins writing a new point of one disk. */
export interface WriteSessionOptions {
  machine: string;
  disk: string;
  /** Logical size of the disk in bytes (a multiple of 512). */
  size: number;
  /**
   * What the new point starts from: `'latest'` (the newest point of this machine+disk, or an
   * empty disk when there is none), a point id, or `null` for an empty (all-zero) disk.
   * @default 'latest'
   */
  base?: string | 'latest' | null;
}

/** Metadata given when a point is committed. */
export interface CommitOptions {
  /** @default new Date() */
  time?: Date;
  /** @default 'crash' */
  kind?: PointKind;
  cut?: string;
  consistencyGroup?: string;
  labels?: Record<string, string>;
}

/**
 * Writes one new recovery point of one disk: extents on top of a base, then commit. Writes may
 * be at any offset and length (partial chunks are merged with the base). Nothing is visible to
 * readers until commit resolves; abandoning a session (abort, crash) leaves garbage that gc
 * removes, never a visible point.
 */
export interface WriteSession {
  readonly machine: string;
  readonly disk: string;
  /** Current logical size of the disk. */
  readonly size: number;
  /** Writes bytes at `offset`; `offset + data.length` must not exceed `size`. */
  write(offset: number, data: Uint8Array): Promise<void>;
  /** Makes a range read as zeros, storing nothing for whole chunks. */
  writeZeroes(offset: number, length: number): Promise<void>;
  /** Discards a range: it reads as zeros and is reported unallocated. */
  trim(offset: number, length: number): Promise<void>;
  /** Changes the disk's logical size (growing adds zeros). */
  resize(size: number): Promise<void>;
  /**
   * Says which ranges are about to be written, so that the session reads the base's tree
   * leaves for them now, several at once, instead of one at a time as the writes reach them
   * (a changed-extents import is mostly such reads). Only a hint: it changes nothing the
   * session writes, reads at most 1024 leaves, and leaves any read error to the write that
   * needs the leaf. Resolves once those reads are done (or the session ended); never rejects.
   */
  prefetch?(ranges: ReadonlyArray<{ offset: number; length: number }>): Promise<void>;
  /** Writes packs, then index, then the point itself; resolves once the point is durable. */
  commit(options?: CommitOptions): Promise<PointInfo>;
  /** Ends the session without a point. */
  abort(): Promise<void>;
}

/** One range of a point's disk, as reported by {@link PointReader.extents}. */
export interface PointExtent {
  offset: number;
  length: number;
  /** True when the range reads as zeros (never written, written as zeros, or trimmed). */
  zero: boolean;
}

/** Random-access and streaming reads of one point. Reads never replay a chain of deltas. */
export interface PointReader {
  readonly point: PointInfo;
  /** Logical size in bytes. */
  readonly size: number;
  /**
   * Reads `length` bytes at `offset`. A missing or corrupt chunk rejects with a LifeboatError
   * (`LB_STORE_*`, details naming the point, offset and object); never returns zeros for it.
   */
  readAt(offset: number, length: number): Promise<Buffer>;
  /**
   * Like readAt, into `target` (`target.length` bytes at `offset`), for bulk copies that reuse
   * their buffers: nothing is allocated per read, and when `target` is shared memory
   * (a SharedArrayBuffer) the crypto threads write the plaintext straight into it.
   */
  readInto(offset: number, target: Buffer): Promise<void>;
  /** Allocation map in offset order, adjacent ranges of the same kind merged. */
  extents(): AsyncIterable<PointExtent>;
  /** The whole disk (or a range) as a stream, with read-ahead. */
  stream(options?: { start?: number; end?: number }): NodeJS.ReadableStream;
  /** The keyed chunk ids of the point in offset order (`null` for zero chunks); for resync. */
  chunkIds(): AsyncIterable<{ offset: number; id: string | null }>;
}

/** Storage figures of a store. */
export interface StoreStats {
  points: number;
  machines: number;
  disks: number;
  /** Sum of the logical sizes of all points. */
  logicalBytes: number;
  /** Sum of the distinct non-zero chunks referenced, before compression. */
  uniqueBytes: number;
  /** Bytes of all objects in the backend. */
  storedBytes: number;
  /** logicalBytes / storedBytes. */
  dedupRatio: number;
  packs: number;
  chunks: number;
}

/** One fault found by verify. */
export interface VerifyFault {
  /** Stable error code, e.g. `LB_STORE_CORRUPT_CHUNK`. */
  code: string;
  message: string;
  /** The object that is missing or damaged. */
  object: string;
  /** Ids of the points whose data this fault affects. */
  points: string[];
}

/** Result of {@link Store.verify}. */
export interface VerifyReport {
  ok: boolean;
  pointsChecked: number;
  chunksChecked: number;
  bytesChecked: number;
  faults: VerifyFault[];
}

/**
 * Retention, thinning with age like the commercial service: every rule keeps at most one point
 * per `every` within `for` of the newest; a point is kept when any rule keeps it. The newest
 * point of each disk is always kept.
 * Example: `[{ for: '24h' }, { for: '7d', every: '1h' }, { for: '90d', every: '1d' }]`.
 */
export interface RetentionPolicy {
  rules: Array<{ for: string; every?: string }>;
  /** Keep app-consistent points at least this long regardless of the rules. */
  keepAppConsistentFor?: string;
}

/** Progress of long work, for progress bars. */
export interface Progress {
  done: number;
  total: number;
  /** Unit of done and total. */
  unit: 'bytes' | 'objects' | 'points';
}

/** Result of {@link Store.prune}. */
export interface PruneReport {
  kept: PointInfo[];
  removed: PointInfo[];
}

/** Result of {@link Store.gc}. */
export interface GcReport {
  packsDeleted: number;
  packsRepacked: number;
  bytesFreed: number;
  objectsDeleted: number;
}

/**
 * The replica store's API, implemented by the `Store` class (`Store.init(options)` creates a
 * new store in an empty backend, `Store.open(options)` opens an existing one; a wrong
 * passphrase rejects with `LB_STORE_WRONG_PASSPHRASE`, an unknown format version with
 * `LB_STORE_UNSUPPORTED_VERSION`, an empty backend with `LB_STORE_NOT_FOUND`, and init over
 * an existing store with `LB_STORE_EXISTS`). Several writers (processes or sessions) may write
 * different disks at once; a reader never sees a half-committed point.
 */
export interface StoreApi {
  /** The store's random id. */
  readonly id: string;
  /** Chunk size in bytes, fixed at init. */
  readonly chunkSize: number;
  /** Where the objects live, for messages. */
  readonly location: string;
  /** Starts a new point of one disk. */
  beginWrite(options: WriteSessionOptions): Promise<WriteSession>;
  /** Committed points, oldest first. */
  listPoints(filter?: PointFilter): Promise<PointInfo[]>;
  /**
   * Point objects the last listing found but could not read (damaged, unknown version), with
   * the reason; those points are missing from {@link listPoints}. Empty when all were read.
   */
  damagedPointObjects(): Array<{ id: string; object: string; error: Error }>;
  /** One point; rejects with `LB_STORE_POINT_NOT_FOUND`. */
  getPoint(id: string): Promise<PointInfo>;
  /**
   * The point committed for cut `cut` of a machine's disk, or undefined: one read of the
   * object the cut names (see `docs/store-format.md`), whatever the number of points. Points
   * committed before 2026-12-07 (random names) are not found; {@link listPoints} with a `cut`
   * filter finds every one.
   */
  findCutPoint(machine: string, disk: string, cut: string): Promise<PointInfo | undefined>;
  /** The newest point of a disk, or undefined. */
  latestPoint(machine: string, disk: string): Promise<PointInfo | undefined>;
  /** Opens a point for reading. */
  openPoint(id: string): Promise<PointReader>;
  /** The keyed chunk id (hex) the store would give `data` (a whole chunk), for resync. */
  chunkIdOf(data: Uint8Array): string;
  /** Removes points (their data stays until gc). */
  deletePoints(ids: string[]): Promise<void>;
  /** Storage figures. */
  stats(): Promise<StoreStats>;
  /** Reads and checks every referenced object; reports which points each fault affects. */
  verify(options?: { onProgress?: (p: Progress) => void }): Promise<VerifyReport>;
  /** Applies a retention policy per machine+disk; `dryRun` only reports. */
  prune(
    policy: RetentionPolicy,
    options?: { now?: Date; dryRun?: boolean; machine?: string },
  ): Promise<PruneReport>;
  /** Garbage collection under an exclusive lock: deletes unreferenced data, repacks sparse packs. */
  gc(options?: { onProgress?: (p: Progress) => void }): Promise<GcReport>;
  /** Re-wraps the master key under a new passphrase; no data is rewritten. */
  changePassphrase(newPassphrase: string): Promise<void>;
  /** Releases caches and the backend. */
  close(): Promise<void>;
}
