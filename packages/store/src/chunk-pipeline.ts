import type { CryptoPool } from './crypto-pool.js';
import type { PackWriter } from './pack-writer.js';
import { BlobType } from './store-crypto.js';

/** Chunks per hash or seal request to a crypto thread. */
const BATCH = 16;
/** Reference updates queued behind pending hashes before a writer waits. */
const MAX_QUEUED = 4096;

/** One reference update of a write session, in the order the session made it. */
interface Entry {
  /** Chunk index on the disk. */
  j: number;
  /** The chunk's id once known; null for a zero chunk. */
  id: Buffer | null | undefined;
  /** The slot holding the plaintext while it is hashed (and, when new, sealed). */
  slot: number;
  length: number;
}

/**
 * The parallel write path of one session: whole chunks are copied into the crypto pool's
 * slots, hashed on its threads in batches, and applied to the session's tree strictly in the
 * order they were written (a later write of the same chunk always wins). A chunk the store
 * does not have yet is sealed on a thread in its slot and copied into the session's pack
 * writer; duplicates only cost the hash. `drain()` waits until every chunk written so far is
 * in the tree and in the pack writer; the session calls it before anything that reads the tree
 * or the packs (partial-chunk merges, resize, commit).
 */
export class ChunkPipeline {
  private readonly queue: Entry[] = [];
  private head = 0;
  private hashBatch: Entry[] = [];
  private sealBatch: Array<{ entry: Entry; id: Buffer }> = [];
  /** Ids being sealed now, so a second copy in flight is recognised as a duplicate. */
  private readonly sealing = new Set<string>();
  private sealChain: Promise<void> = Promise.resolve();
  private applying = false;
  private flushScheduled = false;
  /** Requests to the pool not yet answered. */
  private inFlight = 0;
  private failure: unknown;
  private closed = false;
  private idleWaiters: Array<() => void> = [];

  constructor(
    private readonly pool: CryptoPool,
    private readonly key: number,
    private readonly writer: PackWriter,
    /** True when the store or this session already holds a blob with this id. */
    private readonly known: (id: Buffer) => boolean,
    /** Sets chunk j's reference in the session's tree. */
    private readonly setRef: (j: number, id: Buffer | null) => Promise<void>,
  ) {}

  /** Queues a whole non-zero chunk; resolves once its bytes are copied (the caller may reuse them). */
  async write(j: number, data: Buffer): Promise<void> {
    this.throwIfFailed();
    const got = this.pool.acquireSlot();
    const slot = typeof got === 'number' ? got : await got;
    if (this.failure !== undefined || this.closed) {
      this.pool.releaseSlot(slot);
      this.throwIfFailed();
    }
    data.copy(this.pool.view(slot), 0);
    const entry: Entry = { j, id: undefined, slot, length: data.length };
    this.queue.push(entry);
    this.hashBatch.push(entry);
    if (this.hashBatch.length >= BATCH) this.sendHashes();
    else this.scheduleFlush();
  }

  /** Queues a reference that needs no hashing (a zero chunk) behind the pending ones. */
  async setZero(j: number): Promise<void> {
    this.throwIfFailed();
    if (this.pending === 0 && !this.applying) {
      // Nothing ahead of it: apply at once (tree updates never run two at a time).
      await this.setRef(j, null);
      return;
    }
    while (this.pending > MAX_QUEUED) {
      this.flush();
      await this.waitProgress();
      this.throwIfFailed();
    }
    this.queue.push({ j, id: null, slot: -1, length: 0 });
  }

  /** Waits until every queued chunk is in the tree and in the pack writer; throws the first failure. */
  async drain(): Promise<void> {
    for (;;) {
      this.throwIfFailed();
      this.flush();
      if (this.idle) break;
      await this.waitProgress();
    }
    await this.sealChain;
    this.throwIfFailed();
  }

  /** Ends the pipeline without applying what is queued; releases every slot once no thread uses it. */
  async close(): Promise<void> {
    this.closed = true;
    this.failure ??= new Error('write session ended');
    for (;;) {
      this.releaseUnsent();
      if (this.inFlight === 0 && !this.applying) break;
      await this.waitProgress();
    }
    await this.sealChain.catch(() => undefined);
    this.releaseUnsent();
  }

  // ---- internals --------------------------------------------------------------------------------

  private get pending(): number {
    return this.queue.length - this.head;
  }

  private get idle(): boolean {
    return (
      this.pending === 0 &&
      this.inFlight === 0 &&
      this.hashBatch.length === 0 &&
      this.sealBatch.length === 0 &&
      !this.applying
    );
  }

  private throwIfFailed(): void {
    if (this.failure !== undefined) throw this.failure;
  }

  private fail(err: unknown): void {
    this.failure ??= err;
    if (!this.applying) this.releaseUnsent();
    this.notify();
  }

  private notify(): void {
    const w = this.idleWaiters;
    this.idleWaiters = [];
    for (const f of w) f();
  }

  private waitProgress(): Promise<void> {
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private scheduleFlush(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    // Partial batches go out once the writer pauses (awaits its next block), not at once.
    setImmediate(() => {
      this.flushScheduled = false;
      this.flush();
    });
  }

  private flush(): void {
    if (this.hashBatch.length > 0) this.sendHashes();
    if (this.sealBatch.length > 0) this.sendSeals();
  }

  private sendHashes(): void {
    const batch = this.hashBatch;
    this.hashBatch = [];
    if (this.failure !== undefined) {
      for (const e of batch) this.release(e);
      return;
    }
    const slots = Int32Array.from(batch, (e) => e.slot);
    const lens = Int32Array.from(batch, (e) => e.length);
    this.inFlight++;
    this.pool.hash(this.key, slots, lens).then(
      (ids) => {
        this.inFlight--;
        batch.forEach((e, i) => {
          e.id = Buffer.from(ids.subarray(32 * i, 32 * i + 32));
        });
        if (this.failure !== undefined) {
          for (const e of batch) this.release(e);
          this.notify();
          return;
        }
        void this.apply();
      },
      (err: unknown) => {
        this.inFlight--;
        for (const e of batch) this.release(e);
        this.fail(err);
      },
    );
  }

  /** Applies resolved entries at the head of the queue, in order. */
  private async apply(): Promise<void> {
    if (this.applying) return;
    this.applying = true;
    try {
      while (this.failure === undefined && this.pending > 0) {
        const e = this.queue[this.head] as Entry;
        if (e.id === undefined) break;
        this.queue[this.head++] = undefined as unknown as Entry;
        if (this.head > 1024 && this.head * 2 > this.queue.length) {
          this.queue.splice(0, this.head);
          this.head = 0;
        }
        if (e.id !== null && e.slot >= 0) {
          const k = e.id.toString('latin1');
          if (this.known(e.id) || this.sealing.has(k)) {
            this.release(e);
          } else {
            this.sealing.add(k);
            this.sealBatch.push({ entry: e, id: e.id });
            if (this.sealBatch.length >= BATCH) this.sendSeals();
          }
        }
        await this.setRef(e.j, e.id);
      }
      if (this.sealBatch.length > 0) this.sendSeals();
    } catch (err) {
      this.fail(err);
    } finally {
      this.applying = false;
      // Drop what can no longer be applied.
      if (this.failure !== undefined) this.releaseUnsent();
      this.notify();
    }
  }

  private sendSeals(): void {
    const batch = this.sealBatch;
    this.sealBatch = [];
    if (this.failure !== undefined) {
      for (const { entry, id } of batch) {
        this.sealing.delete(id.toString('latin1'));
        this.release(entry);
      }
      return;
    }
    const slots = Int32Array.from(batch, (b) => b.entry.slot);
    const lens = Int32Array.from(batch, (b) => b.entry.length);
    const ids = Buffer.allocUnsafe(32 * batch.length);
    batch.forEach((b, i) => b.id.copy(ids, 32 * i));
    this.inFlight++;
    const sealed = this.pool.seal(this.key, slots, lens, ids);
    // Sealed chunks enter the pack writer one batch at a time, in the order they were sealed.
    this.sealChain = this.sealChain.then(async () => {
      let lengths: Int32Array | undefined;
      try {
        lengths = await sealed;
      } catch (err) {
        this.fail(err);
      }
      try {
        for (let i = 0; i < batch.length; i++) {
          const { entry, id } = batch[i] as { entry: Entry; id: Buffer };
          const n = lengths?.[i];
          if (this.failure === undefined && n !== undefined) {
            try {
              await this.writer.addSealed(
                BlobType.Data,
                id,
                entry.length,
                this.pool.view(entry.slot, n),
              );
            } catch (err) {
              this.fail(err);
            }
          }
          this.sealing.delete(id.toString('latin1'));
          // Only now: a chunk holds its slot until it is in a pack, so what waits for a pack
          // upload (plaintext or ciphertext) never exceeds the slots, however slow the store.
          this.release(entry);
        }
      } finally {
        this.inFlight--;
        this.notify();
      }
    });
  }

  private release(e: Entry): void {
    if (e.slot < 0) return;
    const s = e.slot;
    e.slot = -1;
    this.pool.releaseSlot(s);
  }

  /** Releases the slots of entries no thread holds (queued, not yet sent or already hashed). */
  private releaseUnsent(): void {
    for (const e of this.hashBatch) this.release(e);
    this.hashBatch = [];
    for (const { entry, id } of this.sealBatch) {
      this.sealing.delete(id.toString('latin1'));
      this.release(entry);
    }
    this.sealBatch = [];
    if (this.applying) return;
    for (let i = this.head; i < this.queue.length; i++) {
      const e = this.queue[i] as Entry;
      // An entry whose hash is in flight keeps its slot until the thread answers.
      if (e.id !== undefined) this.release(e);
    }
    if (this.inFlight === 0) {
      for (let i = this.head; i < this.queue.length; i++) this.release(this.queue[i] as Entry);
      this.queue.length = 0;
      this.head = 0;
    }
  }
}
