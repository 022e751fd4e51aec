import type { ByteRange } from './byte-ranges.js';
import { alignRanges } from './byte-ranges.js';
import type { ImageMapEntry } from './disk-image.js';

/** One piece of an import: a range that is zero, or data to read through its map entry. */
export type ImportPiece =
  | { kind: 'zero'; offset: number; length: number }
  | { kind: 'data'; offset: number; length: number; entry: ImageMapEntry };

/**
 * Intersects the ranges to import with the image's allocation map: unallocated and zero
 * ranges become `zero` pieces (nothing read), allocated ranges `data` pieces. Both inputs in
 * offset order; a range the map does not cover counts as zero (past a raw file's end).
 */
export function planImport(
  map: readonly ImageMapEntry[],
  ranges: readonly ByteRange[],
): ImportPiece[] {
  const pieces: ImportPiece[] = [];
  let m = 0;
  for (const range of ranges) {
    let pos = range.offset;
    const end = range.offset + range.length;
    while (
      m < map.length &&
      (map[m] as ImageMapEntry).start + (map[m] as ImageMapEntry).length <= pos
    )
      m++;
    let i = m;
    while (pos < end) {
      const entry = map[i];
      if (entry === undefined || entry.start >= end) {
        push(pieces, { kind: 'zero', offset: pos, length: end - pos });
        break;
      }
      if (entry.start > pos) {
        push(pieces, { kind: 'zero', offset: pos, length: entry.start - pos });
        pos = entry.start;
      }
      const to = Math.min(end, entry.start + entry.length);
      if (entry.zero || !entry.data) push(pieces, { kind: 'zero', offset: pos, length: to - pos });
      else push(pieces, { kind: 'data', offset: pos, length: to - pos, entry });
      pos = to;
      i++;
    }
  }
  return pieces;
}

// Adjacent zero pieces merge; data pieces stay apart since each reads through its own entry.
function push(pieces: ImportPiece[], piece: ImportPiece): void {
  const last = pieces[pieces.length - 1];
  if (
    piece.kind === 'zero' &&
    last !== undefined &&
    last.kind === 'zero' &&
    last.offset + last.length === piece.offset
  ) {
    last.length += piece.length;
    return;
  }
  pieces.push(piece);
}

/**
 * A raw file's map at chunk granularity: a chunk with any data in it is read whole (its holes
 * read as zeros), so the store gets whole chunks instead of 4 KiB fragments.
 */
export function coarsenRawMap(
  map: readonly ImageMapEntry[],
  unit: number,
  size: number,
): ImageMapEntry[] {
  const data = alignRanges(
    map.filter((e) => e.data && !e.zero).map((e) => ({ offset: e.start, length: e.length })),
    unit,
    size,
  );
  const out: ImageMapEntry[] = [];
  let pos = 0;
  for (const r of data) {
    if (r.offset > pos)
      out.push({ start: pos, length: r.offset - pos, zero: true, data: false, depth: 0 });
    out.push({
      start: r.offset,
      length: r.length,
      zero: false,
      data: true,
      depth: 0,
      offset: r.offset,
    });
    pos = r.offset + r.length;
  }
  if (pos < size) out.push({ start: pos, length: size - pos, zero: true, data: false, depth: 0 });
  return out;
}
