import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { ImageMapEntry } from './disk-image.js';
import { coarsenRawMap, planImport } from './import-plan.js';
import { alignRanges, mergeRanges } from './byte-ranges.js';

const K = 1024;

function entry(start: number, length: number, data: boolean): ImageMapEntry {
  return data
    ? { start, length, data: true, zero: false, depth: 0, offset: start }
    : { start, length, data: false, zero: true, depth: 0 };
}

// A map of the whole disk made of alternating runs, as qemu-img map gives it.
const mapArb = fc
  .array(fc.tuple(fc.integer({ min: 1, max: 40 }), fc.boolean()), { minLength: 1, maxLength: 12 })
  .map((runs) => {
    let pos = 0;
    const map = runs.map(([sectors, data]) => {
      const e = entry(pos, sectors * 4 * K, data);
      pos += e.length;
      return e;
    });
    return { map, size: pos };
  });

function isDataAt(map: readonly ImageMapEntry[], offset: number): boolean {
  const e = map.find((m) => m.start <= offset && offset < m.start + m.length);
  return e !== undefined && e.data && !e.zero;
}

describe('planImport', () => {
  it('splits a range into zero and data pieces along the map', () => {
    const map = [
      entry(0, 64 * K, true),
      entry(64 * K, 128 * K, false),
      entry(192 * K, 64 * K, true),
    ];
    expect(planImport(map, [{ offset: 32 * K, length: 192 * K }])).toEqual([
      { kind: 'data', offset: 32 * K, length: 32 * K, entry: map[0] },
      { kind: 'zero', offset: 64 * K, length: 128 * K },
      { kind: 'data', offset: 192 * K, length: 32 * K, entry: map[2] },
    ]);
  });

  it('covers every range exactly, data pieces only where the map has data', () => {
    fc.assert(
      fc.property(
        mapArb,
        fc.array(fc.tuple(fc.nat(), fc.nat()), { maxLength: 6 }),
        ({ map, size }, raw) => {
          const ranges = mergeRanges(
            raw.map(([a, b]) => {
              const offset = a % size;
              return { offset, length: Math.min(size - offset, (b % size) + 1) };
            }),
          );
          const pieces = planImport(map, ranges);
          const covered = mergeRanges(pieces.map((p) => ({ offset: p.offset, length: p.length })));
          expect(covered).toEqual(ranges);
          for (const p of pieces) {
            expect(isDataAt(map, p.offset)).toBe(p.kind === 'data');
            if (p.kind === 'data') {
              expect(p.offset + p.length).toBeLessThanOrEqual(p.entry.start + p.entry.length);
            }
          }
        },
      ),
    );
  });
});

describe('coarsenRawMap', () => {
  it('widens data to whole chunks and keeps the rest zero', () => {
    fc.assert(
      fc.property(mapArb, ({ map, size }) => {
        const unit = 64 * K;
        const coarse = coarsenRawMap(map, unit, size);
        // The coarse map tiles the disk without gaps or overlaps.
        let pos = 0;
        for (const e of coarse) {
          expect(e.start).toBe(pos);
          expect(e.length).toBeGreaterThan(0);
          pos += e.length;
        }
        expect(pos).toBe(size);
        // No byte of data is lost, and data starts on chunk boundaries.
        for (const e of map.filter((m) => m.data)) {
          expect(isDataAt(coarse, e.start)).toBe(true);
          expect(isDataAt(coarse, e.start + e.length - 1)).toBe(true);
        }
        for (const e of coarse.filter((m) => m.data)) expect(e.start % unit).toBe(0);
      }),
    );
  });
});

describe('alignRanges', () => {
  it('widens to whole units within the disk and merges', () => {
    expect(
      alignRanges(
        [
          { offset: 10, length: 10 },
          { offset: 70_000, length: 1 },
          { offset: 200_000, length: 50 },
        ],
        65536,
        200_050,
      ),
    ).toEqual([
      { offset: 0, length: 131072 },
      { offset: 196608, length: 200_050 - 196608 },
    ]);
  });
});
