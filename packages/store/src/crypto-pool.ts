import { Worker } from 'node:worker_threads';
import type { CryptoReply, CryptoRequest, CryptoWorkerData } from './crypto-protocol.js';
import { BlobType } from './store-crypto.js';
import type { StoreCrypto } from './store-crypto.js';
import { storeError } from './store-error.js';

/** Options of {@link CryptoPool}. */
export interface CryptoPoolOptions {
  /** Crypto threads; 0 runs everything on the calling thread. */
  threads: number;
  /** Bytes of one slot: a chunk's plaintext, and its sealed form written over it. */
  slotBytes: number;
  /** Bytes of all slots together (bounds the data in flight). @default 8388608 */
  arenaBytes?: number;
}

/** One blob to open: where it is in the buffer given, and what it must be. */
export interface OpenItem {
  offset: number;
  length: number;
  rawLength: number;
  id: Buffer;
}

/** Result of {@link CryptoPool.open}: the plaintexts one after another, and per-blob failures. */
export interface OpenResult {
  out: Buffer;
  /** Null when every blob opened; otherwise, per blob, why it did not (null: it did). */
  errors: Array<string | null> | null;
}

interface Pending {
  resolve: (r: CryptoReply & { ok: true }) => void;
  reject: (e: unknown) => void;
}

// Read slots: as many as the merged reads a fetcher runs at once.
const READ_SLOTS = 8;

// A thread that dies this many times (per configured thread) is not replaced any more: the
// pool then works on the calling thread, which is slower but still correct.
const MAX_DEATHS_PER_THREAD = 4;

class CryptoThread {
  readonly pending = new Map<number, Pending>();
  ready = false;
  dead = false;
  /** Bytes of work posted and not yet answered, to balance the threads. */
  load = 0;
  /** Tests: the thread ends abruptly just before its next request. */
  dieBeforeNext = false;
  /** Being terminated: stays referenced until it has exited, whatever replies still arrive. */
  ending = false;

  constructor(
    readonly worker: Worker,
    private readonly onDeath: (t: CryptoThread, why: string) => void,
  ) {
    // An idle pool must not keep the process alive; a thread with work in hand does.
    worker.unref();
    worker.on('message', (m: CryptoReply) => {
      if (m.id === 0) {
        if (m.ok && m.ready === true) this.ready = true;
        return;
      }
      const p = this.pending.get(m.id);
      if (p === undefined) return;
      this.pending.delete(m.id);
      if (this.pending.size === 0 && !this.ending) worker.unref();
      if (m.ok) p.resolve(m);
      else p.reject(new Error(m.error));
    });
    worker.on('error', (err) => this.die(err.message));
    worker.on('exit', (code) => this.die(`exit code ${code}`));
  }

  post(req: CryptoRequest, transfer: ArrayBuffer[]): Promise<CryptoReply & { ok: true }> {
    return new Promise((resolve, reject) => {
      if (this.pending.size === 0) this.worker.ref();
      this.pending.set(req.id, { resolve, reject });
      if (this.dieBeforeNext) this.worker.postMessage({ t: 'die', id: 0 } satisfies CryptoRequest);
      this.worker.postMessage(req, transfer);
    });
  }

  private die(why: string): void {
    if (this.dead) return;
    this.dead = true;
    this.ready = false;
    this.onDeath(this, why);
    const err = storeError(
      'LB_STORE_WORKER_FAILED',
      `A store crypto thread stopped (${why}) while it held work; that work was lost, so the write session or read that needed it failed and nothing half-done was committed. Retry; if it happens again, run with fewer crypto threads (cryptoThreads) and report it.`,
      { reason: why },
    );
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
    this.worker.unref();
  }
}

/**
 * Keyed hashing, sealing and opening of data chunks on worker threads, so a write session or
 * a reader uses every core. Plaintexts travel in fixed slots of one SharedArrayBuffer (bounded:
 * a session waits for a free slot), sealed chunks come back in the same slot, and sealed runs
 * of a pack are transferred, not copied. Threads start on first use and end on close; with
 * `threads: 0`, or while no thread is ready yet, the work runs on the calling thread.
 * Several stores may share one pool: each registers its keys and names them in its requests.
 */
export class CryptoPool {
  readonly threads: number;
  readonly slotBytes: number;
  private readonly arena: SharedArrayBuffer;
  private readonly arenaView: Buffer;
  private readonly free: number[] = [];
  private readonly waiters: Array<(slot: number) => void> = [];
  private readonly workers: CryptoThread[] = [];
  private readArena: Buffer | undefined;
  private readonly readFree: number[] = [];
  private readonly readWaiters: Array<(slot: number) => void> = [];
  private readonly keys = new Map<
    number,
    { crypto: StoreCrypto; master: Uint8Array; storeId: string; level: number }
  >();
  private nextKey = 1;
  private nextId = 1;
  private deaths = 0;
  private closed = false;
  private dieNext = false;

  constructor(options: CryptoPoolOptions) {
    const threads = options.threads;
    if (!Number.isInteger(threads) || threads < 0 || threads > 64) {
      throw storeError(
        'LB_STORE_INVALID_ARGUMENT',
        `cryptoThreads must be a whole number from 0 to 64, not ${threads}.`,
        {},
      );
    }
    this.threads = threads;
    this.slotBytes = Math.ceil(options.slotBytes / 64) * 64;
    const slots =
      threads === 0
        ? 0
        : Math.max(16, Math.floor((options.arenaBytes ?? 8 << 20) / this.slotBytes));
    this.arena = new SharedArrayBuffer(slots * this.slotBytes);
    this.arenaView = Buffer.from(this.arena);
    for (let i = slots - 1; i >= 0; i--) this.free.push(i);
  }

  /** Number of slots (the most chunks in flight at once). */
  get slots(): number {
    return this.arena.byteLength / this.slotBytes;
  }

  /** Registers a store's keys; requests name the returned key. */
  register(crypto: StoreCrypto, master: Buffer, storeId: string, level: number): number {
    const key = this.nextKey++;
    const entry = { crypto, master: new Uint8Array(master), storeId, level };
    this.keys.set(key, entry);
    for (const w of this.workers) void this.sendKey(w, key, entry).catch(() => undefined);
    return key;
  }

  /** Forgets a store's keys, in this thread and in every crypto thread. */
  unregister(key: number): void {
    const entry = this.keys.get(key);
    if (entry === undefined) return;
    entry.master.fill(0);
    this.keys.delete(key);
    for (const w of this.workers) {
      if (!w.dead) void w.post({ t: 'unkey', id: this.nextId++, key }, []).catch(() => undefined);
    }
  }

  /** Starts the threads, if not yet started (they become ready a little later). */
  start(): void {
    if (this.closed) return;
    while (
      this.workers.length < this.threads &&
      this.deaths < this.threads * MAX_DEATHS_PER_THREAD
    ) {
      this.spawn();
    }
  }

  /** True when at least one thread is ready for work. */
  get ready(): boolean {
    return this.workers.some((w) => w.ready);
  }

  /** A free slot; waits (first come, first served) while all are in use. */
  acquireSlot(): Promise<number> | number {
    const slot = this.free.pop();
    if (slot !== undefined) return slot;
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  /** Returns a slot; the next waiter gets it. */
  releaseSlot(slot: number): void {
    const next = this.waiters.shift();
    if (next !== undefined) next(slot);
    else this.free.push(slot);
  }

  /** The first `length` bytes of a slot. */
  view(slot: number, length = this.slotBytes): Buffer {
    const at = slot * this.slotBytes;
    return this.arenaView.subarray(at, at + length);
  }

  /** Keyed ids (32 bytes each, one after another) of the plaintexts in `slots`. */
  async hash(key: number, slots: Int32Array, lens: Int32Array): Promise<Buffer> {
    const w = this.pick();
    if (w === undefined) {
      const c = this.crypto(key);
      const ids = Buffer.allocUnsafe(32 * slots.length);
      for (let i = 0; i < slots.length; i++) {
        c.chunkId(this.view(slots[i] as number, lens[i] as number)).copy(ids, 32 * i);
      }
      return ids;
    }
    const bytes = sum(lens);
    w.load += bytes;
    try {
      const r = await w.post({ t: 'hash', id: this.nextId++, key, slots, lens }, []);
      const ids = r.ids as Uint8Array;
      return Buffer.from(ids.buffer, ids.byteOffset, ids.byteLength);
    } finally {
      w.load -= bytes;
    }
  }

  /**
   * Seals the data chunks in `slots` in place (the sealed chunk is written over its plaintext,
   * so the calling thread makes no garbage); resolves with each sealed length.
   */
  async seal(key: number, slots: Int32Array, lens: Int32Array, ids: Buffer): Promise<Int32Array> {
    const w = this.pick();
    if (w === undefined) {
      const c = this.crypto(key);
      const sealed = new Int32Array(slots.length);
      for (let i = 0; i < slots.length; i++) {
        const s = slots[i] as number;
        const parts = c.sealChunkParts(
          BlobType.Data,
          ids.subarray(32 * i, 32 * i + 32),
          this.view(s, lens[i] as number),
        );
        const out = this.view(s);
        let pos = 0;
        for (const p of parts) pos += p.copy(out, pos);
        sealed[i] = pos;
      }
      return sealed;
    }
    const bytes = sum(lens);
    w.load += bytes;
    try {
      const r = await w.post(
        { t: 'seal', id: this.nextId++, key, slots, lens, ids: new Uint8Array(ids) },
        [],
      );
      return r.sealed as Int32Array;
    } finally {
      w.load -= bytes;
    }
  }

  /** Bytes of one read slot: the most one merged read may be. */
  readonly readSlotBytes = 2 * 1024 * 1024;

  /** A free read slot (shared memory a merged read of a pack is read into); waits while all are in use. */
  acquireReadSlot(): Promise<number> | number {
    if (this.readArena === undefined) {
      // Made on first use: a store that only writes never pays for it.
      this.readArena = Buffer.from(new SharedArrayBuffer(READ_SLOTS * this.readSlotBytes));
      for (let i = READ_SLOTS - 1; i >= 0; i--) this.readFree.push(i);
    }
    const slot = this.readFree.pop();
    if (slot !== undefined) return slot;
    return new Promise((resolve) => this.readWaiters.push(resolve));
  }

  /** Returns a read slot. */
  releaseReadSlot(slot: number): void {
    const next = this.readWaiters.shift();
    if (next !== undefined) next(slot);
    else this.readFree.push(slot);
  }

  /** The first `length` bytes of a read slot. */
  readView(slot: number, length: number): Buffer {
    const at = slot * this.readSlotBytes;
    return (this.readArena as Buffer).subarray(at, at + length);
  }

  /**
   * Opens (decrypts, decompresses, checks) sealed data chunks lying in `data`. `data` is a
   * view of shared memory (a read slot), or is handed over to a thread when it owns its memory
   * (the caller must not use it afterwards). With `dest` (shared memory, the plaintexts' total
   * length) the plaintexts are written there, one after another, and `out` is `dest`.
   */
  async open(
    key: number,
    data: Buffer,
    items: readonly OpenItem[],
    dest?: Buffer,
  ): Promise<OpenResult> {
    const w = this.pick();
    let total = 0;
    for (const it of items) total += it.rawLength;
    const into = dest !== undefined && dest.length === total ? dest : undefined;
    if (w === undefined) {
      const c = this.crypto(key);
      const out = into ?? Buffer.allocUnsafe(total);
      let errors: Array<string | null> | null = null;
      let pos = 0;
      items.forEach((it, i) => {
        try {
          const plain = c.openChunk(
            BlobType.Data,
            it.id,
            data.subarray(it.offset, it.offset + it.length),
          );
          if (plain.length !== it.rawLength)
            throw new Error(`length ${plain.length}, expected ${it.rawLength}`);
          plain.copy(out, pos);
        } catch (err) {
          errors ??= items.map(() => null);
          errors[i] = (err as Error).message;
        }
        pos += it.rawLength;
      });
      return { out, errors };
    }
    const n = items.length;
    const offs = new Int32Array(n);
    const lens = new Int32Array(n);
    const raws = new Int32Array(n);
    const ids = new Uint8Array(32 * n);
    items.forEach((it, i) => {
      offs[i] = it.offset;
      lens[i] = it.length;
      raws[i] = it.rawLength;
      ids.set(it.id, 32 * i);
    });
    const shared = data.buffer instanceof SharedArrayBuffer;
    const owned = !shared && data.byteOffset === 0 && data.byteLength === data.buffer.byteLength;
    // Shared memory is posted as a view (no copy); an owned buffer is transferred.
    const payload =
      shared || owned
        ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
        : new Uint8Array(data);
    const outView =
      into !== undefined && into.buffer instanceof SharedArrayBuffer
        ? new Uint8Array(into.buffer, into.byteOffset, into.byteLength)
        : undefined;
    w.load += data.length;
    try {
      const r = await w.post(
        {
          t: 'open',
          id: this.nextId++,
          key,
          data: payload,
          ...(outView === undefined ? {} : { out: outView }),
          offs,
          lens,
          raws,
          ids,
        },
        shared ? [] : [payload.buffer as ArrayBuffer],
      );
      if (outView !== undefined) return { out: into as Buffer, errors: r.errors ?? null };
      const out = r.out as Uint8Array;
      const got = Buffer.from(out.buffer, out.byteOffset, out.byteLength);
      if (into !== undefined) {
        got.copy(into);
        return { out: into, errors: r.errors ?? null };
      }
      return { out: got, errors: r.errors ?? null };
    } finally {
      w.load -= data.length;
    }
  }

  /**
   * @internal Tests: the thread given the next piece of work ends abruptly instead, so that work
   * is lost exactly as when a thread crashes in the middle of it.
   */
  crashNextForTest(): void {
    this.dieNext = true;
  }

  /** Ends the threads and forgets every key. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const key of [...this.keys.keys()]) this.unregister(key);
    // Referenced until they have exited (a late reply must not unreference them): otherwise
    // the process could run out of work while waiting for the exit and end before it.
    await Promise.all(
      this.workers.map((w) => {
        w.ending = true;
        w.worker.ref();
        return w.worker.terminate();
      }),
    );
    this.workers.length = 0;
  }

  private crypto(key: number): StoreCrypto {
    const entry = this.keys.get(key);
    if (entry === undefined) {
      throw storeError('LB_STORE_CLOSED', 'The store was closed. Open it again.', {});
    }
    return entry.crypto;
  }

  /** The ready thread with the least work in hand, or undefined (then: the calling thread). */
  private pick(): CryptoThread | undefined {
    if (this.threads === 0 || this.closed) return undefined;
    if (this.workers.length < this.threads) this.start();
    let best: CryptoThread | undefined;
    for (const w of this.workers) {
      if (w.ready && (best === undefined || w.load < best.load)) best = w;
    }
    if (best !== undefined && this.dieNext) {
      this.dieNext = false;
      best.dieBeforeNext = true;
    }
    return best;
  }

  private spawn(): void {
    const ext = import.meta.url.endsWith('.ts') ? '.ts' : '.js';
    const entry = new URL(`./crypto-worker${ext}`, import.meta.url);
    const workerData: CryptoWorkerData = { arena: this.arena, slotBytes: this.slotBytes };
    // A thread keeps little on its heap; a small young generation collects its short-lived
    // buffers (compressor output, ciphertext parts) early, which keeps the process's RSS low.
    const resourceLimits = { maxYoungGenerationSizeMb: 4, maxOldGenerationSizeMb: 64 };
    let worker: Worker;
    if (ext === '.js') {
      worker = new Worker(entry, { workerData, resourceLimits });
    } else {
      // Running from TypeScript sources (tests, tsx): loader hooks do not reach worker threads
      // in Node 20, so the thread registers tsx itself before importing its entry.
      const boot = `import('tsx/esm/api').then((api) => { api.register(); return import(${JSON.stringify(entry.href)}); })`;
      worker = new Worker(boot, { eval: true, workerData, resourceLimits });
    }
    const thread = new CryptoThread(worker, (t) => {
      this.deaths++;
      const i = this.workers.indexOf(t);
      if (i >= 0) this.workers.splice(i, 1);
    });
    this.workers.push(thread);
    for (const [key, entry] of this.keys)
      void this.sendKey(thread, key, entry).catch(() => undefined);
  }

  private sendKey(
    w: CryptoThread,
    key: number,
    entry: { master: Uint8Array; storeId: string; level: number },
  ): Promise<unknown> {
    return w.post(
      {
        t: 'key',
        id: this.nextId++,
        key,
        master: entry.master,
        storeId: entry.storeId,
        level: entry.level,
      },
      [],
    );
  }
}

function sum(a: Int32Array): number {
  let n = 0;
  for (let i = 0; i < a.length; i++) n += a[i] as number;
  return n;
}
