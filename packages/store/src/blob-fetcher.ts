import { isLifeboatError } from '@lifeboat/protocol/errors';
import { packKey } from './object-format.js';
import type { BlobLocation } from './object-format.js';
import { BlobType } from './store-crypto.js';
import type { ReadContext, Store } from './store.js';

/** Blobs of one pack closer than this are read in one request (the gap is read and dropped). */
const MAX_GAP = 64 * 1024;
/** The most bytes one merged request reads (the size of a crypto pool's read slot). */
const MAX_RUN = 2 * 1024 * 1024;
/** Merged requests (read, then open) in flight at once. */
const MAX_IN_FLIGHT = 8;

interface Wanted {
  id: Buffer;
  loc: BlobLocation;
  /** Every read waiting for this blob (the first one's context names it in errors). */
  waiters: Waiter[];
}

interface Waiter {
  ctx: ReadContext;
  /** Where the reader wants the plaintext (exactly its length), if anywhere. */
  dest: Buffer | undefined;
  resolve: (b: Buffer) => void;
  reject: (e: unknown) => void;
}

/**
 * Fetches data chunks for point readers. Requests made in the same turn of the event loop
 * (a window of a stream, the blocks a read-ahead asks for, concurrent random reads) are
 * grouped per pack and merged into as few ranged reads as their offsets allow; each read's
 * chunks are then opened (decrypted, decompressed, checked) on the store's crypto threads
 * when it has them, so reads over several packs use every core and a remote backend sees one
 * request per run instead of one per chunk.
 */
export class BlobFetcher {
  private queue = new Map<string, Wanted>();
  private scheduled = false;
  private readonly runs: Wanted[][] = [];
  private active = 0;

  constructor(private readonly store: Store) {}

  /**
   * The plaintext of a data chunk at `loc` (a slice: copy it before keeping it long). With
   * `dest` (its exact length) the plaintext is written there and `dest` is what resolves.
   */
  fetch(id: Buffer, loc: BlobLocation, ctx: ReadContext, dest?: Buffer): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      const k = `${loc.pack}:${loc.offset}`;
      let w = this.queue.get(k);
      if (w === undefined) {
        w = { id, loc, waiters: [] };
        this.queue.set(k, w);
      }
      w.waiters.push({
        ctx,
        dest: dest !== undefined && dest.length === loc.rawLength ? dest : undefined,
        resolve,
        reject,
      });
      if (!this.scheduled) {
        this.scheduled = true;
        // After every read started in this turn has asked for its chunks.
        setImmediate(() => this.flush());
      }
    });
  }

  private flush(): void {
    this.scheduled = false;
    const wanted = [...this.queue.values()];
    this.queue = new Map();
    wanted.sort((a, b) =>
      a.loc.pack < b.loc.pack ? -1 : a.loc.pack > b.loc.pack ? 1 : a.loc.offset - b.loc.offset,
    );
    let run: Wanted[] = [];
    for (const w of wanted) {
      const first = run[0];
      const last = run[run.length - 1];
      if (
        first !== undefined &&
        last !== undefined &&
        (w.loc.pack !== first.loc.pack ||
          w.loc.offset > last.loc.offset + last.loc.length + MAX_GAP ||
          w.loc.offset + w.loc.length - first.loc.offset > MAX_RUN)
      ) {
        this.runs.push(run);
        run = [];
      }
      run.push(w);
    }
    if (run.length > 0) this.runs.push(run);
    this.pump();
  }

  private pump(): void {
    while (this.active < MAX_IN_FLIGHT && this.runs.length > 0) {
      const run = this.runs.shift() as Wanted[];
      this.active++;
      void this.read(run).finally(() => {
        this.active--;
        this.pump();
      });
    }
  }

  private async read(run: Wanted[]): Promise<void> {
    const store = this.store;
    const head = run[0] as Wanted;
    const base = head.loc.offset;
    let end = 0;
    for (const w of run) end = Math.max(end, w.loc.offset + w.loc.length);
    const key = packKey(head.loc.pack);
    const length = end - base;
    const threads = store.useCryptoThreads(length) ? store.cryptoPool : undefined;
    // On the threads, the run is read into a read slot (shared memory, nothing allocated);
    // on this thread, into a buffer of its own.
    const got = threads?.acquireReadSlot();
    const slot = typeof got === 'number' ? got : got === undefined ? undefined : await got;
    try {
      let data: Buffer;
      try {
        if (threads !== undefined && slot !== undefined) {
          data = threads.readView(slot, length);
          if (store.backend.getRangeInto !== undefined) {
            await store.backend.getRangeInto(key, base, data);
          } else {
            (await store.backend.getRange(key, base, length)).copy(data);
          }
        } else {
          data = await store.backend.getRange(key, base, length);
        }
      } catch (err) {
        await this.failed(run, err);
        return;
      }
      if (threads !== undefined) {
        await this.openOnThreads(run, data);
        return;
      }
      for (const w of run) {
        const rel = w.loc.offset - base;
        let plain: Buffer;
        try {
          plain = store.crypto.openChunk(
            BlobType.Data,
            w.id,
            data.subarray(rel, rel + w.loc.length),
          );
          if (plain.length !== w.loc.rawLength)
            throw new Error(`length ${plain.length}, expected ${w.loc.rawLength}`);
        } catch (e) {
          const why = (e as Error).message;
          for (const x of w.waiters)
            x.reject(store.corruptBlob(w.id, BlobType.Data, w.loc, x.ctx, why, e));
          continue;
        }
        resolveAll(w, plain);
      }
    } finally {
      if (slot !== undefined) threads?.releaseReadSlot(slot);
    }
  }

  /** A run's ranged read failed: one blob at a time when it may be one blob's fault, else all fail. */
  private async failed(run: Wanted[], err: unknown): Promise<void> {
    const store = this.store;
    if (isLifeboatError(err, 'LB_BACKEND_NOT_FOUND') || isLifeboatError(err, 'LB_BACKEND_RANGE')) {
      // One blob at a time: names the exact chunk, and looks again after a repack.
      for (const w of run) {
        try {
          resolveAll(w, await store.readBlobUncached(w.id, BlobType.Data, w.waiters[0]?.ctx ?? {}));
        } catch (e) {
          for (const x of w.waiters) x.reject(e);
        }
      }
      return;
    }
    for (const w of run) {
      for (const x of w.waiters)
        x.reject(store.blobReadError(err, w.id, BlobType.Data, w.loc, x.ctx));
    }
  }

  /** Opens a run's sealed bytes on the crypto threads, straight into the readers' buffers when they lie back to back. */
  private async openOnThreads(run: Wanted[], data: Buffer): Promise<void> {
    const store = this.store;
    const base = (run[0] as Wanted).loc.offset;
    const items = run.map((w) => ({
      offset: w.loc.offset - base,
      length: w.loc.length,
      rawLength: w.loc.rawLength,
      id: w.id,
    }));
    let result;
    try {
      result = await store.openOnThreads(data, items, contiguousDest(run));
    } catch (err) {
      for (const w of run) for (const x of w.waiters) x.reject(err);
      return;
    }
    let pos = 0;
    run.forEach((w, i) => {
      const why = result.errors?.[i];
      if (why !== undefined && why !== null) {
        for (const x of w.waiters)
          x.reject(store.corruptBlob(w.id, BlobType.Data, w.loc, x.ctx, why));
      } else {
        resolveAll(w, result.out.subarray(pos, pos + w.loc.rawLength));
      }
      pos += w.loc.rawLength;
    });
  }
}

/** The readers' buffers of a run, as one, when they lie back to back in one shared memory. */
function contiguousDest(run: Wanted[]): Buffer | undefined {
  const first = run[0]?.waiters[0]?.dest;
  if (first === undefined || !(first.buffer instanceof SharedArrayBuffer)) return undefined;
  let end = first.byteOffset;
  for (const w of run) {
    const d = w.waiters[0]?.dest;
    if (d === undefined || d.buffer !== first.buffer || d.byteOffset !== end) return undefined;
    end += d.byteLength;
  }
  return Buffer.from(first.buffer, first.byteOffset, end - first.byteOffset);
}

/**
 * Hands the plaintext to every waiter: into its own buffer when it gave one, otherwise the
 * first gets it and the others copies (no two readers share memory).
 */
function resolveAll(w: Wanted, plain: Buffer): void {
  w.waiters.forEach((x, i) => {
    if (x.dest !== undefined) {
      if (x.dest.buffer !== plain.buffer || x.dest.byteOffset !== plain.byteOffset)
        plain.copy(x.dest);
      x.resolve(x.dest);
    } else {
      x.resolve(i === 0 ? plain : Buffer.from(plain));
    }
  });
}
