import { createHmac } from 'node:crypto';
import { BASELINE_DIGEST_BYTES, BASELINE_ENTRY_BYTES } from '@lifeboat/protocol';
import type { StoreApi } from '@lifeboat/store';

/** A point's resync baseline: one BASELINE_DIGESTS entry per chunk. */
export interface PointDigests {
  chunkSize: number;
  size: number;
  /** `BASELINE_ENTRY_BYTES` per chunk, in chunk order. */
  entries: Uint8Array;
}

/** Chunks read from the store in one request (contiguous data chunks). */
const RUN_CHUNKS = 64;

/**
 * Reads a point and digests each data chunk's plaintext with HMAC-SHA-256 under `key` (the
 * first 16 bytes), for an agent's resync: the agent digests its disk's chunks under the same
 * key and sends only those that differ. Zero chunks are known from the point's tree and not
 * read; chunks with the same store id are read and digested once.
 */
export async function computePointDigests(
  store: StoreApi,
  pointId: string,
  key: Uint8Array,
): Promise<PointDigests> {
  const reader = await store.openPoint(pointId);
  const cs = store.chunkSize;
  const n = Math.ceil(reader.size / cs);
  const entries = Buffer.alloc(n * BASELINE_ENTRY_BYTES);
  const ids: Array<string | null> = new Array<string | null>(n).fill(null);
  for await (const c of reader.chunkIds()) ids[c.offset / cs] = c.id;
  const seen = new Map<string, number>(); // store id -> first chunk index with it
  const toRead: number[] = [];
  const copies: Array<[number, number]> = [];
  for (let i = 0; i < n; i++) {
    const id = ids[i];
    if (id === null || id === undefined) continue;
    const first = seen.get(id);
    if (first === undefined) {
      seen.set(id, i);
      toRead.push(i);
    } else copies.push([i, first]);
  }
  const digest = (i: number, data: Buffer): void => {
    const at = i * BASELINE_ENTRY_BYTES;
    entries[at] = 1;
    createHmac('sha256', key)
      .update(data)
      .digest()
      .copy(entries, at + 1, 0, BASELINE_DIGEST_BYTES);
  };
  for (let k = 0; k < toRead.length;) {
    let end = k + 1;
    while (end < toRead.length && end - k < RUN_CHUNKS && toRead[end] === toRead[end - 1]! + 1)
      end++;
    const from = toRead[k]! * cs;
    const to = Math.min(reader.size, (toRead[end - 1]! + 1) * cs);
    const buf = await reader.readAt(from, to - from);
    for (let j = k; j < end; j++) {
      const off = toRead[j]! * cs - from;
      digest(toRead[j]!, buf.subarray(off, Math.min(buf.length, off + cs)));
    }
    k = end;
  }
  for (const [i, first] of copies) {
    entries.copy(
      entries,
      i * BASELINE_ENTRY_BYTES,
      first * BASELINE_ENTRY_BYTES,
      (first + 1) * BASELINE_ENTRY_BYTES,
    );
  }
  return { chunkSize: cs, size: reader.size, entries };
}
