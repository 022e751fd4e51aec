import { FormatError } from './object-format.js';
import type { BlobLocation, PackEntry } from './object-format.js';

const ID = 32;
/** Words of an entry in `meta`: pack number, offset, length, raw length. */
const META = 4;
/** Bytes of one entry in an index object's plaintext (id, type, offset, length, raw length). */
const ENCODED_ENTRY = 45;

/**
 * The in-memory map from blob id to its place in a pack, loaded from the index objects.
 *
 * Kept in flat typed arrays, not as a Map of strings to objects: the ids one after the other in
 * one buffer, each entry's pack number, offset, lengths and type in parallel arrays, and an
 * open-addressing hash table of entry numbers keyed by the id's first four bytes (ids are keyed
 * HMACs, so those are uniformly random). About 60 bytes a blob (the Map took about 140, and a
 * key string and an object per blob for the garbage collector to trace), so 1 TiB of unique
 * 64 KiB chunks (16 M blobs) needs about 1 GiB; loading an index object is copying its entries
 * in, with no object per entry.
 */
export class ChunkIndex {
  private ids = Buffer.alloc(0);
  private meta = new Uint32Array(0);
  private types = new Uint8Array(0);
  /** Entry number + 1 per slot, 0 for an empty slot; its length is a power of two. */
  private table = new Int32Array(0);
  private count = 0;
  private packs: string[] = [];
  private packNumbers = new Map<string, number>();
  /** Index objects whose entries are loaded. */
  loaded = new Set<string>();
  /** Index objects that could not be read, with the reason. */
  damaged = new Map<string, Error>();

  /** Adds a pack's entries (a later entry for the same id replaces the earlier one). */
  addPack(pack: string, entries: readonly PackEntry[]): void {
    this.reserve(entries.length);
    const p = this.packNumber(pack);
    for (const e of entries) {
      if (e.id.length !== ID) throw new FormatError(`blob id of ${e.id.length} bytes`);
      this.put(e.id, 0, p, e.offset, e.length, e.rawLength, e.type);
    }
  }

  /**
   * Adds every entry of an index object's plaintext (the layout decodeIndex reads), straight
   * from the bytes. Throws FormatError (and adds nothing) when the layout is wrong.
   */
  addEncoded(buf: Buffer): void {
    // First check the layout, then add: a bad object adds nothing.
    const bad = (why: string): never => {
      throw new FormatError(why);
    };
    if (buf.length < 8) bad('index ends early');
    let pos = 8 + buf.readUInt32LE(0) * 16;
    if (pos + 4 > buf.length) bad('index ends early');
    const nPacks = buf.readUInt32LE(pos);
    pos += 4;
    const start = pos;
    let total = 0;
    for (let i = 0; i < nPacks; i++) {
      if (pos + 20 > buf.length) bad('index ends early');
      const n = buf.readUInt32LE(pos + 16);
      pos += 20;
      if (pos + n * ENCODED_ENTRY > buf.length) bad('index ends early');
      for (let j = 0, e = pos + ID; j < n; j++, e += ENCODED_ENTRY) {
        const type = buf[e];
        if (type !== 0 && type !== 1) bad(`unknown blob type ${String(type)}`);
      }
      pos += n * ENCODED_ENTRY;
      total += n;
    }
    if (pos !== buf.length) bad('index has trailing bytes');
    this.reserve(total);
    pos = start;
    for (let i = 0; i < nPacks; i++) {
      const p = this.packNumber(buf.toString('hex', pos, pos + 16));
      const n = buf.readUInt32LE(pos + 16);
      pos += 20;
      for (let j = 0; j < n; j++, pos += ENCODED_ENTRY) {
        this.put(
          buf,
          pos,
          p,
          buf.readUInt32LE(pos + 33),
          buf.readUInt32LE(pos + 37),
          buf.readUInt32LE(pos + 41),
          buf[pos + 32] as number,
        );
      }
    }
  }

  get(id: Buffer): BlobLocation | undefined {
    const e = this.find(id, 0);
    return e < 0 ? undefined : this.location(e);
  }

  has(id: Buffer): boolean {
    return this.find(id, 0) >= 0;
  }

  get size(): number {
    return this.count;
  }

  /** Every entry, as [id, location]. */
  *entries(): IterableIterator<[Buffer, BlobLocation]> {
    const n = this.count;
    const ids = this.ids;
    for (let e = 0; e < n; e++) {
      yield [Buffer.from(ids.subarray(e * ID, e * ID + ID)), this.location(e)];
    }
  }

  /** Takes over another index's content in one step, so concurrent readers never see it empty. */
  adopt(other: ChunkIndex): void {
    this.ids = other.ids;
    this.meta = other.meta;
    this.types = other.types;
    this.table = other.table;
    this.count = other.count;
    this.packs = other.packs;
    this.packNumbers = other.packNumbers;
    this.loaded = other.loaded;
    this.damaged = other.damaged;
  }

  clear(): void {
    const { loaded, damaged } = this;
    this.adopt(new ChunkIndex());
    this.loaded = loaded;
    this.damaged = damaged;
    loaded.clear();
    damaged.clear();
  }

  private location(e: number): BlobLocation {
    const m = e * META;
    const meta = this.meta;
    return {
      pack: this.packs[meta[m] as number] as string,
      offset: meta[m + 1] as number,
      length: meta[m + 2] as number,
      rawLength: meta[m + 3] as number,
      type: this.types[e] as 0 | 1,
    };
  }

  private packNumber(pack: string): number {
    let p = this.packNumbers.get(pack);
    if (p === undefined) {
      p = this.packs.length;
      this.packs.push(pack);
      this.packNumbers.set(pack, p);
    }
    return p;
  }

  /** The entry holding the id at `src[at..at+32]`, or -1. */
  private find(src: Buffer, at: number): number {
    const table = this.table;
    if (table.length === 0) return -1;
    const mask = table.length - 1;
    const head = src.readUInt32LE(at);
    const ids = this.ids;
    for (let slot = head & mask; ; slot = (slot + 1) & mask) {
      const v = table[slot] as number;
      if (v === 0) return -1;
      const e = v - 1;
      if (
        ids.readUInt32LE(e * ID) === head &&
        src.compare(ids, e * ID, e * ID + ID, at, at + ID) === 0
      )
        return e;
    }
  }

  /** Adds or replaces the entry of the id at `src[at..at+32]`; room must be reserved. */
  private put(
    src: Buffer,
    at: number,
    pack: number,
    offset: number,
    length: number,
    rawLength: number,
    type: number,
  ): void {
    const table = this.table;
    const mask = table.length - 1;
    const head = src.readUInt32LE(at);
    const ids = this.ids;
    let slot = head & mask;
    let e = -1;
    for (; ; slot = (slot + 1) & mask) {
      const v = table[slot] as number;
      if (v === 0) break;
      const x = v - 1;
      if (
        ids.readUInt32LE(x * ID) === head &&
        src.compare(ids, x * ID, x * ID + ID, at, at + ID) === 0
      ) {
        e = x;
        break;
      }
    }
    if (e < 0) {
      e = this.count++;
      src.copy(ids, e * ID, at, at + ID);
      table[slot] = e + 1;
    }
    const m = e * META;
    const meta = this.meta;
    meta[m] = pack;
    meta[m + 1] = offset;
    meta[m + 2] = length;
    meta[m + 3] = rawLength;
    this.types[e] = type;
  }

  /** Makes room for `more` entries: arrays grown by doubling, the table kept at most half full. */
  private reserve(more: number): void {
    const need = this.count + more;
    const cap = this.types.length;
    if (need <= cap) return;
    let next = Math.max(1024, cap);
    while (next < need) next *= 2;
    const ids = Buffer.allocUnsafe(next * ID);
    this.ids.copy(ids, 0, 0, this.count * ID);
    const meta = new Uint32Array(next * META);
    meta.set(this.meta.subarray(0, this.count * META));
    const types = new Uint8Array(next);
    types.set(this.types.subarray(0, this.count));
    const table = new Int32Array(next * 2);
    const mask = table.length - 1;
    for (let e = 0; e < this.count; e++) {
      let slot = ids.readUInt32LE(e * ID) & mask;
      while (table[slot] !== 0) slot = (slot + 1) & mask;
      table[slot] = e + 1;
    }
    this.ids = ids;
    this.meta = meta;
    this.types = types;
    this.table = table;
  }
}
