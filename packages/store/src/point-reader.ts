import { Readable } from 'node:stream';
import type { PointRecord } from './point-record.js';
import { BlobType } from './store-crypto.js';
import { storeError } from './store-error.js';
import type { Store } from './store.js';
import type { PointExtent, PointInfo, PointReader } from './store-types.js';
import { getRef } from './tree-node.js';

// Streaming reads fetch this many chunks per window and keep this many windows in flight.
const WINDOW_CHUNKS = 64;
const READ_AHEAD = 3;
// readAt of at least this many bytes bypasses the chunk cache.
const LARGE_READ = 1024 * 1024;

/** Reads one point: walks its tree (never a chain of deltas) and fetches chunks from packs. */
export class StorePointReader implements PointReader {
  readonly point: PointInfo;
  readonly size: number;
  private readonly cs: number;

  constructor(
    private readonly store: Store,
    private readonly record: PointRecord,
  ) {
    this.point = { ...record.info, labels: { ...record.info.labels } };
    this.size = record.info.size;
    this.cs = store.chunkSize;
  }

  async readAt(offset: number, length: number): Promise<Buffer> {
    this.checkRead(offset, length);
    // Large reads are restores or copies: they would only flush the cache that small random
    // reads (a booting guest) benefit from.
    return this.readRange(offset, length, length < LARGE_READ);
  }

  async readInto(offset: number, target: Buffer): Promise<void> {
    const length = target.length;
    this.checkRead(offset, length);
    const cs = this.cs;
    const a = Math.floor(offset / cs);
    const b = Math.ceil((offset + length) / cs);
    const refs = await this.refsFor(a, b);
    const store = this.store;
    const waits: Array<Promise<unknown>> = [];
    for (let j = a; j < b; j++) {
      const from = Math.max(offset, j * cs);
      const to = Math.min(offset + length, (j + 1) * cs);
      const part = target.subarray(from - offset, to - offset);
      const ref = refs[j - a];
      if (ref === null || ref === undefined) {
        part.fill(0);
        continue;
      }
      const ctx = { point: this.point.id, offset: j * cs };
      let loc = store.index.get(ref);
      if (loc === undefined) {
        await store.refreshIndex();
        loc = store.index.get(ref);
      }
      if (loc === undefined) throw store.notLocated(Buffer.from(ref), BlobType.Data, ctx);
      const id = Buffer.from(ref);
      // A whole chunk goes straight into the target; a piece of one is copied out of it.
      const whole = from === j * cs && part.length === loc.rawLength;
      const p = whole
        ? store.fetcher.fetch(id, loc, ctx, part)
        : store.fetcher
            .fetch(id, loc, ctx)
            .then((plain) => plain.copy(part, 0, from - j * cs, to - j * cs));
      p.catch(() => undefined);
      waits.push(p);
    }
    for (const p of waits) await p;
  }

  async *extents(): AsyncIterable<PointExtent> {
    let cur: PointExtent | undefined;
    for await (const run of this.runs()) {
      if (cur !== undefined && cur.zero === run.zero && cur.offset + cur.length === run.offset) {
        cur.length += run.length;
      } else {
        if (cur !== undefined) yield cur;
        cur = { ...run };
      }
    }
    if (cur !== undefined) yield cur;
  }

  stream(options: { start?: number; end?: number } = {}): NodeJS.ReadableStream {
    const start = options.start ?? 0;
    const end = options.end ?? this.size;
    if (
      !Number.isSafeInteger(start) ||
      !Number.isSafeInteger(end) ||
      start < 0 ||
      end > this.size ||
      start > end
    ) {
      throw storeError(
        'LB_STORE_OUT_OF_RANGE',
        `Stream range ${start}..${end} is outside point ${this.point.id} of size ${this.size}.`,
        { point: this.point.id, start, end, size: this.size },
      );
    }
    const window = WINDOW_CHUNKS * this.cs;
    const readParts = (from: number, to: number): Promise<Buffer[]> =>
      this.readParts(from, to - from, false);
    async function* windows(): AsyncGenerator<Buffer> {
      const queue: Array<Promise<Buffer[]>> = [];
      let next = start;
      const fill = (): void => {
        while (queue.length < READ_AHEAD && next < end) {
          // Windows are aligned to chunks so each chunk is fetched once.
          const stop = Math.min(end, (Math.floor(next / window) + 1) * window);
          const p = readParts(next, stop);
          // Attach a handler now; the error surfaces when this window is awaited below.
          p.catch(() => undefined);
          queue.push(p);
          next = stop;
        }
      };
      fill();
      while (queue.length > 0) {
        const parts = await (queue.shift() as Promise<Buffer[]>);
        fill();
        yield* parts;
      }
    }
    return Readable.from(windows(), { objectMode: false, highWaterMark: 1 });
  }

  async *chunkIds(): AsyncIterable<{ offset: number; id: string | null }> {
    const chunks = Math.ceil(this.size / this.cs);
    const F = this.store.fanout;
    for (let l = 0; l * F < chunks; l++) {
      const refs = await this.leafRefs(l);
      for (let i = 0; i < F && l * F + i < chunks; i++) {
        const id = refs === null ? null : getRef(refs, i);
        yield { offset: (l * F + i) * this.cs, id: id === null ? null : id.toString('hex') };
      }
    }
  }

  // ---- internals --------------------------------------------------------------------------------

  private checkRead(offset: number, length: number): void {
    if (
      !Number.isSafeInteger(offset) ||
      !Number.isSafeInteger(length) ||
      offset < 0 ||
      length < 0
    ) {
      throw storeError(
        'LB_STORE_INVALID_ARGUMENT',
        `Invalid read range: offset ${offset}, length ${length}.`,
        {},
      );
    }
    if (offset + length > this.size) {
      throw storeError(
        'LB_STORE_OUT_OF_RANGE',
        `Read ${offset}+${length} ends past the size ${this.size} of point ${this.point.id}.`,
        { point: this.point.id, offset, length, size: this.size },
      );
    }
  }

  /** Leaf l's references, or null when the whole leaf reads as zeros. */
  private async leafRefs(l: number): Promise<Buffer | null> {
    const ctx = { point: this.point.id, offset: l * this.store.fanout * this.cs };
    const id = await this.store.nodeAt(this.record.root, this.record.height, 0, l, ctx);
    return id === null ? null : this.store.readNode(id, 0, ctx);
  }

  /** The chunk ids covering chunks [a, b). */
  private async refsFor(a: number, b: number): Promise<Array<Buffer | null>> {
    const F = this.store.fanout;
    const out: Array<Buffer | null> = [];
    for (let l = Math.floor(a / F); l * F < b; l++) {
      const refs = await this.leafRefs(l);
      for (let j = Math.max(a, l * F); j < Math.min(b, (l + 1) * F); j++) {
        out.push(refs === null ? null : getRef(refs, j - l * F));
      }
    }
    return out;
  }

  /** Reads [offset, offset+length); `cached` uses the chunk cache (random access) or not (streams). */
  private async readRange(offset: number, length: number, cached: boolean): Promise<Buffer> {
    const parts = await this.readParts(offset, length, cached);
    return parts.length === 1
      ? (parts[0] as Buffer)
      : (adjacent(parts) ?? Buffer.concat(parts, length));
  }

  /**
   * Reads [offset, offset+length) as consecutive pieces: slices of decrypted chunks (no copy)
   * and freshly allocated zero runs. Streams yield these directly.
   */
  private async readParts(offset: number, length: number, cached: boolean): Promise<Buffer[]> {
    if (length === 0) return [Buffer.alloc(0)];
    const cs = this.cs;
    const a = Math.floor(offset / cs);
    const b = Math.ceil((offset + length) / cs);
    const refs = await this.refsFor(a, b);
    const chunks = await this.fetch(refs, a, cached);
    const parts: Buffer[] = [];
    let zeros = 0;
    for (let j = a; j < b; j++) {
      const plain = chunks[j - a];
      const from = Math.max(offset, j * cs);
      const to = Math.min(offset + length, (j + 1) * cs);
      if (plain === undefined || plain === null) {
        zeros += to - from;
        continue;
      }
      if (zeros > 0) parts.push(Buffer.alloc(zeros));
      zeros = 0;
      // Cached chunks are shared: hand out copies; uncached ones belong to this read alone.
      const slice = plain.subarray(from - j * cs, to - j * cs);
      parts.push(cached ? Buffer.from(slice) : slice);
    }
    if (zeros > 0) parts.push(Buffer.alloc(zeros));
    return parts;
  }

  /**
   * Fetches chunks through the store's fetcher, which merges adjacent blobs of a pack (also
   * across concurrent reads) into one ranged read and opens them on the crypto threads.
   */
  private async fetch(
    refs: Array<Buffer | null>,
    first: number,
    cached: boolean,
  ): Promise<Array<Buffer | null>> {
    const store = this.store;
    const out: Array<Buffer | null> = refs.map(() => null);
    const waits: Array<Promise<void>> = [];
    for (let i = 0; i < refs.length; i++) {
      const ref = refs[i];
      if (ref === null || ref === undefined) continue;
      if (cached) {
        const hit = store.cachedChunk(ref);
        if (hit !== undefined) {
          out[i] = hit;
          continue;
        }
      }
      const ctx = { point: this.point.id, offset: (first + i) * this.cs };
      let loc = store.index.get(ref);
      if (loc === undefined) {
        // Another process may have committed it after this one loaded the index.
        await store.refreshIndex();
        loc = store.index.get(ref);
      }
      if (loc === undefined) throw store.notLocated(Buffer.from(ref), BlobType.Data, ctx);
      const id = Buffer.from(ref);
      const p = store.fetcher.fetch(id, loc, ctx).then((plain) => {
        if (cached) {
          // A slice of a larger read would keep all of it alive in the cache: copy it.
          const own = plain.buffer.byteLength - plain.byteLength < 64 ? plain : Buffer.from(plain);
          store.cacheChunk(id, own);
          out[i] = own;
        } else {
          out[i] = plain;
        }
      });
      // Errors surface below, in chunk order; none is left unhandled meanwhile.
      p.catch(() => undefined);
      waits.push(p);
    }
    for (const p of waits) await p;
    return out;
  }

  /** Runs of chunks in offset order, each all-zero or all-data, walking whole zero subtrees at once. */
  private async *runs(): AsyncIterable<PointExtent> {
    const store = this.store;
    const cs = this.cs;
    const size = this.size;
    const F = store.fanout;
    const pow = store.pow;
    const point = this.point.id;
    async function* walk(
      id: Buffer | null,
      level: number,
      idx: number,
    ): AsyncGenerator<PointExtent> {
      const span = (pow[level + 1] as number) * cs;
      const start = idx * span;
      if (start >= size) return;
      const length = Math.min(span, size - start);
      if (id === null) {
        yield { offset: start, length, zero: true };
        return;
      }
      const refs = await store.readNode(id, level, { point, offset: start });
      for (let c = 0; c < F; c++) {
        const child = getRef(refs, c);
        if (level === 0) {
          const off = start + c * cs;
          if (off >= size) return;
          yield { offset: off, length: Math.min(cs, size - off), zero: child === null };
        } else {
          yield* walk(child === null ? null : Buffer.from(child), level - 1, idx * F + c);
        }
      }
    }
    yield* walk(this.record.root, this.record.height - 1, 0);
  }
}

/** One view over `parts` when they lie back to back in one buffer (a merged read): no copy. */
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
