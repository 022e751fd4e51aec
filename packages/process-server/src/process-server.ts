import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { createServer as createHttpServer } from 'node:http';
import type { Server as HttpServer } from 'node:http';
import { join } from 'node:path';
import { createServer } from 'node:tls';
import type { Server, TLSSocket } from 'node:tls';
import {
  BASELINE_ENTRY_BYTES,
  LifeboatError,
  MIN_PROTOCOL_VERSION,
  encodeFrame,
  frameOwnsBuffer,
} from '@lifeboat/protocol';
import type {
  BaselineRequestFrame,
  HelloFrame,
  SequencedFrame,
  WelcomeFrame,
} from '@lifeboat/protocol';
import type { StoreApi } from '@lifeboat/store';
import { pino } from 'pino';
import type { Logger } from 'pino';
import { HealthServer } from './health-server.js';
import { IngestSession } from './ingest-session.js';
import { Journal } from './journal.js';
import type { JournalInput } from './journal.js';
import { MachineReplicator } from './machine-replicator.js';
import type { CommittedCut } from './machine-replicator.js';
import { MachineStateStore } from './machine-state-store.js';
import { computePointDigests } from './point-digests.js';
import type { PointDigests } from './point-digests.js';
import type { MachineState } from './machine-state-store.js';
import { resolveProcessServerOptions } from './process-server-options.js';
import type {
  PeerIdentity,
  ProcessServerOptions,
  ProcessServerTls,
  ResolvedProcessServerOptions,
} from './process-server-options.js';
import { RateMeter } from './rate-meter.js';
import { Semaphore } from './semaphore.js';
import { StoreWorkerPool } from './store-worker-pool.js';
import type { StoreWorkerPoolHealth } from './store-worker-pool.js';
import { TokenBucket } from './token-bucket.js';

/** Bytes of all sessions waiting for the journal's fsync before sessions stop being read. */
const JOURNAL_PENDING_LIMIT = 32 * 1024 * 1024;

/** Health of one disk of a machine. */
export interface DiskHealth {
  disk: string;
  size: number;
  /** Age in seconds of the newest committed point (agent's cut time), null before the first point. */
  rpoSeconds: number | null;
  lastPointId: string | null;
  lastPointTime: string | null;
  /** Changed bytes received for this disk per second (last 10 s). */
  bytesPerSecondIn: number;
  /** Changed bytes written to the store for this disk per second (last 10 s). */
  bytesPerSecondOut: number;
}

/** Health of one machine. */
export interface MachineHealth {
  machine: string;
  connected: boolean;
  /** Highest sequence number received and journaled. */
  lastSeq: number;
  /** Sequence number of the newest committed cut (or dropped backlog). */
  committedSeq: number;
  /** Journal bytes of this machine not yet committed to the store. */
  backlogBytes: number;
  bytesPerSecondIn: number;
  bytesPerSecondOut: number;
  resyncRequired: boolean;
  resyncReason: string | null;
  /** The last store error of this machine, until the next commit. */
  lastError: { code: string; message: string } | null;
  lastCut: { cutId: string; time: string; kind: 'crash' | 'app' } | null;
  disks: DiskHealth[];
}

/** What `GET /health` returns. */
export interface ProcessServerHealth {
  status: 'ok' | 'degraded';
  time: string;
  uptimeSeconds: number;
  process: { cpuPercent: number; rssBytes: number; heapUsedBytes: number };
  journal: {
    usedBytes: number;
    maxBytes: number;
    usedRatio: number;
    segments: number;
    fullForSeconds: number | null;
    framesPerSync: number;
    /** True while segments are written with direct I/O (past the page cache). */
    directIo: boolean;
    failed: string | null;
  };
  store: { location: string; reachable: boolean; lastError: string | null };
  /** The store worker threads (null when store work runs on the ingest thread). */
  storeWorkers: StoreWorkerPoolHealth | null;
  ingest: {
    sessions: number;
    bytesPerSecondIn: number;
    bytesPerSecondOut: number;
    bandwidthBytesPerSecond: number;
    machineBandwidthBytesPerSecond: number;
    /** Time from a cut's arrival (durable in the journal) to its committed points, over the last 1000 cuts. */
    commitLatencyMs: { p50: number; p99: number; samples: number };
  };
  machines: MachineHealth[];
}

interface Machine {
  id: string;
  state: MachineState;
  /** True when the server has never heard of this machine (no state file). */
  isNew: boolean;
  receivedSeq: number;
  durableSeq: number;
  /** Disk sizes as of the newest received frame (RESIZE applied), for range checks. */
  sizes: Map<string, number>;
  replicator: MachineReplicator;
  session: IngestSession | undefined;
  bucket: TokenBucket;
  helloLock: Promise<unknown>;
  /** Sequence number of the newest cut received (journaled or on its way). */
  lastCutSeq: number;
  /** Baseline requests waiting for every cut received before them to be committed. */
  releaseWaiters: Array<{ seq: number; resolve: () => void }>;
  rateIn: RateMeter;
  rateOut: RateMeter;
  diskRates: Map<string, { in: RateMeter; out: RateMeter }>;
}

/**
 * The process server: accepts agents over mutual TLS, journals their frames durably before
 * acknowledging them, and commits their cuts as recovery points in the store. Events:
 * `committed` (CommittedCut), `resync-required` ({ machine, reason }).
 */
export class ProcessServer extends EventEmitter {
  private readonly machines = new Map<string, Machine>();
  private readonly sessions = new Set<IngestSession>();
  private readonly bucket: TokenBucket;
  private readonly storeLimit: Semaphore;
  private readonly applySlots: Semaphore;
  private tlsServer: Server | undefined;
  /** Serves the HTTP/1.1 connections of the mTLS port (ALPN), when an httpHandler is given. */
  private httpServer: HttpServer | undefined;
  private health: HealthServer | undefined;
  private timers: NodeJS.Timeout[] = [];
  private fullSince = 0;
  private stopping = false;
  private readonly started = performance.now();
  private cpuPrev = process.cpuUsage();
  private cpuPrevAt = performance.now();
  private cpuPercent = 0;
  private readonly rateIn = new RateMeter();
  private readonly rateOut = new RateMeter();
  private machineLimit: number;
  private readonly commitLatencies: number[] = [];
  private readonly pool: StoreWorkerPool | undefined;
  private readonly storeLocation: string;

  private constructor(
    private readonly opts: ResolvedProcessServerOptions,
    private readonly journal: Journal,
    private readonly stateStore: MachineStateStore,
    private readonly logger: Logger,
  ) {
    super();
    this.bucket = new TokenBucket(opts.bandwidthBytesPerSecond);
    this.machineLimit = opts.machineBandwidthBytesPerSecond;
    this.storeLimit = new Semaphore(opts.storeConcurrency);
    this.applySlots = new Semaphore(opts.storeConcurrency);
    const w = opts.storeWorkers;
    this.pool = w
      ? new StoreWorkerPool(w, (e) => {
          if (e.kind === 'died')
            this.logger.error(
              { code: e.error?.code, worker: e.worker, err: e.error?.toJSON() },
              'store worker thread died; restarting it (its machines retry from the journal)',
            );
          else this.logger.warn({ worker: e.worker }, 'store worker thread restarted');
        })
      : undefined;
    this.storeLocation =
      opts.store?.location ??
      (w?.spec.kind === 'directory'
        ? `dir:${w.spec.path}`
        : `azure:${w?.spec.kind === 'azure' ? (w.spec.containerUrl ?? w.spec.container ?? '') : ''}`);
  }

  /** Opens the journal, replays it, and starts listening. */
  static async start(options: ProcessServerOptions): Promise<ProcessServer> {
    const opts = resolveProcessServerOptions(options);
    const logger = opts.logger ?? pino({ name: 'process-server', level: opts.logLevel });
    const stateStore = new MachineStateStore(join(opts.journalDir, 'machines'), opts.unsafeNoSync);
    const states = await stateStore.loadAll();
    const { journal, records, corruptSegments } = await Journal.open({
      dir: join(opts.journalDir, 'journal'),
      maxBytes: opts.journalMaxBytes,
      segmentBytes: opts.journalSegmentBytes,
      noSync: opts.unsafeNoSync,
    });
    const server = new ProcessServer(opts, journal, stateStore, logger);
    try {
      await server.replay(states, records, corruptSegments);
      await server.listen();
    } catch (err) {
      await server.stop().catch(() => undefined);
      throw err;
    }
    return server;
  }

  /** The port agents connect to. */
  get port(): number {
    const a = this.tlsServer?.address();
    return typeof a === 'object' && a ? a.port : 0;
  }

  /** The health/metrics listener's port (0 when disabled). */
  get healthPort(): number {
    return this.health?.port ?? 0;
  }

  /** Changes the bandwidth limits at run time (bytes per second; 0 is unlimited). */
  setBandwidthLimits(limits: { total?: number; perMachine?: number }): void {
    if (limits.total !== undefined) this.bucket.setRate(limits.total);
    if (limits.perMachine !== undefined) {
      this.machineLimit = limits.perMachine;
      for (const m of this.machines.values()) m.bucket.setRate(limits.perMachine);
    }
  }

  /**
   * Uses new TLS material (a renewed certificate, a new CA) for connections from now on;
   * sessions already open keep theirs.
   */
  setTls(tls: ProcessServerTls): void {
    this.tlsServer?.setSecureContext({
      cert: tls.cert,
      key: tls.key,
      ca: tls.ca,
      minVersion: 'TLSv1.3',
    });
  }

  /** Commit latencies (ms) of the most recent cuts, newest last, for benchmarks. */
  recentCommitLatencies(): number[] {
    return [...this.commitLatencies];
  }

  /** Journal counters (appends, syncs, bytes) for benchmarks. */
  journalCounters(): { appends: number; syncs: number; bytes: number } {
    return { ...this.journal.counters };
  }

  /** A health snapshot. */
  healthReport(): ProcessServerHealth {
    const now = Date.now();
    const machines: MachineHealth[] = [...this.machines.values()]
      .sort((a, b) => a.id.localeCompare(b.id))
      .map((m) => {
        const err = m.replicator.lastError;
        return {
          machine: m.id,
          connected: m.session !== undefined && !m.session.isClosed,
          lastSeq: m.receivedSeq,
          committedSeq: m.state.releasedSeq,
          backlogBytes: m.replicator.backlogBytes,
          bytesPerSecondIn: m.rateIn.rate(),
          bytesPerSecondOut: m.rateOut.rate(),
          resyncRequired: m.state.resync !== undefined,
          resyncReason: m.state.resync?.reason ?? null,
          lastError: err ? { code: err.code, message: err.message } : null,
          lastCut: m.state.lastCut
            ? {
                cutId: m.state.lastCut.cutId,
                time: new Date(m.state.lastCut.time).toISOString(),
                kind: m.state.lastCut.kind,
              }
            : null,
          disks: Object.entries(m.state.disks)
            .sort(([a], [b]) => a.localeCompare(b))
            .map(([disk, d]) => {
              const p = m.state.points[disk];
              return {
                disk,
                size: m.sizes.get(disk) ?? d.size,
                rpoSeconds: p ? Math.max(0, (now - p.time) / 1000) : null,
                lastPointId: p?.id ?? null,
                lastPointTime: p ? new Date(p.time).toISOString() : null,
                bytesPerSecondIn: m.diskRates.get(disk)?.in.rate() ?? 0,
                bytesPerSecondOut: m.diskRates.get(disk)?.out.rate() ?? 0,
              };
            }),
        };
      });
    const storeErrors = machines.filter((m) => m.lastError !== null);
    const mem = process.memoryUsage();
    const c = this.journal.counters;
    const jf = this.journal.failure;
    const workers = this.pool?.health() ?? this.opts.store?.workerHealth?.() ?? null;
    return {
      status:
        storeErrors.length > 0 ||
        (workers !== null && workers.alive < workers.count) ||
        machines.some((m) => m.resyncRequired) ||
        jf !== undefined ||
        this.fullSince > 0
          ? 'degraded'
          : 'ok',
      time: new Date(now).toISOString(),
      uptimeSeconds: (performance.now() - this.started) / 1000,
      process: { cpuPercent: this.cpuPercent, rssBytes: mem.rss, heapUsedBytes: mem.heapUsed },
      journal: {
        usedBytes: this.journal.usedBytes,
        maxBytes: this.journal.maxBytes,
        usedRatio: this.journal.usedBytes / this.journal.maxBytes,
        segments: this.journal.segmentCount,
        fullForSeconds: this.fullSince > 0 ? (performance.now() - this.fullSince) / 1000 : null,
        framesPerSync: c.syncs > 0 ? c.appends / c.syncs : 0,
        directIo: this.journal.directIo,
        failed: jf?.message ?? null,
      },
      store: {
        location: this.storeLocation,
        reachable: storeErrors.length === 0,
        lastError: storeErrors[0]?.lastError?.message ?? null,
      },
      storeWorkers: workers,
      ingest: {
        sessions: this.sessions.size,
        bytesPerSecondIn: this.rateIn.rate(),
        bytesPerSecondOut: this.rateOut.rate(),
        bandwidthBytesPerSecond: this.bucket.bytesPerSecond,
        machineBandwidthBytesPerSecond: this.machineLimit,
        commitLatencyMs: percentiles(this.commitLatencies.slice(-1000)),
      },
      machines,
    };
  }

  /** Stops: refuses new sessions, tells agents, flushes the journal, stops store work. The store stays open. */
  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    for (const t of this.timers) clearInterval(t);
    const closing = this.tlsServer
      ? new Promise<void>((resolve) => this.tlsServer!.close(() => resolve()))
      : Promise.resolve();
    for (const s of [...this.sessions])
      s.reject(
        new LifeboatError(
          'LB_PS_SHUTTING_DOWN',
          'The process server is stopping; reconnect later (nothing acknowledged is lost).',
        ),
      );
    for (const s of [...this.sessions]) s.socket.destroy();
    this.httpServer?.closeAllConnections();
    await closing;
    await this.health?.close();
    await Promise.all([...this.machines.values()].map((m) => m.replicator.stop()));
    await this.pool?.close();
    await this.journal.close();
  }

  private newMachine(state: MachineState, isNew: boolean): Machine {
    const m: Machine = {
      id: state.machine,
      state,
      isNew,
      receivedSeq: state.releasedSeq,
      durableSeq: state.releasedSeq,
      sizes: new Map(Object.entries(state.disks).map(([k, v]) => [k, v.size])),
      replicator: new MachineReplicator(state, {
        store: this.pool ? this.pool.forMachine(state.machine) : this.opts.store!,
        journal: this.journal,
        storeLimit: this.storeLimit,
        applySlots: this.applySlots,
        logger: this.logger,
        saveState: (s) => this.stateStore.save(s),
        onCommitted: (cut) => this.committed(m, cut),
        onJournalDamage: (err) => {
          const reason =
            err.code === 'LB_PS_JOURNAL_CORRUPT' ? `journal damaged: ${err.message}` : err.message;
          void this.markResync(m, reason).catch((e: unknown) =>
            this.logger.error({ err: e, machine: m.id }, 'marking the machine for resync failed'),
          );
        },
        retryInitialMs: this.opts.storeRetryInitialMs,
        retryMaxMs: this.opts.storeRetryMaxMs,
      }),
      session: undefined,
      bucket: new TokenBucket(this.machineLimit),
      helloLock: Promise.resolve(),
      lastCutSeq: state.releasedSeq,
      releaseWaiters: [],
      rateIn: new RateMeter(),
      rateOut: new RateMeter(),
      diskRates: new Map(),
    };
    this.machines.set(m.id, m);
    return m;
  }

  private committed(m: Machine, cut: CommittedCut): void {
    this.commitLatencies.push(cut.latencyMs);
    if (this.commitLatencies.length > 10_000) this.commitLatencies.splice(0, 5_000);
    this.logger.debug(
      { machine: m.id, cut: cut.cutId, seq: cut.seq, latencyMs: cut.latencyMs },
      'cut committed',
    );
    m.session?.committed(cut.seq, cut.cutId, cut.time.getTime());
    this.released(m);
    this.emit('committed', cut);
  }

  /** Wakes the baseline requests whose cuts are now committed (or dropped by a resync mark). */
  private released(m: Machine): void {
    m.releaseWaiters = m.releaseWaiters.filter((w) => {
      if (w.seq > m.state.releasedSeq) return true;
      w.resolve();
      return false;
    });
  }

  /** The resync digests of a machine's point, from whichever store the server writes to. */
  private pointDigests(machine: string, point: string, key: Uint8Array): Promise<PointDigests> {
    if (this.pool) return this.pool.forMachine(machine).pointDigests(point, key);
    const st = this.opts.store;
    if (st?.pointDigests) return st.pointDigests(machine, point, key);
    if (st !== undefined && 'openPoint' in st && 'chunkSize' in st)
      return computePointDigests(st as StoreApi, point, key);
    return Promise.reject(
      new LifeboatError(
        'LB_PS_STORE_FAILED',
        'This store cannot read points for a resync baseline; the agent sends every allocated range.',
      ),
    );
  }

  /**
   * Answers a resync baseline request: once every cut the machine sent before it is committed,
   * the latest point of the disk is read and each chunk digested under a fresh random key,
   * which goes to the agent with the digests. The store's chunk-id key never leaves the server;
   * the digests are worth nothing after this answer. On a store failure the agent is told, and
   * sends every allocated range instead.
   */
  private baselineRequest(s: IngestSession, f: BaselineRequestFrame): void {
    const m = this.machines.get(s.machine!)!;
    const disk = s.diskNames[f.disk];
    if (disk === undefined) {
      s.reject(
        new LifeboatError(
          'LB_PROTO_UNKNOWN_DISK',
          `A baseline request names disk index ${f.disk}, but the hello announced ${s.diskNames.length} disks.`,
          { details: { machine: m.id, disk: f.disk } },
        ),
      );
      return;
    }
    const run = async (): Promise<void> => {
      const seq = m.lastCutSeq;
      if (seq > m.state.releasedSeq)
        await new Promise<void>((resolve) => m.releaseWaiters.push({ seq, resolve }));
      if (s.isClosed) return;
      const key = randomBytes(32);
      const point = m.state.points[disk]?.id ?? null;
      const head = {
        type: 'baseline' as const,
        request: f.request,
        disk: f.disk,
        point,
        chunkSize: 512,
        size: 0,
        chunks: 0,
        key: key.toString('hex'),
      };
      if (point === null) {
        await s.send(head);
        return;
      }
      let digests: PointDigests;
      const t0 = performance.now();
      try {
        digests = await this.storeLimit.run(() => this.pointDigests(m.id, point, key));
      } catch (err) {
        const e =
          err instanceof LifeboatError
            ? err
            : new LifeboatError('LB_PS_STORE_FAILED', String((err as Error)?.message ?? err));
        this.logger.warn(
          { machine: m.id, disk, point, err: e.toJSON() },
          'resync baseline failed; the agent sends every allocated range',
        );
        await s.send({ ...head, error: { code: e.code, message: e.message.slice(0, 4000) } });
        return;
      }
      const chunks = digests.entries.length / BASELINE_ENTRY_BYTES;
      if (!(await s.send({ ...head, chunkSize: digests.chunkSize, size: digests.size, chunks })))
        return;
      const entries = Buffer.from(
        digests.entries.buffer,
        digests.entries.byteOffset,
        digests.entries.byteLength,
      );
      const per = Math.floor((1024 * 1024) / BASELINE_ENTRY_BYTES);
      for (let first = 0; first < chunks; first += per) {
        const n = Math.min(per, chunks - first);
        const part = entries.subarray(
          first * BASELINE_ENTRY_BYTES,
          (first + n) * BASELINE_ENTRY_BYTES,
        );
        if (!(await s.send({ type: 'baseline-digests', request: f.request, first, entries: part })))
          return;
      }
      this.logger.info(
        { machine: m.id, disk, point, chunks, ms: Math.round(performance.now() - t0) },
        'resync baseline sent',
      );
    };
    run().catch((err: unknown) => s.reject(err));
  }

  private async replay(
    states: MachineState[],
    records: Awaited<ReturnType<typeof Journal.open>>['records'],
    corrupt: Array<{ segment: number; position: number }>,
  ): Promise<void> {
    for (const s of states) this.newMachine(s, false);
    for (const c of corrupt)
      this.logger.error(
        { code: 'LB_PS_JOURNAL_CORRUPT', ...c },
        'journal segment damaged in the middle; records after the damage are lost',
      );
    const broken = new Set<string>();
    // Damage in the middle of a segment loses records whose machines cannot be known (the
    // machine id is in the lost bytes): every machine must resync, none may resume silently.
    if (corrupt.length > 0) {
      for (const id of this.machines.keys()) broken.add(id);
      for (const r of records) broken.add(r.machine);
    }
    let replayed = 0;
    for (const r of records) {
      const m = this.machines.get(r.machine);
      if (!m) {
        // State is saved before the first welcome, so this means a lost state file.
        broken.add(r.machine);
        continue;
      }
      if (r.seq <= m.receivedSeq) continue;
      if (r.seq !== m.receivedSeq + 1 || broken.has(m.id)) {
        broken.add(m.id);
        continue;
      }
      m.receivedSeq = m.durableSeq = r.seq;
      if (r.kind === 'resize') m.sizes.set(r.disk, r.a);
      if (r.kind === 'cut') m.lastCutSeq = r.seq;
      m.replicator.push(r);
      replayed++;
    }
    for (const id of broken) {
      const m =
        this.machines.get(id) ??
        this.newMachine({ machine: id, releasedSeq: 0, disks: {}, points: {} }, false);
      await this.markResync(m, 'journal damaged: records of this machine are missing');
    }
    for (const m of this.machines.values()) {
      await this.journal.release(m.id, m.state.releasedSeq);
      m.replicator.start();
    }
    if (replayed > 0)
      this.logger.info({ records: replayed, machines: this.machines.size }, 'journal replayed');
  }

  private async listen(): Promise<void> {
    const o = this.opts;
    const server = createServer({
      cert: o.tls.cert,
      key: o.tls.key,
      ca: o.tls.ca,
      requestCert: true,
      // Verified in accept() instead, so a rejected agent gets an ERROR frame naming the reason
      // rather than a bare hang-up (TLS 1.3 checks the client certificate after the handshake).
      rejectUnauthorized: false,
      minVersion: 'TLSv1.3',
      // Agents' HTTPS requests (ALPN http/1.1) share the port with replication sessions, which
      // announce no ALPN protocol.
      ...(o.httpHandler !== undefined ? { ALPNProtocols: ['http/1.1'] } : {}),
    });
    this.tlsServer = server;
    const handler = o.httpHandler;
    if (handler !== undefined) {
      this.httpServer = createHttpServer((req, res) => {
        handler(req, res, peerOf(req.socket as TLSSocket));
      });
      this.httpServer.keepAliveTimeout = 5000;
    }
    server.on('secureConnection', (socket: TLSSocket) => this.accept(socket));
    server.on('tlsClientError', (err, socket) => {
      this.logger.warn(
        { err: err.message, remote: socket.remoteAddress },
        'TLS handshake rejected (client certificate missing or not from the configured CA)',
      );
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(o.port, o.host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    server.on('error', (err) => this.logger.error({ err: err.message }, 'TLS listener error'));
    this.journal.on('flushed', () => {
      if (this.journal.pendingBytes > JOURNAL_PENDING_LIMIT / 2) return;
      for (const s of this.sessions)
        if (s.unsyncedBytes <= this.opts.sessionUnsyncedBytes / 2) s.resume('unsynced');
    });
    this.journal.on('space', () => {
      this.fullSince = 0;
      for (const s of this.sessions) s.resume('journal');
    });
    this.journal.on('failed', (err: LifeboatError) => {
      this.logger.error({ err: err.toJSON() }, 'journal failed; no more acknowledgements');
      for (const s of [...this.sessions]) s.reject(err);
    });
    if (o.healthPort !== null)
      this.health = await HealthServer.start({
        host: o.healthHost,
        port: o.healthPort,
        report: () => this.healthReport(),
      });
    this.timers.push(setInterval(() => this.tick(), 1000));
    for (const t of this.timers) t.unref();
  }

  private tick(): void {
    // Safety net for the pause reasons released by events: a missed event must not stall a session.
    for (const sess of this.sessions) {
      if (!this.journal.full) sess.resume('journal');
      if (
        sess.unsyncedBytes <= this.opts.sessionUnsyncedBytes / 2 &&
        this.journal.pendingBytes <= JOURNAL_PENDING_LIMIT / 2
      )
        sess.resume('unsynced');
    }
    const now = performance.now();
    const cpu = process.cpuUsage();
    const us = cpu.user - this.cpuPrev.user + (cpu.system - this.cpuPrev.system);
    this.cpuPercent = (us / 1000 / Math.max(1, now - this.cpuPrevAt)) * 100;
    this.cpuPrev = cpu;
    this.cpuPrevAt = now;
    let out = 0;
    for (const m of this.machines.values()) {
      m.rateIn.sample();
      m.rateOut.set(m.replicator.bytesOut);
      for (const [disk, r] of m.diskRates) {
        r.in.sample();
        r.out.set(m.replicator.diskBytesOut.get(disk) ?? 0);
      }
      out += m.replicator.bytesOut;
    }
    this.rateIn.sample();
    this.rateOut.set(out);
    if (this.journal.full) {
      if (this.fullSince === 0) this.fullSince = now;
      else if (now - this.fullSince > this.opts.overflowTimeoutMs) void this.overflow();
    } else this.fullSince = 0;
  }

  /** The journal stayed full too long: machines blocked on it lose their backlog and must resync. */
  private async overflow(): Promise<void> {
    const waiting = [...this.machines.values()].filter((m) => m.session?.isPausedFor('journal'));
    const victims =
      waiting.length > 0
        ? waiting
        : [...this.machines.values()].filter((m) => m.replicator.backlogBytes > 0);
    this.fullSince = performance.now();
    for (const m of victims) {
      await this.markResync(
        m,
        `journal full for more than ${Math.round(this.opts.overflowTimeoutMs / 1000)} s`,
      );
    }
  }

  private async markResync(m: Machine, reason: string): Promise<void> {
    m.session?.reject(
      new LifeboatError(
        'LB_PS_RESYNC_REQUIRED',
        `The process server dropped the backlog of machine ${m.id} (${reason}); the agent must resync its disks.`,
        { details: { machine: m.id, reason } },
      ),
    );
    await this.journal.sync();
    const dropped = await m.replicator.dropBacklog();
    m.durableSeq = m.receivedSeq;
    m.state.releasedSeq = m.receivedSeq;
    m.state.resync = { since: Date.now(), reason, atSeq: m.receivedSeq };
    await this.stateStore.save(m.state);
    await this.journal.release(m.id, m.receivedSeq);
    this.released(m);
    this.logger.error(
      { code: 'LB_PS_RESYNC_REQUIRED', machine: m.id, reason, droppedBytes: dropped },
      'machine marked for resync',
    );
    this.emit('resync-required', { machine: m.id, reason });
  }

  private accept(socket: TLSSocket): void {
    if (this.stopping) {
      socket.destroy();
      return;
    }
    if (this.httpServer !== undefined && socket.alpnProtocol === 'http/1.1') {
      // HTTP routes check the peer themselves (registration needs no client certificate).
      this.httpServer.emit('connection', socket);
      return;
    }
    if (!socket.authorized) {
      const reason = String(socket.authorizationError ?? 'no client certificate');
      this.logger.warn({ remote: socket.remoteAddress, reason }, 'agent certificate rejected');
      const err = new LifeboatError(
        'LB_PROTO_UNAUTHORIZED',
        `The process server rejected this agent's client certificate (${reason}). Give the agent a certificate issued by the CA the process server trusts.`,
        {
          details: { reason },
        },
      );
      socket.on('error', () => undefined);
      // The oldest version: any agent can read why it was turned away.
      socket.end(
        Buffer.concat(
          encodeFrame(
            { type: 'error', code: err.code, message: err.message, details: err.details },
            MIN_PROTOCOL_VERSION,
          ),
        ),
      );
      setTimeout(() => socket.destroy(), 2000).unref();
      return;
    }
    const session = new IngestSession(
      socket,
      {
        onHello: (s, f) => this.hello(s, f),
        onSequenced: (s, f) => this.sequenced(s, f),
        onBytes: (s, n) => this.bytes(s, n),
        onClosed: (s) => this.closed(s),
        onBaselineRequest: (s, f) => this.baselineRequest(s, f),
      },
      {
        maxPayloadBytes: this.opts.maxPayloadBytes,
        helloTimeoutMs: this.opts.helloTimeoutMs,
        stallTimeoutMs: this.opts.stallTimeoutMs,
      },
      this.logger,
    );
    this.sessions.add(session);
    if (this.journal.full) session.pause('journal');
  }

  private closed(s: IngestSession): void {
    this.sessions.delete(s);
    if (s.machine) {
      const m = this.machines.get(s.machine);
      if (m?.session === s) m.session = undefined;
    }
  }

  private hello(session: IngestSession, f: HelloFrame): Promise<WelcomeFrame> {
    let m = this.machines.get(f.machine);
    if (!m) {
      m = this.newMachine({ machine: f.machine, releasedSeq: 0, disks: {}, points: {} }, true);
      m.replicator.start();
    }
    const machine = m;
    const run = machine.helloLock.then(() => this.helloLocked(session, machine, f));
    machine.helloLock = run.catch(() => undefined);
    return run;
  }

  private async helloLocked(
    session: IngestSession,
    m: Machine,
    f: HelloFrame,
  ): Promise<WelcomeFrame> {
    if (this.stopping)
      throw new LifeboatError(
        'LB_PS_SHUTTING_DOWN',
        'The process server is stopping; reconnect later.',
      );
    const old = m.session;
    if (old && old !== session && !old.isClosed) {
      old.reject(
        new LifeboatError(
          'LB_PROTO_SESSION_REPLACED',
          `A newer session of machine ${m.id} took over this one.`,
          { details: { machine: m.id, by: session.id } },
        ),
      );
    }
    const refused = this.opts.authorizeSession?.(peerOf(session.socket), m.id);
    if (refused !== undefined) throw refused;
    // Everything the old session handed to the journal is durable (or failed) before we say where to resume.
    await this.journal.sync();
    if (this.journal.failure) throw this.journal.failure;
    const o = f.oldestUnackedSeq;
    if (o !== null && o > m.receivedSeq + 1) {
      if (m.isNew) {
        // A machine moving here from another process server: its history before `o` is that server's.
        m.receivedSeq = m.durableSeq = o - 1;
        m.state.releasedSeq = o - 1;
      } else {
        throw new LifeboatError(
          'LB_PROTO_RESUME_GAP',
          `Machine ${m.id} resumes at frame ${o}, but this process server has frames only up to ${m.receivedSeq}; the frames between were never received. Resync the machine.`,
          {
            details: { machine: m.id, oldestUnackedSeq: o, lastSeq: m.receivedSeq },
          },
        );
      }
    }
    let changed = m.isNew;
    for (const d of f.disks) {
      if (m.state.disks[d.name] === undefined) {
        m.state.disks[d.name] = { size: d.size };
        if (!m.sizes.has(d.name)) m.sizes.set(d.name, d.size);
        changed = true;
      }
    }
    if (changed) await this.stateStore.save(m.state);
    m.isNew = false;
    if (session.isClosed)
      throw new LifeboatError('LB_PROTO_CONNECTION_LOST', 'The agent left during the hello.');
    session.diskNames = f.disks.map((d) => d.name);
    m.session = session;
    this.logger.info(
      {
        session: session.id,
        machine: m.id,
        agent: f.agent,
        lastSeq: m.receivedSeq,
        resync: m.state.resync !== undefined,
      },
      'session established',
    );
    return {
      type: 'welcome',
      sessionId: session.id,
      lastSeq: m.receivedSeq,
      maxPayloadBytes: this.opts.maxPayloadBytes,
      resyncRequired: m.state.resync !== undefined,
      ...(m.state.resync === undefined ? {} : { resyncAtSeq: m.state.resync.atSeq }),
      latestCut: m.state.lastCut
        ? { seq: m.state.lastCut.seq, cutId: m.state.lastCut.cutId, time: m.state.lastCut.time }
        : null,
    };
  }

  private bytes(s: IngestSession, n: number): void {
    const m = s.machine ? this.machines.get(s.machine) : undefined;
    this.rateIn.add(n);
    m?.rateIn.add(n);
    const wait = Math.max(this.bucket.take(n), m ? m.bucket.take(n) : 0);
    if (wait > 0 && !s.isPausedFor('bandwidth')) {
      s.pause('bandwidth');
      setTimeout(() => s.resume('bandwidth'), wait).unref();
    }
    if (this.journal.full) s.pause('journal');
  }

  private sequenced(s: IngestSession, f: SequencedFrame): void {
    const m = this.machines.get(s.machine!)!;
    if (m.session !== s) {
      s.reject(
        new LifeboatError(
          'LB_PROTO_SESSION_REPLACED',
          `A newer session of machine ${m.id} took over this one.`,
        ),
      );
      return;
    }
    if (f.seq <= m.receivedSeq) {
      // A resent frame we already hold: idempotent, acknowledge once durable.
      if (f.seq <= m.durableSeq) s.ack(m.durableSeq);
      return;
    }
    if (f.seq !== m.receivedSeq + 1) {
      s.reject(
        new LifeboatError(
          'LB_PROTO_SEQUENCE_GAP',
          `Frame ${f.seq} of machine ${m.id} arrived but ${m.receivedSeq + 1} was expected; frames were lost. The agent must reconnect and resend from its last acknowledged frame.`,
          {
            details: { machine: m.id, expected: m.receivedSeq + 1, got: f.seq },
          },
        ),
      );
      return;
    }
    let input: JournalInput;
    if (f.type === 'cut') {
      m.lastCutSeq = f.seq;
      const meta: Record<string, unknown> = { cutId: f.cutId, kind: f.kind, time: f.time };
      if (f.consistencyGroup !== undefined) meta.consistencyGroup = f.consistencyGroup;
      if (f.labels !== undefined) meta.labels = f.labels;
      input = {
        kind: 'cut',
        machine: m.id,
        disk: '',
        seq: f.seq,
        a: f.time,
        b: 0,
        body: Buffer.from(JSON.stringify(meta)),
      };
    } else {
      const disk = s.diskNames[f.disk];
      if (disk === undefined) {
        s.reject(
          new LifeboatError(
            'LB_PROTO_UNKNOWN_DISK',
            `Frame ${f.seq} names disk index ${f.disk}, but the hello announced ${s.diskNames.length} disks.`,
            { details: { machine: m.id, disk: f.disk, seq: f.seq } },
          ),
        );
        return;
      }
      const size = m.sizes.get(disk) ?? 0;
      if (f.type === 'discard') {
        input = {
          kind: 'discard',
          machine: m.id,
          disk,
          seq: f.seq,
          a: 0,
          b: 0,
          body: Buffer.alloc(0),
        };
      } else if (f.type === 'resize') {
        input = {
          kind: 'resize',
          machine: m.id,
          disk,
          seq: f.seq,
          a: f.size,
          b: 0,
          body: Buffer.alloc(0),
        };
      } else {
        const length = f.type === 'data' ? f.data.length : f.length;
        if (f.offset + length > size) {
          s.reject(
            new LifeboatError(
              'LB_PROTO_OUT_OF_RANGE',
              `Frame ${f.seq} writes ${length} bytes at ${f.offset} on disk ${disk}, past its end at ${size}. Send a RESIZE first.`,
              {
                details: { machine: m.id, disk, seq: f.seq, offset: f.offset, length, size },
              },
            ),
          );
          return;
        }
        input = {
          kind: f.type,
          machine: m.id,
          disk,
          seq: f.seq,
          a: f.offset,
          b: f.type === 'data' ? 0 : f.length,
          body: f.type === 'data' ? f.data : Buffer.alloc(0),
          // Applied right after its fsync when the machine keeps up: no read back then.
          hold: f.type === 'data' && m.replicator.keepingUp,
          // Nothing here reads a frame's bytes after the journal: its buffer can be reused.
          recycle: f.type === 'data' && frameOwnsBuffer(f.data),
        };
      }
      if (f.type === 'resize') m.sizes.set(disk, f.size);
    }
    m.receivedSeq = f.seq;
    if (input.kind === 'data') diskRate(m, input.disk).in.add(input.body.length);
    const bytes = input.body.length + 64;
    s.unsyncedBytes += bytes;
    // Bytes waiting for the fsync are in memory: bound them per session and for all sessions.
    if (
      s.unsyncedBytes > this.opts.sessionUnsyncedBytes ||
      this.journal.pendingBytes > JOURNAL_PENDING_LIMIT
    )
      s.pause('unsynced');
    this.journal.append(input).then(
      (rec) => {
        if (rec.seq > m.durableSeq) m.durableSeq = rec.seq;
        // A resync may have dropped the backlog meanwhile: such a record is already released.
        if (rec.seq > m.state.releasedSeq) m.replicator.push(rec);
        s.unsyncedBytes -= bytes;
        // 'flushed' fires before these callbacks run, so the session's own bytes are checked here.
        if (
          s.unsyncedBytes <= this.opts.sessionUnsyncedBytes / 2 &&
          this.journal.pendingBytes <= JOURNAL_PENDING_LIMIT / 2
        )
          s.resume('unsynced');
        s.ack(m.durableSeq);
      },
      (err: unknown) => s.reject(err),
    );
  }
}

/** The identity a TLS peer proved with its client certificate. */
function peerOf(socket: TLSSocket): PeerIdentity {
  if (!socket.authorized) {
    return {
      authorized: false,
      id: undefined,
      reason: String(socket.authorizationError ?? 'no client certificate'),
    };
  }
  const cn = socket.getPeerCertificate().subject?.CN;
  return { authorized: true, id: Array.isArray(cn) ? cn[0] : cn, reason: undefined };
}

function percentiles(values: number[]): { p50: number; p99: number; samples: number } {
  if (values.length === 0) return { p50: 0, p99: 0, samples: 0 };
  const v = [...values].sort((a, b) => a - b);
  const at = (q: number): number => v[Math.min(v.length - 1, Math.floor(q * v.length))]!;
  return { p50: at(0.5), p99: at(0.99), samples: v.length };
}

function diskRate(m: Machine, disk: string): { in: RateMeter; out: RateMeter } {
  let r = m.diskRates.get(disk);
  if (!r) {
    r = { in: new RateMeter(), out: new RateMeter() };
    m.diskRates.set(disk, r);
  }
  return r;
}
