import { randomBytes } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { crc32Combine, knownCrc32 } from './crc32-combine.js';
import { FrameDecoder, encodeFrameBuffer, frameOwnsBuffer } from './frame-codec.js';

describe('crc32Combine', () => {
  it('gives the CRC-32 of a concatenation from the CRCs of its parts', () => {
    for (const n of [0, 1, 2, 3, 7, 8, 31, 100, 4096, 65_537, 262_144 + 12]) {
      const buf = randomBytes(n + 5);
      for (const cut of new Set([0, 1, Math.floor(n / 2), n, n + 5])) {
        const a = buf.subarray(0, cut);
        const b = buf.subarray(cut);
        expect(crc32Combine(crc32(a), crc32(b), b.length)).toBe(crc32(buf));
      }
    }
  });

  it('a decoded DATA frame carries the CRC of its extent bytes', () => {
    const data = randomBytes(70_000);
    const bytes = encodeFrameBuffer({ type: 'data', seq: 5, disk: 0, offset: 4096, data });
    const d = new FrameDecoder();
    // Fed in pieces, as TLS delivers it.
    const frames = [...d.push(bytes.subarray(0, 1000)), ...d.push(bytes.subarray(1000))];
    expect(frames).toHaveLength(1);
    const f = frames[0]!;
    if (f.type !== 'data') throw new Error('not data');
    expect(f.data.equals(data)).toBe(true);
    expect(knownCrc32(f.data)).toBe(crc32(data));
  });

  it('a DATA frame damaged in its extent bytes still fails its check', () => {
    const data = randomBytes(1000);
    const bytes = Buffer.from(
      encodeFrameBuffer({ type: 'data', seq: 1, disk: 0, offset: 0, data }),
    );
    bytes[bytes.length - 10]! ^= 0x01;
    expect(() => new FrameDecoder().push(bytes)).toThrow(/CRC-32/);
  });
});

describe('frameOwnsBuffer', () => {
  it('is true for a DATA frame gathered from several reads, false for a view of a shared read', () => {
    const big = randomBytes(100_000);
    const small = randomBytes(100);
    const a = encodeFrameBuffer({ type: 'data', seq: 1, disk: 0, offset: 0, data: big });
    const b = encodeFrameBuffer({ type: 'data', seq: 2, disk: 0, offset: 0, data: small });
    const c = encodeFrameBuffer({ type: 'data', seq: 3, disk: 0, offset: 0, data: big });
    const stream = Buffer.concat([a, b, c]);
    const d = new FrameDecoder();
    const frames = [];
    // Reads of 16 KiB, as TLS gives them: frame 1 spans reads, frame 2 sits inside one.
    for (let i = 0; i < stream.length; i += 16_384)
      frames.push(...d.push(stream.subarray(i, i + 16_384)));
    const data = frames.filter((f) => f.type === 'data');
    expect(data.map((f) => f.seq)).toEqual([1, 2, 3]);
    const [f1, f2, f3] = data;
    expect(f1!.data.equals(big)).toBe(true);
    expect(f2!.data.equals(small)).toBe(true);
    expect(f3!.data.equals(big)).toBe(true);
    expect(frameOwnsBuffer(f1!.data)).toBe(true);
    // Its own buffer (from the frame pool: rounded up to the pool's 16 KiB classes).
    expect(f1!.data.buffer).not.toBe(f3!.data.buffer);
    expect(f1!.data.buffer.byteLength).toBeGreaterThanOrEqual(a.length);
    expect(f1!.data.buffer.byteLength).toBeLessThan(a.length + 16_384);
    expect(frameOwnsBuffer(f2!.data)).toBe(false);
    expect(frameOwnsBuffer(f3!.data)).toBe(true);
    // Transferring frame 1's buffer leaves the others intact.
    structuredClone(f1!.data, { transfer: [f1!.data.buffer as ArrayBuffer] });
    expect(f2!.data.equals(small)).toBe(true);
    expect(f3!.data.equals(big)).toBe(true);
  });
});
