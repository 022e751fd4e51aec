import { randomUUID } from 'node:crypto';
import type { TLSSocket } from 'node:tls';
import {
  FrameDecoder,
  LifeboatError,
  MIN_PROTOCOL_VERSION,
  PROTOCOL_VERSION,
  encodeFrame,
} from '@lifeboat/protocol';
import type {
  BaselineRequestFrame,
  Frame,
  HelloFrame,
  SequencedFrame,
  WelcomeFrame,
} from '@lifeboat/protocol';
import type { Logger } from 'pino';

/** Why a session's socket is paused; it reads again when no reason is left. */
export type PauseReason = 'hello' | 'bandwidth' | 'journal' | 'unsynced' | 'acks';

/** What an {@link IngestSession} asks of the server. */
export interface IngestSessionHost {
  onHello(session: IngestSession, hello: HelloFrame): Promise<WelcomeFrame>;
  onSequenced(session: IngestSession, frame: SequencedFrame): void;
  onBytes(session: IngestSession, n: number): void;
  onClosed(session: IngestSession): void;
  /** A resync baseline request (version 2): the host answers with {@link IngestSession.send}. */
  onBaselineRequest(session: IngestSession, frame: BaselineRequestFrame): void;
}

/** Limits of a session. */
export interface IngestSessionLimits {
  maxPayloadBytes: number;
  helloTimeoutMs: number;
  stallTimeoutMs: number;
}

/**
 * One agent connection: a strict state machine (hello → streaming → closed). Any protocol
 * violation is answered with an ERROR frame carrying the code, then the connection is closed;
 * nothing else on the server is affected.
 */
export class IngestSession {
  /** Id shown in logs on both sides. */
  readonly id = randomUUID();
  /** The machine this session streams, once hello is accepted. */
  machine: string | undefined;
  /** Disk names by index, from the hello. */
  diskNames: string[] = [];
  /** Bytes appended to the journal and not yet synced. */
  unsyncedBytes = 0;
  /**
   * The session's protocol version: the lower of the hello's and this server's. Frames sent
   * before the hello (errors) use the oldest version, which every agent can read.
   */
  version = MIN_PROTOCOL_VERSION;
  private state: 'hello' | 'welcoming' | 'streaming' | 'closed' = 'hello';
  private readonly decoder: FrameDecoder;
  private readonly pauses = new Set<PauseReason>();
  private stash: Frame[] = [];
  private ackSeq = 0;
  private ackScheduled = false;
  private helloTimer: NodeJS.Timeout | undefined;
  private stallTimer: NodeJS.Timeout | undefined;
  private blockedSince = 0;

  constructor(
    readonly socket: TLSSocket,
    private readonly host: IngestSessionHost,
    private readonly limits: IngestSessionLimits,
    private readonly logger: Logger,
  ) {
    this.decoder = new FrameDecoder({ maxPayloadBytes: limits.maxPayloadBytes });
    socket.setNoDelay(true);
    socket.setKeepAlive(true, 10_000);
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('end', () => {
      try {
        this.decoder.end();
      } catch (err) {
        // Nobody is left to read an error frame; log it for the operator.
        this.logger.warn(
          {
            session: this.id,
            machine: this.machine,
            err: (err as LifeboatError).toJSON?.() ?? String(err),
          },
          'session ended mid-frame',
        );
      }
      socket.end();
    });
    socket.on('error', (err) =>
      this.logger.debug(
        { session: this.id, machine: this.machine, err: err.message },
        'session socket error',
      ),
    );
    socket.on('close', () => this.closed());
    socket.on('drain', () => {
      this.blockedSince = 0;
      this.resume('acks');
    });
    this.helloTimer = setTimeout(
      () =>
        this.reject(
          new LifeboatError(
            'LB_PS_HELLO_TIMEOUT',
            `No hello within ${limits.helloTimeoutMs} ms; closing the connection.`,
          ),
        ),
      limits.helloTimeoutMs,
    );
    if (limits.stallTimeoutMs > 0) {
      this.stallTimer = setInterval(
        () => this.checkStall(),
        Math.max(50, Math.min(5000, limits.stallTimeoutMs / 4)),
      );
      this.stallTimer.unref();
    }
  }

  /** True once closed. */
  get isClosed(): boolean {
    return this.state === 'closed';
  }

  /** True when the socket is paused for `reason`. */
  isPausedFor(reason: PauseReason): boolean {
    return this.pauses.has(reason);
  }

  /** Stops reading for a reason. */
  pause(reason: PauseReason): void {
    this.pauses.add(reason);
    this.socket.pause();
  }

  /** Clears a pause reason; reads again when none is left. */
  resume(reason: PauseReason): void {
    if (!this.pauses.delete(reason)) return;
    if (this.pauses.size === 0 && this.state !== 'closed') this.socket.resume();
  }

  /** Acknowledges everything up to `seq` (coalesced: one ACK frame per event-loop turn). */
  ack(seq: number): void {
    if (seq > this.ackSeq) this.ackSeq = seq;
    if (this.ackScheduled || this.state !== 'streaming') return;
    this.ackScheduled = true;
    setImmediate(() => {
      this.ackScheduled = false;
      if (this.state !== 'streaming' || this.socket.destroyed) return;
      // A client that stops reading: stop reading it too (no unbounded buffers), later close it.
      if (this.socket.writableNeedDrain) {
        if (this.blockedSince === 0) this.blockedSince = performance.now();
        this.pause('acks');
        return;
      }
      for (const part of encodeFrame({ type: 'ack', seq: this.ackSeq }, this.version))
        this.socket.write(part);
    });
  }

  /** Tells the agent that the points of every cut up to `seq` are committed. */
  committed(seq: number, cutId: string, time: number): void {
    if (this.state !== 'streaming' || this.socket.destroyed || this.socket.writableNeedDrain)
      return;
    for (const part of encodeFrame({ type: 'committed', seq, cutId, time }, this.version))
      this.socket.write(part);
  }

  /**
   * Sends a control frame in the session's version; resolves when the socket can take more
   * (so a long answer, like a baseline, never piles up in memory). False when the session closed.
   */
  async send(frame: Frame): Promise<boolean> {
    if (this.state !== 'streaming' || this.socket.destroyed) return false;
    let ok = true;
    for (const part of encodeFrame(frame, this.version)) ok = this.socket.write(part);
    if (!ok) {
      await new Promise<void>((resolve) => {
        const done = (): void => {
          this.socket.off('drain', done);
          this.socket.off('close', done);
          resolve();
        };
        this.socket.on('drain', done);
        this.socket.on('close', done);
      });
    }
    return this.state === 'streaming' && !this.socket.destroyed;
  }

  /** Sends an ERROR frame with the error's code, then closes the connection. */
  reject(err: unknown): void {
    if (this.state === 'closed') return;
    const e =
      err instanceof LifeboatError
        ? err
        : new LifeboatError('LB_PROTO_MALFORMED', 'The session failed.', { cause: err });
    this.logger.warn(
      { session: this.id, machine: this.machine, err: e.toJSON() },
      'session rejected',
    );
    this.state = 'closed';
    this.stash = [];
    clearTimeout(this.helloTimer);
    clearInterval(this.stallTimer);
    if (!this.socket.destroyed) {
      for (const part of encodeFrame(
        { type: 'error', code: e.code, message: e.message, details: e.details },
        this.version,
      ))
        this.socket.write(part);
      this.socket.end();
      // A peer that never reads would keep the socket half-open: bound the goodbye.
      setTimeout(() => this.socket.destroy(), 2000).unref();
    }
    this.host.onClosed(this);
  }

  private closed(): void {
    clearTimeout(this.helloTimer);
    clearInterval(this.stallTimer);
    if (this.state !== 'closed') {
      this.state = 'closed';
      this.stash = [];
      this.host.onClosed(this);
    }
  }

  private checkStall(): void {
    if (this.state !== 'streaming') return;
    if (this.socket.writableNeedDrain && this.blockedSince === 0)
      this.blockedSince = performance.now();
    if (
      this.blockedSince > 0 &&
      performance.now() - this.blockedSince > this.limits.stallTimeoutMs
    ) {
      this.reject(
        new LifeboatError(
          'LB_PROTO_STALLED',
          `The agent did not read acknowledgements for ${this.limits.stallTimeoutMs} ms; closing the session.`,
        ),
      );
    }
  }

  private onData(chunk: Buffer): void {
    if (this.state === 'closed') return;
    this.host.onBytes(this, chunk.length);
    let frames: Frame[];
    try {
      frames = this.decoder.push(chunk);
    } catch (err) {
      this.reject(err);
      return;
    }
    this.processFrames(frames);
  }

  private processFrames(frames: Frame[]): void {
    if (this.stash.length > 0) {
      frames = [...this.stash, ...frames];
      this.stash = [];
    }
    for (let i = 0; i < frames.length; i++) {
      if (this.state === 'closed') return;
      if (this.state === 'welcoming') {
        this.stash = frames.slice(i);
        return;
      }
      const f = frames[i]!;
      if (this.state === 'hello') {
        if (f.type !== 'hello') {
          this.reject(
            new LifeboatError(
              'LB_PROTO_UNEXPECTED_FRAME',
              `Expected a hello as the first frame, got ${f.type}.`,
            ),
          );
          return;
        }
        clearTimeout(this.helloTimer);
        this.state = 'welcoming';
        this.pause('hello');
        // Both sides speak the lower of their versions from here on, and nothing else.
        this.version = Math.min(f.version ?? MIN_PROTOCOL_VERSION, PROTOCOL_VERSION);
        this.decoder.lockVersion(this.version);
        this.host.onHello(this, f).then(
          (welcome) => {
            if (this.state === 'closed') return;
            this.machine = f.machine;
            for (const part of encodeFrame({ ...welcome, version: this.version }))
              this.socket.write(part);
            this.state = 'streaming';
            this.resume('hello');
            if (this.stash.length > 0) this.processFrames([]);
          },
          (err: unknown) => this.reject(err),
        );
        continue;
      }
      switch (f.type) {
        case 'data':
        case 'zero':
        case 'trim':
        case 'resize':
        case 'cut':
        case 'discard':
          this.host.onSequenced(this, f);
          break;
        case 'baseline-request':
          if (this.version < 2) {
            this.reject(
              new LifeboatError(
                'LB_PROTO_UNEXPECTED_FRAME',
                `A baseline request is not part of protocol version ${this.version}, which this session speaks.`,
              ),
            );
            return;
          }
          this.host.onBaselineRequest(this, f);
          break;
        default:
          this.reject(
            new LifeboatError(
              'LB_PROTO_UNEXPECTED_FRAME',
              `A ${f.type} frame is not allowed from an agent in a streaming session.`,
            ),
          );
          return;
      }
    }
  }
}
