import { randomBytes } from 'node:crypto';
import type { ObjectBackend } from './object-backend.js';
import { encodePackTrailer, packKey } from './object-format.js';
import type { BlobLocation, PackEntry } from './object-format.js';
import type { BlobType, StoreCrypto } from './store-crypto.js';

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
  /** Pack buffers whose upload finished, reused so the kernel need not fault in fresh pages. */
  private readonly free: Buffer[] = [];
  private partsBytes = 0;
  private entries: PackEntry[] = [];
  private pack = newPackId();
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
  ) {}

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
      const slack = Math.max(2 * sealed.length, Math.min(this.packSize, 256 * 1024));
      const cap = Math.max(this.packSize + slack, this.partsBytes + sealed.length);
      const spare = this.free.pop();
      const grown = spare !== undefined && spare.length >= cap ? spare : Buffer.allocUnsafe(cap);
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
    const upload = this.backend.put(packKey(pack), body).then(
      () => {
        this.uploadedBytes += body.length;
        this.written.push({ pack, entries });
        for (const e of entries) {
          const b = this.blobs.get(e.id.toString('latin1'));
          if (b !== undefined) b.data = undefined;
        }
        // Nothing refers to the pack's buffer any more: keep it for the next pack.
        // One spare is enough: the next pack takes it, and a second would only sit in memory.
        if (this.free.length < 1) this.free.push(buf);
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

  /** Waits for uploads without raising their errors (for abort). */
  async settle(): Promise<void> {
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

function newPackId(): string {
  return randomBytes(16).toString('hex');
}
