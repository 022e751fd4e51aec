import { isLifeboatError } from '@lifeboat/protocol';
import { packKey } from './object-format.js';
import type { BlobLocation } from './object-format.js';
import { BlobType } from './store-crypto.js';
import type { ReadContext, Store } from './store.js';

/** Blobs of one pack closer than this are read in one request (the gap is read and dropped). */
const MAX_GAP = 64 * 1024;
/** The most bytes one merged request reads. */
const MAX_RUN = 8 * 1024 * 1024;
/** Merged requests (read, then open) in flight at once. */
const MAX_IN_FLIGHT = 8;

interface Wanted {
  id: Buffer;
  loc: BlobLocation;
  /** Every read waiting for this blob (the first one's context names it in errors). */
  waiters: Array<{ ctx: ReadContext; resolve: (b: Buffer) => void; reject: (e: unknown) => void }>;
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

  /** The plaintext of a data chunk at `loc` (a slice: copy it before keeping it long). */
  fetch(id: Buffer, loc: BlobLocation, ctx: ReadContext): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      const k = `${loc.pack}:${loc.offset}`;
      let w = this.queue.get(k);
      if (w === undefined) {
        w = { id, loc, waiters: [] };
        this.queue.set(k, w);
      }
      w.waiters.push({ ctx, resolve, reject });
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
    let end = 0;
    for (const w of run) end = Math.max(end, w.loc.offset + w.loc.length);
    let data: Buffer;
    try {
      data = await store.backend.getRange(
        packKey(head.loc.pack),
        head.loc.offset,
        end - head.loc.offset,
      );
    } catch (err) {
      if (
        isLifeboatError(err, 'LB_BACKEND_NOT_FOUND') ||
        isLifeboatError(err, 'LB_BACKEND_RANGE')
      ) {
        // One blob at a time: names the exact chunk, and looks again after a repack.
        for (const w of run) {
          try {
            const plain = await store.readBlobUncached(
              w.id,
              BlobType.Data,
              w.waiters[0]?.ctx ?? {},
            );
            resolveAll(w, plain);
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
      return;
    }
    const base = head.loc.offset;
    if (!store.useCryptoThreads(data.length)) {
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
      return;
    }
    let result;
    try {
      result = await store.openOnThreads(
        data,
        run.map((w) => ({
          offset: w.loc.offset - base,
          length: w.loc.length,
          rawLength: w.loc.rawLength,
          id: w.id,
        })),
      );
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
        const plain = result.out.subarray(pos, pos + w.loc.rawLength);
        resolveAll(w, plain);
      }
      pos += w.loc.rawLength;
    });
  }
}

/** Hands the plaintext to every waiter: the first gets it, the others copies (readers own what they get). */
function resolveAll(w: Wanted, plain: Buffer): void {
  w.waiters.forEach((x, i) => x.resolve(i === 0 ? plain : Buffer.from(plain)));
}
