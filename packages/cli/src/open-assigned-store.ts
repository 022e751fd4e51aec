import { DirectoryBackend, Store } from '@lifeboat/store';
import type { StoreApi } from '@lifeboat/store';
import type { AssignedTargetStore } from '@lifeboat/recovery';

/**
 * Opens a target store with what the vault handed a component over its token: a directory,
 * or an Azure Blob container with its connection string (the SDK is loaded only then).
 */
export async function openAssignedStore(access: AssignedTargetStore): Promise<StoreApi> {
  if (access.kind === 'directory') {
    return Store.open({
      backend: new DirectoryBackend({ path: access.path ?? '' }),
      passphrase: access.passphrase,
    });
  }
  const { AzureBlobBackend } = await import('@lifeboat/store-azure');
  const backend = new AzureBlobBackend({
    ...(access.connectionString !== null ? { connectionString: access.connectionString } : {}),
    ...(access.container !== null ? { container: access.container } : {}),
  });
  try {
    return await Store.open({ backend, passphrase: access.passphrase });
  } catch (err) {
    await backend.close().catch(() => undefined);
    throw err;
  }
}
