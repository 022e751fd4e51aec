import { Worker } from 'node:worker_threads';
import { LifeboatError, frameBufferPool, frameOwnsBuffer } from '@lifeboat/protocol';
import type {
  CommitOptions,
  PointFilter,
  PointInfo,
  WriteSession,
  WriteSessionOptions,
} from '@lifeboat/store';
import type { PointDigests } from './point-digests.js';
import type { StoreWorkerRequest, StoreWorkerResponse } from './store-worker-protocol.js';
import type { WorkerStoreSpec } from './worker-store-opener.js';

/** Store work on worker threads: how each thread opens its own instance of the target store. */
export interface StoreWorkerOptions {
  /** The store every worker opens (directory or Azure, with the passphrase). */
  spec: WorkerStoreSpec;
  /** Worker threads. @default 2 */
  count?: number;
  /** A module exporting `openWorkerStore(spec): Promise<StoreApi>` instead of the built-in one (file URL). */
  module?: string;
  /**
   * Diagnostics (benchmarks): each worker appends a JSON line of its V8 heap and ArrayBuffer
   * bytes to this file every 200 ms. @default none
   */
  memLogFile?: string;
}

/** The part of the store API the process server's replicators use. */
export interface ReplicatorStore {
  beginWrite(options: WriteSessionOptions): Promise<WriteSession>;
  listPoints(filter?: PointFilter): Promise<PointInfo[]>;
  /** The point of a cut, if committed (see `StoreApi.findCutPoint`). */
  findCutPoint(machine: string, disk: string, cut: string): Promise<PointInfo | undefined>;
}

/** A machine's store as served by its worker: the replicator's part and resync baselines. */
export interface MachineStore extends ReplicatorStore {
  /** A point's per-chunk digests under `key` (see `computePointDigests`). */
  pointDigests(point: string, key: Uint8Array): Promise<PointDigests>;
}

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
}

class WorkerHandle {
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private dead: LifeboatError | undefined;

  constructor(
    readonly worker: Worker,
    /** Called once when the thread is gone (error or exit), with the error its calls got. */
    onDead: (err: LifeboatError) => void,
  ) {
    worker.on('message', (m: StoreWorkerResponse) => {
      const p = this.pending.get(m.id);
      if (!p) return;
      this.pending.delete(m.id);
      if (m.ok) {
        if (m.buffer !== undefined) frameBufferPool.give(m.buffer);
        p.resolve(m.value);
      } else
        p.reject(new LifeboatError(m.error.code, m.error.message, { details: m.error.details }));
    });
    const fail = (err: unknown): void => {
      if (this.dead) return;
      this.dead = new LifeboatError(
        'LB_PS_STORE_WORKER_DIED',
        `A store worker thread stopped (${(err as Error)?.message ?? String(err)}); it is restarted, and its machines' uncommitted records are applied again from the journal.`,
        { cause: err },
      );
      for (const p of this.pending.values()) p.reject(this.dead);
      this.pending.clear();
      onDead(this.dead);
    };
    worker.on('error', fail);
    worker.on('exit', (code) => fail(new Error(`exit code ${code}`)));
  }

  /** True once the thread is gone. */
  get isDead(): boolean {
    return this.dead !== undefined;
  }

  call(req: Omit<StoreWorkerRequest, 'id'>, transfer: ArrayBuffer[] = []): Promise<unknown> {
    if (this.dead) return Promise.reject(this.dead);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ ...req, id }, transfer);
    });
  }
}

/** Health of the store worker threads. */
export interface StoreWorkerPoolHealth {
  count: number;
  /** Threads running now. */
  alive: number;
  /** Threads restarted since the server started. */
  restarts: number;
  /** Why the last thread died, until the server stops. */
  lastError: string | null;
  lastErrorAt: string | null;
}

/** A worker thread died (with the error its calls got), or was started again. */
export interface StoreWorkerEvent {
  kind: 'died' | 'restarted';
  /** Index of the thread's slot. */
  worker: number;
  error?: LifeboatError;
}

/**
 * Young generation of each store worker thread's V8 heap (MiB; V8's default is 48, three
 * 16 MiB semi-spaces). A worker's live JS objects are a few MiB (its bytes are in
 * ArrayBuffers, outside the heap), yet its young generation grew to the default and stayed
 * resident: some 23 MiB per thread of a 100-machine server's RSS (V8 heap 50 -> 28 MiB each).
 */
const WORKER_YOUNG_GENERATION_MB = 12;

/** First delay before a dead worker thread is started again; doubles per quick death. */
const RESTART_INITIAL_MS = 200;
const RESTART_MAX_MS = 30_000;
/** A thread that ran this long before dying is restarted at the first delay again. */
const RESTART_STABLE_MS = 60_000;

/**
 * Store work on worker threads, each with its own Store instance. Each write session goes to
 * the worker with the fewest sessions open, preferring the one that ran the machine's previous
 * session (its caches hold that point's tree). A machine's points stay in order because its
 * replicator begins a session only after the previous one committed (and the store's disk lock
 * refuses a second writer of a disk, whichever thread it is on). A hash of the machine's id
 * left one thread with 8 of 10 machines and the other mostly idle. The ingest thread only
 * reads the journal and posts bytes; chunk hashing, compression and encryption run in the
 * workers, in parallel with TLS, framing and the journal. A thread that dies is started again
 * (with backoff when it keeps dying); its machines' calls fail meanwhile, and their replicators
 * apply the uncommitted records again from the journal, as after any store error.
 */
export class StoreWorkerPool {
  private readonly slots: Array<{
    handle: WorkerHandle | undefined;
    /** Write sessions begun on this slot's thread and not yet committed or aborted. */
    sessions: number;
    startedAt: number;
    delayMs: number;
    timer: NodeJS.Timeout | undefined;
  }>;
  private closing = false;
  private restarts = 0;
  /** The slot of each machine's last write session. */
  private readonly lastSlot = new Map<string, number>();
  private lastError: { message: string; at: Date } | undefined;
  private readonly onEvent: ((e: StoreWorkerEvent) => void) | undefined;

  constructor(options: StoreWorkerOptions, onEvent?: (e: StoreWorkerEvent) => void) {
    const count = options.count ?? 2;
    if (!Number.isInteger(count) || count < 1 || count > 64) {
      throw new LifeboatError(
        'LB_PS_INVALID_OPTIONS',
        'Invalid process server option: storeWorkers.count must be 1-64.',
      );
    }
    this.onEvent = onEvent;
    const ext = import.meta.url.endsWith('.ts') ? '.ts' : '.js';
    const entry = new URL(`./store-worker-main${ext}`, import.meta.url);
    const module = options.module ?? new URL(`./worker-store-opener${ext}`, import.meta.url).href;
    // The workers are the parallelism: their stores start no crypto threads unless asked to.
    const workerData = {
      module,
      options: { ...options.spec, cryptoThreads: options.spec.cryptoThreads ?? 0 },
      ...(options.memLogFile === undefined ? {} : { memLogFile: options.memLogFile }),
    };
    const resourceLimits = { maxYoungGenerationSizeMb: WORKER_YOUNG_GENERATION_MB };
    const spawnWorker = (): Worker => {
      if (ext === '.js') return new Worker(entry, { workerData, resourceLimits });
      // Running from TypeScript sources (tests, tsx): loader hooks do not reach worker threads
      // in Node 20, so the worker registers tsx itself before importing its entry.
      const boot = `import('tsx/esm/api').then((api) => { api.register(); return import(${JSON.stringify(entry.href)}); })`;
      return new Worker(boot, { eval: true, workerData, resourceLimits });
    };
    this.slots = Array.from({ length: count }, () => ({
      handle: undefined,
      sessions: 0,
      startedAt: 0,
      delayMs: RESTART_INITIAL_MS,
      timer: undefined,
    }));
    for (let i = 0; i < count; i++) this.launch(i, spawnWorker);
  }

  private launch(i: number, spawnWorker: () => Worker): void {
    const slot = this.slots[i]!;
    slot.startedAt = performance.now();
    slot.handle = new WorkerHandle(spawnWorker(), (err) => {
      if (this.closing) return;
      this.lastError = { message: err.message, at: new Date() };
      this.onEvent?.({ kind: 'died', worker: i, error: err });
      // A thread that keeps dying at once is restarted ever more slowly.
      slot.delayMs =
        performance.now() - slot.startedAt > RESTART_STABLE_MS
          ? RESTART_INITIAL_MS
          : Math.min(RESTART_MAX_MS, slot.delayMs * 2);
      const delay = slot.delayMs;
      slot.timer = setTimeout(() => {
        slot.timer = undefined;
        if (this.closing) return;
        this.restarts++;
        this.launch(i, spawnWorker);
        this.onEvent?.({ kind: 'restarted', worker: i });
      }, delay);
      slot.timer.unref();
    });
  }

  /** Threads, restarts and the last death, for health. */
  health(): StoreWorkerPoolHealth {
    return {
      count: this.slots.length,
      alive: this.slots.filter((s) => s.handle !== undefined && !s.handle.isDead).length,
      restarts: this.restarts,
      lastError: this.lastError?.message ?? null,
      lastErrorAt: this.lastError?.at.toISOString() ?? null,
    };
  }

  /** The slot for a machine's next call: its last one unless another has fewer sessions open. */
  private pick(machine: string): number {
    const live = (i: number): boolean => {
      const h = this.slots[i]!.handle;
      return h !== undefined && !h.isDead;
    };
    const last = this.lastSlot.get(machine);
    let best = last !== undefined && live(last) ? last : -1;
    for (let i = 0; i < this.slots.length; i++) {
      if (!live(i)) continue;
      if (best < 0 || this.slots[i]!.sessions < this.slots[best]!.sessions) best = i;
    }
    if (best < 0) {
      throw new LifeboatError(
        'LB_PS_STORE_WORKER_DIED',
        `No store worker thread is running for machine ${machine} (they are being restarted); the store work is retried.`,
        { details: { machine } },
      );
    }
    return best;
  }

  /** The store API for one machine, served by the store worker threads. */
  forMachine(machine: string): MachineStore {
    const call = async (req: Omit<StoreWorkerRequest, 'id'>): Promise<unknown> =>
      this.slots[this.pick(machine)]!.handle!.call(req);
    return {
      beginWrite: async (o) => {
        const i = this.pick(machine);
        const slot = this.slots[i]!;
        const h = slot.handle!;
        this.lastSlot.set(machine, i);
        slot.sessions++;
        let open = true;
        const done = (): void => {
          if (open) slot.sessions--;
          open = false;
        };
        let began: { session: number; size: number };
        try {
          began = (await h.call({
            op: 'beginWrite',
            args:
              o.base === undefined
                ? { machine: o.machine, disk: o.disk, size: o.size }
                : { machine: o.machine, disk: o.disk, size: o.size, base: o.base },
          } as Omit<StoreWorkerRequest, 'id'>)) as { session: number; size: number };
        } catch (err) {
          done();
          throw err;
        }
        // The session lives in the thread that began it: it dies with that thread.
        return new WorkerWriteSession(h, began.session, o.machine, o.disk, began.size, done);
      },
      listPoints: async (filter) =>
        (await call({ op: 'listPoints', filter: { ...filter } } as Omit<
          StoreWorkerRequest,
          'id'
        >)) as PointInfo[],
      findCutPoint: async (machine, disk, cut) =>
        (await call({ op: 'findCutPoint', machine, disk, cut } as Omit<
          StoreWorkerRequest,
          'id'
        >)) as PointInfo | undefined,
      pointDigests: async (point, key) =>
        (await call({ op: 'pointDigests', point, key } as Omit<
          StoreWorkerRequest,
          'id'
        >)) as PointDigests,
    };
  }

  /** Closes every worker's store and ends the threads. */
  async close(): Promise<void> {
    this.closing = true;
    await Promise.all(
      this.slots.map(async (slot) => {
        clearTimeout(slot.timer);
        const h = slot.handle;
        if (!h) return;
        await h.call({ op: 'close' } as Omit<StoreWorkerRequest, 'id'>).catch(() => undefined);
        await h.worker.terminate();
      }),
    );
  }
}

/** Writes a session may have posted and not yet seen answered (bounds memory in flight). */
const PIPELINE = 8;
const PIPELINE_BYTES = 4 * 1024 * 1024;

class WorkerWriteSession implements WriteSession {
  private readonly inflight: Array<{ p: Promise<unknown>; bytes: number }> = [];
  private inflightBytes = 0;
  private failure: unknown;

  constructor(
    private readonly h: WorkerHandle,
    private readonly id: number,
    readonly machine: string,
    readonly disk: string,
    private _size: number,
    /** Called once the session is over (committed, aborted or failed at either). */
    private readonly done: () => void,
  ) {}

  /** Posts a request without waiting for it (the worker runs a session's requests in order). */
  private async post(
    req: Omit<StoreWorkerRequest, 'id'>,
    transfer: ArrayBuffer[] = [],
    bytes = 0,
  ): Promise<void> {
    if (this.failure !== undefined) throw this.failure;
    const p = this.h.call(req, transfer);
    p.catch((err: unknown) => {
      this.failure ??= err;
    });
    this.inflight.push({ p, bytes });
    this.inflightBytes += bytes;
    while (this.inflight.length > PIPELINE || this.inflightBytes > PIPELINE_BYTES) {
      const first = this.inflight.shift()!;
      this.inflightBytes -= first.bytes;
      await first.p.catch(() => undefined);
    }
    if (this.failure !== undefined) throw this.failure;
  }

  /** Waits for every posted request; throws the first failure. */
  private async settle(): Promise<void> {
    const all = this.inflight.splice(0);
    this.inflightBytes = 0;
    await Promise.allSettled(all.map((x) => x.p));
    if (this.failure !== undefined) throw this.failure;
  }

  get size(): number {
    return this._size;
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    // Transfer whole, unpooled buffers (journal reads are) and a decoded frame's own buffer (a
    // body still held by the journal: the frame is durable, nothing reads it again); copy the
    // rest. A transferred buffer is detached here: the caller must not use `data` afterwards.
    const own =
      data.buffer instanceof ArrayBuffer &&
      ((data.byteOffset === 0 && data.byteLength === data.buffer.byteLength) ||
        frameOwnsBuffer(data));
    let bytes: Uint8Array;
    if (own) bytes = data;
    else {
      bytes = frameBufferPool.take(data.byteLength);
      bytes.set(data);
    }
    await this.post(
      { op: 'write', session: this.id, offset, data: bytes } as Omit<StoreWorkerRequest, 'id'>,
      [bytes.buffer as ArrayBuffer],
      bytes.byteLength,
    );
  }

  prefetch(ranges: ReadonlyArray<{ offset: number; length: number }>): Promise<void> {
    // A hint: posted like a write (the worker keeps a session's requests in order), never failing.
    return this.post({
      op: 'prefetch',
      session: this.id,
      ranges: ranges.map((r) => ({ offset: r.offset, length: r.length })),
    } as Omit<StoreWorkerRequest, 'id'>).catch(() => undefined);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    await this.post({ op: 'writeZeroes', session: this.id, offset, length } as Omit<
      StoreWorkerRequest,
      'id'
    >);
  }

  async trim(offset: number, length: number): Promise<void> {
    await this.post({ op: 'trim', session: this.id, offset, length } as Omit<
      StoreWorkerRequest,
      'id'
    >);
  }

  async resize(size: number): Promise<void> {
    await this.post({ op: 'resize', session: this.id, size } as Omit<StoreWorkerRequest, 'id'>);
    this._size = size;
  }

  async commit(options: CommitOptions = {}): Promise<PointInfo> {
    try {
      await this.settle();
      return (await this.h.call({ op: 'commit', session: this.id, options } as Omit<
        StoreWorkerRequest,
        'id'
      >)) as PointInfo;
    } finally {
      // A failed commit ends the session too: the replicator aborts it and begins a new one.
      this.done();
    }
  }

  async abort(): Promise<void> {
    try {
      await Promise.allSettled(this.inflight.splice(0).map((x) => x.p));
      this.inflightBytes = 0;
      await this.h.call({ op: 'abort', session: this.id } as Omit<StoreWorkerRequest, 'id'>);
    } finally {
      this.done();
    }
  }
}
