/** A range of bytes of a disk. */
export interface ByteRange {
  offset: number;
  length: number;
}

/** Sorts ranges and merges those that overlap or touch. */
export function mergeRanges(ranges: readonly ByteRange[]): ByteRange[] {
  const sorted = ranges.filter((r) => r.length > 0).sort((a, b) => a.offset - b.offset);
  const out: ByteRange[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last !== undefined && r.offset <= last.offset + last.length) {
      last.length = Math.max(last.length, r.offset + r.length - last.offset);
    } else {
      out.push({ offset: r.offset, length: r.length });
    }
  }
  return out;
}

/**
 * Widens ranges to whole `unit`s (clamped to `size`) and merges them: the store works in whole
 * chunks, and reading a chunk's rest from the image is cheaper than the store merging a
 * partial write with the base.
 */
export function alignRanges(ranges: readonly ByteRange[], unit: number, size: number): ByteRange[] {
  return mergeRanges(
    ranges.map((r) => {
      const start = Math.floor(r.offset / unit) * unit;
      const end = Math.min(Math.ceil((r.offset + r.length) / unit) * unit, size);
      return { offset: start, length: end - start };
    }),
  );
}
