import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { LifeboatError } from '@lifeboat/protocol';
import type { NbdTarget } from './nbd-client.js';
import { BASE_ALLOCATION, NBD } from './nbd-constants.js';
import type { NbdExportSource, NbdSourceExtent } from './nbd-export-source.js';
import { SocketReader } from './socket-reader.js';

/** Options of {@link NbdServer}. */
export interface NbdServerOptions {
  /** Largest READ (and BLOCK_STATUS range) served; advertised as the maximum block size. @default 33554432 */
  maxRequestBytes?: number;
  /** Requests of one connection handled at once; the next is read when one finishes. @default 8 */
  maxInFlightPerConnection?: number;
  /** A client that has not reached transmission after this long is dropped. @default 30000 */
  handshakeTimeoutMs?: number;
  /** Called when a source read or extent lookup fails (the client gets EIO for that request). */
  onSourceError?: (err: unknown, where: NbdSourceErrorContext) => void;
}

/** Where a source failed, for {@link NbdServerOptions.onSourceError}. */
export interface NbdSourceErrorContext {
  exportName: string;
  operation: 'read' | 'block-status';
  offset: number;
  length: number;
}

/** Options of one export. */
export interface NbdExportOptions {
  /** Shown by `nbdinfo --list` and NBD_OPT_LIST. @default '' */
  description?: string;
}

interface ExportEntry {
  name: string;
  source: NbdExportSource;
  description: string;
}

interface ResolvedServerOptions {
  maxRequestBytes: number;
  maxInFlightPerConnection: number;
  handshakeTimeoutMs: number;
  onSourceError: ((err: unknown, where: NbdSourceErrorContext) => void) | undefined;
}

/** Options longer than this are refused with NBD_REP_ERR_TOO_BIG. */
const MAX_OPTION_LENGTH = 65536;
/** Beyond this an option's payload is not even skipped: the connection is dropped. */
const MAX_OPTION_SKIP = 16 * 1024 * 1024;
/** NBD strings (export names, context queries) are at most 4096 bytes. */
const MAX_STRING = 4096;
const BASE_ALLOCATION_ID = 1;
/** FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO: every flag this specification version defines. */
const KNOWN_COMMAND_FLAGS =
  NBD.CMD_FLAG_FUA |
  NBD.CMD_FLAG_NO_HOLE |
  NBD.CMD_FLAG_DF |
  NBD.CMD_FLAG_REQ_ONE |
  NBD.CMD_FLAG_FAST_ZERO;
/** sun_path holds 108 bytes including the terminating NUL. */
const MAX_UNIX_PATH = 107;

/** The flags every read-only export advertises. Flush is a no-op on a read-only export. */
const EXPORT_FLAGS =
  NBD.FLAG_HAS_FLAGS |
  NBD.FLAG_READ_ONLY |
  NBD.FLAG_SEND_FLUSH |
  NBD.FLAG_SEND_DF |
  NBD.FLAG_CAN_MULTI_CONN;

/** Requests a server has read and not answered yet (see {@link NbdServer.pendingRequests}). */
export interface NbdPendingRequests {
  /** Reads and block status requests waiting for their source. */
  count: number;
  /** How long the oldest of them has waited, in ms (0 when none waits). */
  oldestMs: number;
}

/** Ends a connection without an error reply: the peer broke the protocol. */
class Hangup extends Error {}

function validate(o: NbdServerOptions): Readonly<ResolvedServerOptions> {
  const r: ResolvedServerOptions = {
    maxRequestBytes: o.maxRequestBytes ?? 32 * 1024 * 1024,
    maxInFlightPerConnection: o.maxInFlightPerConnection ?? 8,
    handshakeTimeoutMs: o.handshakeTimeoutMs ?? 30_000,
    onSourceError: o.onSourceError,
  };
  const pow2 = (v: number): boolean => Number.isInteger(v) && v > 0 && (v & (v - 1)) === 0;
  if (!pow2(r.maxRequestBytes) || r.maxRequestBytes < 4096 || r.maxRequestBytes > 0x40000000) {
    throw new LifeboatError(
      'LB_NBD_INVALID_OPTIONS',
      `NbdServer maxRequestBytes must be a power of two from 4096 to 1 GiB, not ${r.maxRequestBytes}.`,
    );
  }
  if (!Number.isInteger(r.maxInFlightPerConnection) || r.maxInFlightPerConnection < 1) {
    throw new LifeboatError(
      'LB_NBD_INVALID_OPTIONS',
      'NbdServer maxInFlightPerConnection must be a positive integer.',
    );
  }
  if (!(r.handshakeTimeoutMs > 0)) {
    throw new LifeboatError(
      'LB_NBD_INVALID_OPTIONS',
      'NbdServer handshakeTimeoutMs must be positive.',
    );
  }
  return Object.freeze(r);
}

/**
 * A read-only NBD server (fixed newstyle; NBD_OPT_GO, INFO, LIST, EXPORT_NAME,
 * STRUCTURED_REPLY, LIST/SET_META_CONTEXT with `base:allocation`) for several named exports and
 * any number of connections. A source that fails a read gives EIO for that request, never
 * zeros. Malformed client input is answered with the NBD error the specification asks for, or
 * ends that connection; it never takes the server down.
 */
export class NbdServer {
  private readonly opts: Readonly<ResolvedServerOptions>;
  private readonly exports = new Map<string, ExportEntry>();
  private readonly sockets = new Set<Socket>();
  /** Start times of the requests waiting for their source, over every connection. */
  private readonly pending = new Set<{ since: number }>();
  private server: Server | undefined;
  private bound: NbdTarget | undefined;

  constructor(options: NbdServerOptions = {}) {
    this.opts = validate(options);
  }

  /** Adds (or replaces) a named export; connections already attached keep their source. */
  addExport(name: string, source: NbdExportSource, options: NbdExportOptions = {}): void {
    if (Buffer.byteLength(name) > MAX_STRING) {
      throw new LifeboatError(
        'LB_NBD_INVALID_OPTIONS',
        'An NBD export name is at most 4096 bytes.',
      );
    }
    if (!Number.isSafeInteger(source.size) || source.size < 0) {
      throw new LifeboatError(
        'LB_NBD_INVALID_OPTIONS',
        `Export '${name}' has an invalid size ${source.size}.`,
      );
    }
    this.exports.set(name, { name, source, description: options.description ?? '' });
  }

  /** Removes an export from listings and new connections. */
  removeExport(name: string): boolean {
    return this.exports.delete(name);
  }

  /** Names of the current exports. */
  exportNames(): string[] {
    return [...this.exports.keys()];
  }

  /** Open client connections. */
  get connections(): number {
    return this.sockets.size;
  }

  /**
   * Requests read from clients whose source has not answered yet, and the age of the oldest:
   * a guest whose disk I/O times out while this is 0 is not waiting for this server.
   */
  get pendingRequests(): NbdPendingRequests {
    const now = Date.now();
    let oldest = now;
    for (const p of this.pending) oldest = Math.min(oldest, p.since);
    return { count: this.pending.size, oldestMs: now - oldest };
  }

  /** Where the server listens (after {@link listen}); a TCP port 0 is resolved to the real one. */
  get address(): NbdTarget {
    if (this.bound === undefined) {
      throw new LifeboatError('LB_NBD_INVALID_OPTIONS', 'The NBD server is not listening yet.');
    }
    return this.bound;
  }

  /** Starts listening on a UNIX socket or a TCP address (use port 0 for an ephemeral port). */
  async listen(target: NbdTarget): Promise<NbdTarget> {
    if (this.server !== undefined) {
      throw new LifeboatError('LB_NBD_INVALID_OPTIONS', 'The NBD server is already listening.');
    }
    if ('path' in target && Buffer.byteLength(target.path) > MAX_UNIX_PATH) {
      // Node.js would silently truncate the path and listen somewhere else.
      throw new LifeboatError(
        'LB_NBD_LISTEN',
        `The NBD socket path is longer than ${MAX_UNIX_PATH} bytes (a UNIX socket limit): ${target.path}. Use a shorter directory.`,
        { details: { path: target.path } },
      );
    }
    const server = createServer((s) => this.accept(s));
    this.server = server;
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err) => {
        this.server = undefined;
        reject(
          new LifeboatError(
            'LB_NBD_LISTEN',
            `The NBD server could not listen on ${'path' in target ? target.path : `${target.host}:${target.port}`}: ${err.message}. Choose another address or free it.`,
            { cause: err },
          ),
        );
      });
      if ('path' in target) server.listen(target.path, resolve);
      else server.listen(target.port, target.host, resolve);
    });
    server.on('error', () => undefined);
    if ('path' in target) this.bound = { path: target.path };
    else this.bound = { host: target.host, port: (server.address() as AddressInfo).port };
    return this.bound;
  }

  /** Stops listening and drops every connection. */
  async close(): Promise<void> {
    const server = this.server;
    this.server = undefined;
    for (const s of this.sockets) s.destroy();
    if (server !== undefined) await new Promise<void>((r) => server.close(() => r()));
  }

  private accept(socket: Socket): void {
    this.sockets.add(socket);
    socket.setNoDelay(true);
    socket.on('error', () => undefined);
    socket.once('close', () => this.sockets.delete(socket));
    const conn = new Connection(
      socket,
      this.opts,
      (name) => this.exports.get(name),
      () => [...this.exports.values()],
      this.pending,
    );
    conn.run().catch(() => socket.destroy());
  }
}

/** One client connection: option haggling, then transmission. */
class Connection {
  private readonly reader: SocketReader;
  private structured = false;
  private noZeroes = false;
  /** Export name the meta contexts were negotiated for, and whether base:allocation was chosen. */
  private meta: { exportName: string; baseAllocation: boolean } | undefined;
  private inFlight = 0;
  private readonly slotWaiters: (() => void)[] = [];
  private readonly handlers = new Set<Promise<void>>();

  constructor(
    private readonly socket: Socket,
    private readonly opts: Readonly<ResolvedServerOptions>,
    private readonly lookup: (name: string) => ExportEntry | undefined,
    private readonly all: () => ExportEntry[],
    private readonly pending: Set<{ since: number }>,
  ) {
    this.reader = new SocketReader(socket);
  }

  async run(): Promise<void> {
    const timer = setTimeout(() => this.socket.destroy(), this.opts.handshakeTimeoutMs);
    let entry: ExportEntry | 'abort' | undefined;
    try {
      entry = await this.negotiate();
    } catch {
      entry = undefined;
    } finally {
      clearTimeout(timer);
    }
    if (entry === 'abort') {
      this.endGently();
      return;
    }
    if (entry === undefined) {
      this.socket.destroy();
      return;
    }
    try {
      await this.transmit(entry);
    } catch {
      // A broken or vanished client ends only its own connection, at once.
      this.socket.destroy();
    }
    await Promise.allSettled([...this.handlers]);
    this.endGently();
  }

  /** After NBD_OPT_ABORT or NBD_CMD_DISC: let the last replies reach the client, then close. */
  private endGently(): void {
    const linger = setTimeout(() => this.socket.destroy(), 5000);
    this.socket.once('close', () => clearTimeout(linger));
    this.socket.end();
  }

  // ---- negotiation -----------------------------------------------------------------------

  private async negotiate(): Promise<ExportEntry | 'abort' | undefined> {
    const hello = Buffer.alloc(18);
    hello.writeBigUInt64BE(NBD.INIT_MAGIC, 0);
    hello.writeBigUInt64BE(NBD.OPTS_MAGIC, 8);
    hello.writeUInt16BE(NBD.FLAG_FIXED_NEWSTYLE | NBD.FLAG_NO_ZEROES, 16);
    this.socket.write(hello);
    const cflags = (await this.reader.read(4)).readUInt32BE(0);
    // Unknown client flags, or a client that cannot do fixed newstyle: the spec says hang up.
    if ((cflags & ~(NBD.FLAG_C_FIXED_NEWSTYLE | NBD.FLAG_C_NO_ZEROES)) !== 0) return undefined;
    if ((cflags & NBD.FLAG_C_FIXED_NEWSTYLE) === 0) return undefined;
    this.noZeroes = (cflags & NBD.FLAG_C_NO_ZEROES) !== 0;
    for (;;) {
      const h = await this.reader.read(16);
      if (h.readBigUInt64BE(0) !== NBD.OPTS_MAGIC) return undefined;
      const opt = h.readUInt32BE(8);
      const length = h.readUInt32BE(12);
      if (length > MAX_OPTION_LENGTH) {
        if (length > MAX_OPTION_SKIP) return undefined;
        await this.reader.skip(length);
        this.reply(opt, NBD.REP_ERR_TOO_BIG, Buffer.from('option too long'));
        continue;
      }
      const data = await this.reader.read(length);
      const done = await this.option(opt, data);
      if (done !== undefined) return done;
    }
  }

  private reply(opt: number, type: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.alloc(20);
    h.writeBigUInt64BE(NBD.REP_MAGIC, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(type, 12);
    h.writeUInt32BE(data.length, 16);
    this.socket.write(Buffer.concat([h, data]));
  }

  private async option(opt: number, data: Buffer): Promise<ExportEntry | 'abort' | undefined> {
    switch (opt) {
      case NBD.OPT_EXPORT_NAME: {
        const e = this.lookup(data.toString('utf8'));
        // This option has no error reply: the only way to refuse is to hang up.
        if (e === undefined) return 'abort';
        const r = Buffer.alloc(this.noZeroes ? 10 : 134);
        r.writeBigUInt64BE(BigInt(e.source.size), 0);
        r.writeUInt16BE(EXPORT_FLAGS, 8);
        this.socket.write(r);
        return e;
      }
      case NBD.OPT_ABORT:
        this.reply(opt, NBD.REP_ACK);
        return 'abort';
      case NBD.OPT_LIST:
        if (data.length !== 0)
          return this.refuse(opt, NBD.REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
        for (const e of this.all()) {
          const name = Buffer.from(e.name, 'utf8');
          const len = Buffer.alloc(4);
          len.writeUInt32BE(name.length);
          this.reply(
            opt,
            NBD.REP_SERVER,
            Buffer.concat([len, name, Buffer.from(e.description, 'utf8')]),
          );
        }
        this.reply(opt, NBD.REP_ACK);
        return undefined;
      case NBD.OPT_INFO:
      case NBD.OPT_GO:
        return this.infoOrGo(opt, data);
      case NBD.OPT_STRUCTURED_REPLY:
        if (data.length !== 0) return this.refuse(opt, NBD.REP_ERR_INVALID, 'takes no data');
        if (this.structured) return this.refuse(opt, NBD.REP_ERR_INVALID, 'already negotiated');
        this.structured = true;
        this.reply(opt, NBD.REP_ACK);
        return undefined;
      case NBD.OPT_LIST_META_CONTEXT:
      case NBD.OPT_SET_META_CONTEXT:
        return this.metaContext(opt, data);
      default:
        // STARTTLS, EXTENDED_HEADERS, PEEK_EXPORT and anything unknown.
        return this.refuse(opt, NBD.REP_ERR_UNSUP, 'option not supported');
    }
  }

  private refuse(opt: number, type: number, message: string): undefined {
    this.reply(opt, type, Buffer.from(message, 'utf8'));
    return undefined;
  }

  private infoOrGo(opt: number, data: Buffer): ExportEntry | undefined {
    const p = new Parser(data);
    const name = p.string();
    const n = p.u16();
    const requests: number[] = [];
    for (let i = 0; n !== undefined && i < n; i++) {
      const t = p.u16();
      if (t === undefined) break;
      requests.push(t);
    }
    if (name === undefined || n === undefined || requests.length !== n || !p.atEnd()) {
      return this.refuse(opt, NBD.REP_ERR_INVALID, 'malformed request');
    }
    const e = this.lookup(name);
    if (e === undefined) return this.refuse(opt, NBD.REP_ERR_UNKNOWN, `no export named '${name}'`);
    const exp = Buffer.alloc(12);
    exp.writeUInt16BE(NBD.INFO_EXPORT, 0);
    exp.writeBigUInt64BE(BigInt(e.source.size), 2);
    exp.writeUInt16BE(EXPORT_FLAGS, 10);
    this.reply(opt, NBD.REP_INFO, exp);
    // Block sizes are always sent: any client may rely on them, and minimum 1 constrains nobody.
    const bs = Buffer.alloc(14);
    bs.writeUInt16BE(NBD.INFO_BLOCK_SIZE, 0);
    bs.writeUInt32BE(1, 2);
    bs.writeUInt32BE(4096, 6);
    bs.writeUInt32BE(this.opts.maxRequestBytes, 10);
    this.reply(opt, NBD.REP_INFO, bs);
    if (requests.includes(NBD.INFO_NAME)) {
      const b = Buffer.alloc(2);
      b.writeUInt16BE(NBD.INFO_NAME);
      this.reply(opt, NBD.REP_INFO, Buffer.concat([b, Buffer.from(e.name, 'utf8')]));
    }
    if (requests.includes(NBD.INFO_DESCRIPTION) && e.description !== '') {
      const b = Buffer.alloc(2);
      b.writeUInt16BE(NBD.INFO_DESCRIPTION);
      this.reply(opt, NBD.REP_INFO, Buffer.concat([b, Buffer.from(e.description, 'utf8')]));
    }
    this.reply(opt, NBD.REP_ACK);
    if (opt !== NBD.OPT_GO) return undefined;
    if (this.meta !== undefined && this.meta.exportName !== name) this.meta = undefined;
    return e;
  }

  private metaContext(opt: number, data: Buffer): undefined {
    if (!this.structured) {
      return this.refuse(opt, NBD.REP_ERR_INVALID, 'negotiate structured replies first');
    }
    const p = new Parser(data);
    const name = p.string();
    const n = p.u32();
    const queries: string[] = [];
    for (let i = 0; n !== undefined && i < n && i < 1024; i++) {
      const q = p.string();
      if (q === undefined) break;
      queries.push(q);
    }
    if (name === undefined || n === undefined || queries.length !== n || !p.atEnd()) {
      return this.refuse(opt, NBD.REP_ERR_INVALID, 'malformed request');
    }
    if (this.lookup(name) === undefined) {
      return this.refuse(opt, NBD.REP_ERR_UNKNOWN, `no export named '${name}'`);
    }
    const list = opt === NBD.OPT_LIST_META_CONTEXT;
    const matches = queries.some(
      (q) => q === BASE_ALLOCATION || (list && (q === 'base:' || q === 'base')),
    );
    const chosen = matches || (list && queries.length === 0);
    if (chosen) {
      const id = Buffer.alloc(4);
      id.writeUInt32BE(list ? 0 : BASE_ALLOCATION_ID);
      this.reply(opt, NBD.REP_META_CONTEXT, Buffer.concat([id, Buffer.from(BASE_ALLOCATION)]));
    }
    if (!list) this.meta = { exportName: name, baseAllocation: chosen };
    this.reply(opt, NBD.REP_ACK);
    return undefined;
  }

  // ---- transmission ----------------------------------------------------------------------

  private async transmit(entry: ExportEntry): Promise<void> {
    const max = this.opts.maxRequestBytes;
    const baseAllocation = this.meta?.baseAllocation === true;
    for (;;) {
      await this.acquireSlot();
      if (this.socket.writableNeedDrain) await drained(this.socket);
      const h = await this.reader.read(NBD.REQUEST_SIZE);
      if (h.readUInt32BE(0) !== NBD.REQUEST_MAGIC) throw new Hangup('bad request magic');
      const flags = h.readUInt16BE(4);
      const type = h.readUInt16BE(6);
      const cookie = h.subarray(8, 16);
      const offsetBig = h.readBigUInt64BE(16);
      const length = h.readUInt32BE(24);
      const size = entry.source.size;
      const inRange = offsetBig + BigInt(length) <= BigInt(size);
      const offset = Number(offsetBig > BigInt(Number.MAX_SAFE_INTEGER) ? -1n : offsetBig);
      const error = (errno: number, msg: string): void => {
        this.replyError(cookie, errno, msg);
        this.releaseSlot();
      };
      if ((flags & ~KNOWN_COMMAND_FLAGS) !== 0 && type !== NBD.CMD_DISC) {
        // The specification asks for EINVAL on unknown command flags; a write's payload is
        // still consumed so the stream stays in step.
        if (type === NBD.CMD_WRITE) {
          if (length > max) throw new Hangup('oversized write');
          await this.reader.skip(length);
        }
        error(NBD.EINVAL, `unknown command flags 0x${flags.toString(16)}`);
        continue;
      }
      switch (type) {
        case NBD.CMD_DISC:
          this.releaseSlot();
          return;
        case NBD.CMD_WRITE:
          if (length > max) {
            // The payload cannot be trusted to be skipped cheaply: refuse and hang up.
            this.replyError(cookie, NBD.EINVAL, 'write larger than the maximum block size');
            throw new Hangup('oversized write');
          }
          await this.reader.skip(length);
          error(NBD.EPERM, 'export is read-only');
          break;
        case NBD.CMD_TRIM:
        case NBD.CMD_WRITE_ZEROES:
          error(NBD.EPERM, 'export is read-only');
          break;
        case NBD.CMD_FLUSH:
          this.replyOk(cookie);
          this.releaseSlot();
          break;
        case NBD.CMD_READ:
          if (!inRange) error(NBD.EINVAL, 'read past the end of the export');
          else if (length > max) error(NBD.EINVAL, 'read larger than the maximum block size');
          else this.spawn(this.read(entry, cookie, offset, length));
          break;
        case NBD.CMD_BLOCK_STATUS:
          if (!this.structured || !baseAllocation) error(NBD.EINVAL, 'no meta context negotiated');
          else if (!inRange || length === 0) error(NBD.EINVAL, 'block status outside the export');
          else {
            const one = (flags & NBD.CMD_FLAG_REQ_ONE) !== 0;
            this.spawn(this.blockStatus(entry, cookie, offset, length, one));
          }
          break;
        default:
          error(NBD.EINVAL, `unknown command ${type}`);
      }
    }
  }

  private spawn(p: Promise<void>): void {
    const mark = { since: Date.now() };
    this.pending.add(mark);
    const h = p.finally(() => {
      this.pending.delete(mark);
      this.handlers.delete(h);
      this.releaseSlot();
    });
    this.handlers.add(h);
    // Handlers never reject (errors become replies); a write to a dead socket is harmless.
    h.catch(() => this.socket.destroy());
  }

  private async read(
    entry: ExportEntry,
    cookie: Buffer,
    offset: number,
    length: number,
  ): Promise<void> {
    let data: Uint8Array;
    try {
      data = length === 0 ? Buffer.alloc(0) : await entry.source.readAt(offset, length);
      if (data.length !== length) {
        throw new LifeboatError(
          'LB_NBD_SOURCE_SHORT_READ',
          `The export source returned ${data.length} bytes for a read of ${length} at ${offset}.`,
          { details: { offset, length, got: data.length } },
        );
      }
    } catch (err) {
      this.reportSourceError(err, { exportName: entry.name, operation: 'read', offset, length });
      this.replyError(cookie, NBD.EIO, errorText(err));
      return;
    }
    if (!this.structured) {
      this.socket.cork();
      this.socket.write(simpleHeader(cookie, 0));
      this.socket.write(data);
      this.socket.uncork();
      return;
    }
    if (length === 0) {
      this.socket.write(chunkHeader(cookie, NBD.REPLY_FLAG_DONE, NBD.REPLY_TYPE_NONE, 0));
      return;
    }
    const h = Buffer.alloc(NBD.STRUCTURED_REPLY_SIZE + 8);
    chunkHeader(cookie, NBD.REPLY_FLAG_DONE, NBD.REPLY_TYPE_OFFSET_DATA, 8 + length).copy(h);
    h.writeBigUInt64BE(BigInt(offset), NBD.STRUCTURED_REPLY_SIZE);
    // Two writes in one cork: one syscall, and no copy of the data into a joined buffer.
    this.socket.cork();
    this.socket.write(h);
    this.socket.write(data);
    this.socket.uncork();
  }

  private async blockStatus(
    entry: ExportEntry,
    cookie: Buffer,
    offset: number,
    length: number,
    one: boolean,
  ): Promise<void> {
    const end = offset + length;
    const out: number[] = [];
    try {
      let pos = offset;
      const push = (len: number, flags: number): void => {
        out.push(len, flags);
        pos += len;
      };
      const src = entry.source.extents?.(offset, length);
      if (src === undefined) push(length, 0);
      else {
        for await (const e of src as AsyncIterable<NbdSourceExtent>) {
          const s = Math.max(e.offset, offset);
          const t = Math.min(e.offset + e.length, end);
          if (t <= pos) continue;
          // A gap in the source's map is reported as data: the safe answer for a reader.
          if (s > pos) push(s - pos, 0);
          const hole = e.hole ?? e.zero;
          push(t - Math.max(s, pos), (hole ? NBD.STATE_HOLE : 0) | (e.zero ? NBD.STATE_ZERO : 0));
          if (pos >= end || (one && out.length >= 2) || out.length >= 2 * 65536) break;
        }
        if (out.length === 0) push(length, 0);
      }
    } catch (err) {
      this.reportSourceError(err, {
        exportName: entry.name,
        operation: 'block-status',
        offset,
        length,
      });
      this.replyError(cookie, NBD.EIO, errorText(err));
      return;
    }
    const n = one ? 2 : out.length;
    const payload = Buffer.alloc(4 + n * 4);
    payload.writeUInt32BE(BASE_ALLOCATION_ID, 0);
    for (let i = 0; i < n; i++) payload.writeUInt32BE(out[i] as number, 4 + i * 4);
    const h = chunkHeader(cookie, NBD.REPLY_FLAG_DONE, NBD.REPLY_TYPE_BLOCK_STATUS, payload.length);
    this.socket.write(Buffer.concat([h, payload]));
  }

  /**
   * Reports a source failure, unless the client is already gone: a read that fails because the
   * server is being shut down (the store closed under it) is not a fault of the point.
   */
  private reportSourceError(err: unknown, where: NbdSourceErrorContext): void {
    if (!this.socket.destroyed) this.opts.onSourceError?.(err, where);
  }

  private replyOk(cookie: Buffer): void {
    this.socket.write(simpleHeader(cookie, 0));
  }

  private replyError(cookie: Buffer, errno: number, message: string): void {
    if (!this.structured) {
      this.socket.write(simpleHeader(cookie, errno));
      return;
    }
    const msg = Buffer.from(message, 'utf8').subarray(0, 4096);
    const p = Buffer.alloc(6);
    p.writeUInt32BE(errno, 0);
    p.writeUInt16BE(msg.length, 4);
    const h = chunkHeader(cookie, NBD.REPLY_FLAG_DONE, NBD.REPLY_TYPE_ERROR, 6 + msg.length);
    this.socket.write(Buffer.concat([h, p, msg]));
  }

  private async acquireSlot(): Promise<void> {
    while (this.inFlight >= this.opts.maxInFlightPerConnection) {
      await new Promise<void>((r) => this.slotWaiters.push(r));
    }
    this.inFlight++;
  }

  private releaseSlot(): void {
    this.inFlight--;
    this.slotWaiters.shift()?.();
  }
}

function errorText(err: unknown): string {
  if (err instanceof LifeboatError) return `${err.code}: ${err.message}`;
  return err instanceof Error ? err.message : String(err);
}

function simpleHeader(cookie: Buffer, errno: number): Buffer {
  const h = Buffer.alloc(NBD.SIMPLE_REPLY_SIZE);
  h.writeUInt32BE(NBD.SIMPLE_REPLY_MAGIC, 0);
  h.writeUInt32BE(errno, 4);
  cookie.copy(h, 8);
  return h;
}

function chunkHeader(cookie: Buffer, flags: number, type: number, length: number): Buffer {
  const h = Buffer.alloc(NBD.STRUCTURED_REPLY_SIZE);
  h.writeUInt32BE(NBD.STRUCTURED_REPLY_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  cookie.copy(h, 8);
  h.writeUInt32BE(length, 16);
  return h;
}

function drained(socket: Socket): Promise<void> {
  return new Promise<void>((resolve) => {
    const done = (): void => {
      socket.off('drain', done);
      socket.off('close', done);
      resolve();
    };
    socket.on('drain', done);
    socket.on('close', done);
  });
}

/** Bounds-checked reader of option payloads: every method returns undefined when short. */
class Parser {
  private pos = 0;
  constructor(private readonly b: Buffer) {}
  u16(): number | undefined {
    if (this.pos + 2 > this.b.length) return undefined;
    const v = this.b.readUInt16BE(this.pos);
    this.pos += 2;
    return v;
  }
  u32(): number | undefined {
    if (this.pos + 4 > this.b.length) return undefined;
    const v = this.b.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }
  string(): string | undefined {
    const n = this.u32();
    if (n === undefined || n > MAX_STRING || this.pos + n > this.b.length) return undefined;
    const s = this.b.subarray(this.pos, this.pos + n).toString('utf8');
    this.pos += n;
    return s;
  }
  atEnd(): boolean {
    return this.pos === this.b.length;
  }
}
