/**
 * What a resync compares the disk with: the keyed chunk ids of the latest committed point.
 * Chunks whose id equals the disk's are not sent.
 */
export interface ResyncBaseline {
  /** Chunk size of the store (ids are per aligned chunk of this size). */
  chunkSize: number;
  /** Size of the disk at the latest point. */
  size: number;
  /** The id of the chunk at a chunk-aligned offset of the latest point; `null` for a zero chunk or past its end. */
  idAt(offset: number): string | null;
  /** The id the store would give `data` (one whole chunk, not all zero). */
  idOf(data: Uint8Array): string;
}

/** Metadata of a cut marker sent to a sink. */
export interface SinkCutOptions {
  cutId: string;
  kind: 'crash' | 'app';
  /** When the cut was taken, ms since the epoch. */
  time: number;
  consistencyGroup?: string;
  /** Labels of the points (the machine's recorded hardware, `machine.*`). */
  labels?: Record<string, string>;
}

/**
 * Where the agent streams one machine's changes: `@lifeboat/protocol`'s ReplicationClient
 * (to a process server) fits this interface as it is; a store-backed sink serves tests and
 * single-process installations. Disks are named; every frame is ordered.
 */
export interface ReplicationSink {
  /** Changed bytes of a disk. */
  write(disk: string, offset: number, data: Buffer): Promise<unknown>;
  /** A range that reads as zeros. */
  writeZeroes(disk: string, offset: number, length: number): Promise<unknown>;
  /** A disk's new logical size. */
  resize(disk: string, size: number): Promise<unknown>;
  /** Announces a disk (at start, and when one is added). */
  addDisk(disk: { name: string; size: number }): void;
  /** Marks a consistent cut of all disks. */
  cut(options: SinkCutOptions): Promise<unknown>;
  /** Resolves when everything sent so far is durable on the other side. */
  waitForAck(): Promise<void>;
  /**
   * The latest point's chunk ids of a disk, for a resync that sends only what differs;
   * `undefined` when there is no point (then every allocated range is sent). A sink without
   * this method makes a resync send every allocated range.
   */
  resyncBaseline?(disk: string): Promise<ResyncBaseline | undefined>;
  /**
   * Drops the frames of a disk received since its last committed point, before a fresh
   * resync: they were read at a cut the agent can no longer relate to the disk (its bitmap is
   * lost), and a chunk they changed may since have changed back to the latest point's content,
   * which a resync would then skip.
   */
  discardPending?(disk: string): Promise<void>;
  /**
   * The newest committed cut of the machine, so an agent can tell that its bitmaps count from
   * an older point (a restored state or image) and resync. Without it the check is skipped.
   */
  latestCut?(): Promise<{ cutId: string; time: number } | undefined>;
}
