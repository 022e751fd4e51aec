import { inflateSync } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { ppmToPng, pngSize } from './png.js';

describe('ppmToPng', () => {
  it('encodes every pixel of a P6 PPM into a PNG of the same size', () => {
    const w = 5;
    const h = 3;
    const pixels = Buffer.alloc(w * h * 3);
    for (let i = 0; i < pixels.length; i++) pixels[i] = (i * 37) & 0xff;
    const ppm = Buffer.concat([Buffer.from(`P6\n# QEMU\n${w} ${h}\n255\n`), pixels]);
    const png = ppmToPng(ppm);
    expect(pngSize(png)).toEqual({ width: w, height: h });
    // IDAT holds the scanlines, each behind a filter byte 0.
    const idatAt = png.indexOf('IDAT');
    const len = png.readUInt32BE(idatAt - 4);
    const raw = inflateSync(png.subarray(idatAt + 4, idatAt + 4 + len));
    for (let y = 0; y < h; y++) {
      expect(raw[y * (w * 3 + 1)]).toBe(0);
      expect(raw.subarray(y * (w * 3 + 1) + 1, (y + 1) * (w * 3 + 1))).toEqual(
        pixels.subarray(y * w * 3, (y + 1) * w * 3),
      );
    }
    expect(png.subarray(-8, -4).toString('latin1')).toBe('IEND');
  });

  it('refuses what is not a complete 8-bit P6 image', () => {
    expect(() => ppmToPng(Buffer.from('P3\n1 1\n255\n0 0 0\n'))).toThrow(/P6/);
    expect(() => ppmToPng(Buffer.from('P6\n2 2\n255\nabc'))).toThrow(/truncated/);
    expect(pngSize(Buffer.from('not a png at all, not at all'))).toBeUndefined();
  });
});
