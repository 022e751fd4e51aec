import { existsSync, writeFileSync } from 'node:fs';
import { DirectoryBackend, Store } from '@lifeboat/store';
import type { StoreApi } from '@lifeboat/store';

/** The spec of {@link openWorkerStore}: a directory store, and the file that records the one crash. */
export interface CrashingStoreSpec {
  kind: 'directory';
  path: string;
  passphrase: string;
  /** Created when the thread kills itself; while it exists, no further crash. */
  crashMarker: string;
}

/** Data starting with this makes the store worker thread die (once). */
export const CRASH_PATTERN = 'LIFEBOAT-CRASH-STORE-WORKER';

/**
 * A store worker module (`storeWorkers.module`) for fault tests: it opens the directory store as
 * the built-in one does, but the first write of a chunk starting with {@link CRASH_PATTERN}
 * ends the worker thread at once (`process.exit` in a worker ends only that thread), as a crash
 * in the store code would, in the middle of a machine's cut.
 */
export async function openWorkerStore(spec: CrashingStoreSpec): Promise<StoreApi> {
  const store = await Store.open({
    backend: new DirectoryBackend({ path: spec.path }),
    passphrase: spec.passphrase,
    cacheBytes: 8 * 1024 * 1024,
  });
  const beginWrite = store.beginWrite.bind(store);
  store.beginWrite = async (options) => {
    const session = await beginWrite(options);
    const write = session.write.bind(session);
    session.write = async (offset, data) => {
      const head = Buffer.from(data.buffer, data.byteOffset, Math.min(64, data.byteLength));
      if (head.toString('latin1').startsWith(CRASH_PATTERN) && !existsSync(spec.crashMarker)) {
        writeFileSync(spec.crashMarker, String(Date.now()));
        process.exit(1);
      }
      return write(offset, data);
    };
    return session;
  };
  return store;
}
