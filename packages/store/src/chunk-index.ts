import { FormatError } from './object-format.js';
import type { BlobLocation, PackEntry } from './object-format.js';

const ID = 32;
/** Bytes of one entry in an index object's plaintext: id, type, offset, length, raw length. */
const ENTRY = 45;

/**
 * The in-memory map from blob id to its place in a pack, loaded from the index objects.
 *
 * An index object's plaintext is kept as it is (a segment) and its entries are looked up in
 * place: loading one is a pass that puts each entry's number in an open-addressing hash table
 * keyed by the id's first four bytes (ids are keyed HMACs, so those are uniformly random), with
 * no object, string or copy per entry. The Map of id strings to location objects this replaced
 * cost about 140 bytes a blob and most of a changed-extents import's index load (a string and
 * an object per blob for the garbage collector); this is about 65 (the 45-byte entry, its
 * place, its pack and two table slots), so 1 TiB of unique 64 KiB chunks (16 M blobs) needs
 * about 1 GiB.
 */
export class ChunkIndex {
  private segments: Buffer[] = [];
  /** Per entry: its segment, its byte position there, its pack's number. */
  private entrySegment = new Int32Array(0);
  private entryPos = new Int32Array(0);
  private entryPack = new Int32Array(0);
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
    const seg = Buffer.allocUnsafe(entries.length * ENTRY);
    for (let j = 0; j < entries.length; j++) {
      const e = entries[j] as PackEntry;
      if (e.id.length !== ID) throw new FormatError(`blob id of ${e.id.length} bytes`);
      const at = j * ENTRY;
      e.id.copy(seg, at);
      seg[at + ID] = e.type;
      seg.writeUInt32LE(e.offset, at + 33);
      seg.writeUInt32LE(e.length, at + 37);
      seg.writeUInt32LE(e.rawLength, at + 41);
    }
    this.reserve(entries.length);
    const s = this.segments.push(seg) - 1;
    const p = this.packNumber(pack);
    for (let j = 0; j < entries.length; j++) this.put(s, j * ENTRY, p);
  }

  /**
   * Adds every entry of an index object's plaintext (the layout decodeIndex reads), keeping
   * `buf` (which must not change afterwards). Throws FormatError (and adds nothing) when the
   * layout is wrong.
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
      if (pos + n * ENTRY > buf.length) bad('index ends early');
      for (let j = 0, e = pos + ID; j < n; j++, e += ENTRY) {
        const type = buf[e];
        if (type !== 0 && type !== 1) bad(`unknown blob type ${String(type)}`);
      }
      pos += n * ENTRY;
      total += n;
    }
    if (pos !== buf.length) bad('index has trailing bytes');
    this.reserve(total);
    const s = this.segments.push(buf) - 1;
    pos = start;
    for (let i = 0; i < nPacks; i++) {
      const p = this.packNumber(buf.toString('hex', pos, pos + 16));
      const n = buf.readUInt32LE(pos + 16);
      pos += 20;
      for (let j = 0; j < n; j++, pos += ENTRY) this.put(s, pos, p);
    }
  }

  get(id: Buffer): BlobLocation | undefined {
    const e = this.find(id);
    return e < 0 ? undefined : this.location(e);
  }

  has(id: Buffer): boolean {
    return this.find(id) >= 0;
  }

  get size(): number {
    return this.count;
  }

  /** Every entry, as [id, location]. */
  *entries(): IterableIterator<[Buffer, BlobLocation]> {
    const n = this.count;
    for (let e = 0; e < n; e++) {
      const seg = this.segments[this.entrySegment[e] as number] as Buffer;
      const at = this.entryPos[e] as number;
      yield [Buffer.from(seg.subarray(at, at + ID)), this.location(e)];
    }
  }

  /** Takes over another index's content in one step, so concurrent readers never see it empty. */
  adopt(other: ChunkIndex): void {
    this.segments = other.segments;
    this.entrySegment = other.entrySegment;
    this.entryPos = other.entryPos;
    this.entryPack = other.entryPack;
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
    const seg = this.segments[this.entrySegment[e] as number] as Buffer;
    const at = this.entryPos[e] as number;
    return {
      pack: this.packs[this.entryPack[e] as number] as string,
      offset: seg.readUInt32LE(at + 33),
      length: seg.readUInt32LE(at + 37),
      rawLength: seg.readUInt32LE(at + 41),
      type: seg[at + ID] as 0 | 1,
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

  /** True when entry `e`'s id is the 32 bytes of `src` at `at`. */
  private idIs(e: number, src: Buffer, at: number): boolean {
    const seg = this.segments[this.entrySegment[e] as number] as Buffer;
    const pos = this.entryPos[e] as number;
    for (let k = 0; k < ID; k++) if (seg[pos + k] !== src[at + k]) return false;
    return true;
  }

  /** The entry of an id, or -1. */
  private find(id: Buffer): number {
    if (this.table.length === 0 || id.length !== ID) return -1;
    return (this.table[this.slotOf(id, 0)] as number) - 1;
  }

  /** The table slot holding the id at `src[at..at+32]`, or the empty slot where it would go. */
  private slotOf(src: Buffer, at: number): number {
    const table = this.table;
    const mask = table.length - 1;
    let slot = head(src, at) & mask;
    for (; ; slot = (slot + 1) & mask) {
      const v = table[slot] as number;
      if (v === 0 || this.idIs(v - 1, src, at)) return slot;
    }
  }

  /** Adds (or, for an id already present, points to) the entry at `pos` of segment `s`. */
  private put(s: number, pos: number, pack: number): void {
    const slot = this.slotOf(this.segments[s] as Buffer, pos);
    // A later entry for the same id replaces the earlier one.
    let e = (this.table[slot] as number) - 1;
    if (e < 0) {
      e = this.count++;
      this.table[slot] = e + 1;
    }
    this.entrySegment[e] = s;
    this.entryPos[e] = pos;
    this.entryPack[e] = pack;
  }

  /** Makes room for `more` entries: arrays grown by doubling, the table kept at most half full. */
  private reserve(more: number): void {
    const need = this.count + more;
    const cap = this.entryPos.length;
    if (need <= cap) return;
    let next = Math.max(1024, cap);
    while (next < need) next *= 2;
    const grow = (a: Int32Array): Int32Array<ArrayBuffer> => {
      const b = new Int32Array(next);
      b.set(a.subarray(0, this.count));
      return b;
    };
    this.entrySegment = grow(this.entrySegment);
    this.entryPos = grow(this.entryPos);
    this.entryPack = grow(this.entryPack);
    const table = new Int32Array(next * 2);
    const mask = table.length - 1;
    for (let e = 0; e < this.count; e++) {
      const seg = this.segments[this.entrySegment[e] as number] as Buffer;
      let slot = head(seg, this.entryPos[e] as number) & mask;
      while (table[slot] !== 0) slot = (slot + 1) & mask;
      table[slot] = e + 1;
    }
    this.table = table;
  }
}

/** The first four bytes of the id at `at` as a non-negative 31-bit number (its hash). */
function head(b: Buffer, at: number): number {
  return (
    (b[at] as number) |
    ((b[at + 1] as number) << 8) |
    ((b[at + 2] as number) << 16) |
    (((b[at + 3] as number) & 0x7f) << 24)
  );
}
