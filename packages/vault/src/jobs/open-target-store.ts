import { LifeboatError } from '@lifeboat/protocol';
import { DirectoryBackend, Store, type StoreApi } from '@lifeboat/store';
import { AzureBlobBackend } from '@lifeboat/store-azure';
import type { VaultContext } from '../vault-context.js';
import type { TargetStoreAccess } from '../vault-options.js';

/** Opens a target store with `@lifeboat/store` (directory or Azure Blob backend). */
export async function defaultOpenStore(store: TargetStoreAccess): Promise<StoreApi> {
  const backend =
    store.kind === 'directory'
      ? new DirectoryBackend({ path: store.path ?? '' })
      : new AzureBlobBackend({
          ...(store.connectionString !== null ? { connectionString: store.connectionString } : {}),
          ...(store.container !== null ? { container: store.container } : {}),
        });
  return Store.open({ backend, passphrase: store.passphrase });
}

/** Opens the target store with this id, unsealing its secrets. */
export async function openTargetStore(vault: VaultContext, id: string): Promise<StoreApi> {
  const row = await vault.db
    .selectFrom('targetStores')
    .selectAll()
    .where('id', '=', id)
    .executeTakeFirst();
  if (row === undefined) {
    throw new LifeboatError('LB_VAULT_NOT_FOUND', `No target store with id "${id}".`, {
      details: { what: 'target store', id },
    });
  }
  const access: TargetStoreAccess = {
    id: row.id,
    kind: row.kind as 'directory' | 'azure',
    path: row.path,
    container: row.container,
    connectionString:
      row.connectionSealed === null ? null : vault.secrets.open(row.connectionSealed),
    passphrase: vault.secrets.open(row.passphraseSealed),
  };
  return (vault.options.openStore ?? defaultOpenStore)(access);
}
