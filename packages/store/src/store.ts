import { randomBytes } from 'node:crypto';
import { availableParallelism } from 'node:os';
import { isLifeboatError } from '@lifeboat/protocol/errors';
import { BlobFetcher } from './blob-fetcher.js';
import { ChunkIndex } from './chunk-index.js';
import { CryptoPool } from './crypto-pool.js';
import type { OpenItem, OpenResult } from './crypto-pool.js';
import { LruCache } from './lru-cache.js';
import { mapLimit } from './map-limit.js';
import type { ObjectBackend } from './object-backend.js';
import { listKeys } from './object-backend.js';
import {
  FormatError,
  ObjectKind,
  openObject,
  packKey,
  pointKey,
  sealObject,
} from './object-format.js';
import type { BlobLocation } from './object-format.js';
import type { PackWriter } from './pack-writer.js';
import { decodePoint, encodePoint } from './point-record.js';
import type { PointRecord } from './point-record.js';
import { BlobType, SEAL_OVERHEAD, StoreCrypto } from './store-crypto.js';
import {
  STORE_VERSION,
  configText,
  parseConfig,
  parseKeyFile,
  unwrapMasterKey,
  wrapMasterKey,
} from './store-config.js';
import type { KeyFile, StoreConfig } from './store-config.js';
import { storeError } from './store-error.js';
import type {
  GcReport,
  PointFilter,
  PointInfo,
  PointReader,
  Progress,
  PruneReport,
  RetentionPolicy,
  StoreApi,
  StoreInitOptions,
  StoreOpenOptions,
  StoreStats,
  VerifyReport,
  WriteSession,
  WriteSessionOptions,
} from './store-types.js';
import { REF_BYTES, TreeNode, getRef } from './tree-node.js';
import { StoreWriteSession } from './write-session.js';
import { StorePointReader } from './point-reader.js';
import { StoreMaintenance } from './store-maintenance.js';
import { StoreLocks } from './store-locks.js';
import type { HeldLock } from './store-locks.js';
import type { LockOptions } from './store-locks.js';

/** Facts about a read, for error messages and details. */
export interface ReadContext {
  point?: string;
  /** Disk offset of the chunk being read. */
  offset?: number;
}

/** The chunk size a store gets unless its init says otherwise. */
export const DEFAULT_CHUNK_SIZE = 65536;
export const DEFAULT_PACK_SIZE = 16 * 1024 * 1024;
const DEFAULT_KDF = 32768;
const DEFAULT_FANOUT = 256;
const DEFAULT_CACHE = 64 * 1024 * 1024;
/** The object a gc replaces before it deletes anything (see Store.refreshIndexForWrite). */
const GC_MARK_KEY = 'gc-mark';
/** At most this long between a writer's listings of index/ while no gc ran. */
const WRITE_RELIST_MS = 60_000;
const NODE_CACHE = 32 * 1024 * 1024;
/** Recently written tree nodes kept for the next session of their disk (a process server's next cut). */
const WRITTEN_NODE_CACHE = 8 * 1024 * 1024;
// Below this many bytes moved, thread start-up would cost more than it saves (a changed-extents
// import of 1% of a 2 GiB disk, 20 MiB, was slower with threads than without).
const DEFAULT_PARALLEL_MIN = 64 * 1024 * 1024;

/** Extra options of {@link Store.open} and {@link Store.init} beyond the API contract. */
export interface StoreExtraOptions {
  /** Lock timings (tests shorten them). */
  locks?: Partial<LockOptions>;
  /** Blobs a write session collects before it writes an index object for them (tests lower it). @default 65536 */
  indexEveryBlobs?: number;
  /** References per tree node, a power of two from 4 to 4096 (init only; tests lower it). @default 256 */
  treeFanout?: number;
  /** Bytes the store writes on the calling thread before it starts its crypto threads (reads count eight times; tests lower it). @default 67108864 */
  parallelMinBytes?: number;
  /** A crypto pool shared with other stores (tests), used instead of one of the store's own; not closed by the store. */
  cryptoPool?: CryptoPool;
}

/**
 * The replica store: content-addressed, encrypted, deduplicated recovery points over an
 * {@link ObjectBackend}. See docs/store-format.md for every object it writes.
 */
export class Store implements StoreApi {
  readonly id: string;
  readonly chunkSize: number;
  readonly location: string;
  /** @internal */ readonly backend: ObjectBackend;
  /** @internal */ readonly config: StoreConfig;
  /** @internal */ readonly crypto: StoreCrypto;
  /** @internal */ readonly index = new ChunkIndex();
  /** @internal */ readonly fanout: number;
  /** @internal */ readonly pow: number[];
  /** @internal */ readonly locks: StoreLocks;
  /** @internal */ readonly zeroChunk: Buffer;
  /** @internal */ readonly indexEveryBlobs: number;
  /** @internal Fetches data chunks for readers: merged ranged reads, opened on the crypto threads. */
  readonly fetcher = new BlobFetcher(this);
  private readonly ownPool: boolean;
  private readonly pool: CryptoPool | undefined;
  private poolKey = 0;
  private readonly parallelMinBytes: number;
  private movedBytes = 0;
  private readonly nodeCache = new LruCache<string, Buffer>(NODE_CACHE, (b) => b.length + 64);
  /** Nodes this store's write sessions wrote last (see cacheNode): small, to bound memory. */
  private readonly writtenNodes = new LruCache<string, Buffer>(
    WRITTEN_NODE_CACHE,
    (b) => b.length + 64,
  );
  private readonly chunkCache: LruCache<string, Buffer>;
  private readonly points = new Map<string, PointRecord>();
  /** Point objects that could not be read, by id. */
  private readonly damagedPoints = new Map<string, Error>();
  private masterKey: Buffer;
  private closed = false;
  /** The index refresh running now, if any. */
  private indexRefresh: Promise<void> | undefined;
  /** @internal True once an index refresh has completed: the index holds what was listed then. */
  indexWarm = false;
  /** gc's mark and the time of the index listing a write session last took under its lock. */
  private writeListing: { mark: string; at: number } | undefined;
  /** The refresh queued to start after the running one, shared by the callers waiting for it. */
  private nextRefresh: Promise<void> | undefined;
  private nextRefreshFull = false;
  /** What {@link Store.open} started while the key was derived, until it is used. */
  private early: EarlyWork | undefined;

  private constructor(
    backend: ObjectBackend,
    config: StoreConfig,
    masterKey: Buffer,
    cacheBytes: number,
    extra: StoreExtraOptions & {
      cryptoThreads?: number | undefined;
      earlyLocks?: StoreLocks;
      early?: EarlyWork;
    },
  ) {
    this.backend = backend;
    this.config = config;
    this.id = config.id;
    this.chunkSize = config.chunkSize;
    this.fanout = config.treeFanout;
    this.location = backend.location;
    this.masterKey = masterKey;
    this.crypto = new StoreCrypto(masterKey, config.id, config.compressionLevel);
    this.chunkCache = new LruCache(cacheBytes, (b) => b.length + 64);
    this.zeroChunk = Buffer.alloc(config.chunkSize);
    this.pow = [1];
    while ((this.pow[this.pow.length - 1] as number) * this.fanout <= Number.MAX_SAFE_INTEGER) {
      this.pow.push((this.pow[this.pow.length - 1] as number) * this.fanout);
    }
    this.locks = extra.earlyLocks ?? new StoreLocks(backend, extra.locks ?? {});
    this.early = extra.early;
    this.indexEveryBlobs = Math.max(1, extra.indexEveryBlobs ?? 65_536);
    this.parallelMinBytes = Math.max(0, extra.parallelMinBytes ?? DEFAULT_PARALLEL_MIN);
    const slotBytes = config.chunkSize + SEAL_OVERHEAD + 64;
    const shared = extra.cryptoPool;
    if (shared !== undefined && shared.threads > 0 && shared.slotBytes >= slotBytes) {
      this.pool = shared;
      this.ownPool = false;
    } else {
      const threads = threadCount(extra.cryptoThreads);
      this.pool = threads === 0 ? undefined : new CryptoPool({ threads, slotBytes });
      this.ownPool = true;
    }
    if (this.pool !== undefined) {
      this.poolKey = this.pool.register(this.crypto, masterKey, config.id, config.compressionLevel);
    }
  }

  /** Creates a new store in an empty backend. */
  static async init(options: StoreInitOptions & StoreExtraOptions): Promise<Store> {
    const chunkSize = options.chunkSize ?? DEFAULT_CHUNK_SIZE;
    const packSize = options.packSize ?? DEFAULT_PACK_SIZE;
    const kdfCost = options.kdfCost ?? DEFAULT_KDF;
    const pow2 = (n: number): boolean => Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
    if (!pow2(chunkSize) || chunkSize < 4096 || chunkSize > 1024 * 1024) {
      throw invalid(`chunkSize must be a power of two from 4096 to 1048576, not ${chunkSize}.`);
    }
    if (!Number.isSafeInteger(packSize) || packSize < chunkSize || packSize > 1024 * 1024 * 1024) {
      throw invalid(`packSize must be from chunkSize to 1 GiB, not ${packSize}.`);
    }
    if (!pow2(kdfCost) || kdfCost < 1024 || kdfCost > 1 << 22) {
      throw invalid(`kdfCost must be a power of two from 1024 to 4194304, not ${kdfCost}.`);
    }
    const treeFanout = options.treeFanout ?? DEFAULT_FANOUT;
    if (!pow2(treeFanout) || treeFanout < 4 || treeFanout > 4096) {
      throw invalid(`treeFanout must be a power of two from 4 to 4096, not ${treeFanout}.`);
    }
    if (typeof options.passphrase !== 'string' || options.passphrase.length === 0) {
      throw invalid('The passphrase must not be empty.');
    }
    const backend = options.backend;
    if ((await backend.stat('config')) !== undefined) {
      throw storeError(
        'LB_STORE_EXISTS',
        `A Lifeboat store already exists at ${backend.location}. Open it instead, or choose an empty location.`,
        { location: backend.location },
      );
    }
    const masterKey = randomBytes(32);
    const base: StoreConfig = {
      format: 'lifeboat-store',
      version: STORE_VERSION,
      id: randomBytes(16).toString('hex'),
      chunkSize,
      packSize,
      treeFanout,
      compressionLevel: 1,
      createdAt: new Date().toISOString(),
    };
    const store = new Store(backend, base, masterKey, DEFAULT_CACHE, options);
    const keyFile = await wrapMasterKey(masterKey, options.passphrase, base.id, kdfCost);
    // The key first, then the config: a store "exists" once its config does, and then it opens.
    await backend.put(
      `keys/${randomBytes(16).toString('hex')}`,
      Buffer.from(JSON.stringify(keyFile)),
    );
    const config = { ...base, mac: store.crypto.configMac(configText(base)) };
    await backend.put('config', Buffer.from(JSON.stringify(config, null, 2)));
    return store;
  }

  /** Opens an existing store. */
  static async open(options: StoreOpenOptions & StoreExtraOptions): Promise<Store> {
    const backend = options.backend;
    let data: Buffer;
    try {
      data = await backend.get('config');
    } catch (err) {
      if (isLifeboatError(err, 'LB_BACKEND_NOT_FOUND')) {
        throw storeError(
          'LB_STORE_NOT_FOUND',
          `There is no Lifeboat store at ${backend.location}. Check the location, or create one with init.`,
          { location: backend.location },
          err,
        );
      }
      throw err;
    }
    const config = parseConfig(data, backend.location);
    const keys: Array<{ key: string; file: KeyFile }> = [];
    let damaged: unknown;
    for await (const info of backend.list('keys/')) {
      try {
        keys.push({
          key: info.key,
          file: parseKeyFile(await backend.get(info.key), info.key, backend.location),
        });
      } catch (err) {
        if (isLifeboatError(err, 'LB_STORE_UNSUPPORTED_VERSION')) throw err;
        damaged ??= err;
      }
    }
    // While the key is derived: the write lock the caller asked for, and the index objects'
    // bytes (plain reads; opened once the key is there).
    const locks = new StoreLocks(backend, options.locks ?? {});
    const want = options.prepareWrite;
    const early: EarlyWork = {
      lock: undefined,
      // A writer needs the index first thing (a reader of points may never).
      indexBytes: want === undefined ? new Map() : prefetchObjects(backend, 'index/'),
    };
    if (want !== undefined) {
      const lock = locks.acquire(false, writePurpose(want.machine, want.disk), want);
      lock.catch(() => undefined);
      early.lock = { ...want, lock };
    }
    let masterKey: Buffer | undefined;
    try {
      for (const k of keys) {
        masterKey = await unwrapMasterKey(k.file, options.passphrase, config.id);
        if (masterKey !== undefined) break;
      }
    } finally {
      if (masterKey === undefined) await releaseEarly(early);
    }
    if (masterKey === undefined) {
      if (keys.length === 0) {
        throw (
          damaged ??
          storeError(
            'LB_STORE_CORRUPT_KEY',
            `The store at ${backend.location} has no key object, so it cannot be opened. Restore keys/ from a copy of the store.`,
            { location: backend.location, object: 'keys/' },
          )
        );
      }
      throw storeError(
        'LB_STORE_WRONG_PASSPHRASE',
        `The passphrase does not open the store at ${backend.location}. Check it (LIFEBOAT_PASSPHRASE or --passphrase-file) and try again.`,
        { location: backend.location },
      );
    }
    const { mac, ...plain } = config;
    const store = new Store(backend, plain, masterKey, options.cacheBytes ?? DEFAULT_CACHE, {
      ...options,
      earlyLocks: locks,
      early,
    });
    if (store.crypto.configMac(configText(plain)) !== mac) {
      await releaseEarly(early);
      throw storeError(
        'LB_STORE_CORRUPT_CONFIG',
        `The config object of the store at ${backend.location} fails its authentication check: it was changed or damaged. Restore it from a copy of the store.`,
        { object: 'config', location: backend.location },
      );
    }
    // The index loads on first need (a read, a write session, gc): listing points stays fast
    // on a large store. A prepared lock is settled (held, or refused for beginWrite to retry).
    await early.lock?.lock.catch(() => undefined);
    return store;
  }

  // ---- points -------------------------------------------------------------------------------

  async beginWrite(options: WriteSessionOptions): Promise<WriteSession> {
    this.throwIfClosed();
    return StoreWriteSession.begin(this, options);
  }

  async listPoints(filter: PointFilter = {}): Promise<PointInfo[]> {
    this.throwIfClosed();
    await this.refreshPoints();
    const out: PointInfo[] = [];
    for (const r of this.points.values()) {
      const p = r.info;
      if (filter.machine !== undefined && p.machine !== filter.machine) continue;
      if (filter.disk !== undefined && p.disk !== filter.disk) continue;
      if (filter.kind !== undefined && p.kind !== filter.kind) continue;
      if (filter.consistencyGroup !== undefined && p.consistencyGroup !== filter.consistencyGroup)
        continue;
      if (filter.cut !== undefined && p.cut !== filter.cut) continue;
      if (filter.since !== undefined && p.time < filter.since) continue;
      if (filter.until !== undefined && p.time > filter.until) continue;
      out.push(clonePoint(p));
    }
    return out.sort(comparePoints);
  }

  async findCutPoint(machine: string, disk: string, cut: string): Promise<PointInfo | undefined> {
    this.throwIfClosed();
    const id = this.crypto.cutPointId(machine, disk, cut);
    let record: PointRecord;
    try {
      record = await this.loadPoint(id);
    } catch (err) {
      if (isLifeboatError(err, 'LB_STORE_POINT_NOT_FOUND')) return undefined;
      throw err;
    }
    const p = record.info;
    return p.machine === machine && p.disk === disk && p.cut === cut ? clonePoint(p) : undefined;
  }

  async getPoint(id: string): Promise<PointInfo> {
    return clonePoint((await this.loadPoint(id)).info);
  }

  async latestPoint(machine: string, disk: string): Promise<PointInfo | undefined> {
    const all = await this.listPoints({ machine, disk });
    return all[all.length - 1];
  }

  async openPoint(id: string): Promise<PointReader> {
    this.throwIfClosed();
    return new StorePointReader(this, await this.loadPoint(id));
  }

  chunkIdOf(data: Uint8Array): string {
    if (data.length !== this.chunkSize) {
      throw invalid(
        `chunkIdOf takes a whole chunk of ${this.chunkSize} bytes, not ${data.length}.`,
      );
    }
    if (isZero(data)) return this.crypto.chunkId(this.zeroChunk).toString('hex');
    return this.crypto.chunkId(data).toString('hex');
  }

  async deletePoints(ids: string[]): Promise<void> {
    this.throwIfClosed();
    for (const id of ids) {
      checkPointId(id);
      await this.backend.delete(pointKey(id));
      this.points.delete(id);
      this.damagedPoints.delete(id);
    }
  }

  /** Points whose objects could not be read at the last listing, with the reason. */
  damagedPointObjects(): Array<{ id: string; object: string; error: Error }> {
    return [...this.damagedPoints].map(([id, error]) => ({ id, object: pointKey(id), error }));
  }

  // ---- maintenance --------------------------------------------------------------------------

  async stats(): Promise<StoreStats> {
    this.throwIfClosed();
    return new StoreMaintenance(this).stats();
  }

  async verify(options: { onProgress?: (p: Progress) => void } = {}): Promise<VerifyReport> {
    this.throwIfClosed();
    return new StoreMaintenance(this).verify(options.onProgress);
  }

  async prune(
    policy: RetentionPolicy,
    options: { now?: Date; dryRun?: boolean; machine?: string } = {},
  ): Promise<PruneReport> {
    this.throwIfClosed();
    return new StoreMaintenance(this).prune(policy, options);
  }

  async gc(options: { onProgress?: (p: Progress) => void } = {}): Promise<GcReport> {
    this.throwIfClosed();
    return new StoreMaintenance(this).gc(options.onProgress);
  }

  async changePassphrase(newPassphrase: string): Promise<void> {
    this.throwIfClosed();
    if (typeof newPassphrase !== 'string' || newPassphrase.length === 0) {
      throw invalid('The new passphrase must not be empty.');
    }
    const old: string[] = [];
    let cost = DEFAULT_KDF;
    for await (const info of this.backend.list('keys/')) {
      old.push(info.key);
      try {
        cost = parseKeyFile(await this.backend.get(info.key), info.key, this.location).N;
      } catch {
        // A damaged old key object is replaced all the same.
      }
    }
    const keyFile = await wrapMasterKey(this.masterKey, newPassphrase, this.id, cost);
    // New key first, then drop the old ones: a crash in between leaves both passphrases working.
    await this.backend.put(
      `keys/${randomBytes(16).toString('hex')}`,
      Buffer.from(JSON.stringify(keyFile)),
    );
    for (const key of old) await this.backend.delete(key);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.early !== undefined) {
      await releaseEarly(this.early);
      this.early = undefined;
    }
    if (this.pool !== undefined) {
      this.pool.unregister(this.poolKey);
      if (this.ownPool) await this.pool.close();
    }
    this.chunkCache.clear();
    this.nodeCache.clear();
    this.writtenNodes.clear();
    this.index.clear();
    this.masterKey.fill(0);
    await this.locks.releaseAll();
    await this.backend.close();
  }

  // ---- internals shared with sessions, readers and maintenance -------------------------------

  /**
   * @internal The crypto pool and this store's key in it, once the store has moved enough
   * bytes to make threads worth it (undefined before that, or with cryptoThreads 0).
   */
  parallel(bytes: number): { pool: CryptoPool; key: number } | undefined {
    if (this.pool === undefined) return undefined;
    if (this.movedBytes < this.parallelMinBytes) {
      this.movedBytes += bytes;
      if (this.movedBytes < this.parallelMinBytes) return undefined;
    }
    this.pool.start();
    return { pool: this.pool, key: this.poolKey };
  }

  /**
   * @internal True when `bytes` of sealed chunks should be opened on the crypto threads. Reads
   * count eight times: they have no fixed cost to save (a changed-extents import does), and a
   * recovery host reading a point sequentially wants the threads early.
   */
  useCryptoThreads(bytes: number): boolean {
    return this.parallel(bytes * 8)?.pool.ready === true;
  }

  /** @internal Opens sealed data chunks on the crypto threads (see {@link CryptoPool.open}). */
  openOnThreads(data: Buffer, items: readonly OpenItem[], dest?: Buffer): Promise<OpenResult> {
    if (this.pool === undefined) throw new Error('no crypto pool');
    return this.pool.open(this.poolKey, data, items, dest);
  }

  /** @internal The crypto pool (tests). */
  get cryptoPool(): CryptoPool | undefined {
    return this.pool;
  }

  /**
   * @internal Loads index objects written since the call began (reloads all when one vanished:
   * gc). The listing of the refresh a caller waits for always starts after its call, so a
   * reader that has seen a point (whose index objects were written before it) finds its blobs.
   */
  async refreshIndex(full = false): Promise<void> {
    if (this.indexRefresh === undefined) return this.startIndexRefresh(full);
    // One is running, but it may have listed index/ before what this caller needs was
    // written: wait for one more that starts after it, shared by every caller arriving
    // meanwhile (joining the running one made readers report committed chunks as lost).
    this.nextRefreshFull ||= full;
    this.nextRefresh ??= this.indexRefresh
      .catch(() => undefined)
      .then(() => {
        this.nextRefresh = undefined;
        const nextFull = this.nextRefreshFull;
        this.nextRefreshFull = false;
        // A refresh started since the last one ended also began after every queued caller.
        if (this.indexRefresh !== undefined && !nextFull) return this.indexRefresh;
        return this.indexRefresh === undefined
          ? this.startIndexRefresh(nextFull)
          : this.indexRefresh.catch(() => undefined).then(() => this.refreshIndex(true));
      });
    return this.nextRefresh;
  }

  /**
   * @internal The index refresh a write session needs under its shared lock. Only a gc removes
   * index entries (with the packs they point at), and a gc first replaces the `gc-mark` object:
   * while the mark is the one seen at this store's last listing, nothing this index holds was
   * removed, and the listing (in proportion to the index objects: one per commit until a gc
   * merges them) is taken at most every {@link WRITE_RELIST_MS}, for other writers' new chunks
   * (deduplication only). The mark is one small read.
   */
  async refreshIndexForWrite(): Promise<void> {
    const mark = await this.gcMark();
    const last = this.writeListing;
    if (last !== undefined && last.mark === mark && Date.now() - last.at < WRITE_RELIST_MS) return;
    const at = Date.now();
    await this.refreshIndex();
    this.writeListing = { mark, at };
  }

  /** @internal Replaces gc's mark (gc calls it under its exclusive lock, before deleting). */
  async markGc(): Promise<void> {
    await this.backend.put(GC_MARK_KEY, Buffer.from(randomBytes(16).toString('hex')), {
      overwrite: true,
    });
  }

  private async gcMark(): Promise<string> {
    try {
      return (await this.backend.get(GC_MARK_KEY)).toString('utf8');
    } catch (err) {
      if (isLifeboatError(err, 'LB_BACKEND_NOT_FOUND')) return '';
      throw err;
    }
  }

  /** An index object's bytes: read while the key was derived, or now. */
  private async getIndexObject(key: string): Promise<Buffer> {
    const early = this.early?.indexBytes.get(key);
    if (early !== undefined) {
      this.early?.indexBytes.delete(key);
      const bytes = await early.catch(() => undefined);
      if (bytes !== undefined) return bytes;
    }
    return this.backend.get(key);
  }

  /** @internal The write lock of this disk taken while the store opened, if any (once). */
  takePreparedLock(machine: string, disk: string): Promise<HeldLock> | undefined {
    const early = this.early?.lock;
    if (early === undefined || early.machine !== machine || early.disk !== disk) return undefined;
    if (this.early !== undefined) this.early.lock = undefined;
    return early.lock;
  }

  private startIndexRefresh(full: boolean): Promise<void> {
    const run: Promise<void> = this.doRefreshIndex(full).finally(() => {
      if (this.indexRefresh === run) this.indexRefresh = undefined;
    });
    this.indexRefresh = run;
    return run;
  }

  private async doRefreshIndex(full: boolean): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      // Index objects known before the listing: one a write session of this process publishes
      // while the listing runs is not "vanished" (that would force a needless full reload).
      const known = new Set(this.index.loaded);
      const keys: string[] = [];
      for await (const key of listKeys(this.backend, 'index/')) keys.push(key);
      const present = new Set(keys);
      const vanished = [...known].some((k) => !present.has(k));
      // A full reload fills a new index and swaps it in, so readers never see an empty one.
      const target = full || vanished ? new ChunkIndex() : this.index;
      full = false;
      let raced = false;
      const load = async (key: string): Promise<void> => {
        try {
          target.addEncoded(
            openObject(this.crypto, ObjectKind.Index, key, await this.getIndexObject(key)),
          );
          target.loaded.add(key);
        } catch (err) {
          if (isLifeboatError(err, 'LB_BACKEND_NOT_FOUND')) {
            raced = true;
            return;
          }
          if (err instanceof FormatError && err.unsupportedVersion !== undefined) {
            throw storeError(
              'LB_STORE_UNSUPPORTED_VERSION',
              `Index object ${key} has format version ${err.unsupportedVersion}; this Lifeboat reads version ${STORE_VERSION}. Use a newer Lifeboat.`,
              { object: key, version: err.unsupportedVersion, location: this.location },
            );
          }
          if (err instanceof FormatError) target.damaged.set(key, err);
          else throw err;
        }
      };
      await mapLimit(
        keys.filter((k) => !target.loaded.has(k) && !target.damaged.has(k)),
        8,
        load,
      );
      if (target !== this.index) {
        // Index objects a write session of this process published during the reload are in
        // the old index only: carry them over, or its blobs would be unknown here until the
        // next reload. No await between the last check and the swap, so none slips through.
        const tried = new Set<string>();
        for (;;) {
          const late = [...this.index.loaded].filter(
            (k) => !known.has(k) && !target.loaded.has(k) && !tried.has(k),
          );
          if (late.length === 0) break;
          for (const k of late) tried.add(k);
          await mapLimit(late, 8, load);
        }
        this.index.adopt(target);
      }
      if (!raced || attempt >= 3) {
        this.indexWarm = true;
        return;
      }
      full = true;
    }
  }

  /** @internal Reloads the point list from the backend. */
  async refreshPoints(): Promise<void> {
    const ids: string[] = [];
    for await (const key of listKeys(this.backend, 'points/')) {
      const id = key.slice('points/'.length);
      if (/^[0-9a-f]{32}$/.test(id)) ids.push(id);
    }
    const present = new Set(ids);
    for (const id of [...this.points.keys()]) if (!present.has(id)) this.points.delete(id);
    for (const id of [...this.damagedPoints.keys()])
      if (!present.has(id)) this.damagedPoints.delete(id);
    await mapLimit(
      ids.filter((id) => !this.points.has(id)),
      16,
      async (id) => {
        try {
          await this.loadPoint(id);
        } catch (err) {
          if (isLifeboatError(err, 'LB_STORE_POINT_NOT_FOUND')) return;
          if (isLifeboatError(err) && err.code.startsWith('LB_STORE_')) {
            this.damagedPoints.set(id, err);
            return;
          }
          throw err;
        }
      },
    );
  }

  /** @internal A point's record (cached; point objects are immutable). */
  async loadPoint(id: string): Promise<PointRecord> {
    checkPointId(id);
    const cached = this.points.get(id);
    if (cached !== undefined) return cached;
    const key = pointKey(id);
    let data: Buffer;
    try {
      data = await this.backend.get(key);
    } catch (err) {
      if (isLifeboatError(err, 'LB_BACKEND_NOT_FOUND')) {
        throw storeError(
          'LB_STORE_POINT_NOT_FOUND',
          `Recovery point ${id} does not exist in the store at ${this.location}. List the points to pick another.`,
          { point: id, object: key },
          err,
        );
      }
      throw err;
    }
    let record: PointRecord;
    try {
      record = decodePoint(openObject(this.crypto, ObjectKind.Point, key, data), id);
    } catch (err) {
      if (err instanceof FormatError && err.unsupportedVersion !== undefined) {
        throw storeError(
          'LB_STORE_UNSUPPORTED_VERSION',
          `Point object ${key} has format version ${err.unsupportedVersion}; this Lifeboat reads version ${STORE_VERSION}. Use a newer Lifeboat.`,
          { point: id, object: key, version: err.unsupportedVersion },
        );
      }
      throw storeError(
        'LB_STORE_CORRUPT_POINT',
        `Point object ${key} is damaged (${(err as Error).message}); recovery point ${id} cannot be read. Other points are unaffected; pick another point or restore the object from a copy.`,
        { point: id, object: key, location: this.location },
        err,
      );
    }
    this.points.set(id, record);
    return record;
  }

  /** @internal Writes a point object (the last step of a commit). */
  async putPoint(record: PointRecord): Promise<void> {
    const key = pointKey(record.info.id);
    try {
      await this.backend.put(
        key,
        sealObject(this.crypto, ObjectKind.Point, key, encodePoint(record)),
      );
    } catch (err) {
      if (isLifeboatError(err, 'LB_BACKEND_EXISTS')) {
        const { machine, disk, cut } = record.info;
        throw storeError(
          'LB_STORE_POINT_EXISTS',
          `Cut ${cut ?? '?'} of ${machine}/${disk} is already committed as point ${record.info.id} in ${this.location}; this commit added nothing. Use that point (findCutPoint).`,
          { point: record.info.id, machine, disk, cut, object: key },
          err,
        );
      }
      throw err;
    }
    this.points.set(record.info.id, record);
  }

  /**
   * @internal Blobs gc found in packs that no index object lists, while gc runs (under its
   * exclusive lock): its tree walk may need them. Never used to deduplicate writes.
   */
  gcOverlay: ChunkIndex | undefined;

  /** @internal Where a blob lives: this session's writer first, then the index. */
  locate(
    id: Buffer,
    writer?: PackWriter,
  ): { loc: BlobLocation; data: Buffer | undefined } | undefined {
    const pending = writer?.locate(id);
    if (pending !== undefined) return pending;
    const loc = this.index.get(id) ?? this.gcOverlay?.get(id);
    return loc === undefined ? undefined : { loc, data: undefined };
  }

  /** @internal Reads, decrypts and checks one blob; errors name the point, offset and object. */
  async readBlob(
    id: Buffer,
    type: BlobType,
    ctx: ReadContext,
    writer?: PackWriter,
  ): Promise<Buffer> {
    const cacheKey = type === BlobType.Data ? id.toString('latin1') : undefined;
    if (cacheKey !== undefined) {
      const hit = this.chunkCache.get(cacheKey);
      if (hit !== undefined) return hit;
    }
    const plain = await this.readBlobUncached(id, type, ctx, writer);
    if (cacheKey !== undefined) this.chunkCache.set(cacheKey, plain);
    return plain;
  }

  /** @internal A decrypted data chunk from the cache, if there. */
  cachedChunk(id: Buffer): Buffer | undefined {
    return this.chunkCache.get(id.toString('latin1'));
  }

  /** @internal Remembers a decrypted data chunk. */
  cacheChunk(id: Buffer, plain: Buffer): void {
    this.chunkCache.set(id.toString('latin1'), plain);
  }

  /** @internal Like readBlob, without the chunk cache (for streaming whole disks). */
  async readBlobUncached(
    id: Buffer,
    type: BlobType,
    ctx: ReadContext,
    writer?: PackWriter,
  ): Promise<Buffer> {
    for (let attempt = 0; ; attempt++) {
      const where = this.locate(id, writer);
      if (where === undefined) {
        // Another process may have committed it after this one loaded the index.
        if (attempt === 0) {
          await this.refreshIndex();
          continue;
        }
        throw this.notLocated(id, type, ctx);
      }
      let sealed = where.data;
      if (sealed === undefined) {
        try {
          sealed = await this.backend.getRange(
            packKey(where.loc.pack),
            where.loc.offset,
            where.loc.length,
          );
        } catch (err) {
          // gc may have repacked it since this process loaded the index: look again once.
          if (attempt === 0 && isLifeboatError(err, 'LB_BACKEND_NOT_FOUND')) {
            await this.refreshIndex();
            continue;
          }
          throw this.blobReadError(err, id, type, where.loc, ctx);
        }
      }
      return this.openBlob(sealed, id, type, where.loc, ctx);
    }
  }

  /** @internal Decrypts a sealed blob already read; errors name the point, offset and pack. */
  openBlob(
    sealed: Buffer,
    id: Buffer,
    type: BlobType,
    loc: BlobLocation,
    ctx: ReadContext,
  ): Buffer {
    let plain: Buffer;
    try {
      plain = this.crypto.openChunk(type, id, sealed);
      if (plain.length !== loc.rawLength)
        throw new Error(`length ${plain.length}, expected ${loc.rawLength}`);
    } catch (err) {
      throw this.corruptBlob(id, type, loc, ctx, (err as Error).message, err);
    }
    return plain;
  }

  /** @internal The error for a blob whose bytes fail their check. */
  corruptBlob(
    id: Buffer,
    type: BlobType,
    loc: BlobLocation,
    ctx: ReadContext,
    why: string,
    cause?: unknown,
  ): Error {
    const what = type === BlobType.Tree ? 'Tree node' : 'Chunk';
    return storeError(
      type === BlobType.Tree ? 'LB_STORE_CORRUPT_TREE' : 'LB_STORE_CORRUPT_CHUNK',
      `${what} ${id.toString('hex')} in ${packKey(loc.pack)} at byte ${loc.offset} is damaged (${why})${describe(ctx)}. That data cannot be read; run verify to list every affected point, and restore the pack from a copy if you have one.`,
      {
        ...ctxDetails(ctx),
        chunk: id.toString('hex'),
        object: packKey(loc.pack),
        packOffset: loc.offset,
      },
      cause,
    );
  }

  /** @internal The error for a blob that no index lists. */
  notLocated(id: Buffer, type: BlobType, ctx: ReadContext): Error {
    const what = type === BlobType.Tree ? 'Tree node' : 'Chunk';
    if (this.index.damaged.size > 0) {
      const damaged = [...this.index.damaged.keys()];
      return storeError(
        'LB_STORE_CORRUPT_INDEX',
        `${what} ${id.toString('hex')}${describe(ctx)} is not in any readable index; index object(s) ${damaged.join(', ')} are damaged. Run gc to rebuild the index from the packs, then retry.`,
        { ...ctxDetails(ctx), chunk: id.toString('hex'), object: damaged[0], objects: damaged },
      );
    }
    // Callers report this only after an index reload that began after they saw the point,
    // so the blob is not merely newer than this process's view: no index object lists it.
    const objects = this.index.loaded.size;
    return storeError(
      'LB_STORE_MISSING_CHUNK',
      `${what} ${id.toString('hex')}${describe(ctx)} is listed by none of the ${objects} index object(s) of the store at ${this.location}, read again just now. A commit writes its packs and index objects before its point, so this is not a commit in progress: an index object or pack is missing and that data cannot be read. Run verify to list every affected point; restore the store's objects from a copy if you have one, or pick another point.`,
      {
        ...ctxDetails(ctx),
        chunk: id.toString('hex'),
        object: `chunk ${id.toString('hex')}`,
        indexObjects: objects,
      },
    );
  }

  /** @internal Maps a backend failure while reading a blob to a store error. */
  blobReadError(
    err: unknown,
    id: Buffer,
    type: BlobType,
    loc: BlobLocation,
    ctx: ReadContext,
  ): unknown {
    const object = packKey(loc.pack);
    const details = {
      ...ctxDetails(ctx),
      chunk: id.toString('hex'),
      object,
      packOffset: loc.offset,
    };
    if (isLifeboatError(err, 'LB_BACKEND_NOT_FOUND')) {
      return storeError(
        'LB_STORE_MISSING_OBJECT',
        `Pack ${object} is missing from the store at ${this.location}${describe(ctx)}. Its data cannot be read; run verify to list every affected point, and restore the pack from a copy if you have one.`,
        details,
        err,
      );
    }
    if (isLifeboatError(err, 'LB_BACKEND_RANGE')) {
      return storeError(
        'LB_STORE_TRUNCATED_OBJECT',
        `Pack ${object} is shorter than its index says (truncated)${describe(ctx)}. The data past its end cannot be read; run verify to list every affected point.`,
        details,
        err,
      );
    }
    return err;
  }

  /** @internal A tree node's references (cached). */
  async readNode(
    id: Buffer,
    level: number,
    ctx: ReadContext,
    writer?: PackWriter,
  ): Promise<Buffer> {
    const key = id.toString('latin1');
    const hit = this.nodeCache.get(key) ?? this.writtenNodes.get(key);
    if (hit !== undefined) return hit;
    const plain = await this.readBlobUncached(id, BlobType.Tree, ctx, writer);
    let refs: Buffer;
    try {
      if (!this.crypto.treeId(plain).equals(id))
        throw new FormatError('node id does not match its content');
      refs = TreeNode.decode(plain, this.fanout, level);
    } catch (err) {
      const loc = this.locate(id, writer)?.loc;
      throw loc === undefined
        ? err
        : this.corruptBlob(id, BlobType.Tree, loc, ctx, (err as Error).message, err);
    }
    this.nodeCache.set(key, refs);
    return refs;
  }

  /**
   * @internal Remembers the references of a node a write session just wrote (`refs`,
   * fanout*32 bytes, copied), so the next session of the disk, whose base is that point, finds
   * its tree in memory instead of reading it back from the packs. Nodes are addressed by their
   * content, so an entry is right whether or not the session commits. They go to a cache of
   * their own (8 MiB): in the node cache they raised a 100-machine process server's RSS by
   * some 55 MiB.
   */
  cacheNode(id: Buffer, refs: Buffer): void {
    if (refs.length !== this.fanout * REF_BYTES) return;
    this.writtenNodes.set(id.toString('latin1'), Buffer.from(refs));
  }

  /** @internal The id of node (level, idx) of a tree, or null when that subtree reads as zeros. */
  async nodeAt(
    root: Buffer | null,
    height: number,
    level: number,
    idx: number,
    ctx: ReadContext,
    writer?: PackWriter,
  ): Promise<Buffer | null> {
    if (level >= height) return idx === 0 && level === height - 1 ? root : null;
    if (idx >= (this.pow[height - 1 - level] as number)) return null;
    let id = root;
    for (let l = height - 1; l > level && id !== null; l--) {
      const refs = await this.readNode(id, l, ctx, writer);
      id = getRef(refs, Math.floor(idx / (this.pow[l - 1 - level] as number)) % this.fanout);
    }
    return id;
  }

  private throwIfClosed(): void {
    if (this.closed)
      throw storeError('LB_STORE_CLOSED', 'The store was closed. Open it again.', {});
  }
}

function invalid(message: string): Error {
  return storeError('LB_STORE_INVALID_ARGUMENT', message, {});
}

/** Work {@link Store.open} starts before the key is there. */
interface EarlyWork {
  lock: { machine: string; disk: string; lock: Promise<HeldLock> } | undefined;
  /** Index objects' bytes by key, read as listed when the open began. */
  indexBytes: Map<string, Promise<Buffer>>;
}

/** The purpose a write session's lock carries (shown to whoever it blocks). */
export function writePurpose(machine: string, disk: string): string {
  return `write ${machine}/${disk}`;
}

/** Lets go of what an open started early and nobody took (a lock; the reads just end). */
async function releaseEarly(early: EarlyWork): Promise<void> {
  early.indexBytes.clear();
  const lock = early.lock?.lock;
  early.lock = undefined;
  if (lock !== undefined) await lock.then((l) => l.release()).catch(() => undefined);
}

/**
 * Starts reading every object under `prefix` (a few at a time; nothing when there are more
 * than 16: a large store's index is read as it is needed) and returns their reads by key.
 * Never rejects as a whole; a read that fails is read again by whoever needs it.
 */
function prefetchObjects(backend: ObjectBackend, prefix: string): Map<string, Promise<Buffer>> {
  const reads = new Map<string, Promise<Buffer>>();
  void (async () => {
    const keys: string[] = [];
    for await (const key of listKeys(backend, prefix)) {
      keys.push(key);
      if (keys.length > 16) return;
    }
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < keys.length) {
        const key = keys[next++] as string;
        const read = backend.get(key);
        read.catch(() => undefined);
        reads.set(key, read);
        await read.catch(() => undefined);
      }
    };
    await Promise.all([worker(), worker(), worker(), worker()]);
  })().catch(() => undefined);
  return reads;
}

function threadCount(option: number | undefined): number {
  if (option === undefined) return Math.min(4, availableParallelism());
  if (!Number.isInteger(option) || option < 0 || option > 64) {
    throw invalid(`cryptoThreads must be a whole number from 0 to 64, not ${option}.`);
  }
  return option;
}

function checkPointId(id: string): void {
  if (typeof id !== 'string' || !/^[0-9a-f]{32}$/.test(id)) {
    throw storeError(
      'LB_STORE_POINT_NOT_FOUND',
      `${JSON.stringify(id)} is not a recovery point id (32 hex digits). List the points to pick one.`,
      { point: id },
    );
  }
}

function describe(ctx: ReadContext): string {
  const parts: string[] = [];
  if (ctx.point !== undefined) parts.push(`point ${ctx.point}`);
  if (ctx.offset !== undefined) parts.push(`disk offset ${ctx.offset}`);
  return parts.length === 0 ? '' : ` (${parts.join(', ')})`;
}

function ctxDetails(ctx: ReadContext): Record<string, unknown> {
  const d: Record<string, unknown> = {};
  if (ctx.point !== undefined) d['point'] = ctx.point;
  if (ctx.offset !== undefined) d['offset'] = ctx.offset;
  return d;
}

/** True when every byte of `data` is zero. */
export function isZero(data: Uint8Array): boolean {
  const buf = Buffer.isBuffer(data)
    ? data
    : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  const len = buf.length;
  if (len === 0) return true;
  // Cheap early exits on the first and last 8 bytes before comparing the whole range.
  if (buf[0] !== 0 || buf[len - 1] !== 0) return false;
  return (
    buf.compare(
      ZEROS_64K,
      0,
      Math.min(len, ZEROS_64K.length),
      0,
      Math.min(len, ZEROS_64K.length),
    ) === 0 &&
    (len <= ZEROS_64K.length || isZeroLong(buf))
  );
}

const ZEROS_64K = Buffer.alloc(65536);

function isZeroLong(buf: Buffer): boolean {
  for (let pos = 0; pos < buf.length; pos += ZEROS_64K.length) {
    const n = Math.min(ZEROS_64K.length, buf.length - pos);
    if (buf.compare(ZEROS_64K, 0, n, pos, pos + n) !== 0) return false;
  }
  return true;
}

function clonePoint(p: PointInfo): PointInfo {
  return {
    ...p,
    time: new Date(p.time),
    committedAt: new Date(p.committedAt),
    labels: { ...p.labels },
  };
}

function comparePoints(a: PointInfo, b: PointInfo): number {
  return (
    a.time.getTime() - b.time.getTime() ||
    a.committedAt.getTime() - b.committedAt.getTime() ||
    (a.id < b.id ? -1 : a.id > b.id ? 1 : 0)
  );
}
