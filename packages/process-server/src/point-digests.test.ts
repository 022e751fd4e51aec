import { createHmac, randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BASELINE_ENTRY_BYTES } from '@lifeboat/protocol';
import { DirectoryBackend, Store } from '@lifeboat/store';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { computePointDigests } from './point-digests.js';

let dir: string;
let store: Store;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lb-digests-'));
  store = await Store.init({
    backend: new DirectoryBackend({ path: join(dir, 'store') }),
    passphrase: 'test',
    kdfCost: 1024,
  });
});
afterEach(async () => {
  await store.close();
  await rm(dir, { recursive: true, force: true });
});

describe('computePointDigests', () => {
  it('digests every data chunk under the key, marks zero chunks, and handles a short last chunk', async () => {
    const C = store.chunkSize;
    const a = randomBytes(C);
    const b = randomBytes(C);
    const tail = randomBytes(512);
    const size = 4 * C + 512;
    const s = await store.beginWrite({ machine: 'm', disk: 'vda', size });
    await s.write(0, a);
    // chunk 1 stays zero
    await s.write(2 * C, a); // same content as chunk 0: digested once, same digest
    await s.write(3 * C, b);
    await s.write(4 * C, tail);
    const point = await s.commit({});
    const key = randomBytes(32);
    const got = await computePointDigests(store, point.id, key);
    expect(got.chunkSize).toBe(C);
    expect(got.size).toBe(size);
    const entries = Buffer.from(got.entries);
    expect(entries.length).toBe(5 * BASELINE_ENTRY_BYTES);
    const expected = (data: Buffer | null): Buffer =>
      data === null
        ? Buffer.alloc(BASELINE_ENTRY_BYTES)
        : Buffer.concat([
            Buffer.of(1),
            createHmac('sha256', key).update(data).digest().subarray(0, 16),
          ]);
    const want = Buffer.concat([a, null, a, b, tail].map((d) => expected(d)));
    expect(entries.equals(want)).toBe(true);
    // Another key gives other digests: nothing outlives the answer it was made for.
    const other = await computePointDigests(store, point.id, randomBytes(32));
    expect(Buffer.from(other.entries).equals(entries)).toBe(false);
  });
});
