import { randomBytes } from 'node:crypto';
import { setImmediate } from 'node:timers/promises';
import type { ObjectBackend, ObjectWriter } from './object-backend.js';
import { encodePackTrailer, packKey } from './object-format.js';
import type { BlobLocation, PackEntry } from './object-format.js';
import type { BlobType, StoreCrypto } from './store-crypto.js';

/**
 * With a backend that writes objects in pieces (`openWrite`), the pack being filled goes to it
 * in pieces of this size as blobs are added, and is made durable early every `SYNC_PIECES`
 * pieces: at the commit only the tail, the trailer and one short fsync are left, instead of a
 * whole pack's write and flush (about 45 ms for 16 MiB on the development VM).
 */
const STREAM_PIECE = 1024 * 1024;
/** Early syncs come every this many pieces. */
const SYNC_PIECES = 4;

/** Extra room of a pack buffer past `packSize`, for the blob that overflows it and the trailer. */
function packSlack(packSize: number, blobBytes: number): number {
  return Math.max(2 * blobBytes, Math.min(packSize, 256 * 1024));
}

/**
 * Pack buffers of this thread that no pack uses any more, for the next pack of any writer.
 * Each write session has its own pack writer, and a process server commits a point every few
 * MiB: when each session allocated its own 16 MiB buffer, a store worker thread allocated
 * four times its data rate in fresh memory, which V8 counts against the thread's external
 * memory limit (a full garbage collection every four 4 MiB cuts, 370 of them in a 30 s
 * benchmark run) and the kernel faulted in page by page. Three spares cover a writer's
 * buffers (two packs in flight and one being filled); what they keep is at most three packs'
 * worth of touched pages per thread.
 */
const spares: Buffer[] = [];
const MAX_SPARES = 3;

/** A buffer of at least `bytes` that nothing refers to, if this thread has one. */
function takeSpare(bytes: number): Buffer | undefined {
  const i = spares.findIndex((b) => b.length >= bytes);
  return i < 0 ? undefined : spares.splice(i, 1)[0];
}

/** Keeps a buffer nothing refers to any more, for {@link takeSpare}; the smallest goes first. */
function giveSpare(buf: Buffer): void {
  if (spares.length < MAX_SPARES) {
    spares.push(buf);
    return;
  }
  let smallest = 0;
  for (let i = 1; i < spares.length; i++) {
    if ((spares[i] as Buffer).length < (spares[smallest] as Buffer).length) smallest = i;
  }
  if ((spares[smallest] as Buffer).length < buf.length) spares[smallest] = buf;
}

/** Whether {@link warmPackBuffer} ran in this thread (it does its work once). */
let warmed = false;

/**
 * Allocates the buffer of a first pack of `packSize` bytes now, as a spare for the first pack
 * writer to take, and touches its pages, a MiB at a time between turns of the event loop, until
 * done or taken. A page's first touch costs the kernel a fault (on the development VM about
 * 0.7 ms per MiB, a host fault each): for a short command such as a changed-extents import that
 * was 17 ms of its copies into the pack buffer. Meant for time the process would idle anyway
 * (while the store's key derives).
 */
export async function warmPackBuffer(packSize: number): Promise<void> {
  if (warmed || !Number.isSafeInteger(packSize) || packSize <= 0) return;
  warmed = true;
  const buf = Buffer.allocUnsafe(packSize + packSlack(packSize, 0));
  giveSpare(buf);
  const step = 1024 * 1024;
  // Once a writer took it, its bytes are the writer's: stop touching them.
  for (let at = 0; at < buf.length && spares.includes(buf); at += step) {
    buf.fill(0, at, Math.min(buf.length, at + step));
    await setImmediate();
  }
}

/** @internal For tests: the spare pack buffers this thread holds. */
export function spareBuffers(): readonly Buffer[] {
  return spares;
}

/** The pack being filled, as far as it went to the backend already. */
interface PackStream {
  writer: Promise<ObjectWriter>;
  /** Bytes of the pack buffer handed to the writer so far. */
  sent: number;
  /** Bytes sent when the last early sync was asked for. */
  synced: number;
  /** The appends (and early syncs) so far, in order; rejects when one failed. */
  chain: Promise<void>;
}

/** A blob this writer has written, with its sealed bytes while its pack is not yet durable. */
interface PendingBlob {
  loc: BlobLocation;
  data: Buffer | undefined;
}

/**
 * Collects sealed blobs into packs of about `packSize` bytes and uploads each under a fresh
 * random name (so concurrent writers, in this process or others, never collide). At most
 * `maxInFlight` packs upload at once, which bounds memory to about (maxInFlight + 1) packs.
 */
export class PackWriter {
  private readonly blobs = new Map<string, PendingBlob>();
  /** The pack being filled: sealed blobs are copied in as they come, so a pack is one buffer. */
  private buf: Buffer | undefined;
  private partsBytes = 0;
  private entries: PackEntry[] = [];
  private pack = newPackId();
  private stream: PackStream | undefined;
  /** Size of the pieces a streamed pack goes out in: a quarter pack for small (test) packs. */
  private readonly piece: number;
  /** The backend's `openWrite`, when it writes objects in pieces. */
  private readonly openWrite: ((key: string) => Promise<ObjectWriter>) | undefined;
  private readonly inFlight = new Set<Promise<void>>();
  private failure: unknown;
  /** Packs fully uploaded, with their entries, for the index object written at commit. */
  readonly written: Array<{ pack: string; entries: PackEntry[] }> = [];
  /** Bytes uploaded. */
  uploadedBytes = 0;

  private publishing: Promise<void> = Promise.resolve();
  private unpublished = 0;

  /**
   * `publish`, when given, is called with packs that are durable, in batches of about
   * `publishEvery` blobs, to write an index object for them; their blobs are then forgotten
   * here (the store's index knows them), which keeps a long import's memory bounded.
   */
  constructor(
    private readonly backend: ObjectBackend,
    private readonly crypto: StoreCrypto,
    private readonly packSize: number,
    private readonly maxInFlight = 2,
    private readonly publish?: (
      packs: Array<{ pack: string; entries: PackEntry[] }>,
    ) => Promise<void>,
    private readonly publishEvery = 65_536,
  ) {
    this.piece = Math.min(STREAM_PIECE, Math.max(4096, packSize >> 2));
    this.openWrite = backend.openWrite?.bind(backend);
  }

  /** True when this writer already holds a blob with this id. */
  has(id: Buffer): boolean {
    return this.blobs.has(id.toString('latin1'));
  }

  /** Where a blob of this writer lives, and its sealed bytes while they are still in memory. */
  locate(id: Buffer): PendingBlob | undefined {
    return this.blobs.get(id.toString('latin1'));
  }

  /** Adds an already sealed blob; uploads the pack when it is full. */
  async addSealed(type: BlobType, id: Buffer, rawLength: number, sealed: Buffer): Promise<void> {
    await this.addParts(type, id, rawLength, [sealed]);
  }

  /** Adds a sealed blob given as consecutive parts, copied straight into the pack buffer. */
  private async addParts(
    type: BlobType,
    id: Buffer,
    rawLength: number,
    parts: Buffer[],
  ): Promise<void> {
    this.throwIfFailed();
    const key = id.toString('latin1');
    if (this.blobs.has(key)) return;
    let length = 0;
    for (const part of parts) length += part.length;
    const sealed = { length };
    const loc: BlobLocation = {
      pack: this.pack,
      offset: this.partsBytes,
      length: sealed.length,
      rawLength,
      type,
    };
    if (this.buf === undefined || this.partsBytes + sealed.length > this.buf.length) {
      // Room for a full pack plus one large blob; the trailer usually fits in the slack too
      // (45 bytes per blob; if it does not, flush copies once).
      const slack = packSlack(this.packSize, sealed.length);
      const cap = Math.max(this.packSize + slack, this.partsBytes + sealed.length);
      const grown = takeSpare(cap) ?? Buffer.allocUnsafe(cap);
      if (this.buf !== undefined) {
        this.buf.copy(grown, 0, 0, this.partsBytes);
        for (const e of this.entries) {
          const b = this.blobs.get(e.id.toString('latin1'));
          if (b !== undefined && b.loc.pack === this.pack)
            b.data = grown.subarray(e.offset, e.offset + e.length);
        }
      }
      this.buf = grown;
    }
    let pos = this.partsBytes;
    for (const part of parts) pos += part.copy(this.buf, pos);
    this.blobs.set(key, { loc, data: this.buf.subarray(loc.offset, loc.offset + sealed.length) });
    this.entries.push({
      id: Buffer.from(id),
      type,
      offset: loc.offset,
      length: sealed.length,
      rawLength,
    });
    this.partsBytes += sealed.length;
    if (this.partsBytes >= this.packSize) await this.flush();
    else if (this.openWrite !== undefined) {
      // The pack's file is opened with its first blob, while the next blobs are sealed: its
      // first piece then need not wait for the open (1-6 ms on the development VM).
      const stream = this.openStream(this.openWrite);
      if (this.partsBytes - stream.sent >= this.piece) this.sendPiece(stream);
    }
  }

  /** The backend's writer of the pack being filled, opened on first use. */
  private openStream(openWrite: (key: string) => Promise<ObjectWriter>): PackStream {
    return (this.stream ??= (() => {
      const writer = openWrite(packKey(this.pack));
      // A failed open fails the writer at once; the pieces' chain then does nothing more.
      const chain = writer.then(() => undefined);
      chain.catch((err: unknown) => {
        this.failure ??= err;
      });
      return { writer, sent: 0, synced: 0, chain };
    })());
  }

  /** Hands the pack buffer's bytes not yet sent to the backend's writer. */
  private sendPiece(stream: PackStream): void {
    // The bytes below partsBytes never change again: a grown buffer is a copy of them.
    const piece = (this.buf as Buffer).subarray(stream.sent, this.partsBytes);
    stream.sent = this.partsBytes;
    const syncNow = stream.sent - stream.synced >= SYNC_PIECES * this.piece;
    if (syncNow) stream.synced = stream.sent;
    stream.chain = stream.chain.then(async () => {
      const w = await stream.writer;
      await w.append(piece);
      if (syncNow) await w.syncEarly?.();
    });
    // Nothing waits for the pieces until the pack's flush; a failure fails the writer at once.
    stream.chain.catch((err: unknown) => {
      this.failure ??= err;
    });
  }

  /** Seals and adds a blob. */
  async add(type: BlobType, id: Buffer, plain: Uint8Array): Promise<void> {
    if (this.has(id)) return;
    await this.addParts(type, id, plain.length, this.crypto.sealChunkParts(type, id, plain));
  }

  /** Starts uploading the current pack (if it holds anything); waits while too many upload. */
  async flush(): Promise<void> {
    this.throwIfFailed();
    if (this.entries.length === 0) return;
    while (this.inFlight.size >= this.maxInFlight) await Promise.race(this.inFlight);
    this.throwIfFailed();
    const pack = this.pack;
    const entries = this.entries;
    const buf = this.buf as Buffer;
    const used = this.partsBytes;
    this.pack = newPackId();
    this.entries = [];
    this.buf = undefined;
    this.partsBytes = 0;
    const trailer = encodePackTrailer(this.crypto, pack, entries);
    let body: Buffer;
    if (used + trailer.length <= buf.length) {
      trailer.copy(buf, used);
      body = buf.subarray(0, used + trailer.length);
    } else {
      body = Buffer.concat([buf.subarray(0, used), trailer]);
      for (const e of entries) {
        const b = this.blobs.get(e.id.toString('latin1'));
        if (b !== undefined && b.loc.pack === pack)
          b.data = body.subarray(e.offset, e.offset + e.length);
      }
    }
    const stream = this.stream;
    this.stream = undefined;
    const written =
      stream === undefined
        ? this.backend.put(packKey(pack), body)
        : finishStream(stream, body.subarray(stream.sent));
    const upload = written.then(
      () => {
        this.uploadedBytes += body.length;
        this.written.push({ pack, entries });
        for (const e of entries) {
          const b = this.blobs.get(e.id.toString('latin1'));
          if (b !== undefined) b.data = undefined;
        }
        // Nothing refers to the pack's buffer any more (its blobs' views are dropped above,
        // the backend is done with its bytes): keep it for the next pack, of any writer.
        giveSpare(buf);
        this.unpublished += entries.length;
        if (this.unpublished >= this.publishEvery) this.startPublish();
      },
      (err: unknown) => {
        this.failure ??= err;
      },
    );
    const tracked = upload.finally(() => this.inFlight.delete(tracked));
    this.inFlight.add(tracked);
  }

  /**
   * Uploads everything and waits until every pack is durable (and, with `publish`, indexed).
   * Returns the packs not handed to `publish`.
   */
  async finish(): Promise<Array<{ pack: string; entries: PackEntry[] }>> {
    await this.flush();
    await Promise.all(this.inFlight);
    this.throwIfFailed();
    if (this.publish !== undefined && this.written.length > 0) this.startPublish();
    await this.publishing;
    this.throwIfFailed();
    return this.written;
  }

  /**
   * Waits for uploads without raising their errors, and drops the pack being filled (for
   * abort: nothing of it is published).
   */
  async settle(): Promise<void> {
    const stream = this.stream;
    this.stream = undefined;
    if (stream !== undefined) await dropStream(stream);
    await Promise.allSettled(this.inFlight);
    await this.publishing;
  }

  private startPublish(): void {
    const publish = this.publish;
    if (publish === undefined || this.written.length === 0) return;
    const batch = this.written.splice(0);
    this.unpublished = 0;
    this.publishing = this.publishing.then(async () => {
      if (this.failure !== undefined) return;
      try {
        await publish(batch);
        for (const p of batch)
          for (const e of p.entries) this.blobs.delete(e.id.toString('latin1'));
      } catch (err) {
        this.failure ??= err;
      }
    });
  }

  private throwIfFailed(): void {
    if (this.failure !== undefined) throw this.failure;
  }
}

/** Sends the pack's last bytes and publishes it; on any failure, drops what was written. */
async function finishStream(stream: PackStream, rest: Buffer): Promise<void> {
  try {
    await stream.chain;
    const w = await stream.writer;
    if (rest.length > 0) await w.append(rest);
    await w.commit();
  } catch (err) {
    await dropStream(stream);
    throw err;
  }
}

async function dropStream(stream: PackStream): Promise<void> {
  await stream.chain.catch(() => undefined);
  const w = await stream.writer.catch(() => undefined);
  await w?.abort();
}

function newPackId(): string {
  return randomBytes(16).toString('hex');
}
