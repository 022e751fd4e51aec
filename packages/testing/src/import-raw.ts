import { open, stat } from 'node:fs/promises';
import type { PointInfo, StoreApi } from '@lifeboat/store';

/**
 * Imports a raw image as a point of `machine`/`disk`, storing only non-zero chunks (test images
 * are sparse), as a fixture for tests that boot or read points.
 */
export async function importRaw(
  store: StoreApi,
  path: string,
  machine: string,
  disk: string,
  commit: { cut?: string; kind?: 'crash' | 'app'; consistencyGroup?: string } = {},
): Promise<PointInfo> {
  const size = (await stat(path)).size;
  const session = await store.beginWrite({ machine, disk, size, base: null });
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.alloc(store.chunkSize);
    for (let off = 0; off < size; off += buf.length) {
      const { bytesRead } = await fh.read(buf, 0, buf.length, off);
      const chunk = buf.subarray(0, bytesRead);
      if (chunk.some((b) => b !== 0)) await session.write(off, Buffer.from(chunk));
    }
  } finally {
    await fh.close();
  }
  return session.commit(commit);
}
