// A light entry point (`@lifeboat/store/key-prefetch`): node built-ins only, so a command-line
// tool can start it before it loads anything else. See prefetchDirectoryStoreKeys.
import { readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { startScryptKek } from './kdf.js';

/**
 * Starts deriving, on the thread pool, the key-encryption keys that `Store.open` of the
 * directory store at `dir` with `passphrase` will need (scrypt: a few hundred ms by design), so
 * that the derivation overlaps whatever the process does before it opens the store (loading its
 * modules, probing an image). Only plain reads of `keys/`; a store that is not there, a damaged
 * key object or another passphrase later simply means the work was not needed. Never throws.
 */
export async function prefetchDirectoryStoreKeys(dir: string, passphrase: string): Promise<void> {
  try {
    const names = await readdir(join(dir, 'keys'));
    for (const name of names.filter((n) => /^[0-9a-f]{32}$/.test(n)).slice(0, 2)) {
      const k = JSON.parse(await readFile(join(dir, 'keys', name), 'utf8')) as Record<
        string,
        unknown
      >;
      const { kdf, N, r, p, salt } = k;
      if (
        kdf === 'scrypt' &&
        typeof salt === 'string' &&
        typeof N === 'number' &&
        typeof r === 'number' &&
        typeof p === 'number' &&
        Number.isInteger(N) &&
        N >= 1024 &&
        N <= 1 << 22 &&
        r >= 1 &&
        r <= 32 &&
        p >= 1 &&
        p <= 16
      ) {
        startScryptKek(passphrase, Buffer.from(salt, 'base64'), N, r, p);
      }
    }
  } catch {
    // Nothing to prepare: Store.open will say what is wrong.
  }
}
