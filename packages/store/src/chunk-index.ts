import { FormatError } from './object-format.js';
import type { BlobLocation, PackEntry } from './object-format.js';

/**
 * The in-memory map from blob id to its place in a pack, loaded from the index objects.
 * Cost: about 140 bytes of heap per blob (measured: a 32-character key string, a Map slot and
 * a small object), so 1 TiB of unique 64 KiB chunks (16 M blobs) needs about 2.3 GiB; see
 * docs/store-format.md for the planned on-disk alternative.
 */
export class ChunkIndex {
  private map = new Map<string, BlobLocation>();
  /** Index objects whose entries are loaded. */
  loaded = new Set<string>();
  /** Index objects that could not be read, with the reason. */
  damaged = new Map<string, Error>();

  /** Adds a pack's entries (a later entry for the same id replaces the earlier one). */
  addPack(pack: string, entries: readonly PackEntry[]): void {
    for (const e of entries) {
      this.map.set(e.id.toString('latin1'), {
        pack,
        offset: e.offset,
        length: e.length,
        rawLength: e.rawLength,
        type: e.type,
      });
    }
  }

  /**
   * Adds every entry of an index object's plaintext (the layout decodeIndex reads), straight
   * from the bytes: no entry objects or id buffers on the way, which made loading the index of
   * a large store a visible part of every write session's start. Throws FormatError (and adds
   * nothing) when the layout is wrong.
   */
  addEncoded(buf: Buffer): void {
    const ENTRY = 45;
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
    for (let i = 0; i < nPacks; i++) {
      if (pos + 20 > buf.length) bad('index ends early');
      const n = buf.readUInt32LE(pos + 16);
      pos += 20;
      if (pos + n * ENTRY > buf.length) bad('index ends early');
      for (let j = 0, e = pos + 32; j < n; j++, e += ENTRY) {
        const type = buf[e];
        if (type !== 0 && type !== 1) bad(`unknown blob type ${String(type)}`);
      }
      pos += n * ENTRY;
    }
    if (pos !== buf.length) bad('index has trailing bytes');
    pos = start;
    for (let i = 0; i < nPacks; i++) {
      const pack = buf.toString('hex', pos, pos + 16);
      const n = buf.readUInt32LE(pos + 16);
      pos += 20;
      for (let j = 0; j < n; j++, pos += ENTRY) {
        this.map.set(buf.toString('latin1', pos, pos + 32), {
          pack,
          offset: buf.readUInt32LE(pos + 33),
          length: buf.readUInt32LE(pos + 37),
          rawLength: buf.readUInt32LE(pos + 41),
          type: buf[pos + 32] as 0 | 1,
        });
      }
    }
  }

  get(id: Buffer): BlobLocation | undefined {
    return this.map.get(id.toString('latin1'));
  }

  has(id: Buffer): boolean {
    return this.map.has(id.toString('latin1'));
  }

  get size(): number {
    return this.map.size;
  }

  /** Every entry, as [id, location]. */
  *entries(): IterableIterator<[Buffer, BlobLocation]> {
    for (const [k, v] of this.map) yield [Buffer.from(k, 'latin1'), v];
  }

  /** Takes over another index's content in one step, so concurrent readers never see it empty. */
  adopt(other: ChunkIndex): void {
    this.map = other.map;
    this.loaded = other.loaded;
    this.damaged = other.damaged;
  }

  clear(): void {
    this.map.clear();
    this.loaded.clear();
    this.damaged.clear();
  }
}
