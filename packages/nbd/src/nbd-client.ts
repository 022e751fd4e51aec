import { connect as netConnect, type Socket } from 'node:net';
import { LifeboatError } from '@lifeboat/protocol';
import { NBD } from './nbd-constants.js';
import { nbdProtocolError, nbdRequestError } from './nbd-errors.js';
import { SocketClosedError, SocketReader } from './socket-reader.js';

/** Where an NBD server listens: a UNIX socket path, or a TCP host and port. */
export type NbdTarget = { path: string } | { host: string; port: number };

/** Options of {@link NbdClient.connect}. */
export interface NbdClientOptions {
  /** Name of the export to attach to. @default '' (the server's default export) */
  exportName?: string;
  /**
   * Meta contexts to negotiate for block status (`base:allocation`, `qemu:dirty-bitmap:NAME`).
   * A name that the server does not grant fails the connection with
   * LB_NBD_META_CONTEXT_UNAVAILABLE, so a missing bitmap is never read as "nothing dirty".
   * @default []
   */
  metaContexts?: readonly string[];
  /** Ask for structured replies (needed for block status and sparse reads). @default true */
  structuredReplies?: boolean;
  /** Give up connecting and negotiating after this long. @default 30000 */
  connectTimeoutMs?: number;
  /** Largest single READ/WRITE sent; bigger calls are split (and capped by the server's maximum). @default 4194304 */
  maxRequestBytes?: number;
  /** Requests on the wire at once; further calls wait. @default 32 */
  maxInFlight?: number;
  /**
   * A request without a reply after this long fails the whole connection with LB_NBD_TIMEOUT
   * (NBD cannot cancel one request, and a late reply must not be mistaken for another), so a
   * stuck server never hangs the caller. 0 disables it. @default 300000
   */
  requestTimeoutMs?: number;
}

/** Block size constraints of an export (NBD_INFO_BLOCK_SIZE, or the specification's defaults). */
export interface NbdBlockSize {
  minimum: number;
  preferred: number;
  maximum: number;
}

/** One extent of a block status reply: `flags` are the context's (base:allocation: 1 hole, 2 zero; dirty bitmap: 1 dirty). */
export interface NbdExtent {
  offset: number;
  length: number;
  flags: number;
}

/** An export as reported by NBD_OPT_LIST. */
export interface NbdExportListing {
  name: string;
  description: string;
}

/** What NBD_OPT_INFO tells about an export without attaching to it. */
export interface NbdExportInfo {
  size: number;
  flags: number;
  blockSize: NbdBlockSize;
  description?: string;
}

/** Options of writes. */
export interface NbdWriteOptions {
  /** Force unit access: the data is on stable storage when the call resolves. @default false */
  fua?: boolean;
}

/** Options of {@link NbdClient.writeZeroes}. */
export interface NbdWriteZeroesOptions extends NbdWriteOptions {
  /** Ask the server to allocate (not punch a hole). @default false */
  noHole?: boolean;
}

const DEFAULT_BLOCK_SIZE: NbdBlockSize = Object.freeze({
  minimum: 1,
  preferred: 4096,
  maximum: 32 * 1024 * 1024,
});
const MAX_OPTION_REPLY = 16 * 1024 * 1024;
const MAX_STATUS_CHUNK = 64 * 1024 * 1024;
const U32_MAX = 0xffffffff;

interface ResolvedOptions {
  exportName: string;
  metaContexts: readonly string[];
  structuredReplies: boolean;
  connectTimeoutMs: number;
  maxRequestBytes: number;
  maxInFlight: number;
  requestTimeoutMs: number;
}

function resolveOptions(o: NbdClientOptions): Readonly<ResolvedOptions> {
  const r: ResolvedOptions = {
    exportName: o.exportName ?? '',
    metaContexts: [...(o.metaContexts ?? [])],
    structuredReplies: o.structuredReplies ?? true,
    connectTimeoutMs: o.connectTimeoutMs ?? 30_000,
    maxRequestBytes: o.maxRequestBytes ?? 4 * 1024 * 1024,
    maxInFlight: o.maxInFlight ?? 32,
    requestTimeoutMs: o.requestTimeoutMs ?? 300_000,
  };
  if (!Number.isFinite(r.requestTimeoutMs) || r.requestTimeoutMs < 0) {
    badArgument('requestTimeoutMs must be 0 or a positive number');
  }
  if (Buffer.byteLength(r.exportName) > 4096) badArgument('export name longer than 4096 bytes');
  if (r.metaContexts.length > 0 && !r.structuredReplies) {
    badArgument('meta contexts need structured replies');
  }
  if (!Number.isInteger(r.maxRequestBytes) || r.maxRequestBytes < 512) {
    badArgument('maxRequestBytes must be an integer of at least 512');
  }
  if (!Number.isInteger(r.maxInFlight) || r.maxInFlight < 1) {
    badArgument('maxInFlight must be a positive integer');
  }
  return Object.freeze(r);
}

function badArgument(what: string, details: Record<string, unknown> = {}): never {
  throw new LifeboatError('LB_NBD_BAD_ARGUMENT', `Invalid NBD client call: ${what}.`, { details });
}

function targetLabel(t: NbdTarget): string {
  return 'path' in t ? `unix:${t.path}` : `${t.host}:${t.port}`;
}

function u64(buf: Buffer, at: number, what: string): number {
  const v = buf.readBigUInt64BE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw nbdProtocolError(`${what} ${v} is too large`);
  return Number(v);
}

function optionName(opt: number): string {
  const names: Record<number, string> = {
    [NBD.OPT_EXPORT_NAME]: 'NBD_OPT_EXPORT_NAME',
    [NBD.OPT_LIST]: 'NBD_OPT_LIST',
    [NBD.OPT_INFO]: 'NBD_OPT_INFO',
    [NBD.OPT_GO]: 'NBD_OPT_GO',
    [NBD.OPT_STRUCTURED_REPLY]: 'NBD_OPT_STRUCTURED_REPLY',
    [NBD.OPT_LIST_META_CONTEXT]: 'NBD_OPT_LIST_META_CONTEXT',
    [NBD.OPT_SET_META_CONTEXT]: 'NBD_OPT_SET_META_CONTEXT',
  };
  return names[opt] ?? `option ${opt}`;
}

function optionErrorName(type: number): string {
  const names: Record<number, string> = {
    [NBD.REP_ERR_UNSUP]: 'NBD_REP_ERR_UNSUP',
    [NBD.REP_ERR_POLICY]: 'NBD_REP_ERR_POLICY',
    [NBD.REP_ERR_INVALID]: 'NBD_REP_ERR_INVALID',
    [NBD.REP_ERR_PLATFORM]: 'NBD_REP_ERR_PLATFORM',
    [NBD.REP_ERR_TLS_REQD]: 'NBD_REP_ERR_TLS_REQD',
    [NBD.REP_ERR_UNKNOWN]: 'NBD_REP_ERR_UNKNOWN',
    [NBD.REP_ERR_SHUTDOWN]: 'NBD_REP_ERR_SHUTDOWN',
    [NBD.REP_ERR_BLOCK_SIZE_REQD]: 'NBD_REP_ERR_BLOCK_SIZE_REQD',
    [NBD.REP_ERR_TOO_BIG]: 'NBD_REP_ERR_TOO_BIG',
  };
  return names[type] ?? `error ${type >>> 0}`;
}

interface OptionReply {
  type: number;
  data: Buffer;
}

/** The option-haggling phase of one connection (fixed newstyle). */
class Negotiation {
  /** True when both sides dropped the 124 zero bytes after NBD_OPT_EXPORT_NAME. */
  noZeroes = false;
  timer: NodeJS.Timeout | undefined;
  timedOut: LifeboatError | undefined;

  constructor(
    readonly socket: Socket,
    readonly reader: SocketReader,
  ) {}

  static async open(target: NbdTarget, timeoutMs: number): Promise<Negotiation> {
    const socket = await openSocket(target, timeoutMs);
    const reader = new SocketReader(socket);
    const n = new Negotiation(socket, reader);
    // One time limit for the whole negotiation; done() ends it once transmission starts.
    n.timer = setTimeout(() => {
      n.timedOut = new LifeboatError(
        'LB_NBD_CONNECT',
        `The NBD server at ${targetLabel(target)} did not finish negotiating within ${timeoutMs} ms. Check that it is an NBD server and not overloaded.`,
      );
      socket.destroy();
    }, timeoutMs);
    try {
      await n.handshake(target);
    } catch (err) {
      n.done();
      socket.destroy();
      throw n.wrap(err, 'during the handshake');
    }
    return n;
  }

  /** Ends the negotiation time limit. */
  done(): void {
    clearTimeout(this.timer);
  }

  /** The error to report for a failure while negotiating: the time limit wins if it fired. */
  wrap(err: unknown, when: string): unknown {
    return this.timedOut ?? wrapClosed(err, when);
  }

  private async handshake(target: NbdTarget): Promise<void> {
    const hello = await this.reader.read(18);
    if (hello.readBigUInt64BE(0) !== NBD.INIT_MAGIC) {
      throw new LifeboatError(
        'LB_NBD_HANDSHAKE',
        `${targetLabel(target)} is not an NBD server (bad greeting magic). Check the address.`,
        { details: { greeting: hello.subarray(0, 8).toString('hex') } },
      );
    }
    if (hello.readBigUInt64BE(8) !== NBD.OPTS_MAGIC) {
      throw new LifeboatError(
        'LB_NBD_HANDSHAKE',
        `The NBD server at ${targetLabel(target)} speaks only the old-style handshake. Run it in newstyle mode (qemu-nbd and nbdkit do by default).`,
      );
    }
    const flags = hello.readUInt16BE(16);
    if ((flags & NBD.FLAG_FIXED_NEWSTYLE) === 0) {
      throw new LifeboatError(
        'LB_NBD_HANDSHAKE',
        `The NBD server at ${targetLabel(target)} does not support the fixed newstyle handshake. Upgrade the server.`,
        { details: { handshakeFlags: flags } },
      );
    }
    this.noZeroes = (flags & NBD.FLAG_NO_ZEROES) !== 0;
    const clientFlags = Buffer.alloc(4);
    clientFlags.writeUInt32BE(
      NBD.FLAG_C_FIXED_NEWSTYLE | (this.noZeroes ? NBD.FLAG_C_NO_ZEROES : 0),
    );
    this.socket.write(clientFlags);
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0)): void {
    const head = Buffer.alloc(16);
    head.writeBigUInt64BE(NBD.OPTS_MAGIC, 0);
    head.writeUInt32BE(option, 8);
    head.writeUInt32BE(data.length, 12);
    this.socket.write(Buffer.concat([head, data]));
  }

  async readReply(option: number): Promise<OptionReply> {
    const head = await this.reader.read(20);
    if (head.readBigUInt64BE(0) !== NBD.REP_MAGIC) {
      throw nbdProtocolError('bad option reply magic', {
        magic: head.subarray(0, 8).toString('hex'),
      });
    }
    const opt = head.readUInt32BE(8);
    if (opt !== option) {
      throw nbdProtocolError(`reply to ${optionName(opt)} while waiting for ${optionName(option)}`);
    }
    const type = head.readUInt32BE(12);
    const length = head.readUInt32BE(16);
    if (length > MAX_OPTION_REPLY) throw nbdProtocolError(`option reply of ${length} bytes`);
    const data = await this.reader.read(length);
    return { type, data };
  }

  /** Sends NBD_OPT_ABORT and closes; the server's answer is optional, so it is not awaited long. */
  async abort(): Promise<void> {
    try {
      this.sendOption(NBD.OPT_ABORT);
    } catch {
      // The server may already have closed; nothing is lost.
    }
    await endSocket(this.socket, 1000);
  }
}

function wrapClosed(err: unknown, when: string): unknown {
  if (err instanceof SocketClosedError) {
    return new LifeboatError(
      'LB_NBD_CONNECTION_LOST',
      `The NBD connection was lost ${when} (${err.message}). Check that the server is running and the export exists.`,
      { cause: err },
    );
  }
  return err;
}

function openSocket(target: NbdTarget, timeoutMs: number): Promise<Socket> {
  if ('path' in target && Buffer.byteLength(target.path) > 107) {
    // Node.js would silently truncate the path and connect to another socket.
    return Promise.reject(
      new LifeboatError(
        'LB_NBD_CONNECT',
        `The NBD socket path is longer than 107 bytes (a UNIX socket limit): ${target.path}. Use a shorter directory.`,
        { details: { path: target.path } },
      ),
    );
  }
  return new Promise<Socket>((resolve, reject) => {
    const socket =
      'path' in target
        ? netConnect({ path: target.path })
        : netConnect({ host: target.host, port: target.port });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(
        new LifeboatError(
          'LB_NBD_CONNECT',
          `Could not connect to the NBD server at ${targetLabel(target)} within ${timeoutMs} ms. Check that it is running.`,
        ),
      );
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.removeAllListeners('error');
      socket.setNoDelay(true);
      resolve(socket);
    });
    socket.once('error', (err) => {
      clearTimeout(timer);
      socket.destroy();
      reject(
        new LifeboatError(
          'LB_NBD_CONNECT',
          `Could not connect to the NBD server at ${targetLabel(target)}: ${err.message}. Check that it is running and the address is right.`,
          { cause: err },
        ),
      );
    });
  });
}

function endSocket(socket: Socket, timeoutMs: number): Promise<void> {
  return new Promise<void>((resolve) => {
    if (socket.destroyed) {
      resolve();
      return;
    }
    const timer = setTimeout(() => socket.destroy(), timeoutMs);
    socket.once('close', () => {
      clearTimeout(timer);
      resolve();
    });
    socket.end();
  });
}

function optionRefused(option: number, reply: OptionReply, exportName: string): LifeboatError {
  const msg = reply.data.toString('utf8');
  const details = {
    option: optionName(option),
    reply: optionErrorName(reply.type),
    exportName,
    serverMessage: msg,
  };
  if (reply.type === NBD.REP_ERR_UNKNOWN) {
    return new LifeboatError(
      'LB_NBD_EXPORT_UNKNOWN',
      `The NBD server has no export named '${exportName}'${msg ? ` (${msg})` : ''}. List the exports (NBD_OPT_LIST) and use one of them.`,
      { details },
    );
  }
  return new LifeboatError(
    'LB_NBD_OPTION_REFUSED',
    `The NBD server refused ${optionName(option)} with ${optionErrorName(reply.type)}${msg ? ` (${msg})` : ''}.`,
    { details },
  );
}

function encodeName(name: string): Buffer {
  const b = Buffer.from(name, 'utf8');
  const len = Buffer.alloc(4);
  len.writeUInt32BE(b.length);
  return Buffer.concat([len, b]);
}

function encodeMetaQuery(exportName: string, queries: readonly string[]): Buffer {
  const count = Buffer.alloc(4);
  count.writeUInt32BE(queries.length);
  return Buffer.concat([encodeName(exportName), count, ...queries.map(encodeName)]);
}

/** Runs NBD_OPT_INFO or NBD_OPT_GO and collects the export's information. */
async function infoOrGo(
  n: Negotiation,
  option: number,
  exportName: string,
): Promise<NbdExportInfo | 'unsupported'> {
  const req = Buffer.alloc(2 + 4);
  req.writeUInt16BE(2, 0);
  req.writeUInt16BE(NBD.INFO_BLOCK_SIZE, 2);
  req.writeUInt16BE(NBD.INFO_DESCRIPTION, 4);
  n.sendOption(option, Buffer.concat([encodeName(exportName), req]));
  let size: number | undefined;
  let flags = 0;
  let blockSize: NbdBlockSize = DEFAULT_BLOCK_SIZE;
  let description: string | undefined;
  for (;;) {
    const r = await n.readReply(option);
    if (r.type === NBD.REP_ACK) break;
    if (r.type >= NBD.REP_FLAG_ERROR) {
      if (r.type === NBD.REP_ERR_UNSUP) return 'unsupported';
      throw optionRefused(option, r, exportName);
    }
    if (r.type !== NBD.REP_INFO) continue; // Unknown reply types are ignored, as the spec says.
    if (r.data.length < 2) throw nbdProtocolError('NBD_REP_INFO without a type');
    const info = r.data.readUInt16BE(0);
    if (info === NBD.INFO_EXPORT) {
      if (r.data.length !== 12) throw nbdProtocolError('NBD_INFO_EXPORT of the wrong length');
      size = u64(r.data, 2, 'export size');
      flags = r.data.readUInt16BE(10);
    } else if (info === NBD.INFO_BLOCK_SIZE) {
      if (r.data.length !== 14) throw nbdProtocolError('NBD_INFO_BLOCK_SIZE of the wrong length');
      const minimum = r.data.readUInt32BE(2);
      const preferred = r.data.readUInt32BE(6);
      const maximum = r.data.readUInt32BE(10);
      const pow2 = (v: number): boolean => v > 0 && (v & (v - 1)) === 0;
      if (!pow2(minimum) || minimum > 65536 || preferred < minimum || maximum < minimum) {
        throw nbdProtocolError('inconsistent NBD_INFO_BLOCK_SIZE', { minimum, preferred, maximum });
      }
      blockSize = Object.freeze({ minimum, preferred, maximum });
    } else if (info === NBD.INFO_DESCRIPTION) {
      description = r.data.subarray(2).toString('utf8');
    }
  }
  if (size === undefined) throw nbdProtocolError('no NBD_INFO_EXPORT before NBD_REP_ACK');
  const out: NbdExportInfo = { size, flags, blockSize };
  if (description !== undefined) out.description = description;
  return out;
}

interface Pending {
  command: string;
  type: number;
  offset: number;
  length: number;
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
  /** READ: destination and bytes covered so far. */
  buf?: Buffer;
  covered: number;
  /** BLOCK_STATUS: extents per context id. */
  status?: Map<number, NbdExtent[]>;
  error?: LifeboatError;
  /** When the request was sent, for the request time limit. */
  sentAt: number;
}

/**
 * An NBD client (fixed newstyle, structured replies, block status) for one export. Requests are
 * pipelined: many may be in flight, matched to replies by cookie. Every server error becomes a
 * LifeboatError with an `LB_NBD_*` code; a read never returns zeros for a range it could not
 * read. When the connection drops, every request in flight rejects with LB_NBD_CONNECTION_LOST.
 */
export class NbdClient {
  /** Export size in bytes. */
  readonly size: number;
  /** Transmission flags (NBD.FLAG_*). */
  readonly flags: number;
  /** Block size constraints of the export. */
  readonly blockSize: NbdBlockSize;
  /** True when structured replies were negotiated. */
  readonly structuredReplies: boolean;
  /** Granted meta contexts, name to id. */
  readonly metaContexts: ReadonlyMap<string, number>;

  private readonly pending = new Map<bigint, Pending>();
  /** Every request accepted and not yet settled, including those waiting for a slot. */
  private readonly active = new Set<Promise<unknown>>();
  private nextCookie = 1n;
  private failure: LifeboatError | undefined;
  private closing = false;
  private inFlight = 0;
  private readonly slotWaiters: (() => void)[] = [];
  private readonly loop: Promise<void>;
  private readonly label: string;
  private watchdog: NodeJS.Timeout | undefined;

  private constructor(
    private readonly socket: Socket,
    private readonly reader: SocketReader,
    private readonly opts: Readonly<ResolvedOptions>,
    info: NbdExportInfo,
    structured: boolean,
    contexts: Map<string, number>,
    label: string,
  ) {
    this.size = info.size;
    this.flags = info.flags;
    this.blockSize = info.blockSize;
    this.structuredReplies = structured;
    this.metaContexts = contexts;
    this.label = label;
    this.loop = this.replyLoop();
    if (opts.requestTimeoutMs > 0) {
      const every = Math.max(50, Math.min(1000, opts.requestTimeoutMs / 4));
      this.watchdog = setInterval(() => this.checkTimeouts(), every);
      this.watchdog.unref();
    }
  }

  private checkTimeouts(): void {
    const now = Date.now();
    for (const p of this.pending.values()) {
      if (now - p.sentAt > this.opts.requestTimeoutMs) {
        this.failure ??= new LifeboatError(
          'LB_NBD_TIMEOUT',
          `The NBD server at ${this.label} did not answer a ${p.command} at ${p.offset} within ${this.opts.requestTimeoutMs} ms. The connection was dropped; check the server and reconnect.`,
          { details: { command: p.command, offset: p.offset, length: p.length } },
        );
        this.socket.destroy();
        return;
      }
    }
  }

  /** True when the export refuses writes. */
  get readOnly(): boolean {
    return (this.flags & NBD.FLAG_READ_ONLY) !== 0;
  }

  /** Connects, negotiates and attaches to one export. */
  static async connect(target: NbdTarget, options: NbdClientOptions = {}): Promise<NbdClient> {
    const opts = resolveOptions(options);
    const n = await Negotiation.open(target, opts.connectTimeoutMs);
    try {
      let structured = false;
      if (opts.structuredReplies) {
        n.sendOption(NBD.OPT_STRUCTURED_REPLY);
        const r = await n.readReply(NBD.OPT_STRUCTURED_REPLY);
        structured = r.type === NBD.REP_ACK;
        if (!structured && r.type < NBD.REP_FLAG_ERROR) {
          throw nbdProtocolError('unexpected reply to NBD_OPT_STRUCTURED_REPLY', { type: r.type });
        }
      }
      const contexts = new Map<string, number>();
      if (opts.metaContexts.length > 0) {
        if (!structured) {
          throw new LifeboatError(
            'LB_NBD_META_CONTEXT_UNAVAILABLE',
            `The NBD server at ${targetLabel(target)} does not support structured replies, so block status (${opts.metaContexts.join(', ')}) is unavailable.`,
          );
        }
        n.sendOption(NBD.OPT_SET_META_CONTEXT, encodeMetaQuery(opts.exportName, opts.metaContexts));
        for (;;) {
          const r = await n.readReply(NBD.OPT_SET_META_CONTEXT);
          if (r.type === NBD.REP_ACK) break;
          if (r.type >= NBD.REP_FLAG_ERROR)
            throw optionRefused(NBD.OPT_SET_META_CONTEXT, r, opts.exportName);
          if (r.type === NBD.REP_META_CONTEXT) {
            if (r.data.length < 4) throw nbdProtocolError('short NBD_REP_META_CONTEXT');
            contexts.set(r.data.subarray(4).toString('utf8'), r.data.readUInt32BE(0));
          }
        }
        const missing = opts.metaContexts.filter((c) => !c.endsWith(':') && !contexts.has(c));
        if (missing.length > 0) {
          throw new LifeboatError(
            'LB_NBD_META_CONTEXT_UNAVAILABLE',
            `The NBD export '${opts.exportName}' at ${targetLabel(target)} does not offer ${missing.join(', ')}. For a dirty bitmap, check that the bitmap exists and is exported (block-export-add bitmaps=[...]).`,
            { details: { missing, granted: [...contexts.keys()] } },
          );
        }
      }
      let info = await infoOrGo(n, NBD.OPT_GO, opts.exportName);
      if (info === 'unsupported') info = await exportNameFallback(n, opts.exportName);
      n.done();
      return new NbdClient(
        n.socket,
        n.reader,
        opts,
        info,
        structured,
        contexts,
        targetLabel(target),
      );
    } catch (err) {
      n.done();
      n.socket.destroy();
      throw n.wrap(err, 'while negotiating');
    }
  }

  /**
   * Runs one query on a connection of its own that is never attached to an export: it ends
   * with NBD_OPT_ABORT, or is destroyed when the query fails (the error says `what` it was doing).
   */
  private static async oneShotQuery<T>(
    target: NbdTarget,
    connectTimeoutMs: number | undefined,
    what: string,
    query: (n: Negotiation) => Promise<T>,
  ): Promise<T> {
    const n = await Negotiation.open(target, connectTimeoutMs ?? 30_000);
    try {
      return await query(n);
    } catch (err) {
      n.socket.destroy();
      throw n.wrap(err, what);
    } finally {
      n.done();
      await n.abort();
    }
  }

  /** Lists the server's exports (NBD_OPT_LIST). */
  static async listExports(
    target: NbdTarget,
    options: { connectTimeoutMs?: number } = {},
  ): Promise<NbdExportListing[]> {
    return NbdClient.oneShotQuery(
      target,
      options.connectTimeoutMs,
      'while listing exports',
      async (n) => {
        n.sendOption(NBD.OPT_LIST);
        const out: NbdExportListing[] = [];
        for (;;) {
          const r = await n.readReply(NBD.OPT_LIST);
          if (r.type === NBD.REP_ACK) break;
          if (r.type >= NBD.REP_FLAG_ERROR) throw optionRefused(NBD.OPT_LIST, r, '');
          if (r.type !== NBD.REP_SERVER) continue;
          if (r.data.length < 4) throw nbdProtocolError('short NBD_REP_SERVER');
          const len = r.data.readUInt32BE(0);
          if (len > r.data.length - 4) throw nbdProtocolError('NBD_REP_SERVER name overruns reply');
          out.push({
            name: r.data.subarray(4, 4 + len).toString('utf8'),
            description: r.data.subarray(4 + len).toString('utf8'),
          });
        }
        return out;
      },
    );
  }

  /** Asks about one export without attaching to it (NBD_OPT_INFO). */
  static async info(
    target: NbdTarget,
    exportName = '',
    options: { connectTimeoutMs?: number } = {},
  ): Promise<NbdExportInfo> {
    return NbdClient.oneShotQuery(
      target,
      options.connectTimeoutMs,
      'while asking for export information',
      async (n) => {
        const info = await infoOrGo(n, NBD.OPT_INFO, exportName);
        if (info === 'unsupported') {
          throw new LifeboatError(
            'LB_NBD_OPTION_REFUSED',
            `The NBD server at ${targetLabel(target)} does not support NBD_OPT_INFO.`,
          );
        }
        return info;
      },
    );
  }

  /** Lists the meta contexts matching `queries` (all of them when empty) for an export. */
  static async listMetaContexts(
    target: NbdTarget,
    exportName = '',
    queries: readonly string[] = [],
    options: { connectTimeoutMs?: number } = {},
  ): Promise<string[]> {
    return NbdClient.oneShotQuery(
      target,
      options.connectTimeoutMs,
      'while listing meta contexts',
      async (n) => {
        n.sendOption(NBD.OPT_STRUCTURED_REPLY);
        const s = await n.readReply(NBD.OPT_STRUCTURED_REPLY);
        if (s.type !== NBD.REP_ACK) throw optionRefused(NBD.OPT_STRUCTURED_REPLY, s, exportName);
        n.sendOption(NBD.OPT_LIST_META_CONTEXT, encodeMetaQuery(exportName, queries));
        const out: string[] = [];
        for (;;) {
          const r = await n.readReply(NBD.OPT_LIST_META_CONTEXT);
          if (r.type === NBD.REP_ACK) break;
          if (r.type >= NBD.REP_FLAG_ERROR)
            throw optionRefused(NBD.OPT_LIST_META_CONTEXT, r, exportName);
          if (r.type === NBD.REP_META_CONTEXT && r.data.length >= 4) {
            out.push(r.data.subarray(4).toString('utf8'));
          }
        }
        return out;
      },
    );
  }

  /** Reads `length` bytes at `offset`; big reads are split and pipelined. */
  async readAt(offset: number, length: number): Promise<Buffer> {
    this.checkBounds('read', offset, length);
    const min = this.blockSize.minimum;
    if (min > 1 && (offset % min !== 0 || (length % min !== 0 && offset + length !== this.size))) {
      // Reads are side-effect free, so an unaligned read is served from the aligned superset.
      const start = offset - (offset % min);
      const end = Math.min(this.size, Math.ceil((offset + length) / min) * min);
      const whole = await this.readAt(start, end - start);
      return whole.subarray(offset - start, offset - start + length);
    }
    const out = Buffer.alloc(length);
    if (length === 0) return out;
    const step = this.maxPiece();
    const parts: Promise<unknown>[] = [];
    for (let pos = 0; pos < length; pos += step) {
      const n = Math.min(step, length - pos);
      parts.push(
        this.request(NBD.CMD_READ, 0, offset + pos, n, undefined, out.subarray(pos, pos + n)),
      );
    }
    await settleAll(parts);
    return out;
  }

  /** Writes `data` at `offset`. With `fua`, the data is durable on return. */
  async write(offset: number, data: Uint8Array, options: NbdWriteOptions = {}): Promise<void> {
    this.checkWritable('write');
    this.checkRange('write', offset, data.length);
    const buf = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    const flags = this.fuaFlag(options);
    const step = this.maxPiece();
    const parts: Promise<unknown>[] = [];
    for (let pos = 0; pos < buf.length; pos += step) {
      const piece = buf.subarray(pos, Math.min(buf.length, pos + step));
      parts.push(this.request(NBD.CMD_WRITE, flags, offset + pos, piece.length, piece));
    }
    await settleAll(parts);
    await this.emulatedFua(options);
  }

  /** Makes a range read as zeros (NBD_CMD_WRITE_ZEROES). */
  async writeZeroes(
    offset: number,
    length: number,
    options: NbdWriteZeroesOptions = {},
  ): Promise<void> {
    this.checkWritable('write zeroes');
    this.checkRange('write zeroes', offset, length);
    this.checkFlag(NBD.FLAG_SEND_WRITE_ZEROES, 'NBD_CMD_WRITE_ZEROES');
    const flags = this.fuaFlag(options) | (options.noHole ? NBD.CMD_FLAG_NO_HOLE : 0);
    await this.splitU32(NBD.CMD_WRITE_ZEROES, flags, offset, length);
    await this.emulatedFua(options);
  }

  /** Discards a range (NBD_CMD_TRIM): it may read as anything afterwards, per the specification. */
  async trim(offset: number, length: number, options: NbdWriteOptions = {}): Promise<void> {
    this.checkWritable('trim');
    this.checkRange('trim', offset, length);
    this.checkFlag(NBD.FLAG_SEND_TRIM, 'NBD_CMD_TRIM');
    await this.splitU32(NBD.CMD_TRIM, this.fuaFlag(options), offset, length);
    await this.emulatedFua(options);
  }

  /** Makes every completed write durable (NBD_CMD_FLUSH). */
  async flush(): Promise<void> {
    this.checkFlag(NBD.FLAG_SEND_FLUSH, 'NBD_CMD_FLUSH');
    await this.request(NBD.CMD_FLUSH, 0, 0, 0);
  }

  /**
   * One NBD_CMD_BLOCK_STATUS request for a negotiated meta context. The server may describe
   * less than `length` (never nothing); extents are returned as sent, clipped to the range.
   */
  async blockStatus(context: string, offset: number, length: number): Promise<NbdExtent[]> {
    const id = this.metaContexts.get(context);
    if (id === undefined) {
      throw new LifeboatError(
        'LB_NBD_META_CONTEXT_UNAVAILABLE',
        `Meta context '${context}' was not negotiated on this connection. Pass it in metaContexts when connecting.`,
        { details: { context, negotiated: [...this.metaContexts.keys()] } },
      );
    }
    this.checkRange('block status', offset, length);
    if (length === 0) return [];
    const len = Math.min(length, alignDown(U32_MAX, this.blockSize.minimum));
    const status = (await this.request(NBD.CMD_BLOCK_STATUS, 0, offset, len)) as Map<
      number,
      NbdExtent[]
    >;
    const extents = status.get(id);
    if (extents === undefined || extents.length === 0) {
      throw nbdProtocolError(`block status reply without extents for '${context}'`, {
        offset,
        length: len,
      });
    }
    const end = offset + len;
    const out: NbdExtent[] = [];
    for (const e of extents) {
      if (e.offset >= end) break;
      out.push({ offset: e.offset, length: Math.min(e.length, end - e.offset), flags: e.flags });
    }
    return out;
  }

  /**
   * Walks a whole range (default: the whole export) with as many block status requests as
   * needed, yielding extents in order, adjacent extents with equal flags merged.
   */
  async *extents(
    context: string,
    offset = 0,
    length = this.size - offset,
  ): AsyncGenerator<NbdExtent> {
    this.checkRange('block status', offset, length);
    const end = offset + length;
    let pos = offset;
    let held: NbdExtent | undefined;
    while (pos < end) {
      const batch = await this.blockStatus(context, pos, end - pos);
      for (const e of batch) {
        if (
          held !== undefined &&
          held.flags === e.flags &&
          held.offset + held.length === e.offset
        ) {
          held.length += e.length;
        } else {
          if (held !== undefined) yield held;
          held = { ...e };
        }
        pos = e.offset + e.length;
      }
    }
    if (held !== undefined) yield held;
  }

  /**
   * Reads many ranges in order with reads ahead in flight, yielding `{ offset, data }` pieces of
   * at most `pieceBytes`. Meant for "read every dirty extent": feed it the filtered output of
   * {@link extents}. The first failed read throws (after the others in flight settle).
   */
  async *readRanges(
    ranges:
      | Iterable<{ offset: number; length: number }>
      | AsyncIterable<{ offset: number; length: number }>,
    options: { pieceBytes?: number; readAhead?: number } = {},
  ): AsyncGenerator<{ offset: number; data: Buffer }> {
    const piece = options.pieceBytes ?? 1024 * 1024;
    const depth = options.readAhead ?? 8;
    if (!Number.isInteger(piece) || piece < 1 || !Number.isInteger(depth) || depth < 1) {
      badArgument('readRanges needs a positive integer pieceBytes and readAhead');
    }
    const queue: { offset: number; data: Promise<Buffer> }[] = [];
    try {
      for await (const r of ranges) {
        const end = r.offset + r.length;
        for (let off = r.offset; off < end; off += piece) {
          const data = this.readAt(off, Math.min(piece, end - off));
          // Observed when its turn comes; this only keeps an early failure from going unhandled.
          data.catch(() => undefined);
          queue.push({ offset: off, data });
          while (queue.length >= depth) {
            const head = queue.shift() as { offset: number; data: Promise<Buffer> };
            yield { offset: head.offset, data: await head.data };
          }
        }
      }
      while (queue.length > 0) {
        const head = queue.shift() as { offset: number; data: Promise<Buffer> };
        yield { offset: head.offset, data: await head.data };
      }
    } finally {
      await Promise.allSettled(queue.map((q) => q.data));
    }
  }

  /** Waits for requests in flight, sends NBD_CMD_DISC and closes the connection. */
  async close(): Promise<void> {
    if (this.closing) {
      await this.loop;
      return;
    }
    this.closing = true;
    await Promise.allSettled([...this.active]);
    if (this.failure === undefined && !this.socket.destroyed) {
      const req = Buffer.alloc(NBD.REQUEST_SIZE);
      req.writeUInt32BE(NBD.REQUEST_MAGIC, 0);
      req.writeUInt16BE(NBD.CMD_DISC, 6);
      req.writeBigUInt64BE(this.nextCookie++, 8);
      this.socket.write(req);
    }
    await endSocket(this.socket, 2000);
    await this.loop;
  }

  /** Drops the connection at once; requests in flight reject. */
  destroy(): void {
    this.closing = true;
    this.socket.destroy();
  }

  private maxPiece(): number {
    const max = Math.min(this.opts.maxRequestBytes, this.blockSize.maximum);
    return Math.max(this.blockSize.minimum, alignDown(max, this.blockSize.minimum));
  }

  private async splitU32(
    type: number,
    flags: number,
    offset: number,
    length: number,
  ): Promise<void> {
    const step = alignDown(0x80000000, Math.max(this.blockSize.minimum, 1));
    const parts: Promise<unknown>[] = [];
    for (let pos = 0; pos < length; pos += step) {
      parts.push(this.request(type, flags, offset + pos, Math.min(step, length - pos)));
    }
    await settleAll(parts);
  }

  private fuaFlag(o: NbdWriteOptions): number {
    return o.fua && this.flags & NBD.FLAG_SEND_FUA ? NBD.CMD_FLAG_FUA : 0;
  }

  /** Servers without FUA still honour flush, which gives the same durability. */
  private async emulatedFua(o: NbdWriteOptions): Promise<void> {
    if (o.fua && !(this.flags & NBD.FLAG_SEND_FUA)) await this.flush();
  }

  private checkFlag(flag: number, what: string): void {
    if ((this.flags & flag) === 0) {
      throw new LifeboatError('LB_NBD_NOT_SUPPORTED', `The NBD export does not support ${what}.`, {
        details: { flags: this.flags },
      });
    }
  }

  private checkWritable(what: string): void {
    if (this.readOnly) {
      throw new LifeboatError(
        'LB_NBD_PERMISSION',
        `Cannot ${what}: the NBD export is read-only. Connect to a writable export.`,
      );
    }
  }

  private checkRange(what: string, offset: number, length: number): void {
    this.checkBounds(what, offset, length);
    const min = this.blockSize.minimum;
    if (min > 1 && (offset % min !== 0 || (length % min !== 0 && offset + length !== this.size))) {
      badArgument(`${what} at ${offset} of ${length} bytes is not aligned to ${min} bytes`, {
        offset,
        length,
        minimum: min,
      });
    }
  }

  private checkBounds(what: string, offset: number, length: number): void {
    if (
      !Number.isSafeInteger(offset) ||
      !Number.isSafeInteger(length) ||
      offset < 0 ||
      length < 0
    ) {
      badArgument(`${what} with offset ${offset} and length ${length}`, { offset, length });
    }
    if (offset + length > this.size) {
      badArgument(
        `${what} of ${length} bytes at ${offset} goes past the export's end (${this.size})`,
        {
          offset,
          length,
          size: this.size,
        },
      );
    }
  }

  private async acquireSlot(): Promise<void> {
    while (this.inFlight >= this.opts.maxInFlight) {
      await new Promise<void>((r) => this.slotWaiters.push(r));
    }
    this.inFlight++;
  }

  private releaseSlot(): void {
    this.inFlight--;
    this.slotWaiters.shift()?.();
  }

  private request(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload?: Buffer,
    into?: Buffer,
  ): Promise<unknown> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    if (this.closing) {
      return Promise.reject(
        new LifeboatError('LB_NBD_CLOSED', 'The NBD client is closed. Connect again.'),
      );
    }
    const p = this.send(type, flags, offset, length, payload, into);
    this.active.add(p);
    const forget = (): void => {
      this.active.delete(p);
    };
    p.then(forget, forget);
    return p;
  }

  private async send(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload?: Buffer,
    into?: Buffer,
  ): Promise<unknown> {
    await this.acquireSlot();
    try {
      if (this.failure !== undefined) throw this.failure;
      const cookie = this.nextCookie++;
      const command = commandName(type);
      const done = new Promise<unknown>((resolve, reject) => {
        const p: Pending = {
          command,
          type,
          offset,
          length,
          resolve,
          reject,
          covered: 0,
          sentAt: Date.now(),
        };
        if (into !== undefined) p.buf = into;
        if (type === NBD.CMD_BLOCK_STATUS) p.status = new Map();
        this.pending.set(cookie, p);
      });
      const head = Buffer.alloc(NBD.REQUEST_SIZE);
      head.writeUInt32BE(NBD.REQUEST_MAGIC, 0);
      head.writeUInt16BE(flags, 4);
      head.writeUInt16BE(type, 6);
      head.writeBigUInt64BE(cookie, 8);
      head.writeBigUInt64BE(BigInt(offset), 16);
      head.writeUInt32BE(length, 24);
      if (payload === undefined) this.socket.write(head);
      else {
        // Header and payload in one cork: one syscall and no joined copy of the payload.
        this.socket.cork();
        this.socket.write(head);
        this.socket.write(payload);
        this.socket.uncork();
      }
      return await done;
    } finally {
      this.releaseSlot();
    }
  }

  private async replyLoop(): Promise<void> {
    try {
      for (;;) {
        const magicBuf = await this.reader.read(4);
        const magic = magicBuf.readUInt32BE(0);
        if (magic === NBD.SIMPLE_REPLY_MAGIC) await this.simpleReply();
        else if (magic === NBD.STRUCTURED_REPLY_MAGIC && this.structuredReplies)
          await this.structuredChunk();
        else throw nbdProtocolError('bad reply magic', { magic: magicBuf.toString('hex') });
      }
    } catch (err) {
      let failure: LifeboatError;
      if (err instanceof LifeboatError) {
        failure = err;
      } else if (this.closing && this.pending.size === 0) {
        failure = new LifeboatError('LB_NBD_CLOSED', 'The NBD client is closed. Connect again.');
      } else {
        const missing = err instanceof SocketClosedError ? err.missing : 0;
        failure = new LifeboatError(
          'LB_NBD_CONNECTION_LOST',
          `The connection to the NBD server at ${this.label} was lost${missing > 0 ? ' in the middle of a reply' : ''} with ${this.pending.size} request(s) in flight. Nothing was read as zeros; retry after reconnecting.`,
          { cause: err, details: { inFlight: this.pending.size, truncatedBy: missing } },
        );
      }
      this.failure ??= failure;
      failure = this.failure;
      clearInterval(this.watchdog);
      this.socket.destroy();
      for (const p of this.pending.values()) p.reject(failure);
      this.pending.clear();
      for (const w of this.slotWaiters.splice(0)) w();
    }
  }

  private take(cookie: bigint): Pending {
    const p = this.pending.get(cookie);
    if (p === undefined)
      throw nbdProtocolError('reply with an unknown cookie', { cookie: cookie.toString() });
    return p;
  }

  private async simpleReply(): Promise<void> {
    const rest = await this.reader.read(12);
    const errno = rest.readUInt32BE(0);
    const cookie = rest.readBigUInt64BE(4);
    const p = this.take(cookie);
    if (p.type === NBD.CMD_BLOCK_STATUS && errno === 0) {
      throw nbdProtocolError('simple reply to NBD_CMD_BLOCK_STATUS');
    }
    if (errno !== 0) {
      this.pending.delete(cookie);
      p.reject(nbdRequestError(errno, p.command, p.offset, p.length));
      return;
    }
    if (p.type === NBD.CMD_READ) {
      // A simple reply to a read carries the data right after the header; the request stays
      // pending until all of it came, so a cut connection rejects it.
      await this.reader.readInto(p.buf as Buffer);
    }
    this.pending.delete(cookie);
    p.resolve(undefined);
  }

  private async structuredChunk(): Promise<void> {
    const h = await this.reader.read(16);
    const flags = h.readUInt16BE(0);
    const type = h.readUInt16BE(2);
    const cookie = h.readBigUInt64BE(4);
    const length = h.readUInt32BE(12);
    const p = this.take(cookie);
    // Bound every chunk by what its type can legitimately carry before reading it.
    const limit =
      type === NBD.REPLY_TYPE_OFFSET_DATA
        ? p.length + 8
        : type & 0x8000
          ? 6 + 0xffff + 8
          : p.type === NBD.CMD_BLOCK_STATUS
            ? MAX_STATUS_CHUNK
            : 16;
    if (length > limit)
      throw nbdProtocolError(`structured chunk of ${length} bytes`, { type, limit });
    if (type === NBD.REPLY_TYPE_OFFSET_DATA && p.type === NBD.CMD_READ && length > 8) {
      // The hot path: data goes straight from the socket into the caller's buffer.
      const head = await this.reader.read(8);
      const at = u64(head, 0, 'chunk offset') - p.offset;
      const n = length - 8;
      if (at < 0 || at + n > p.length) {
        throw nbdProtocolError('OFFSET_DATA outside the request', {
          offset: at + p.offset,
          length: n,
        });
      }
      await this.reader.readInto((p.buf as Buffer).subarray(at, at + n));
      p.covered += n;
      this.finishChunk(cookie, p, flags);
      return;
    }
    const data = await this.reader.read(length);
    switch (type) {
      case NBD.REPLY_TYPE_NONE:
        if (length !== 0 || !(flags & NBD.REPLY_FLAG_DONE))
          throw nbdProtocolError('bad NBD_REPLY_TYPE_NONE');
        break;
      case NBD.REPLY_TYPE_OFFSET_DATA: {
        if (p.type !== NBD.CMD_READ || length < 8)
          throw nbdProtocolError('unexpected OFFSET_DATA chunk');
        const at = u64(data, 0, 'chunk offset') - p.offset;
        const n = length - 8;
        if (at < 0 || at + n > p.length || n === 0) {
          throw nbdProtocolError('OFFSET_DATA outside the request', {
            offset: at + p.offset,
            length: n,
          });
        }
        data.copy(p.buf as Buffer, at, 8);
        p.covered += n;
        break;
      }
      case NBD.REPLY_TYPE_OFFSET_HOLE: {
        if (p.type !== NBD.CMD_READ || length !== 12)
          throw nbdProtocolError('unexpected OFFSET_HOLE chunk');
        const at = u64(data, 0, 'chunk offset') - p.offset;
        const n = data.readUInt32BE(8);
        if (at < 0 || at + n > p.length || n === 0) {
          throw nbdProtocolError('OFFSET_HOLE outside the request', {
            offset: at + p.offset,
            length: n,
          });
        }
        (p.buf as Buffer).fill(0, at, at + n);
        p.covered += n;
        break;
      }
      case NBD.REPLY_TYPE_BLOCK_STATUS: {
        if (p.type !== NBD.CMD_BLOCK_STATUS || length < 12 || (length - 4) % 8 !== 0) {
          throw nbdProtocolError('bad NBD_REPLY_TYPE_BLOCK_STATUS chunk', { length });
        }
        const id = data.readUInt32BE(0);
        const extents: NbdExtent[] = [];
        let pos = p.offset;
        for (let i = 4; i < length; i += 8) {
          const len = data.readUInt32BE(i);
          if (len === 0) throw nbdProtocolError('block status extent of length 0');
          extents.push({ offset: pos, length: len, flags: data.readUInt32BE(i + 4) });
          pos += len;
        }
        p.status?.set(id, extents);
        break;
      }
      default: {
        if (!(type & 0x8000)) throw nbdProtocolError(`unknown structured reply type ${type}`);
        if (length < 6) throw nbdProtocolError('short error chunk');
        const errno = data.readUInt32BE(0);
        const msgLen = data.readUInt16BE(4);
        if (6 + msgLen > length) throw nbdProtocolError('error message overruns its chunk');
        const msg = data.subarray(6, 6 + msgLen).toString('utf8');
        let errOffset: number | undefined;
        if (type === NBD.REPLY_TYPE_ERROR_OFFSET) {
          if (length !== 6 + msgLen + 8) throw nbdProtocolError('bad NBD_REPLY_TYPE_ERROR_OFFSET');
          errOffset = u64(data, 6 + msgLen, 'error offset');
        }
        if (errno === 0) throw nbdProtocolError('error chunk with error value 0');
        // The first error wins; later chunks only add detail the caller does not need.
        p.error ??= nbdRequestError(errno, p.command, p.offset, p.length, msg, errOffset);
      }
    }
    this.finishChunk(cookie, p, flags);
  }

  private finishChunk(cookie: bigint, p: Pending, flags: number): void {
    if (flags & NBD.REPLY_FLAG_DONE) {
      // A protocol error leaves the request pending so the loop's failure path rejects it.
      if (p.error === undefined && p.type === NBD.CMD_READ && p.covered !== p.length) {
        throw nbdProtocolError('read reply did not cover the requested range', {
          offset: p.offset,
          length: p.length,
          covered: p.covered,
        });
      }
      this.pending.delete(cookie);
      if (p.error !== undefined) p.reject(p.error);
      else if (p.type === NBD.CMD_BLOCK_STATUS) p.resolve(p.status);
      else p.resolve(undefined);
    }
  }
}

async function exportNameFallback(n: Negotiation, exportName: string): Promise<NbdExportInfo> {
  // Servers without NBD_OPT_GO: the old way, which answers with size and flags and no ACK.
  n.sendOption(NBD.OPT_EXPORT_NAME, Buffer.from(exportName, 'utf8'));
  const r = await n.reader.read(10);
  if (!n.noZeroes) await n.reader.skip(124);
  return {
    size: u64(r, 0, 'export size'),
    flags: r.readUInt16BE(8),
    blockSize: DEFAULT_BLOCK_SIZE,
  };
}

function commandName(type: number): string {
  const names: Record<number, string> = {
    [NBD.CMD_READ]: 'read',
    [NBD.CMD_WRITE]: 'write',
    [NBD.CMD_FLUSH]: 'flush',
    [NBD.CMD_TRIM]: 'trim',
    [NBD.CMD_WRITE_ZEROES]: 'write zeroes',
    [NBD.CMD_BLOCK_STATUS]: 'block status',
  };
  return names[type] ?? `command ${type}`;
}

function alignDown(v: number, a: number): number {
  return a <= 1 ? v : v - (v % a);
}

/** Waits for every part (so no rejection is left unobserved), then throws the first failure. */
async function settleAll(parts: Promise<unknown>[]): Promise<void> {
  const results = await Promise.allSettled(parts);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}
