import { pseudoRandom } from './test-support.js';

/** One change of a disk in a test model. */
export type DiskOp =
  | { kind: 'write'; offset: number; data: Buffer }
  | { kind: 'zero'; offset: number; length: number }
  | { kind: 'trim'; offset: number; length: number };

/**
 * A deterministic list of changes from a seed (tests only): whole-chunk and unaligned writes,
 * zero ranges and trims, so a point's content can be rebuilt from its seed label alone.
 */
export function deltaOps(seed: number, size: number, chunkSize: number): DiskOp[] {
  let x = seed >>> 0 || 1;
  const rnd = (n: number): number => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) % n;
  };
  const ops: DiskOp[] = [];
  const count = 2 + rnd(5);
  for (let i = 0; i < count; i++) {
    const kind = rnd(6);
    const aligned = rnd(2) === 0;
    const offset = aligned ? rnd(size / chunkSize) * chunkSize : rnd(size);
    const max = size - offset;
    const length = Math.min(max, aligned ? chunkSize * (1 + rnd(12)) : 1 + rnd(chunkSize * 3));
    if (length <= 0) continue;
    if (kind < 4)
      ops.push({ kind: 'write', offset, data: pseudoRandom(length, seed * 31 + i + 1) });
    else ops.push({ kind: kind === 4 ? 'zero' : 'trim', offset, length });
  }
  return ops;
}

/** Applies ops to an in-memory disk. */
export function applyToBuffer(disk: Buffer, ops: readonly DiskOp[]): void {
  for (const op of ops) {
    if (op.kind === 'write') op.data.copy(disk, op.offset);
    else disk.fill(0, op.offset, op.offset + op.length);
  }
}

/** Applies ops to a write session. */
export async function applyToSession(
  session: {
    write(o: number, d: Uint8Array): Promise<void>;
    writeZeroes(o: number, l: number): Promise<void>;
    trim(o: number, l: number): Promise<void>;
  },
  ops: readonly DiskOp[],
): Promise<void> {
  for (const op of ops) {
    if (op.kind === 'write') await session.write(op.offset, op.data);
    else if (op.kind === 'zero') await session.writeZeroes(op.offset, op.length);
    else await session.trim(op.offset, op.length);
  }
}
