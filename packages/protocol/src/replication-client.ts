import { EventEmitter } from 'node:events';
import { createHmac, randomUUID } from 'node:crypto';
import { isIP } from 'node:net';
import { connect } from 'node:tls';
import type { TLSSocket } from 'node:tls';
import {
  BASELINE_DIGEST_BYTES,
  BASELINE_ENTRY_BYTES,
  DATA_PREFIX_BYTES,
  FrameDecoder,
  MIN_PROTOCOL_VERSION,
  PROTOCOL_VERSION,
  encodeFrame,
} from './frame-codec.js';
import type {
  BaselineDigestsFrame,
  BaselineFrame,
  CommittedCutInfo,
  Frame,
  HelloDisk,
  SequencedFrame,
  WelcomeFrame,
} from './frame-codec.js';
import { LifeboatError } from './lifeboat-error.js';

/** The few logger methods the client uses (pino's logger fits). */
export interface ReplicationLogger {
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
  error(obj: object, msg?: string): void;
}

/** Options for {@link ReplicationClient}. */
export interface ReplicationClientOptions {
  /** Process server host name or address. */
  host: string;
  /** Process server port. @default 9443 */
  port?: number;
  /** PEM of the CA that signed the process server's certificate. */
  ca: string | Buffer;
  /** PEM of this agent's client certificate. */
  cert: string | Buffer;
  /** PEM of this agent's private key. */
  key: string | Buffer;
  /** Name to check the server certificate against. @default host */
  servername?: string;
  /** The protected machine's id. */
  machine: string;
  /** The machine's disks and their current sizes. */
  disks: HelloDisk[];
  /** Identification of the agent for the server's logs. @default 'lifeboat-agent' */
  agent?: string;
  /** Bytes of frames sent but not yet acknowledged before write calls wait (backpressure). @default 67108864 */
  maxInFlightBytes?: number;
  /** Largest data bytes per DATA frame; longer writes are split. @default 1048576 */
  maxFrameDataBytes?: number;
  /** First reconnect delay. @default 200 */
  reconnectInitialDelayMs?: number;
  /** Longest reconnect delay. @default 30000 */
  reconnectMaxDelayMs?: number;
  /** A connection attempt (TCP + TLS + hello/welcome) that takes longer fails. @default 15000 */
  connectTimeoutMs?: number;
  /** Where errors and reconnects are logged. @default silent */
  logger?: ReplicationLogger;
}

/** Metadata of a cut marker. */
export interface CutOptions {
  /** Id shared by the points of this cut. @default a random UUID */
  cutId?: string;
  /** @default 'crash' */
  kind?: 'crash' | 'app';
  /** When the cut was taken, ms since the epoch. @default Date.now() */
  time?: number;
  /** Consistency group of the machine. */
  consistencyGroup?: string;
  /** Labels of the points, e.g. `{ 'lifeboat.partial': 'initial-sync' }` for a checkpoint during initial replication. */
  labels?: Record<string, string>;
}

/** Counters of a {@link ReplicationClient}. */
export interface ReplicationClientStats {
  framesSent: number;
  bytesSent: number;
  framesResent: number;
  reconnects: number;
  lastAckedSeq: number;
  inFlightBytes: number;
  connected: boolean;
}

/**
 * A disk's resync baseline from the process server: the latest committed point's per-chunk
 * digests under a key of this answer (the store's own chunk-id key never leaves the server).
 * Fits `@lifeboat/agent`'s `ResyncBaseline`.
 */
export interface BaselineDigests {
  /** Chunk size of the store (digests are per aligned chunk of this size). */
  chunkSize: number;
  /** Size of the disk at the latest point. */
  size: number;
  /** The digest of the point's chunk at a chunk-aligned offset; `null` for a zero chunk or past the end. */
  idAt(offset: number): string | null;
  /** The digest the server computed for a chunk with these bytes (a whole chunk). */
  idOf(data: Uint8Array): string;
}

interface Pending {
  frame: SequencedFrame;
  bytes: number;
}

interface BaselineWaiter {
  disk: number;
  head: BaselineFrame | undefined;
  /** The entries as received, per frame (17 bytes per chunk: 17 MiB for a 64 GiB disk); allocated as they come, never from the head's claim. */
  parts: Buffer[];
  /** First chunk index of each part. */
  starts: number[];
  received: number;
  resolve: (b: BaselineDigests | undefined) => void;
  reject: (e: unknown) => void;
}

/** Codes after which resending the same frames cannot succeed: the client stops and reports. */
const FATAL_CODES = new Set([
  'LB_PROTO_MALFORMED',
  'LB_PROTO_UNKNOWN_DISK',
  'LB_PROTO_OUT_OF_RANGE',
  'LB_PROTO_SEQUENCE_GAP',
  'LB_PROTO_RESUME_GAP',
  'LB_PROTO_FRAME_TOO_LARGE',
  'LB_PROTO_UNSUPPORTED_VERSION',
  'LB_PROTO_BAD_MAGIC',
  'LB_PROTO_UNEXPECTED_FRAME',
]);

const noopLogger: ReplicationLogger = { info() {}, warn() {}, error() {} };

/**
 * Streams one machine's changed extents and cut markers to a process server over mutual TLS.
 * Every frame gets the next sequence number and is kept until the server acknowledges it as
 * durable; on reconnect (exponential backoff with jitter) the client resumes after the
 * server's last durable frame and resends the rest. Write calls wait while more than
 * `maxInFlightBytes` are unacknowledged (backpressure). Buffers passed to {@link write} are
 * kept by reference until acknowledged: do not reuse them.
 *
 * Events: `connected` (WelcomeFrame), `ack` (seq), `committed` (CommittedCutInfo: the
 * cut's points are in the store), `disconnected` (LifeboatError),
 * `server-error` (LifeboatError sent by the server), `resync-required` (the server dropped
 * this machine's backlog: resync the disks), `failed` (LifeboatError; fatal, the client stopped).
 */
export class ReplicationClient extends EventEmitter {
  private readonly opts: Required<Omit<ReplicationClientOptions, 'servername' | 'disks'>> & {
    servername: string;
  };
  private disks: HelloDisk[];
  private pending: Pending[] = [];
  private sendIndex = 0;
  private inFlight = 0;
  private acked = 0;
  private next = 0;
  private socket: TLSSocket | undefined;
  private welcome: WelcomeFrame | undefined;
  private maxData: number;
  private closed = false;
  private failure: LifeboatError | undefined;
  private started = false;
  private attempt = 0;
  private reconnectTimer: NodeJS.Timeout | undefined;
  private readyWaiters: Array<{ resolve: () => void; reject: (e: unknown) => void }> = [];
  private spaceWaiters: Array<() => void> = [];
  /** Why the server last asked for a resync (it dropped this machine's backlog); one per request. */
  private resyncError: LifeboatError | undefined;
  /** The `resyncAtSeq` of the last resync request honoured. */
  private resyncAt: number | undefined;
  private ackWaiters: Array<{ seq: number; resolve: () => void; reject: (e: unknown) => void }> =
    [];
  private commitWaiters: Array<{ seq: number; resolve: () => void; reject: (e: unknown) => void }> =
    [];
  private committedCut: CommittedCutInfo | null = null;
  private lastCutSeq = 0;
  private readonly counters = { framesSent: 0, bytesSent: 0, framesResent: 0, reconnects: 0 };
  private everConnected = false;
  /** The TLS material of the next connection (replaced by {@link setTls} after a renewal). */
  private tls: { ca: string | Buffer; cert: string | Buffer; key: string | Buffer };
  /** The version proposed in the hello: lowered once if the server says it speaks an older one. */
  private helloVersion = PROTOCOL_VERSION;
  /** The version of the current session (from the welcome). */
  private version = MIN_PROTOCOL_VERSION;
  private nextRequest = 1;
  private readonly baselineWaiters = new Map<number, BaselineWaiter>();

  constructor(options: ReplicationClientOptions) {
    super();
    if (!options.machine || options.disks.length === 0) {
      throw new LifeboatError(
        'LB_PROTO_INVALID_OPTIONS',
        'ReplicationClient needs a machine id and at least one disk.',
        { details: { machine: options.machine } },
      );
    }
    this.opts = Object.freeze({
      host: options.host,
      port: options.port ?? 9443,
      ca: options.ca,
      cert: options.cert,
      key: options.key,
      servername: options.servername ?? options.host,
      machine: options.machine,
      agent: options.agent ?? 'lifeboat-agent',
      maxInFlightBytes: options.maxInFlightBytes ?? 64 * 1024 * 1024,
      maxFrameDataBytes: options.maxFrameDataBytes ?? 1024 * 1024,
      reconnectInitialDelayMs: options.reconnectInitialDelayMs ?? 200,
      reconnectMaxDelayMs: options.reconnectMaxDelayMs ?? 30_000,
      connectTimeoutMs: options.connectTimeoutMs ?? 15_000,
      logger: options.logger ?? noopLogger,
    });
    this.disks = options.disks.map((d) => ({ ...d }));
    this.tls = { ca: options.ca, cert: options.cert, key: options.key };
    this.maxData = this.opts.maxFrameDataBytes;
    // Without a listener, EventEmitter throws on 'error'; this class never emits 'error'.
  }

  /**
   * Uses new TLS material (a renewed certificate) from the next connection on; the current
   * session keeps the one it was opened with.
   */
  setTls(tls: { ca: string | Buffer; cert: string | Buffer; key: string | Buffer }): void {
    this.tls = { ...tls };
  }

  /** Highest sequence number the server acknowledged as durable. */
  get lastAckedSeq(): number {
    return this.acked;
  }

  /** Sequence number the next frame will get (known after the first welcome). */
  get nextSeq(): number {
    return this.next;
  }

  /** Bytes of frames not yet acknowledged. */
  get inFlightBytes(): number {
    return this.inFlight;
  }

  /** Counters for status displays. */
  get stats(): ReplicationClientStats {
    return {
      ...this.counters,
      lastAckedSeq: this.acked,
      inFlightBytes: this.inFlight,
      connected: this.welcome !== undefined,
    };
  }

  /** Connects (and keeps reconnecting); resolves at the first welcome, rejects when closed or failed first. */
  start(): Promise<void> {
    if (!this.started) {
      this.started = true;
      this.connectNow();
    }
    return this.ready();
  }

  /** Resolves once a session is established (immediately when it is). */
  ready(): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.closed) return Promise.reject(closedError());
    if (this.welcome) return Promise.resolve();
    return new Promise((resolve, reject) => this.readyWaiters.push({ resolve, reject }));
  }

  /** Sends changed bytes of a disk; resolves with the last sequence number once queued (not yet durable). */
  async write(disk: string, offset: number, data: Uint8Array): Promise<number> {
    const index = this.diskIndex(disk);
    const buf = Buffer.isBuffer(data)
      ? data
      : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    let seq = 0;
    for (let at = 0; at < buf.length;) {
      await this.awaitReady();
      const n = Math.min(this.maxData, buf.length - at);
      seq = await this.enqueue(
        { type: 'data', seq: 0, disk: index, offset: offset + at, data: buf.subarray(at, at + n) },
        n + DATA_PREFIX_BYTES,
      );
      at += n;
    }
    return seq;
  }

  /** Makes a range of a disk read as zeros. */
  async writeZeroes(disk: string, offset: number, length: number): Promise<number> {
    return this.enqueue({ type: 'zero', seq: 0, disk: this.diskIndex(disk), offset, length }, 20);
  }

  /** Discards a range of a disk (reads as zeros, unallocated). */
  async trim(disk: string, offset: number, length: number): Promise<number> {
    return this.enqueue({ type: 'trim', seq: 0, disk: this.diskIndex(disk), offset, length }, 20);
  }

  /** Changes a disk's logical size. */
  async resize(disk: string, size: number): Promise<number> {
    const index = this.diskIndex(disk);
    const seq = await this.enqueue({ type: 'resize', seq: 0, disk: index, size }, 12);
    this.disks[index]!.size = size;
    return seq;
  }

  /** Marks a consistent cut of all disks: everything sent before it forms the recovery point. */
  async cut(options: CutOptions = {}): Promise<{ seq: number; cutId: string }> {
    const cutId = options.cutId ?? randomUUID();
    const frame: SequencedFrame = {
      type: 'cut',
      seq: 0,
      cutId,
      kind: options.kind ?? 'crash',
      time: options.time ?? Date.now(),
    };
    if (options.consistencyGroup !== undefined) frame.consistencyGroup = options.consistencyGroup;
    if (options.labels !== undefined) frame.labels = options.labels;
    const seq = await this.enqueue(frame, 128);
    this.lastCutSeq = seq;
    return { seq, cutId };
  }

  /**
   * Drops the disk's frames sent since the last cut, on the server too (a DISCARD frame): use
   * before a resync when the change tracking of an interrupted cycle is lost. Cuts already sent
   * stay; call {@link waitForCommit} before reading the latest point as a resync baseline.
   */
  async discardPending(disk: string): Promise<void> {
    await this.enqueue({ type: 'discard', seq: 0, disk: this.diskIndex(disk) }, 4);
  }

  /** The machine's newest cut whose points are committed in the store (known once connected). */
  async latestCut(): Promise<{ cutId: string; time: number } | undefined> {
    await this.awaitReady();
    return this.committedCut === null
      ? undefined
      : { cutId: this.committedCut.cutId, time: this.committedCut.time };
  }

  /**
   * The latest committed point of a disk as per-chunk digests, for a resync that sends only
   * chunks that differ (a BASELINE_REQUEST; the server answers once every cut sent before it
   * is committed). `undefined` when the disk has no point yet, the server speaks protocol
   * version 1, or it could not read the point (then the agent sends every allocated range,
   * which is correct, only not minimal). Survives reconnects: the request is sent again.
   */
  async resyncBaseline(disk: string): Promise<BaselineDigests | undefined> {
    const index = this.diskIndex(disk);
    for (;;) {
      await this.ready();
      if (this.version < 2) {
        this.opts.logger.warn(
          { machine: this.opts.machine, disk, version: this.version },
          'the process server speaks protocol version 1 (no resync baseline): the resync sends every allocated range',
        );
        return undefined;
      }
      try {
        return await this.requestBaseline(index);
      } catch (err) {
        if (this.failure || this.closed) throw err;
        // The connection dropped before the whole answer came: ask again on the next one.
      }
    }
  }

  private requestBaseline(disk: number): Promise<BaselineDigests | undefined> {
    const s = this.socket;
    const request = this.nextRequest++ >>> 0;
    return new Promise((resolve, reject) => {
      if (!s || s.destroyed) {
        reject(new Error('not connected'));
        return;
      }
      this.baselineWaiters.set(request, {
        disk,
        head: undefined,
        parts: [],
        starts: [],
        received: 0,
        resolve,
        reject,
      });
      for (const part of encodeFrame({ type: 'baseline-request', disk, request }, this.version))
        s.write(part);
    });
  }

  /** Collects a baseline answer; returns an error text when the server broke the protocol. */
  private onBaseline(f: BaselineFrame | BaselineDigestsFrame): string | undefined {
    const w = this.baselineWaiters.get(f.request);
    if (!w) return `a ${f.type} frame for request ${f.request}, which was not asked for`;
    if (f.type === 'baseline') {
      if (w.head) return `a second baseline head for request ${f.request}`;
      if (f.disk !== w.disk) return `a baseline of disk ${f.disk} for a request of disk ${w.disk}`;
      w.head = f;
      if (f.error) {
        this.opts.logger.warn(
          { machine: this.opts.machine, disk: this.disks[w.disk]?.name, err: f.error },
          'the process server could not compute the resync baseline: the resync sends every allocated range',
        );
      }
    } else {
      const head = w.head;
      if (!head) return `baseline digests before the head of request ${f.request}`;
      const n = f.entries.length / BASELINE_ENTRY_BYTES;
      if (f.first !== w.received || w.received + n > head.chunks)
        return `baseline digests for chunks ${f.first}..${f.first + n} out of order (have ${w.received} of ${head.chunks})`;
      // The decoder's buffer may be shared with the next frames: keep a copy of just this part.
      w.parts.push(Buffer.from(f.entries));
      w.starts.push(f.first);
      w.received += n;
    }
    const head = w.head;
    if (head && w.received === head.chunks) {
      this.baselineWaiters.delete(f.request);
      if (head.point === null || head.error) {
        w.resolve(undefined);
        return undefined;
      }
      const key = Buffer.from(head.key, 'hex');
      const { parts, starts } = w;
      const cs = head.chunkSize;
      w.resolve({
        chunkSize: cs,
        size: head.size,
        idAt: (offset) => {
          const i = offset / cs;
          if (!Number.isInteger(i) || i < 0 || i >= head.chunks) return null;
          // The part holding chunk i: the last one starting at or before it.
          let lo = 0;
          let hi = starts.length - 1;
          while (lo < hi) {
            const mid = (lo + hi + 1) >> 1;
            if (starts[mid]! <= i) lo = mid;
            else hi = mid - 1;
          }
          const part = parts[lo]!;
          const at = (i - starts[lo]!) * BASELINE_ENTRY_BYTES;
          return part[at] === 0
            ? null
            : part.toString('hex', at + 1, at + 1 + BASELINE_DIGEST_BYTES);
        },
        idOf: (data) =>
          createHmac('sha256', key).update(data).digest().toString('hex', 0, BASELINE_DIGEST_BYTES),
      });
    }
    return undefined;
  }

  /** Resolves when the points of every cut up to `seq` (default: the last cut sent) are committed in the store. */
  waitForCommit(seq: number = this.lastCutSeq): Promise<void> {
    if (seq <= (this.committedCut?.seq ?? 0)) return Promise.resolve();
    if (this.failure) return Promise.reject(this.failure);
    if (this.closed) return Promise.reject(closedError());
    return new Promise((resolve, reject) => this.commitWaiters.push({ seq, resolve, reject }));
  }

  /** Adds a disk to the machine; the session is re-established so the server learns it. */
  addDisk(disk: HelloDisk): void {
    if (this.disks.some((d) => d.name === disk.name)) return;
    this.disks.push({ ...disk });
    this.socket?.destroy();
  }

  /** Resolves when every frame up to `seq` (default: all queued) is durable on the server. */
  waitForAck(seq: number = this.next - 1): Promise<void> {
    if (seq <= this.acked) return Promise.resolve();
    if (this.failure) return Promise.reject(this.failure);
    if (this.closed) return Promise.reject(closedError());
    return new Promise((resolve, reject) => this.ackWaiters.push({ seq, resolve, reject }));
  }

  /** Stops: closes the connection; unacknowledged frames are dropped (the agent's bitmaps still hold them). */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.reconnectTimer);
    const err = closedError();
    this.rejectAll(err);
    const s = this.socket;
    this.socket = undefined;
    if (s && !s.destroyed) {
      await new Promise<void>((resolve) => {
        s.once('close', () => resolve());
        s.end();
        setTimeout(() => s.destroy(), 1000).unref();
      });
    }
  }

  private diskIndex(name: string): number {
    const i = this.disks.findIndex((d) => d.name === name);
    if (i < 0)
      throw new LifeboatError(
        'LB_PROTO_UNKNOWN_DISK',
        `Disk ${name} is not one of this machine's disks; add it with addDisk first.`,
        { details: { disk: name } },
      );
    return i;
  }

  private async awaitReady(): Promise<void> {
    if (this.failure) throw this.failure;
    if (this.closed) throw closedError();
    if (this.next === 0) await this.ready();
  }

  private async enqueue(frame: SequencedFrame, bytes: number): Promise<number> {
    await this.awaitReady();
    const resync = this.resyncError;
    // Backpressure: one frame may always be in flight so progress never deadlocks.
    while (this.inFlight > 0 && this.inFlight + bytes > this.opts.maxInFlightBytes) {
      await new Promise<void>((resolve) => this.spaceWaiters.push(resolve));
      if (this.failure) throw this.failure;
      if (this.closed) throw closedError();
      // The frames before this one were dropped with the machine's backlog: sending it alone
      // would put a change on top of changes the server no longer has.
      if (this.resyncError !== resync) throw this.resyncError;
    }
    frame.seq = this.next++;
    this.pending.push({ frame, bytes });
    this.inFlight += bytes;
    this.pump();
    return frame.seq;
  }

  /** Writes every pending frame not yet sent on the current connection. */
  private pump(): void {
    const s = this.socket;
    if (!s || !this.welcome || s.destroyed) return;
    if (this.sendIndex >= this.pending.length) return;
    s.cork();
    while (this.sendIndex < this.pending.length) {
      const p = this.pending[this.sendIndex++]!;
      for (const part of encodeFrame(p.frame, this.version)) s.write(part);
      this.counters.framesSent++;
      this.counters.bytesSent += p.bytes;
    }
    s.uncork();
  }

  private connectNow(): void {
    if (this.closed || this.failure) return;
    const decoder = new FrameDecoder();
    const socket: TLSSocket = connect({
      host: this.opts.host,
      port: this.opts.port,
      ca: this.tls.ca,
      cert: this.tls.cert,
      key: this.tls.key,
      // SNI must not carry an IP address (RFC 6066); the certificate is still checked against it.
      ...(isIP(this.opts.servername) === 0 ? { servername: this.opts.servername } : {}),
      minVersion: 'TLSv1.3',
    });
    let settled = false;
    const timeout = setTimeout(() => {
      fail(
        new LifeboatError(
          'LB_PROTO_CONNECT_FAILED',
          `No session with the process server at ${this.opts.host}:${this.opts.port} within ${this.opts.connectTimeoutMs} ms; retrying.`,
        ),
      );
    }, this.opts.connectTimeoutMs);
    const fail = (err: LifeboatError, retry = false): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timeout);
      socket.destroy();
      if (this.socket === socket) this.socket = undefined;
      this.welcome = undefined;
      this.sendIndex = 0;
      for (const w of this.baselineWaiters.values()) w.reject(err);
      this.baselineWaiters.clear();
      if (this.closed) return;
      this.emit('disconnected', err);
      if (FATAL_CODES.has(err.code) && !retry) {
        this.opts.logger.error(
          { err: err.toJSON(), machine: this.opts.machine },
          'replication stopped',
        );
        this.failure = err;
        this.rejectAll(err);
        this.emit('failed', err);
        return;
      }
      this.opts.logger.warn(
        { err: err.toJSON(), machine: this.opts.machine },
        'replication connection lost; reconnecting',
      );
      const base = Math.min(
        this.opts.reconnectMaxDelayMs,
        this.opts.reconnectInitialDelayMs * 2 ** Math.min(this.attempt, 20),
      );
      this.attempt++;
      // Full jitter on half the delay: agents that lost the server together do not return together.
      const delay = base / 2 + Math.random() * (base / 2);
      this.reconnectTimer = setTimeout(() => {
        this.counters.reconnects++;
        this.connectNow();
      }, delay);
    };
    this.socket = socket;
    socket.setNoDelay(true);
    socket.setKeepAlive(true, 10_000);
    socket.on('secureConnect', () => {
      const oldest = this.pending[0]?.frame.seq ?? null;
      for (const part of encodeFrame({
        type: 'hello',
        machine: this.opts.machine,
        disks: this.disks,
        oldestUnackedSeq: oldest,
        agent: this.opts.agent,
        version: this.helloVersion,
      }))
        socket.write(part);
    });
    socket.on('data', (chunk: Buffer) => {
      let frames: Frame[];
      try {
        frames = decoder.push(chunk);
      } catch (err) {
        fail(err as LifeboatError);
        return;
      }
      for (const f of frames) {
        if (settled) return;
        this.onFrame(f, fail, () => clearTimeout(timeout), decoder);
      }
    });
    socket.on('error', (err: NodeJS.ErrnoException) =>
      fail(transportError(err, this.opts.host, this.opts.port)),
    );
    socket.on('close', () =>
      fail(
        new LifeboatError(
          'LB_PROTO_CONNECTION_LOST',
          'The connection to the process server closed; reconnecting and resending unacknowledged frames.',
        ),
      ),
    );
  }

  private onFrame(
    f: Frame,
    fail: (e: LifeboatError, retry?: boolean) => void,
    connected: () => void,
    decoder: FrameDecoder,
  ): void {
    switch (f.type) {
      case 'welcome': {
        const version = f.version ?? MIN_PROTOCOL_VERSION;
        if (this.welcome || version > this.helloVersion) {
          fail(
            new LifeboatError(
              'LB_PROTO_UNEXPECTED_FRAME',
              this.welcome
                ? 'The process server sent a second welcome; upgrade both sides to the same version.'
                : `The process server answered in protocol version ${version}, newer than the ${this.helloVersion} proposed; upgrade both sides to the same version.`,
            ),
          );
          return;
        }
        connected();
        this.version = version;
        decoder.lockVersion(version);
        this.welcome = f;
        this.attempt = 0;
        if (f.latestCut) this.applyCommitted(f.latestCut);
        this.maxData = Math.min(this.opts.maxFrameDataBytes, f.maxPayloadBytes - DATA_PREFIX_BYTES);
        // The same request as one this client already honoured (its resync has not committed
        // a cut yet, so the flag is still up): the frames it holds are that resync's, resumed
        // as any others. Dropping them again restarted the resync at every reconnect.
        const honoured =
          f.resyncRequired && f.resyncAtSeq !== undefined && f.resyncAtSeq === this.resyncAt;
        if (f.resyncRequired && !honoured) {
          this.resyncAt = f.resyncAtSeq;
          // The server no longer holds this machine's backlog; what we hold is moot too.
          const dropped = this.pending.length;
          this.pending = [];
          this.inFlight = 0;
          this.acked = f.lastSeq;
          this.next = f.lastSeq + 1;
          this.opts.logger.error(
            { machine: this.opts.machine, dropped },
            'process server requires a resync of this machine',
          );
          const err = new LifeboatError(
            'LB_PS_RESYNC_REQUIRED',
            'The process server dropped this machine’s backlog after its journal stayed full; resync the disks.',
            { details: { machine: this.opts.machine } },
          );
          // Whoever waits for a dropped frame's ack, or a dropped cut's commit, would wait
          // forever: neither comes any more. So would a write waiting for room in the window
          // (it is woken below, and fails). Each learns why instead.
          for (const w of this.ackWaiters.splice(0)) w.reject(err);
          for (const w of this.commitWaiters.splice(0)) w.reject(err);
          this.resyncError = err;
          this.emit('resync-required', err);
        } else if (this.next === 0 && this.pending.length === 0) {
          this.acked = f.lastSeq;
          this.next = f.lastSeq + 1;
        } else {
          this.applyAck(f.lastSeq);
          if (this.next <= f.lastSeq) this.next = f.lastSeq + 1;
        }
        this.sendIndex = 0;
        if (this.everConnected) this.counters.framesResent += this.pending.length;
        this.everConnected = true;
        this.opts.logger.info(
          {
            machine: this.opts.machine,
            session: f.sessionId,
            resumeFrom: f.lastSeq + 1,
            resending: this.pending.length,
          },
          'replication session established',
        );
        this.emit('connected', f);
        for (const w of this.readyWaiters.splice(0)) w.resolve();
        this.pump();
        this.wakeSpace();
        break;
      }
      case 'ack':
        this.applyAck(f.seq);
        this.emit('ack', f.seq);
        break;
      case 'committed':
        this.applyCommitted({ seq: f.seq, cutId: f.cutId, time: f.time });
        break;
      case 'error': {
        const err = new LifeboatError(f.code, f.message, { details: f.details });
        this.opts.logger.error(
          { err: err.toJSON(), machine: this.opts.machine },
          'process server rejected the session',
        );
        this.emit('server-error', err);
        // An older server refused our hello's version: propose the newest it speaks, once.
        const supported = f.details.supported;
        if (
          !this.welcome &&
          f.code === 'LB_PROTO_UNSUPPORTED_VERSION' &&
          typeof supported === 'number' &&
          supported >= MIN_PROTOCOL_VERSION &&
          supported < this.helloVersion
        ) {
          this.helloVersion = supported;
          fail(err, true);
          break;
        }
        fail(err);
        break;
      }
      case 'baseline':
      case 'baseline-digests': {
        const problem = this.onBaseline(f);
        if (problem !== undefined)
          fail(
            new LifeboatError(
              'LB_PROTO_UNEXPECTED_FRAME',
              `The process server sent ${problem}; upgrade both sides to the same version.`,
            ),
          );
        break;
      }
      default:
        fail(
          new LifeboatError(
            'LB_PROTO_UNEXPECTED_FRAME',
            `The process server sent an unexpected ${f.type} frame; upgrade both sides to the same version.`,
          ),
        );
    }
  }

  private applyAck(seq: number): void {
    if (seq <= this.acked) return;
    this.acked = seq;
    let n = 0;
    while (n < this.pending.length && this.pending[n]!.frame.seq <= seq) {
      this.inFlight -= this.pending[n]!.bytes;
      n++;
    }
    if (n > 0) {
      this.pending.splice(0, n);
      this.sendIndex = Math.max(0, this.sendIndex - n);
    }
    this.ackWaiters = this.ackWaiters.filter((w) => {
      if (w.seq > seq) return true;
      w.resolve();
      return false;
    });
    this.wakeSpace();
  }

  private applyCommitted(c: CommittedCutInfo): void {
    if (c.seq <= (this.committedCut?.seq ?? 0)) return;
    this.committedCut = c;
    this.commitWaiters = this.commitWaiters.filter((w) => {
      if (w.seq > c.seq) return true;
      w.resolve();
      return false;
    });
    this.emit('committed', c);
  }

  private wakeSpace(): void {
    for (const w of this.spaceWaiters.splice(0)) w();
  }

  private rejectAll(err: LifeboatError): void {
    for (const w of this.readyWaiters.splice(0)) w.reject(err);
    for (const w of this.ackWaiters.splice(0)) w.reject(err);
    for (const w of this.commitWaiters.splice(0)) w.reject(err);
    for (const w of this.baselineWaiters.values()) w.reject(err);
    this.baselineWaiters.clear();
    this.wakeSpace();
  }
}

function closedError(): LifeboatError {
  return new LifeboatError(
    'LB_PROTO_CLOSED',
    'The replication client was closed; create a new one to continue.',
  );
}

function transportError(err: NodeJS.ErrnoException, host: string, port: number): LifeboatError {
  const text = `${err.code ?? ''} ${err.message}`;
  if (/SSL|TLS|certificate|alert|CERT/i.test(text)) {
    return new LifeboatError(
      'LB_PROTO_TLS',
      `TLS with the process server at ${host}:${port} failed (${err.message}). Check that the agent's certificate is signed by the CA the process server trusts, and the server's by the CA given to the agent.`,
      {
        cause: err,
        details: { host, port, tlsCode: err.code },
      },
    );
  }
  return new LifeboatError(
    'LB_PROTO_CONNECT_FAILED',
    `Cannot reach the process server at ${host}:${port} (${err.message}); retrying with backoff.`,
    {
      cause: err,
      details: { host, port, errno: err.code },
    },
  );
}
