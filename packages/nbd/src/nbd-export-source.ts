/** One range of an export's allocation map. */
export interface NbdSourceExtent {
  offset: number;
  length: number;
  /** The range reads as zeros. */
  zero: boolean;
  /** The range is not allocated (a hole). @default same as `zero` */
  hole?: boolean;
}

/**
 * What the NBD server exports: a read-only disk. `readAt` must reject (never return zeros)
 * when it cannot read; the server turns that into an EIO reply for that request only.
 */
export interface NbdExportSource {
  /** Size in bytes. */
  readonly size: number;
  /** Exactly `length` bytes at `offset`. */
  readAt(offset: number, length: number): Promise<Uint8Array>;
  /**
   * The allocation map of `[offset, offset + length)` in offset order (extents may start
   * before or end after the range; the server clips). Without it, everything is reported as data.
   */
  extents?(offset: number, length: number): AsyncIterable<NbdSourceExtent>;
}

/** Anything shaped like `@lifeboat/store`'s PointReader (whole-disk extents, random reads). */
export interface WholeDiskReader {
  readonly size: number;
  readAt(offset: number, length: number): Promise<Uint8Array>;
  extents(): AsyncIterable<{ offset: number; length: number; zero: boolean }>;
}

/**
 * Adapts a reader whose allocation map is walked from the start (a store PointReader) to an
 * export source. The map is loaded once on first use and searched by binary search, so each
 * block status request costs O(log n) instead of a walk of the whole disk. Valid because a
 * recovery point never changes.
 */
export function exportSourceFromReader(reader: WholeDiskReader): NbdExportSource {
  let map: Promise<NbdSourceExtent[]> | undefined;
  const load = async (): Promise<NbdSourceExtent[]> => {
    const out: NbdSourceExtent[] = [];
    for await (const e of reader.extents()) {
      out.push({ offset: e.offset, length: e.length, zero: e.zero });
    }
    return out;
  };
  return {
    get size() {
      return reader.size;
    },
    readAt: (offset, length) => reader.readAt(offset, length),
    extents: async function* (offset, length) {
      if (map === undefined) {
        map = load();
        // A failed load is retried by the next request rather than cached forever.
        map.catch(() => (map = undefined));
      }
      const all = await map;
      let lo = 0;
      let hi = all.length;
      while (lo < hi) {
        const mid = (lo + hi) >>> 1;
        const e = all[mid] as NbdSourceExtent;
        if (e.offset + e.length <= offset) lo = mid + 1;
        else hi = mid;
      }
      const end = offset + length;
      for (let i = lo; i < all.length; i++) {
        const e = all[i] as NbdSourceExtent;
        if (e.offset >= end) break;
        yield e;
      }
    },
  };
}
