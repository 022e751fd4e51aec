import { EventEmitter } from 'node:events';
import { constants } from 'node:fs';
import { mkdir, open, readdir, rm, stat } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import {
  DIRECT_IO_ALIGN,
  LifeboatError,
  O_DIRECT,
  crc32Combine,
  directIoRefused,
  frameBufferPool,
  knownCrc32,
  pageAlignedShared,
  writeFully,
} from '@lifeboat/protocol';

/** Kinds of journal records (the sequenced frame types). */
export type JournalRecordKind = 'data' | 'zero' | 'trim' | 'resize' | 'cut' | 'discard';

const KIND_CODE: Record<JournalRecordKind, number> = {
  data: 1,
  zero: 2,
  trim: 3,
  resize: 4,
  cut: 5,
  discard: 6,
};
const CODE_KIND: Record<number, JournalRecordKind> = {
  1: 'data',
  2: 'zero',
  3: 'trim',
  4: 'resize',
  5: 'cut',
  6: 'discard',
};
const RECORD_MAGIC = 0x4c424a31; // "LBJ1"
/** Fixed bytes before a record's names and body. */
export const RECORD_HEADER_BYTES = 40;
const SEGMENT_RE = /^seg-(\d{12})\.lbj$/;
/** Bytes of the page-aligned buffer direct writes go out from (a batch larger goes in several). */
const STAGING_BYTES = 8 * 1024 * 1024;

/** What is appended: one sequenced frame of one machine, with the disk named (not indexed). */
export interface JournalInput {
  kind: JournalRecordKind;
  machine: string;
  /** Disk name; empty for cuts. */
  disk: string;
  seq: number;
  /** data/zero/trim: offset; resize: new size; cut: the agent's time (ms). */
  a: number;
  /** zero/trim: length; otherwise 0. */
  b: number;
  /** data: the bytes; cut: JSON metadata; otherwise empty. */
  body: Buffer;
  /**
   * Keep a data body in memory after its fsync (within `holdBytes`) for a reader expected to
   * ask for it soon; otherwise it is read back from the segment. @default false
   */
  hold?: boolean;
  /**
   * The body's buffer came from `frameBufferPool` (a decoded frame that owns its buffer) and
   * nobody else reads it: once durable and not held, the journal detaches it and gives it
   * back to the pool, so the next frame reuses its memory. @default false
   */
  recycle?: boolean;
}

/** A durable record: where its body lives, so it can be read back without keeping it in memory. */
export interface JournalRecord {
  kind: JournalRecordKind;
  machine: string;
  disk: string;
  seq: number;
  a: number;
  b: number;
  segment: number;
  bodyPosition: number;
  bodyLength: number;
  /** Bytes the record takes in the journal. */
  recordBytes: number;
}

/** Options for {@link Journal.open}. */
export interface JournalOptions {
  /** Directory of the journal's segment files (created if missing). */
  dir: string;
  /** Journal size limit in bytes; `full` is true above it. @default 1073741824 */
  maxBytes?: number;
  /** A segment is closed and a new one started above this size. @default 67108864 */
  segmentBytes?: number;
  /** Skip fsync (benchmarks of the fsync cost only; never in production). @default false */
  noSync?: boolean;
  /**
   * Write segments with direct I/O (O_DIRECT), past the page cache, where the file system
   * allows it (otherwise, or with false, through the page cache). A segment then ends in zero
   * padding up to the next 4 KiB, which a scan tells from damage. @default true
   */
  direct?: boolean;
  /**
   * Data bodies kept in memory after their fsync, up to this many bytes, so the replicator
   * applies them without reading them back from the segment (0: always read back). The
   * bytes are the same the journal holds; a record applied again, or replayed after a
   * restart, is read from disk. @default 16777216
   */
  holdBytes?: number;
}

/** Result of {@link Journal.open}: the journal and every record found on disk, in append order. */
export interface JournalOpenResult {
  journal: Journal;
  records: JournalRecord[];
  /** Segments whose middle was damaged (not a torn tail): machines with records there need a resync. */
  corruptSegments: Array<{ segment: number; position: number }>;
}

interface Segment {
  id: number;
  path: string;
  bytes: number;
  /** Highest sequence number per machine in this segment. */
  machines: Map<string, number>;
}

interface Queued {
  parts: Buffer[];
  body: Buffer;
  hold: boolean;
  recycle: boolean;
  bytes: number;
  record: Omit<JournalRecord, 'segment' | 'bodyPosition'>;
  bodyOffset: number;
  resolve: (r: JournalRecord) => void;
  reject: (e: unknown) => void;
}

/**
 * The process server's cache journal: an append-only log of frames in segment files shared by
 * all machines. Appends are batched: every append that arrives while a write+fdatasync is in
 * flight goes into the next one (group commit across sessions), and an append's promise
 * resolves only after its bytes are synced — the moment the server may acknowledge it. A
 * segment is deleted once every record in it is released (committed to the store or dropped).
 * Events: `space` when usage drops below the limit, `flushed` after each synced batch.
 */
export class Journal extends EventEmitter {
  private readonly segments = new Map<number, Segment>();
  private active!: Segment;
  private fh!: FileHandle;
  private queue: Queued[] = [];
  private queuedBytes = 0;
  private flushing: Promise<void> | undefined;
  private rotating: Promise<void> | undefined;
  private broken: LifeboatError | undefined;
  private readonly released = new Map<string, number>();
  private readonly readers = new Map<number, Promise<FileHandle>>();
  private closed = false;
  /** Bodies of durable data records still in memory (see `holdBytes`), with their weight. */
  private readonly held = new Map<JournalRecord, { body: Buffer; weight: number }>();
  private heldBytes = 0;
  /** Records appended, and fsyncs done: appends/fsyncs is the group-commit factor. */
  readonly counters = { appends: 0, syncs: 0, bytes: 0 };
  /** Direct writes: the page-aligned buffer they go out from, once the first segment takes them. */
  private staging: Buffer | undefined;
  /**
   * With direct writes, the active segment's last partial 4 KiB block (its first `tailBytes`
   * bytes are in `staging`): the next batch rewrites that block with its own bytes after them.
   */
  private tailBytes = 0;

  private constructor(
    private readonly dir: string,
    /** Size limit in bytes. */
    readonly maxBytes: number,
    private readonly segmentBytes: number,
    private readonly noSync: boolean,
    private readonly holdBytes: number,
    /** Direct writes wanted and not yet refused by the file system. */
    private direct: boolean,
  ) {
    super();
  }

  /** True while segments are written with direct I/O (tests, status). */
  get directIo(): boolean {
    return this.direct;
  }

  /** Opens (or creates) the journal, scans every segment and truncates a torn tail. */
  static async open(options: JournalOptions): Promise<JournalOpenResult> {
    const maxBytes = options.maxBytes ?? 1024 * 1024 * 1024;
    const segmentBytes = options.segmentBytes ?? 64 * 1024 * 1024;
    await mkdir(options.dir, { recursive: true });
    const j = new Journal(
      options.dir,
      maxBytes,
      Math.min(segmentBytes, Math.max(1024 * 1024, Math.floor(maxBytes / 4))),
      options.noSync ?? false,
      Math.max(0, options.holdBytes ?? 16 * 1024 * 1024),
      (options.direct ?? true) && O_DIRECT !== undefined,
    );
    const ids = (await readdir(options.dir))
      .map((n) => SEGMENT_RE.exec(n)?.[1])
      .filter((x): x is string => x !== undefined)
      .map(Number)
      .sort((a, b) => a - b);
    const records: JournalRecord[] = [];
    const corruptSegments: Array<{ segment: number; position: number }> = [];
    for (const [i, id] of ids.entries()) {
      const path = j.segmentPath(id);
      const seg: Segment = { id, path, bytes: 0, machines: new Map() };
      const fh = await open(path, 'r+');
      try {
        const { size } = await fh.stat();
        const valid = await scanSegment(fh, id, size, (r) => {
          records.push(r);
          seg.machines.set(r.machine, Math.max(seg.machines.get(r.machine) ?? 0, r.seq));
        });
        if (valid < size) {
          // Only the newest segment can end in a torn write (crash mid-append); elsewhere it is
          // damage, unless it is the zero padding a direct write leaves after the last record.
          if (i !== ids.length - 1 && !(await isPadding(fh, valid, size)))
            corruptSegments.push({ segment: id, position: valid });
          await fh.truncate(valid);
          await fh.sync();
        }
        seg.bytes = valid;
      } finally {
        await fh.close();
      }
      j.segments.set(id, seg);
    }
    await j.startSegment((ids.at(-1) ?? 0) + 1);
    return { journal: j, records, corruptSegments };
  }

  /** Bytes used on disk plus bytes waiting to be written. */
  get usedBytes(): number {
    let n = this.queuedBytes;
    for (const s of this.segments.values()) n += s.bytes;
    return n;
  }

  /** Bytes appended and not yet written and synced. */
  get pendingBytes(): number {
    return this.queuedBytes;
  }

  /** Number of segment files. */
  get segmentCount(): number {
    return this.segments.size;
  }

  /** True when usage is at or above the limit: stop reading from agents until `space`. */
  get full(): boolean {
    return this.usedBytes >= this.maxBytes;
  }

  /** The I/O error that stopped the journal, if any. */
  get failure(): LifeboatError | undefined {
    return this.broken;
  }

  /** Appends a record; resolves once it is durable on disk. */
  append(input: JournalInput): Promise<JournalRecord> {
    if (this.broken) return Promise.reject(this.broken);
    if (this.closed)
      return Promise.reject(
        new LifeboatError(
          'LB_PS_SHUTTING_DOWN',
          'The journal is closed; the process server is stopping.',
        ),
      );
    const machine = Buffer.from(input.machine, 'utf8');
    const disk = Buffer.from(input.disk, 'utf8');
    const header = Buffer.alloc(RECORD_HEADER_BYTES);
    const total = RECORD_HEADER_BYTES + machine.length + disk.length + input.body.length;
    header.writeUInt32BE(RECORD_MAGIC, 0);
    header.writeUInt32BE(total, 4);
    header.writeUInt8(KIND_CODE[input.kind], 12);
    header.writeUInt8(machine.length, 13);
    header.writeUInt8(disk.length, 14);
    header.writeBigUInt64BE(BigInt(input.seq), 16);
    header.writeBigUInt64BE(BigInt(input.a), 24);
    header.writeBigUInt64BE(BigInt(input.b), 32);
    let crc = crc32(header.subarray(12));
    crc = crc32(machine, crc);
    crc = crc32(disk, crc);
    // The frame decoder already ran over a DATA frame's bytes: combine instead of a second pass.
    const bodyCrc = input.body.length > 0 ? knownCrc32(input.body) : undefined;
    crc =
      bodyCrc === undefined
        ? crc32(input.body, crc)
        : crc32Combine(crc, bodyCrc, input.body.length);
    header.writeUInt32BE(crc, 8);
    return new Promise((resolve, reject) => {
      this.queue.push({
        parts: [header, machine, disk, input.body],
        body: input.body,
        hold: input.hold === true,
        recycle: input.recycle === true && input.body.length > 0,
        bytes: total,
        bodyOffset: RECORD_HEADER_BYTES + machine.length + disk.length,
        record: {
          kind: input.kind,
          machine: input.machine,
          disk: input.disk,
          seq: input.seq,
          a: input.a,
          b: input.b,
          bodyLength: input.body.length,
          recordBytes: total,
        },
        resolve,
        reject,
      });
      this.queuedBytes += total;
      this.kick();
    });
  }

  /** Resolves when everything appended so far is durable (or failed). */
  async sync(): Promise<void> {
    while (this.flushing) await this.flushing;
  }

  /** Bytes of bodies held in memory after their fsync (see `holdBytes`). */
  get heldBodyBytes(): number {
    return this.heldBytes;
  }

  /**
   * A record's body (data bytes or cut metadata): the bytes still held in memory the first
   * time it is asked for (they are then let go), read back from the segment otherwise.
   */
  async readBody(r: JournalRecord): Promise<Buffer> {
    if (r.bodyLength === 0) return Buffer.alloc(0);
    const h = this.held.get(r);
    if (h !== undefined) {
      this.held.delete(r);
      this.heldBytes -= h.weight;
      return h.body;
    }
    let p = this.readers.get(r.segment);
    if (!p) {
      p = open(this.segmentPath(r.segment), 'r');
      this.readers.set(r.segment, p);
    }
    const fh = await p;
    // From the pool: a data body goes to a store worker, which hands the buffer back.
    const buf = frameBufferPool.take(r.bodyLength);
    // The whole record, header and names too, so its CRC is checked: a body the disk changed
    // since it was acknowledged must not become a recovery point's data.
    const head = Buffer.allocUnsafe(r.recordBytes - r.bodyLength);
    const start = r.bodyPosition - head.length;
    // Through the page cache, even after direct writes: a replay of a backlog reads a segment
    // in order, and the kernel's read-ahead keeps that fast (direct reads, one body at a time,
    // waited on the disk for each: one machine's backlog drained at 69 MB/s instead of 83-92).
    const { bytesRead } = await fh.readv([head, buf], start);
    const damage = (what: string): LifeboatError =>
      new LifeboatError(
        'LB_PS_JOURNAL_CORRUPT',
        `Journal segment ${r.segment} ${what} at record ${r.seq} of machine ${r.machine}; the machine must resync. Check the journal's disk.`,
        { details: { segment: r.segment, seq: r.seq, machine: r.machine, position: start } },
      );
    if (bytesRead !== head.length + r.bodyLength) throw damage('is shorter than a record it holds');
    if (
      head.readUInt32BE(0) !== RECORD_MAGIC ||
      head.readUInt32BE(4) !== r.recordBytes ||
      !recordCrcMatches(head, buf)
    ) {
      throw damage('fails its CRC-32 check');
    }
    return buf;
  }

  /**
   * Declares every record of `machine` up to `seq` no longer needed (committed to the store, or
   * dropped for a resync); segments holding only such records are deleted.
   */
  async release(machine: string, seq: number): Promise<void> {
    // Bodies of released records are not needed any more (a dropped backlog, a resent frame).
    const upTo = Math.max(seq, this.released.get(machine) ?? 0);
    for (const [r, h] of this.held) {
      if (r.machine === machine && r.seq <= upTo) {
        this.held.delete(r);
        this.heldBytes -= h.weight;
      }
    }
    if ((this.released.get(machine) ?? 0) >= seq) return;
    this.released.set(machine, seq);
    for (const seg of [...this.segments.values()]) {
      if (seg === this.active) continue;
      let free = true;
      for (const [m, max] of seg.machines) {
        if ((this.released.get(m) ?? 0) < max) {
          free = false;
          break;
        }
      }
      if (!free) continue;
      this.segments.delete(seg.id);
      const reader = this.readers.get(seg.id);
      this.readers.delete(seg.id);
      if (reader) await reader.then((fh) => fh.close()).catch(() => undefined);
      await rm(seg.path, { force: true });
    }
    // A nearly empty active segment full of released records would pin space forever: rotate it.
    if (
      this.active.bytes > 0 &&
      !this.flushing &&
      !this.rotating &&
      [...this.active.machines].every(([m, max]) => (this.released.get(m) ?? 0) >= max)
    ) {
      this.rotating = this.rotate().finally(() => (this.rotating = undefined));
      await this.rotating;
    }
    // Also when it was not full at the start: appends may have filled it while we deleted.
    if (!this.full) this.emit('space');
  }

  /** Flushes what is queued and closes files. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.sync();
    this.held.clear();
    this.heldBytes = 0;
    await this.fh.close().catch(() => undefined);
    for (const p of this.readers.values()) await p.then((fh) => fh.close()).catch(() => undefined);
    this.readers.clear();
  }

  private segmentPath(id: number): string {
    return join(this.dir, `seg-${String(id).padStart(12, '0')}.lbj`);
  }

  private async startSegment(id: number): Promise<void> {
    const seg: Segment = { id, path: this.segmentPath(id), bytes: 0, machines: new Map() };
    this.fh = await this.openSegmentFile(seg.path);
    this.tailBytes = 0;
    if (!this.noSync) await syncDir(this.dir);
    this.segments.set(id, seg);
    this.active = seg;
  }

  private async rotate(): Promise<void> {
    const old = this.active;
    const oldFh = this.fh;
    await this.startSegment(old.id + 1);
    await oldFh.close();
    if (
      old.bytes === 0 ||
      [...old.machines].every(([m, max]) => (this.released.get(m) ?? 0) >= max)
    ) {
      this.segments.delete(old.id);
      await rm(old.path, { force: true });
    }
  }

  /** A new segment file for appending: direct I/O where it is wanted and the file system takes it. */
  private async openSegmentFile(path: string): Promise<FileHandle> {
    if (this.direct && O_DIRECT !== undefined) {
      try {
        const fh = await open(
          path,
          constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC | O_DIRECT,
          0o666,
        );
        this.staging ??= Buffer.from(pageAlignedShared(STAGING_BYTES));
        return fh;
      } catch (err) {
        if (!directIoRefused(err)) throw err;
        this.direct = false; // a file system without direct I/O (EINVAL at open)
      }
    }
    return open(path, 'w');
  }

  /** Writes a batch's parts at `at`, the active segment's end. */
  private async write(parts: Buffer[], at: number): Promise<void> {
    if (this.direct) {
      try {
        await this.writeDirect(parts, at);
        return;
      } catch (err) {
        if (!directIoRefused(err)) throw err;
        // Direct I/O refused at the first write: the page cache from here on, for this segment
        // too (nothing of this batch is acknowledged yet; it is written again in full).
        this.direct = false;
        await this.fh.close().catch(() => undefined);
        this.fh = await open(this.active.path, 'r+');
      }
    }
    await this.fh.writev(parts, at);
  }

  /**
   * Direct I/O wants whole aligned blocks: the parts are copied into the page-aligned staging
   * buffer behind the segment's last partial block, written a buffer at a time, and the last
   * block is padded with zeros (the next batch writes that block again, its old bytes the same).
   */
  private async writeDirect(parts: Buffer[], at: number): Promise<void> {
    const staging = this.staging as Buffer;
    const cap = staging.length;
    let base = at - this.tailBytes;
    let fill = this.tailBytes;
    for (const p of parts) {
      let off = 0;
      while (off < p.length) {
        const n = Math.min(p.length - off, cap - fill);
        p.copy(staging, fill, off, off + n);
        fill += n;
        off += n;
        if (fill === cap) {
          await writeFully(this.fh, staging, base, 0, cap);
          base += cap;
          fill = 0;
        }
      }
    }
    const tail = fill % DIRECT_IO_ALIGN;
    if (fill > 0) {
      const padded = fill - tail + (tail > 0 ? DIRECT_IO_ALIGN : 0);
      staging.fill(0, fill, padded);
      await writeFully(this.fh, staging, base, 0, padded);
    }
    // Keep the last partial block at the start for the next batch.
    if (tail > 0) staging.copy(staging, 0, fill - tail, fill);
    this.tailBytes = tail;
  }

  private kick(): void {
    if (this.flushing) return;
    this.flushing = this.flushLoop().finally(() => {
      this.flushing = undefined;
      if (this.queue.length > 0 && !this.broken) this.kick();
    });
  }

  private async flushLoop(): Promise<void> {
    if (this.rotating) await this.rotating;
    while (this.queue.length > 0) {
      const batch = this.queue;
      this.queue = [];
      const seg = this.active;
      let pos = seg.bytes;
      const parts: Buffer[] = [];
      const done: JournalRecord[] = [];
      for (const q of batch) {
        done.push({ ...q.record, segment: seg.id, bodyPosition: pos + q.bodyOffset });
        pos += q.bytes;
        for (const p of q.parts) if (p.length > 0) parts.push(p);
      }
      const bytes = pos - seg.bytes;
      try {
        await this.write(parts, seg.bytes);
        if (!this.noSync) await this.fh.datasync();
      } catch (cause) {
        this.broken = new LifeboatError(
          'LB_PS_JOURNAL_IO',
          `Writing the cache journal in ${this.dir} failed (${(cause as Error).message}); nothing more is acknowledged. Check the disk, then restart the process server.`,
          { cause, details: { dir: this.dir } },
        );
        this.queuedBytes = 0;
        for (const q of [...batch, ...this.queue]) q.reject(this.broken);
        this.queue = [];
        this.emit('failed', this.broken);
        return;
      }
      seg.bytes = pos;
      this.queuedBytes -= bytes;
      this.counters.syncs++;
      this.counters.appends += batch.length;
      this.counters.bytes += bytes;
      for (const r of done)
        seg.machines.set(r.machine, Math.max(seg.machines.get(r.machine) ?? 0, r.seq));
      for (const [i, q] of batch.entries()) {
        const r = done[i]!;
        if (q.hold && r.kind === 'data' && r.bodyLength > 0) {
          // A small body may be a view of a larger buffer (a TLS read): count what it keeps alive.
          const weight = Math.max(q.body.length, q.body.buffer.byteLength);
          if (this.heldBytes + weight <= this.holdBytes) {
            this.held.set(r, { body: q.body, weight });
            this.heldBytes += weight;
            continue;
          }
        }
        if (q.recycle) {
          // Detached first (every view of it, anywhere, reads as empty): no stale reader can
          // see the next frame's bytes through it.
          const ab = q.body.buffer as ArrayBuffer;
          frameBufferPool.give(structuredClone(ab, { transfer: [ab] }));
        }
      }
      for (const [i, q] of batch.entries()) q.resolve(done[i]!);
      this.emit('flushed');
      if (seg.bytes >= this.segmentBytes) await this.rotate();
    }
  }
}

/** Reads records of a segment in order; returns the length of its valid prefix. */
async function scanSegment(
  fh: FileHandle,
  id: number,
  size: number,
  onRecord: (r: JournalRecord) => void,
): Promise<number> {
  let pos = 0;
  const header = Buffer.alloc(RECORD_HEADER_BYTES);
  while (pos + RECORD_HEADER_BYTES <= size) {
    await fh.read(header, 0, RECORD_HEADER_BYTES, pos);
    if (header.readUInt32BE(0) !== RECORD_MAGIC) break;
    const total = header.readUInt32BE(4);
    const mlen = header.readUInt8(13);
    const dlen = header.readUInt8(14);
    const kind = CODE_KIND[header.readUInt8(12)];
    if (kind === undefined || total < RECORD_HEADER_BYTES + mlen + dlen || pos + total > size)
      break;
    const rest = Buffer.allocUnsafe(total - RECORD_HEADER_BYTES);
    await fh.read(rest, 0, rest.length, pos + RECORD_HEADER_BYTES);
    if (!recordCrcMatches(header, rest)) break;
    onRecord({
      kind,
      machine: rest.subarray(0, mlen).toString('utf8'),
      disk: rest.subarray(mlen, mlen + dlen).toString('utf8'),
      seq: Number(header.readBigUInt64BE(16)),
      a: Number(header.readBigUInt64BE(24)),
      b: Number(header.readBigUInt64BE(32)),
      segment: id,
      bodyPosition: pos + RECORD_HEADER_BYTES + mlen + dlen,
      bodyLength: total - RECORD_HEADER_BYTES - mlen - dlen,
      recordBytes: total,
    });
    pos += total;
  }
  return pos;
}

/**
 * True when a record's CRC-32 (in its header) matches its bytes, given as two consecutive
 * pieces: the first starts with the header (the CRC covers it from byte 12 on), the second
 * runs to the record's end.
 */
function recordCrcMatches(first: Buffer, second: Buffer): boolean {
  return crc32(second, crc32(first.subarray(12))) === first.readUInt32BE(8);
}

/**
 * True when [from, size) of a segment is the zero padding a direct write leaves after its last
 * record: less than a block, up to a block boundary, all zeros.
 */
async function isPadding(fh: FileHandle, from: number, size: number): Promise<boolean> {
  if (size % DIRECT_IO_ALIGN !== 0 || size - from >= DIRECT_IO_ALIGN) return false;
  const buf = Buffer.alloc(size - from);
  const { bytesRead } = await fh.read(buf, 0, buf.length, from);
  return bytesRead === buf.length && buf.every((b) => b === 0);
}

async function syncDir(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Size of a journal directory's segment files, for status output without opening the journal. */
export async function journalDiskUsage(dir: string): Promise<number> {
  let n = 0;
  for (const name of await readdir(dir).catch(() => [] as string[])) {
    if (SEGMENT_RE.test(name)) n += (await stat(join(dir, name))).size;
  }
  return n;
}
