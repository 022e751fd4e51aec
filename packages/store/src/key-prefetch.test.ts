import { describe, expect, it } from 'vitest';
import { isLifeboatError } from '@lifeboat/protocol';
import { DirectoryBackend } from './directory-backend.js';
import { pendingEarlyKeks } from './kdf.js';
import { prefetchDirectoryStoreKeys } from './key-prefetch.js';
import { Store } from './store.js';
import { TEST_PASSPHRASE, tempStore } from './test-support.js';

describe('key prefetch: scrypt started before Store.open', () => {
  it('is taken over by the open with the same passphrase, and changes nothing otherwise', async () => {
    const t = await tempStore();
    try {
      const open = (passphrase: string): Promise<Store> =>
        Store.open({ backend: new DirectoryBackend({ path: t.dir }), passphrase });
      await prefetchDirectoryStoreKeys(t.dir, TEST_PASSPHRASE);
      expect(pendingEarlyKeks()).toBe(1);
      const s = await open(TEST_PASSPHRASE);
      expect(pendingEarlyKeks()).toBe(0);
      expect(s.id).toBe(t.store.id);
      await s.close();
      // A prefetch with another passphrase is not used: the right one still opens, the wrong
      // one still fails as wrong.
      await prefetchDirectoryStoreKeys(t.dir, 'not the passphrase');
      const s2 = await open(TEST_PASSPHRASE);
      await s2.close();
      const err = await open('not the passphrase').catch((e: unknown) => e);
      expect(isLifeboatError(err, 'LB_STORE_WRONG_PASSPHRASE')).toBe(true);
      expect(pendingEarlyKeks()).toBe(0);
      // No store there, or not a directory: nothing happens, nothing throws.
      await prefetchDirectoryStoreKeys(`${t.dir}/nope`, TEST_PASSPHRASE);
      expect(pendingEarlyKeks()).toBe(0);
    } finally {
      await t.cleanup();
    }
  });
});
