import { randomBytes } from 'node:crypto';
import { ChunkPipeline } from './chunk-pipeline.js';
import { mapLimit } from './map-limit.js';
import { ObjectKind, encodeIndex, indexKey, sealObject } from './object-format.js';
import { PackWriter } from './pack-writer.js';
import type { PointRecord } from './point-record.js';
import { BlobType } from './store-crypto.js';
import { storeError } from './store-error.js';
import type { HeldLock } from './store-locks.js';
import type { ReadContext, Store } from './store.js';
import { isZero, writePurpose } from './store.js';
import type { CommitOptions, PointInfo, WriteSession, WriteSessionOptions } from './store-types.js';
import { REF_BYTES, TreeNode, getRef, setRef, treeHeight } from './tree-node.js';

// Dirty leaves kept in memory before the oldest is written out; each is fanout*32 bytes
// (8 KiB at the default fanout), so this bounds a session's tree state to a few MiB.
const MAX_DIRTY_LEAVES = 512;
// Base leaves one prefetch reads at most (8 MiB of references at the default fanout, a
// quarter of the store's node cache), and how many of them are read at once.
const MAX_PREFETCH_LEAVES = 1024;
const PREFETCH_READS = 8;

/**
 * A write session of one disk. It keeps the changed leaves of the copy-on-write tree (bounded,
 * spilling to packs) and streams new chunks into packs as they come; commit writes the changed
 * interior nodes, then the index, then the point object.
 */
export class StoreWriteSession implements WriteSession {
  readonly machine: string;
  readonly disk: string;
  private _size: number;
  private readonly cs: number;
  private readonly fanout: number;
  private readonly writer: PackWriter;
  private readonly leaves = new Map<number, Buffer>();
  private readonly flushed = new Map<number, Buffer | null>();
  /** Chunks of the base at or after this index are gone (the disk shrank during the session). */
  private clipChunk = Number.POSITIVE_INFINITY;
  private readonly baseChunks: number;
  private state: 'open' | 'committing' | 'committed' | 'aborted' | 'failed' = 'open';
  private tail: Promise<unknown> = Promise.resolve();
  private readonly ctx: ReadContext;
  /** The parallel path, once the store uses its crypto threads (see ChunkPipeline). */
  private pipeline: ChunkPipeline | undefined;
  /** Base leaves being read ahead by {@link prefetch}, until each is in the node cache. */
  private readonly prefetching = new Map<number, Promise<void>>();
  /** Every prefetch started, settled once its reads are (a session ends after them). */
  private prefetchRuns: Promise<void> = Promise.resolve();

  private constructor(
    private readonly store: Store,
    private readonly lock: HeldLock,
    options: { machine: string; disk: string; size: number },
    private readonly base: PointRecord | undefined,
  ) {
    this.machine = options.machine;
    this.disk = options.disk;
    this.cs = store.chunkSize;
    this.fanout = store.fanout;
    this._size = base?.info.size ?? 0;
    this.baseChunks = Math.ceil(this._size / this.cs);
    // Index objects are written as packs become durable (not only at commit), so a long
    // import keeps no per-chunk state beyond the store's index. Blobs a session never commits
    // are garbage gc removes, like those of a crashed session.
    this.writer = new PackWriter(
      store.backend,
      store.crypto,
      store.config.packSize,
      2,
      async (packs) => {
        const key = indexKey(randomBytes(16).toString('hex'));
        const body = encodeIndex({ supersedes: [], packs });
        await store.backend.put(key, sealObject(store.crypto, ObjectKind.Index, key, body));
        for (const p of packs) store.index.addPack(p.pack, p.entries);
        store.index.loaded.add(key);
      },
      store.indexEveryBlobs,
    );
    this.ctx = base === undefined ? {} : { point: base.info.id };
  }

  /** Validates options, takes a shared lock, loads the base; the session starts at `size`. */
  static async begin(store: Store, options: WriteSessionOptions): Promise<StoreWriteSession> {
    const { machine, disk, size } = options;
    if (typeof machine !== 'string' || machine === '' || typeof disk !== 'string' || disk === '') {
      throw invalid('A write session needs a non-empty machine and disk.');
    }
    checkSize(size);
    // The first time, most of the index loads while the lock is taken; the refresh that counts
    // lists index/ again once the lock is held (a cheap one then: only what is new). Once the
    // index is loaded, only that one: a listing costs in proportion to the index objects.
    const warm = store.indexWarm ? Promise.resolve() : store.refreshIndex();
    warm.catch(() => undefined);
    // The lock names the disk: a second writer of it, here or in another process, is refused.
    // Taken while the store opened, when the opener said this disk would be written.
    const prepared = await store.takePreparedLock(machine, disk)?.catch(() => undefined);
    const lock =
      prepared ??
      (await store.locks.acquire(false, writePurpose(machine, disk), { machine, disk }));
    try {
      await warm.catch(() => undefined);
      // Under the shared lock no gc runs, so what the index says stays true until commit.
      await store.refreshIndexForWrite();
      const baseOpt = options.base === undefined ? 'latest' : options.base;
      let base: PointRecord | undefined;
      if (baseOpt === 'latest') {
        const latest = await store.latestPoint(machine, disk);
        if (latest !== undefined) base = await store.loadPoint(latest.id);
      } else if (baseOpt !== null) {
        base = await store.loadPoint(baseOpt);
      }
      const session = new StoreWriteSession(store, lock, { machine, disk, size }, base);
      if (size !== session._size) await session.resizeNow(size);
      return session;
    } catch (err) {
      await lock.release();
      throw err;
    }
  }

  get size(): number {
    return this._size;
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    return this.serial(async () => {
      this.checkRange(offset, data.length);
      const buf = Buffer.isBuffer(data)
        ? data
        : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
      await this.mutate(() => this.putRange(offset, buf.length, buf));
    });
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    return this.serial(async () => {
      this.checkRange(offset, length);
      await this.mutate(() => this.putRange(offset, length, undefined));
    });
  }

  trim(offset: number, length: number): Promise<void> {
    // Trimmed ranges read as zeros and are stored as zero references, exactly like zeroes.
    return this.writeZeroes(offset, length);
  }

  prefetch(ranges: ReadonlyArray<{ offset: number; length: number }>): Promise<void> {
    const base = this.base;
    if (this.state !== 'open' || base === undefined) return Promise.resolve();
    const F = this.fanout;
    const end = Math.min(this.baseEnd, Math.ceil(this._size / this.cs));
    const wanted = new Set<number>();
    for (const r of ranges) {
      if (!(r.length > 0) || !(r.offset >= 0)) continue;
      const first = Math.floor(r.offset / this.cs / F);
      const last = Math.floor((r.offset + r.length - 1) / this.cs / F);
      for (let l = first; l <= last && l * F < end && wanted.size < MAX_PREFETCH_LEAVES; l++) {
        if (!this.leaves.has(l) && !this.flushed.has(l) && !this.prefetching.has(l)) wanted.add(l);
      }
    }
    if (wanted.size === 0) return Promise.resolve();
    const queue = [...wanted].sort((a, b) => a - b);
    const settled = new Map<number, () => void>();
    for (const l of queue) {
      this.prefetching.set(l, new Promise<void>((resolve) => settled.set(l, resolve)));
    }
    const readOne = async (l: number): Promise<void> => {
      try {
        // A session that ended meanwhile reads no further; nothing waits for the rest.
        if (this.state !== 'open') return;
        const id = await this.store.nodeAt(base.root, base.height, 0, l, this.ctx);
        if (id !== null) await this.store.readNode(id, 0, this.ctx);
      } catch {
        // The write that needs this leaf reads it again and reports what is wrong.
      } finally {
        this.prefetching.delete(l);
        settled.get(l)?.();
      }
    };
    const run = (async () => {
      // The first leaf alone: it reads the interior nodes every later path shares.
      await readOne(queue[0] as number);
      await mapLimit(queue.slice(1), PREFETCH_READS, readOne);
    })();
    this.prefetchRuns = this.prefetchRuns.then(() => run);
    return run;
  }

  resize(size: number): Promise<void> {
    return this.serial(async () => {
      checkSize(size);
      await this.mutate(() => this.resizeNow(size));
    });
  }

  commit(options: CommitOptions = {}): Promise<PointInfo> {
    return this.serial(async () => {
      // Bad metadata is refused before anything happens, so the session stays usable.
      if (options.kind !== undefined && options.kind !== 'crash' && options.kind !== 'app') {
        throw invalid(`Point kind must be 'crash' or 'app', not ${JSON.stringify(options.kind)}.`);
      }
      if (
        options.time !== undefined &&
        !(options.time instanceof Date && Number.isFinite(options.time.getTime()))
      ) {
        throw invalid('Point time must be a valid Date.');
      }
      for (const [k, v] of Object.entries(options.labels ?? {})) {
        if (typeof v !== 'string') throw invalid(`Label ${JSON.stringify(k)} must be a string.`);
      }
      this.state = 'committing';
      try {
        const info = await this.commitNow(options);
        this.state = 'committed';
        return info;
      } catch (err) {
        this.state = 'failed';
        await this.pipeline?.close();
        await this.writer.settle();
        throw err;
      } finally {
        await this.prefetchRuns;
        await this.lock.release();
      }
    });
  }

  async abort(): Promise<void> {
    if (this.state === 'committed' || this.state === 'aborted') return;
    await this.tail.catch(() => undefined);
    if (this.state === 'open' || this.state === 'failed') {
      this.state = 'aborted';
      await this.pipeline?.close();
      await this.writer.settle();
      await this.prefetchRuns;
      await this.lock.release();
    }
  }

  // ---- internals --------------------------------------------------------------------------------

  /**
   * Runs a change of the session's state. A change that fails half-way (a pack upload, a base
   * chunk that cannot be read) fails the session: committing it would publish a point with
   * part of a write missing.
   */
  private async mutate(fn: () => Promise<void>): Promise<void> {
    try {
      await fn();
    } catch (err) {
      this.state = 'failed';
      // Give back the crypto pool's shared slots now, not only at abort.
      await this.pipeline?.close();
      throw err;
    }
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.tail.then(() => {
      if (this.state !== 'open') {
        throw storeError(
          'LB_STORE_SESSION_CLOSED',
          this.state === 'failed'
            ? `The write session of ${this.machine}/${this.disk} failed earlier (see that error), so it cannot commit. Abort it and begin a new session.`
            : `The write session of ${this.machine}/${this.disk} is ${this.state}. Begin a new session.`,
          { machine: this.machine, disk: this.disk, state: this.state },
        );
      }
      return fn();
    });
    this.tail = run.catch(() => undefined);
    return run;
  }

  private checkRange(offset: number, length: number): void {
    if (
      !Number.isSafeInteger(offset) ||
      !Number.isSafeInteger(length) ||
      offset < 0 ||
      length < 0
    ) {
      throw invalid(`Invalid range: offset ${offset}, length ${length}.`);
    }
    if (offset + length > this._size) {
      throw storeError(
        'LB_STORE_OUT_OF_RANGE',
        `Range ${offset}+${length} ends past the disk's size ${this._size}. Resize the disk first.`,
        { offset, length, size: this._size },
      );
    }
  }

  /** Writes `data` (or zeros when undefined) over [offset, offset+length). */
  private async putRange(offset: number, length: number, data: Buffer | undefined): Promise<void> {
    const cs = this.cs;
    let pos = 0;
    while (pos < length) {
      const abs = offset + pos;
      const j = Math.floor(abs / cs);
      const inChunk = abs - j * cs;
      const n = Math.min(cs - inChunk, length - pos);
      if (n === cs) {
        if (data === undefined) await this.setZero(j);
        else await this.putChunk(j, data.subarray(pos, pos + cs));
      } else {
        // A partial chunk merges with the chunk's current content: the tree must be current.
        await this.pipeline?.drain();
        const cur = await this.currentChunk(j);
        if (data === undefined) cur.fill(0, inChunk, inChunk + n);
        else data.copy(cur, inChunk, pos, pos + n);
        await this.putChunk(j, cur);
      }
      pos += n;
    }
  }

  private async putChunk(j: number, plain: Buffer): Promise<void> {
    if (isZero(plain)) {
      await this.setZero(j);
      return;
    }
    if (this.pipeline === undefined) {
      const par = this.store.parallel(plain.length);
      if (par !== undefined) {
        this.pipeline = new ChunkPipeline(
          par.pool,
          par.key,
          this.writer,
          (id) => this.store.index.has(id) || this.writer.has(id),
          (j2, id) => this.setRef(j2, id),
        );
      }
    }
    if (this.pipeline !== undefined) {
      await this.pipeline.write(j, plain);
      return;
    }
    const id = this.store.crypto.chunkId(plain);
    if (!this.store.index.has(id)) await this.writer.add(BlobType.Data, id, plain);
    await this.setRef(j, id);
  }

  /** Makes chunk j read as zeros, in order behind chunks still in the pipeline. */
  private async setZero(j: number): Promise<void> {
    if (this.pipeline !== undefined) await this.pipeline.setZero(j);
    else await this.setRef(j, null);
  }

  private async setRef(j: number, id: Buffer | null): Promise<void> {
    const refs = await this.leaf(Math.floor(j / this.fanout));
    setRef(refs, j % this.fanout, id);
  }

  /** The chunk's current content (a private copy). */
  private async currentChunk(j: number): Promise<Buffer> {
    const refs = await this.leaf(Math.floor(j / this.fanout));
    const id = getRef(refs, j % this.fanout);
    if (id === null) return Buffer.alloc(this.cs);
    const plain = await this.store.readBlob(
      Buffer.from(id),
      BlobType.Data,
      { ...this.ctx, offset: j * this.cs },
      this.writer,
    );
    return Buffer.from(plain);
  }

  private get baseEnd(): number {
    return Math.min(this.baseChunks, this.clipChunk);
  }

  /** The mutable leaf `l`, loaded from this session's spill or from the base. */
  private async leaf(l: number): Promise<Buffer> {
    const hit = this.leaves.get(l);
    if (hit !== undefined) {
      this.leaves.delete(l);
      this.leaves.set(l, hit);
      return hit;
    }
    const refs = await this.loadLeaf(l);
    while (this.leaves.size >= MAX_DIRTY_LEAVES) {
      const oldest = this.leaves.keys().next().value as number;
      await this.spillLeaf(oldest);
    }
    this.leaves.set(l, refs);
    return refs;
  }

  private async loadLeaf(l: number): Promise<Buffer> {
    const F = this.fanout;
    const refs = Buffer.alloc(F * REF_BYTES);
    if (this.flushed.has(l)) {
      const id = this.flushed.get(l) ?? null;
      if (id !== null) (await this.store.readNode(id, 0, this.ctx, this.writer)).copy(refs);
      return refs;
    }
    const end = this.baseEnd;
    if (this.base !== undefined && l * F < end) {
      // Read ahead by prefetch: wait for that read instead of starting a second one.
      await this.prefetching.get(l);
      const id = await this.store.nodeAt(this.base.root, this.base.height, 0, l, this.ctx);
      if (id !== null) (await this.store.readNode(id, 0, this.ctx)).copy(refs);
      // Entries past the clip point belong to a size this disk no longer has.
      if ((l + 1) * F > end) refs.fill(0, (end - l * F) * REF_BYTES);
    }
    return refs;
  }

  private async spillLeaf(l: number): Promise<void> {
    const refs = this.leaves.get(l);
    if (refs === undefined) return;
    this.leaves.delete(l);
    this.flushed.set(l, await this.putNode(0, refs));
  }

  private async putNode(level: number, refs: Buffer): Promise<Buffer | null> {
    const node = TreeNode.encode(level, refs);
    if (node === null) return null;
    const id = this.store.crypto.treeId(node);
    if (!this.store.index.has(id)) await this.writer.add(BlobType.Tree, id, node);
    this.store.cacheNode(id, refs);
    return id;
  }

  private async resizeNow(size: number): Promise<void> {
    await this.pipeline?.drain();
    const cs = this.cs;
    const F = this.fanout;
    if (size < this._size) {
      // Zero the tail of a partial last chunk so growing later shows zeros, not old bytes.
      if (size % cs !== 0) {
        const end = Math.min(this._size, (Math.floor(size / cs) + 1) * cs);
        await this.putRange(size, end - size, undefined);
      }
      const chunks = Math.ceil(size / cs);
      this.clipChunk = Math.min(this.clipChunk, chunks);
      for (const l of [...this.flushed.keys()]) {
        if (l * F >= chunks) this.flushed.delete(l);
        else if ((l + 1) * F > chunks) await this.leaf(l);
      }
      for (const [l, refs] of [...this.leaves]) {
        if (l * F >= chunks) this.leaves.delete(l);
        else if ((l + 1) * F > chunks) refs.fill(0, (chunks - l * F) * REF_BYTES);
      }
    }
    this._size = size;
  }

  private async commitNow(options: CommitOptions): Promise<PointInfo> {
    const store = this.store;
    // Every chunk written so far is in the tree and in the pack writer before anything else.
    await this.pipeline?.drain();
    for (const l of [...this.leaves.keys()].sort((a, b) => a - b)) await this.spillLeaf(l);
    const chunks = Math.ceil(this._size / this.cs);
    const height = treeHeight(Math.max(chunks, 1), this.fanout);
    const dirty = [...this.flushed.keys()].sort((a, b) => a - b);
    const root = await this.build(height - 1, 0, chunks, dirty);
    // Write order: packs, then the index objects that list them (finish waits for both),
    // then the point that references them.
    await this.writer.finish();
    // Refuse to publish a point whose data a gc could have judged garbage.
    await this.lock.check();
    const now = new Date();
    const info: PointInfo = {
      // A cut's point has the name its cut gives it: whoever asks whether the cut is in the
      // store (a process server after a crash) reads one object instead of every point, and
      // a second commit of the cut is refused instead of adding a duplicate.
      id:
        options.cut === undefined
          ? randomBytes(16).toString('hex')
          : store.crypto.cutPointId(this.machine, this.disk, options.cut),
      machine: this.machine,
      disk: this.disk,
      time: options.time ?? now,
      committedAt: now,
      kind: options.kind ?? 'crash',
      size: this._size,
      labels: { ...(options.labels ?? {}) },
    };
    if (options.cut !== undefined) info.cut = options.cut;
    if (options.consistencyGroup !== undefined) info.consistencyGroup = options.consistencyGroup;
    if (this.base !== undefined) info.parent = this.base.info.id;
    await store.putPoint({ info, root, height });
    return { ...info, labels: { ...info.labels } };
  }

  /** Builds node (level, idx) of the new tree: shares unchanged base subtrees, rewrites the rest. */
  private async build(
    level: number,
    idx: number,
    chunks: number,
    dirty: number[],
  ): Promise<Buffer | null> {
    const pow = this.store.pow;
    const F = this.fanout;
    const span = pow[level + 1] as number;
    const start = idx * span;
    if (start >= chunks) return null;
    const leafLo = idx * (pow[level] as number);
    const leafHi = leafLo + (pow[level] as number);
    const end = this.baseEnd;
    if (!hasAny(dirty, leafLo, leafHi)) {
      if (start >= end || this.base === undefined) return null;
      if (level < this.base.height && Math.min(start + span, this.baseChunks) <= end) {
        return this.store.nodeAt(this.base.root, this.base.height, level, idx, this.ctx);
      }
      if (level === 0) return this.putNode(0, await this.loadLeaf(idx));
    } else if (level === 0) {
      return this.flushed.get(idx) ?? null;
    }
    const refs = Buffer.alloc(F * REF_BYTES);
    for (let c = 0; c < F; c++) {
      const child = idx * F + c;
      if (child * (pow[level] as number) >= chunks) break;
      setRef(refs, c, await this.build(level - 1, child, chunks, dirty));
    }
    return this.putNode(level, refs);
  }
}

function hasAny(sorted: number[], lo: number, hi: number): boolean {
  let a = 0;
  let b = sorted.length;
  while (a < b) {
    const m = (a + b) >> 1;
    if ((sorted[m] as number) < lo) a = m + 1;
    else b = m;
  }
  return a < sorted.length && (sorted[a] as number) < hi;
}

function checkSize(size: number): void {
  if (!Number.isSafeInteger(size) || size < 0 || size % 512 !== 0) {
    throw invalid(`A disk size must be a non-negative multiple of 512 bytes, not ${size}.`);
  }
}

function invalid(message: string): Error {
  return storeError('LB_STORE_INVALID_ARGUMENT', message, {});
}
