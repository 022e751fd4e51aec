import { DirectoryBackend, Store } from '@lifeboat/store';
import type { ObjectBackend, StoreApi, StoreOpenOptions } from '@lifeboat/store';
import type { CliContext } from './cli-context.js';
import type { CliConfig, StoreLocation } from './config.js';
import { readPassphrase, requireStore } from './config.js';

/** Builds the object backend for a store location (Azure's SDK is loaded only when used). */
export async function openBackend(
  location: StoreLocation,
  create: boolean,
  directory: { directWrites?: boolean } = {},
): Promise<ObjectBackend> {
  if (location.kind === 'directory')
    return new DirectoryBackend({ path: location.path, ...directory });
  const { AzureBlobBackend } = await import('@lifeboat/store-azure');
  // The URL, not just the container name: the backend checks that the connection string's
  // endpoint is the one the user named, so a store URL never silently means another account.
  return new AzureBlobBackend({
    connectionString: location.connectionString,
    containerUrl: location.url,
    createContainer: create,
  });
}

/** Human name of a store location for messages. */
export function describeLocation(location: StoreLocation): string {
  return location.kind === 'directory' ? location.path : location.url;
}

/** Reads the store passphrase (flag, environment or prompt), or says how to give one. */
export function storePassphrase(
  config: CliConfig,
  ctx: CliContext,
  confirm = false,
): Promise<string> {
  const where = describeLocation(requireStore(config));
  return readPassphrase(
    config.passphrase,
    { prompt: `passphrase for ${where}: `, confirm },
    ctx.io,
    {
      code: 'LB_CLI_NO_PASSPHRASE',
      message: `No passphrase for ${where}. Set LIFEBOAT_PASSPHRASE or pass --passphrase-file (a prompt is shown only when stdin is a terminal).`,
    },
  );
}

/**
 * Opens the configured store with its passphrase; it is closed when the invocation ends.
 * Errors (wrong passphrase, no store there, unsupported version) come from the store with
 * their own codes.
 */
export async function openStore(
  config: CliConfig,
  ctx: CliContext,
  options: Pick<StoreOpenOptions, 'cacheBytes' | 'prepareWrite'> & {
    /** A directory store writes its packs with direct I/O (see DirectoryBackendOptions). */
    directWrites?: boolean;
  } = {},
): Promise<StoreApi> {
  const location = requireStore(config);
  const passphrase = await storePassphrase(config, ctx);
  const { directWrites, ...open } = options;
  const backend = await openBackend(
    location,
    false,
    directWrites === undefined ? {} : { directWrites },
  );
  let store: StoreApi;
  try {
    store = await Store.open({ backend, passphrase, ...open });
  } catch (err) {
    await backend.close().catch(() => undefined);
    throw err;
  }
  ctx.cleanups.push(() => store.close());
  return store;
}
