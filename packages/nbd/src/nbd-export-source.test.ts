import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { exportSourceFromReader, type NbdSourceExtent } from './nbd-export-source.js';

async function collect(it: AsyncIterable<NbdSourceExtent> | undefined): Promise<NbdSourceExtent[]> {
  if (it === undefined) throw new Error('the adapter must provide extents');
  const out: NbdSourceExtent[] = [];
  for await (const e of it) out.push(e);
  return out;
}

describe('exportSourceFromReader', () => {
  it('answers any range with exactly the extents that overlap it (binary search = linear scan)', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.record({ length: fc.integer({ min: 1, max: 1000 }), zero: fc.boolean() }), {
          minLength: 1,
          maxLength: 60,
        }),
        fc.nat(),
        fc.nat(),
        async (parts, a, b) => {
          let pos = 0;
          const map = parts.map((p) => {
            const e = { offset: pos, length: p.length, zero: p.zero };
            pos += p.length;
            return e;
          });
          const size = pos;
          const offset = a % size;
          const length = 1 + (b % (size - offset));
          let loads = 0;
          const src = exportSourceFromReader({
            size,
            readAt: () => Promise.resolve(Buffer.alloc(0)),
            extents: async function* () {
              loads++;
              yield* map;
            },
          });
          const expected = map.filter(
            (e) => e.offset < offset + length && e.offset + e.length > offset,
          );
          expect(await collect(src.extents?.(offset, length))).toEqual(expected);
          await collect(src.extents?.(0, size));
          expect(loads).toBe(1);
        },
      ),
      { numRuns: 200 },
    );
  });

  it('does not cache a failed map load', async () => {
    let calls = 0;
    const src = exportSourceFromReader({
      size: 10,
      readAt: () => Promise.resolve(Buffer.alloc(0)),
      extents: async function* () {
        calls++;
        if (calls === 1) throw new Error('store unreachable');
        yield { offset: 0, length: 10, zero: true };
      },
    });
    await expect(collect(src.extents?.(0, 10))).rejects.toThrow('store unreachable');
    expect(await collect(src.extents?.(0, 10))).toEqual([{ offset: 0, length: 10, zero: true }]);
  });
});
