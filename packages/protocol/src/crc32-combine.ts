// CRC-32 (the zlib/IEEE one of node:zlib's crc32) of a concatenation from the CRCs of its parts,
// as zlib's crc32_combine does, which Node does not expose: a frame's bytes are checked once,
// and the journal's record CRC reuses the CRC of the extent's bytes instead of a second pass.

const POLY = 0xedb88320;

/** a(x) * b(x) modulo the CRC polynomial, in the reflected bit order of the CRC. */
function multModP(a: number, b: number): number {
  let m = 0x80000000;
  let p = 0;
  for (;;) {
    if ((a & m) !== 0) {
      p ^= b;
      if ((a & (m - 1)) === 0) break;
    }
    m >>>= 1;
    b = b & 1 ? (b >>> 1) ^ POLY : b >>> 1;
  }
  return p >>> 0;
}

/** x^(2^n) modulo the polynomial, n = 0..31. */
const X2N: number[] = [];
{
  let p = 0x40000000; // x^1
  X2N.push(p);
  for (let n = 1; n < 32; n++) X2N.push((p = multModP(p, p)));
}

/** x^(len * 8) modulo the polynomial (shifting a CRC by len zero bytes). */
function x8nModP(len: number): number {
  let p = 0x80000000; // x^0
  let k = 3;
  while (len > 0) {
    if (len % 2 === 1) p = multModP(X2N[k & 31]!, p);
    len = Math.floor(len / 2);
    k++;
  }
  return p;
}

/** CRC-32 of A‖B from crc(A), crc(B) and B's length (zlib's `crc32_combine`). */
export function crc32Combine(crcA: number, crcB: number, lengthB: number): number {
  if (lengthB <= 0) return crcA >>> 0;
  return (multModP(x8nModP(lengthB), crcA) ^ crcB) >>> 0;
}

const known = new WeakMap<Uint8Array, number>();

/** Records the CRC-32 of a buffer's bytes, computed while checking them (see {@link knownCrc32}). */
export function rememberCrc32(bytes: Uint8Array, crc: number): void {
  known.set(bytes, crc >>> 0);
}

/**
 * The CRC-32 of exactly these bytes if the frame decoder already computed it (for DATA frames'
 * extent bytes), so that the journal need not run over them again. Buffers must not be
 * modified after decoding (the decoder's frames are not).
 */
export function knownCrc32(bytes: Uint8Array): number | undefined {
  return known.get(bytes);
}
