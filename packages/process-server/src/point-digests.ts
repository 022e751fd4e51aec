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
/** Store ids remembered to digest a repeated chunk once (bounded: a disk may have millions). */
const RECENT_IDS = 4096;

/**
 * Reads a point and digests each data chunk's plaintext with HMAC-SHA-256 under `key` (the
 * first 16 bytes), for an agent's resync: the agent digests its disk's chunks under the same
 * key and sends only those that differ. Zero chunks are known from the point's tree and not
 * read; a chunk whose store id was seen recently is not read again. Memory: the entries
 * (17 bytes per 64 KiB chunk) and one run of chunks.
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
  const recent = new Map<string, number>(); // store id -> a chunk index holding its digest
  let run: Array<{ index: number; id: string }> = [];
  const flush = async (): Promise<void> => {
    if (run.length === 0) return;
    const first = run[0]!.index;
    const last = run[run.length - 1]!.index;
    const from = first * cs;
    const buf = await reader.readAt(from, Math.min(reader.size, (last + 1) * cs) - from);
    for (const { index, id } of run) {
      const at = index * BASELINE_ENTRY_BYTES;
      const off = (index - first) * cs;
      entries[at] = 1;
      createHmac('sha256', key)
        .update(buf.subarray(off, Math.min(buf.length, off + cs)))
        .digest()
        .copy(entries, at + 1, 0, BASELINE_DIGEST_BYTES);
      remember(id, index);
    }
    run = [];
  };
  const remember = (id: string, index: number): void => {
    if (recent.size >= RECENT_IDS) recent.delete(recent.keys().next().value as string);
    recent.set(id, index);
  };
  for await (const c of reader.chunkIds()) {
    if (c.id === null) continue; // a zero chunk: entry kind 0, all zero
    const index = c.offset / cs;
    const known = recent.get(c.id);
    // A partial last chunk has another length than a whole one with the same id can have.
    if (known !== undefined && (index + 1) * cs <= reader.size) {
      entries.copy(
        entries,
        index * BASELINE_ENTRY_BYTES,
        known * BASELINE_ENTRY_BYTES,
        (known + 1) * BASELINE_ENTRY_BYTES,
      );
      continue;
    }
    const prev = run[run.length - 1];
    if (prev !== undefined && (prev.index !== index - 1 || run.length >= RUN_CHUNKS)) await flush();
    run.push({ index, id: c.id });
  }
  await flush();
  return { chunkSize: cs, size: reader.size, entries };
}
