import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DirectoryBackend } from './directory-backend.js';
import { Store } from './store.js';
import type { StoreExtraOptions } from './store.js';
import type { LockRecord } from './store-locks.js';
import type { StoreInitOptions, StoreOpenOptions } from './store-types.js';

/** Test fixture: a temporary store directory (tests only; not exported from the package). */
export interface TempStore {
  dir: string;
  store: Store;
  /** Opens the same store again (a second process's view). */
  reopen(
    passphrase?: string,
    extra?: StoreExtraOptions & Pick<StoreOpenOptions, 'cryptoThreads' | 'prepareWrite'>,
  ): Promise<Store>;
  cleanup(): Promise<void>;
}

/** The passphrase test stores are created with. */
export const TEST_PASSPHRASE = 'correct horse battery staple';

/** Creates a store in a fresh temporary directory with a cheap KDF. */
export async function tempStore(
  options: Partial<Omit<StoreInitOptions, 'backend'>> & StoreExtraOptions = {},
): Promise<TempStore> {
  const dir = await mkdtemp(join(tmpdir(), 'lifeboat-store-'));
  const opened: Store[] = [];
  const store = await Store.init({
    backend: new DirectoryBackend({ path: dir }),
    passphrase: TEST_PASSPHRASE,
    kdfCost: 1024,
    ...options,
  });
  opened.push(store);
  return {
    dir,
    store,
    async reopen(passphrase = TEST_PASSPHRASE, extra = {}) {
      const s = await Store.open({
        backend: new DirectoryBackend({ path: dir }),
        passphrase,
        ...extra,
      });
      opened.push(s);
      return s;
    },
    async cleanup() {
      for (const s of opened) await s.close().catch(() => undefined);
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** Deterministic pseudo-random bytes (fast, seeded) for test disks. */
export function pseudoRandom(length: number, seed: number): Buffer {
  const out = Buffer.allocUnsafe(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i + 4 <= length; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out.writeUInt32LE(x >>> 0, i);
  }
  for (let i = length & ~3; i < length; i++) out[i] = i & 0xff;
  return out;
}

/** Random bytes (crypto), for when content must not repeat across runs. */
export function randomData(length: number): Buffer {
  return randomBytes(length);
}

/**
 * Writes lock object `locks/<id>` into the store directory `dir` as another holder would: by
 * default a live gc lock (exclusive, fresh) of a process on another host.
 */
export async function writeLockObject(
  dir: string,
  id: string,
  fields: Partial<LockRecord> = {},
): Promise<void> {
  const now = new Date().toISOString();
  const record: LockRecord = {
    version: 1,
    exclusive: true,
    host: 'elsewhere',
    pid: 1,
    purpose: 'gc',
    created: now,
    time: now,
    ...fields,
  };
  await writeFile(join(dir, 'locks', id), JSON.stringify(record));
}
