import { deflateSync } from 'node:zlib';
import { LifeboatError } from '@lifeboat/protocol';

const SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32(parts: Buffer[]): number {
  let c = 0xffffffff;
  for (const b of parts) for (const byte of b) c = CRC_TABLE[(c ^ byte) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type: string, data: Buffer): Buffer {
  const head = Buffer.alloc(8);
  head.writeUInt32BE(data.length, 0);
  head.write(type, 4, 'latin1');
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32([head.subarray(4), data]), 0);
  return Buffer.concat([head, data, crc]);
}

/** Width and height of an image. */
export interface ImageSize {
  width: number;
  height: number;
}

/**
 * Converts a binary PPM (P6, maxval 255: what QMP `screendump` writes by default) to a PNG,
 * with Node's zlib only, for QEMU builds whose `screendump` cannot write PNG itself.
 */
export function ppmToPng(ppm: Buffer): Buffer {
  // Header: "P6" whitespace width whitespace height whitespace maxval, one whitespace, pixels.
  const fields: string[] = [];
  let i = 0;
  while (fields.length < 4 && i < ppm.length) {
    while (i < ppm.length && /\s/.test(String.fromCharCode(ppm[i]!))) i++;
    if (ppm[i] === 0x23) {
      while (i < ppm.length && ppm[i] !== 0x0a) i++;
      continue;
    }
    const start = i;
    while (i < ppm.length && !/\s/.test(String.fromCharCode(ppm[i]!))) i++;
    fields.push(ppm.subarray(start, i).toString('latin1'));
  }
  i++;
  const [magic, w, h, max] = fields;
  const width = Number(w);
  const height = Number(h);
  if (magic !== 'P6' || max !== '255' || !(width > 0) || !(height > 0)) {
    throw new LifeboatError(
      'LB_RECOVERY_SCREENSHOT',
      'The screenshot QEMU wrote is not a binary 8-bit PPM (P6). Retry; if it persists, report the QEMU version.',
      { details: { header: fields.join(' ') } },
    );
  }
  const stride = width * 3;
  if (ppm.length - i < stride * height) {
    throw new LifeboatError(
      'LB_RECOVERY_SCREENSHOT',
      `The screenshot QEMU wrote is truncated (${ppm.length - i} of ${stride * height} pixel bytes). Retry the screenshot.`,
    );
  }
  // Each PNG scanline starts with its filter type (0: none).
  const raw = Buffer.alloc((stride + 1) * height);
  for (let y = 0; y < height; y++) {
    ppm.copy(raw, y * (stride + 1) + 1, i + y * stride, i + (y + 1) * stride);
  }
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = 2; // colour type: truecolour RGB
  return Buffer.concat([
    SIGNATURE,
    chunk('IHDR', ihdr),
    chunk('IDAT', deflateSync(raw)),
    chunk('IEND', Buffer.alloc(0)),
  ]);
}

/** The size a PNG declares in its header, or undefined when `data` is not a PNG. */
export function pngSize(data: Buffer): ImageSize | undefined {
  if (data.length < 24 || !data.subarray(0, 8).equals(SIGNATURE)) return undefined;
  if (data.subarray(12, 16).toString('latin1') !== 'IHDR') return undefined;
  return { width: data.readUInt32BE(16), height: data.readUInt32BE(20) };
}
