import { DirectoryBackend, Store } from '@lifeboat/store';
import type { ObjectBackend, StoreApi } from '@lifeboat/store';

/** How a store worker thread opens the target store (cloneable: it crosses to the thread). */
export type WorkerStoreSpec = (
  | { kind: 'directory'; path: string; passphrase: string }
  | {
      kind: 'azure';
      connectionString: string;
      container?: string;
      containerUrl?: string;
      passphrase: string;
    }
) & {
  /**
   * Crypto threads of the store (see the store's `cryptoThreads`). In a {@link StoreWorkerPool}
   * the store workers already spread machines over threads, so there their stores add none by
   * default (N workers are N threads, not N times the cores); a store opened on its own (no
   * store workers) keeps the store's default.
   * @default 0 in store workers, the store's default otherwise
   */
  cryptoThreads?: number;
};

/** Opens the store described by `spec`; the default module of store workers. */
export async function openWorkerStore(spec: WorkerStoreSpec): Promise<StoreApi> {
  let backend: ObjectBackend;
  // A process server writes each pack once and seldom reads it again (a failover, days later):
  // past the page cache, it saves a kernel copy per byte (about a tenth of its CPU, measured).
  if (spec.kind === 'directory')
    backend = new DirectoryBackend({ path: spec.path, directWrites: true });
  else {
    const { AzureBlobBackend } = await import('@lifeboat/store-azure');
    backend = new AzureBlobBackend({
      connectionString: spec.connectionString,
      ...(spec.container !== undefined ? { container: spec.container } : {}),
      ...(spec.containerUrl !== undefined ? { containerUrl: spec.containerUrl } : {}),
    });
  }
  // A writer reads only the base points' tree nodes: a small chunk cache keeps RSS per worker low.
  return Store.open({
    backend,
    passphrase: spec.passphrase,
    cacheBytes: 8 * 1024 * 1024,
    ...(spec.cryptoThreads === undefined ? {} : { cryptoThreads: spec.cryptoThreads }),
  });
}
