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
