import { FORMAT_VERSION, FormatError } from './object-format.js';

/** Bytes of one reference (a chunk id or a node id) in a tree node. */
export const REF_BYTES = 32;
const HEADER_BYTES = 8;
const ZERO_REF = Buffer.alloc(REF_BYTES);

/**
 * Tree nodes: a node at level 0 (a leaf) holds the ids of `fanout` consecutive chunks; a node
 * at level L > 0 holds the ids of `fanout` nodes of level L-1. An all-zero reference means
 * "reads as zeros" (a zero chunk, or a whole zero subtree), so sparse disks cost nothing.
 * The node covering chunks [i*fanout^(L+1), (i+1)*fanout^(L+1)) is "node (L, i)" in every
 * point whatever the disk's size, which lets a new point share every unchanged subtree.
 */
export const TreeNode = {
  /** Encodes `refs` (fanout*32 bytes) with trailing zero references trimmed; null when all zero. */
  encode(level: number, refs: Buffer): Buffer | null {
    let count = refs.length / REF_BYTES;
    while (count > 0 && isZeroRef(refs, count - 1)) count--;
    if (count === 0) return null;
    const out = Buffer.allocUnsafe(HEADER_BYTES + count * REF_BYTES);
    out[0] = FORMAT_VERSION;
    out[1] = level;
    out.writeUInt16LE(0, 2);
    out.writeUInt32LE(count, 4);
    refs.copy(out, HEADER_BYTES, 0, count * REF_BYTES);
    return out;
  },

  /** Decodes a node into `fanout*32` bytes of references; checks its level. */
  decode(node: Buffer, fanout: number, level: number): Buffer {
    if (node.length < HEADER_BYTES) throw new FormatError('tree node too short');
    if (node[0] !== FORMAT_VERSION)
      throw new FormatError(`tree node version ${String(node[0])}`, node[0]);
    if (node[1] !== level)
      throw new FormatError(`tree node of level ${String(node[1])}, expected ${level}`);
    const count = node.readUInt32LE(4);
    if (count > fanout || node.length !== HEADER_BYTES + count * REF_BYTES) {
      throw new FormatError('tree node length mismatch');
    }
    const refs = Buffer.alloc(fanout * REF_BYTES);
    node.copy(refs, 0, HEADER_BYTES);
    return refs;
  },
} as const;

/** True when reference `i` of `refs` is the zero reference. */
export function isZeroRef(refs: Buffer, i: number): boolean {
  return refs.compare(ZERO_REF, 0, REF_BYTES, i * REF_BYTES, (i + 1) * REF_BYTES) === 0;
}

/** Reference `i` of `refs`, or null when it is zero. */
export function getRef(refs: Buffer, i: number): Buffer | null {
  return isZeroRef(refs, i) ? null : refs.subarray(i * REF_BYTES, (i + 1) * REF_BYTES);
}

/** Sets reference `i` of `refs` (null = zero). */
export function setRef(refs: Buffer, i: number, ref: Buffer | null): void {
  if (ref === null) refs.fill(0, i * REF_BYTES, (i + 1) * REF_BYTES);
  else ref.copy(refs, i * REF_BYTES, 0, REF_BYTES);
}

/** Levels of nodes a disk of `chunks` chunks needs (at least 1). */
export function treeHeight(chunks: number, fanout: number): number {
  let height = 1;
  let cap = fanout;
  while (cap < chunks) {
    height++;
    cap *= fanout;
  }
  return height;
}
