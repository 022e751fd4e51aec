import { EventEmitter } from 'node:events';
import { connect as netConnect, type Socket } from 'node:net';
import { LifeboatError } from '@lifeboat/protocol';

/** Where a QMP monitor listens: a UNIX socket path, or a TCP host and port. */
export type QmpTarget = { path: string } | { host: string; port: number };

/** Options of {@link QmpClient.connect}. */
export interface QmpClientOptions {
  /** Give up connecting and negotiating capabilities after this long. @default 10000 */
  connectTimeoutMs?: number;
  /** Default time limit of one command. @default 60000 */
  commandTimeoutMs?: number;
}

/** Options of one {@link QmpClient.execute} call. */
export interface QmpExecuteOptions {
  /** Reject with LB_QMP_TIMEOUT after this long. @default the client's commandTimeoutMs */
  timeoutMs?: number;
}

/** The greeting QEMU sends on connect. */
export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: string[];
}

/** An asynchronous event from QEMU (`BLOCK_JOB_COMPLETED`, `JOB_STATUS_CHANGE`, ...). */
export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
  timer: NodeJS.Timeout;
}

function label(t: QmpTarget): string {
  return 'path' in t ? `unix:${t.path}` : `${t.host}:${t.port}`;
}

/** Largest line accepted from QEMU; anything longer is a broken peer. */
const MAX_LINE = 64 * 1024 * 1024;

/**
 * A QMP client: the greeting and `qmp_capabilities`, then commands with ids and time limits,
 * and events (emitted as `'event'`, iterable with {@link events}, awaitable with
 * {@link waitForEvent}). QEMU's errors become LifeboatError `LB_QMP_COMMAND` with QEMU's class
 * and description in `details`; a lost connection rejects every command in flight.
 */
export class QmpClient extends EventEmitter<{ event: [QmpEvent]; close: [LifeboatError] }> {
  /** QEMU's greeting (version and capabilities). */
  readonly greeting: QmpGreeting;

  private readonly pending = new Map<string, Pending>();
  private nextId = 1;
  private failure: LifeboatError | undefined;
  private closing = false;
  private readonly closed: Promise<void>;

  private constructor(
    private readonly socket: Socket,
    greeting: QmpGreeting,
    private readonly commandTimeoutMs: number,
    private readonly where: string,
    private buffered: string,
  ) {
    super();
    this.greeting = greeting;
    this.closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
    socket.on('data', (d: Buffer) => this.onData(d.toString('utf8')));
    socket.on('error', () => undefined);
    socket.once('close', () => this.fail());
    if (this.buffered.length > 0) {
      const rest = this.buffered;
      this.buffered = '';
      this.onData(rest);
    }
  }

  /** Connects, reads the greeting and leaves capabilities negotiation mode. */
  static async connect(target: QmpTarget, options: QmpClientOptions = {}): Promise<QmpClient> {
    const connectTimeoutMs = options.connectTimeoutMs ?? 10_000;
    const commandTimeoutMs = options.commandTimeoutMs ?? 60_000;
    if (!(connectTimeoutMs > 0) || !(commandTimeoutMs > 0)) {
      throw new LifeboatError('LB_QMP_INVALID_OPTIONS', 'QMP timeouts must be positive numbers.');
    }
    const where = label(target);
    if ('path' in target && Buffer.byteLength(target.path) > 107) {
      // Node.js would silently truncate the path and connect to another socket.
      throw new LifeboatError(
        'LB_QMP_CONNECT',
        `The QMP socket path is longer than 107 bytes (a UNIX socket limit): ${target.path}. Use a shorter directory.`,
      );
    }
    const socket = await new Promise<Socket>((resolve, reject) => {
      const s = 'path' in target ? netConnect({ path: target.path }) : netConnect(target);
      const timer = setTimeout(() => {
        s.destroy();
        reject(
          new LifeboatError(
            'LB_QMP_CONNECT',
            `Could not connect to QMP at ${where} within ${connectTimeoutMs} ms. Check that QEMU runs with this monitor.`,
          ),
        );
      }, connectTimeoutMs);
      s.once('connect', () => {
        clearTimeout(timer);
        s.removeAllListeners('error');
        resolve(s);
      });
      s.once('error', (err) => {
        clearTimeout(timer);
        s.destroy();
        reject(
          new LifeboatError(
            'LB_QMP_CONNECT',
            `Could not connect to QMP at ${where}: ${err.message}. Check that QEMU runs and the socket path is right.`,
            { cause: err },
          ),
        );
      });
    });
    try {
      const { greeting, rest } = await readGreeting(socket, where, connectTimeoutMs);
      const client = new QmpClient(socket, greeting, commandTimeoutMs, where, rest);
      await client.execute('qmp_capabilities', undefined, { timeoutMs: connectTimeoutMs });
      return client;
    } catch (err) {
      socket.destroy();
      throw err;
    }
  }

  /** Runs a command; resolves with its `return` value. */
  execute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    options: QmpExecuteOptions = {},
  ): Promise<T> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    const timeoutMs = options.timeoutMs ?? this.commandTimeoutMs;
    const id = `lb-${this.nextId++}`;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        // A late reply is dropped by id; the command may still take effect in QEMU.
        this.pending.delete(id);
        reject(
          new LifeboatError(
            'LB_QMP_TIMEOUT',
            `QEMU did not answer '${command}' within ${timeoutMs} ms. It may be hung or overloaded; the command may still complete.`,
            { details: { command, timeoutMs, qmp: this.where } },
          ),
        );
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      const msg: Record<string, unknown> = { execute: command, id };
      if (args !== undefined) msg['arguments'] = args;
      this.socket.write(`${JSON.stringify(msg)}\n`);
    });
  }

  /**
   * Resolves with the next event named `name` for which `predicate` holds. Call it before the
   * command that causes the event, so the event cannot slip by in between.
   */
  waitForEvent(
    name: string,
    predicate: (e: QmpEvent) => boolean = () => true,
    timeoutMs = this.commandTimeoutMs,
  ): Promise<QmpEvent> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    return new Promise<QmpEvent>((resolve, reject) => {
      const cleanup = (): void => {
        clearTimeout(timer);
        this.off('event', onEvent);
        this.off('close', onClose);
      };
      const onEvent = (e: QmpEvent): void => {
        let ok = false;
        try {
          ok = e.event === name && predicate(e);
        } catch (err) {
          cleanup();
          reject(err);
          return;
        }
        if (ok) {
          cleanup();
          resolve(e);
        }
      };
      const onClose = (err: LifeboatError): void => {
        cleanup();
        reject(err);
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(
          new LifeboatError(
            'LB_QMP_TIMEOUT',
            `QEMU did not send the event ${name} within ${timeoutMs} ms.`,
            {
              details: { event: name, timeoutMs, qmp: this.where },
            },
          ),
        );
      }, timeoutMs);
      this.on('event', onEvent);
      this.on('close', onClose);
    });
  }

  /** Events from now until the connection closes, in order. */
  async *events(): AsyncGenerator<QmpEvent> {
    const queue: QmpEvent[] = [];
    let wake: (() => void) | undefined;
    let done = this.failure !== undefined;
    const onEvent = (e: QmpEvent): void => {
      queue.push(e);
      wake?.();
    };
    const onClose = (): void => {
      done = true;
      wake?.();
    };
    this.on('event', onEvent);
    this.on('close', onClose);
    try {
      for (;;) {
        const e = queue.shift();
        if (e !== undefined) {
          yield e;
          continue;
        }
        if (done) return;
        await new Promise<void>((r) => (wake = r));
        wake = undefined;
      }
    } finally {
      this.off('event', onEvent);
      this.off('close', onClose);
    }
  }

  /** Closes the connection; commands in flight reject with LB_QMP_CLOSED. */
  async close(): Promise<void> {
    this.closing = true;
    this.socket.end();
    const timer = setTimeout(() => this.socket.destroy(), 2000);
    await this.closed;
    clearTimeout(timer);
  }

  private onData(text: string): void {
    this.buffered += text;
    if (this.buffered.length > MAX_LINE) {
      this.protocolError('a message longer than 64 MiB');
      return;
    }
    let nl: number;
    while ((nl = this.buffered.indexOf('\n')) >= 0) {
      const line = this.buffered.slice(0, nl).trim();
      this.buffered = this.buffered.slice(nl + 1);
      if (line.length === 0) continue;
      let msg: unknown;
      try {
        msg = JSON.parse(line);
      } catch {
        this.protocolError(`a line that is not JSON: ${line.slice(0, 200)}`);
        return;
      }
      this.dispatch(msg);
    }
  }

  private dispatch(msg: unknown): void {
    if (typeof msg !== 'object' || msg === null) {
      this.protocolError('a message that is not an object');
      return;
    }
    const m = msg as Record<string, unknown>;
    if (typeof m['event'] === 'string') {
      const ts = (m['timestamp'] ?? {}) as { seconds?: number; microseconds?: number };
      this.emit('event', {
        event: m['event'],
        data: (m['data'] ?? {}) as Record<string, unknown>,
        timestamp: { seconds: ts.seconds ?? 0, microseconds: ts.microseconds ?? 0 },
      });
      return;
    }
    const id = typeof m['id'] === 'string' ? m['id'] : undefined;
    const p = id === undefined ? undefined : this.pending.get(id);
    if (p === undefined) return; // a reply to a command that already timed out
    this.pending.delete(id as string);
    clearTimeout(p.timer);
    if ('return' in m) {
      p.resolve(m['return']);
    } else if (typeof m['error'] === 'object' && m['error'] !== null) {
      const e = m['error'] as { class?: string; desc?: string };
      const cls = e.class ?? 'GenericError';
      const desc = e.desc ?? '(no description)';
      p.reject(
        new LifeboatError('LB_QMP_COMMAND', `QEMU refused '${p.command}': ${desc} (${cls}).`, {
          details: { command: p.command, errorClass: cls, desc },
        }),
      );
    } else {
      p.reject(
        new LifeboatError(
          'LB_QMP_PROTOCOL',
          `QEMU answered '${p.command}' with neither return nor error.`,
        ),
      );
    }
  }

  private protocolError(what: string): void {
    this.fail(
      new LifeboatError(
        'LB_QMP_PROTOCOL',
        `QMP peer at ${this.where} sent ${what}. The connection was closed.`,
      ),
    );
    this.socket.destroy();
  }

  private fail(err?: LifeboatError): void {
    if (this.failure !== undefined) return;
    this.failure =
      err ??
      (this.closing
        ? new LifeboatError('LB_QMP_CLOSED', 'The QMP client was closed. Connect again.')
        : new LifeboatError(
            'LB_QMP_CONNECTION_LOST',
            `The QMP connection to ${this.where} was lost (QEMU exited or closed the monitor). Commands in flight may or may not have taken effect.`,
            { details: { inFlight: [...this.pending.values()].map((p) => p.command) } },
          ));
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(this.failure);
    }
    this.pending.clear();
    this.emit('close', this.failure);
  }
}

function readGreeting(
  socket: Socket,
  where: string,
  timeoutMs: number,
): Promise<{ greeting: QmpGreeting; rest: string }> {
  return new Promise((resolve, reject) => {
    let buf = '';
    const done = (err?: LifeboatError, g?: QmpGreeting, rest = ''): void => {
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('close', onClose);
      if (err !== undefined) reject(err);
      else resolve({ greeting: g as QmpGreeting, rest });
    };
    const bad = (why: string): LifeboatError =>
      new LifeboatError(
        'LB_QMP_HANDSHAKE',
        `${where} did not greet like a QMP monitor (${why}). Check that the socket is a QMP monitor, not an HMP one or another service.`,
      );
    const onData = (d: Buffer): void => {
      buf += d.toString('utf8');
      const nl = buf.indexOf('\n');
      if (nl < 0) {
        if (buf.length > 65536) done(bad('no line break'));
        return;
      }
      try {
        const msg = JSON.parse(buf.slice(0, nl)) as { QMP?: QmpGreeting };
        if (msg.QMP === undefined || typeof msg.QMP !== 'object') throw new Error('no QMP key');
        done(undefined, msg.QMP, buf.slice(nl + 1));
      } catch (e) {
        done(bad(e instanceof Error ? e.message : String(e)));
      }
    };
    const onClose = (): void =>
      done(
        new LifeboatError(
          'LB_QMP_CONNECTION_LOST',
          `The QMP monitor at ${where} closed before its greeting. Another client may hold it (QMP serves one at a time).`,
        ),
      );
    const timer = setTimeout(
      () =>
        done(
          new LifeboatError(
            'LB_QMP_TIMEOUT',
            `The QMP monitor at ${where} sent no greeting within ${timeoutMs} ms. A QMP monitor serves one client at a time: another client may hold it; or QEMU is hung.`,
          ),
        ),
      timeoutMs,
    );
    socket.on('data', onData);
    socket.once('close', onClose);
  });
}
