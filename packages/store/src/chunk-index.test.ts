import { randomBytes, randomInt } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { ChunkIndex } from './chunk-index.js';
import type { BlobLocation, PackEntry } from './object-format.js';
import { encodeIndex } from './object-format.js';

function entry(id: Buffer): PackEntry {
  return {
    id,
    type: randomInt(2) as 0 | 1,
    offset: randomInt(2 ** 32),
    length: randomInt(2 ** 32),
    rawLength: randomInt(2 ** 32),
  };
}

const pack = (): string => randomBytes(16).toString('hex');

function locationOf(p: string, e: PackEntry): BlobLocation {
  return { pack: p, offset: e.offset, length: e.length, rawLength: e.rawLength, type: e.type };
}

describe('ChunkIndex', () => {
  it('finds what was added by pack and from index objects, later entries replacing earlier ones, across growth', () => {
    const index = new ChunkIndex();
    const want = new Map<string, BlobLocation>();
    const ids: Buffer[] = [];
    // Ids that share their first four bytes (the hash) collide in the table on purpose.
    const sameHead = randomBytes(4);
    for (let round = 0; round < 12; round++) {
      const packs: Array<{ pack: string; entries: PackEntry[] }> = [];
      for (let k = 0; k < 3; k++) {
        const p = pack();
        const entries: PackEntry[] = [];
        for (let j = 0; j < 400; j++) {
          let id: Buffer;
          if (ids.length > 0 && j % 10 === 0) id = ids[randomInt(ids.length)] as Buffer;
          else {
            id = randomBytes(32);
            if (j % 17 === 0) sameHead.copy(id);
            ids.push(id);
          }
          entries.push(entry(id));
        }
        packs.push({ pack: p, entries });
      }
      if (round % 2 === 0) {
        for (const p of packs) index.addPack(p.pack, p.entries);
      } else {
        index.addEncoded(encodeIndex({ supersedes: [pack()], packs }));
      }
      for (const p of packs)
        for (const e of p.entries) want.set(e.id.toString('hex'), locationOf(p.pack, e));
    }
    expect(index.size).toBe(want.size);
    for (const id of ids) expect(index.get(id)).toEqual(want.get(id.toString('hex')));
    for (let i = 0; i < 1000; i++) {
      const absent = randomBytes(32);
      if (i % 2 === 0) sameHead.copy(absent);
      expect(index.has(absent)).toBe(false);
      expect(index.get(absent)).toBeUndefined();
    }
    const listed = new Map([...index.entries()].map(([id, loc]) => [id.toString('hex'), loc]));
    expect(listed).toEqual(want);
  });

  it('adds nothing from an index object with a bad layout', () => {
    const index = new ChunkIndex();
    const e = entry(randomBytes(32));
    const good = encodeIndex({ supersedes: [], packs: [{ pack: pack(), entries: [e] }] });
    expect(() => index.addEncoded(good.subarray(0, good.length - 1))).toThrow(/ends early/);
    expect(() => index.addEncoded(Buffer.concat([good, Buffer.of(0)]))).toThrow(/trailing/);
    const badType = Buffer.from(good);
    badType[8 + 4 + 20 + 32] = 7;
    expect(() => index.addEncoded(badType)).toThrow(/unknown blob type/);
    expect(index.size).toBe(0);
    expect(index.has(e.id)).toBe(false);
    index.addEncoded(good);
    expect(index.has(e.id)).toBe(true);
  });

  it('takes over another index in one step, and clears', () => {
    const a = new ChunkIndex();
    const b = new ChunkIndex();
    const p = pack();
    const entries = Array.from({ length: 3000 }, () => entry(randomBytes(32)));
    b.addPack(p, entries);
    b.loaded.add('x');
    a.adopt(b);
    expect(a.size).toBe(3000);
    expect(a.get((entries[1234] as PackEntry).id)).toEqual(
      locationOf(p, entries[1234] as PackEntry),
    );
    expect(a.loaded.has('x')).toBe(true);
    const loaded = a.loaded;
    a.clear();
    expect(a.size).toBe(0);
    expect(a.has((entries[0] as PackEntry).id)).toBe(false);
    expect(loaded.size).toBe(0);
    a.addPack(p, entries.slice(0, 10));
    expect(a.size).toBe(10);
  });
});
