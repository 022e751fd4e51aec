import { randomBytes } from 'node:crypto';
import { mkdir, readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { LifeboatError } from '@lifeboat/protocol';
import { DirectoryBackend, Store } from '@lifeboat/store';

/** Where `lifeboat up` keeps its state, inside one data directory. */
export interface UpPaths {
  dataDir: string;
  /** The directory target store. */
  store: string;
  /** The store's passphrase (first line), mode 0600. */
  passphraseFile: string;
  /** The vault's data directory (SQLite, secret key, initial admin password). */
  vault: string;
  /** The process server's cache journal. */
  journal: string;
  /** Credentials each component got from the vault (`<kind>/cert.pem`, ...). */
  credentials: string;
  /** Agents' state directories, one per protected machine. */
  agents: string;
  /** The recovery host's run directory (exports, overlays, jobs). */
  recovery: string;
  /** The demo's VM (overlay, sockets, console). */
  demo: string;
}

/** The paths of a data directory. */
export function upPaths(dataDir: string): UpPaths {
  return {
    dataDir,
    store: join(dataDir, 'store'),
    passphraseFile: join(dataDir, 'store-passphrase'),
    vault: join(dataDir, 'vault'),
    journal: join(dataDir, 'journal'),
    credentials: join(dataDir, 'credentials'),
    agents: join(dataDir, 'agents'),
    recovery: join(dataDir, 'recovery'),
    demo: join(dataDir, 'demo-vm'),
  };
}

async function nonEmpty(dir: string): Promise<boolean> {
  try {
    return (await readdir(dir)).length > 0;
  } catch {
    return false;
  }
}

async function readPassphrase(file: string): Promise<string | undefined> {
  try {
    const first = (await readFile(file, 'utf8')).split('\n')[0]?.trim() ?? '';
    return first === '' ? undefined : first;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
}

/**
 * Opens the data directory's store, creating it with a random passphrase (0600 file) on the
 * first run. A store that exists without its passphrase file is refused: a new store is never
 * created over one whose key is lost, since its points may be the only copy left.
 */
export async function openUpStore(
  paths: UpPaths,
): Promise<{ store: Store; passphrase: string; created: boolean }> {
  await mkdir(paths.dataDir, { recursive: true, mode: 0o700 });
  const exists = await nonEmpty(paths.store);
  let passphrase = await readPassphrase(paths.passphraseFile);
  if (exists) {
    if (passphrase === undefined) {
      throw new LifeboatError(
        'LB_UP_PASSPHRASE_MISSING',
        `The store ${paths.store} exists but its passphrase file ${paths.passphraseFile} is missing or empty. Without the passphrase its recovery points cannot be read, and lifeboat up never creates a new store over an existing one. Restore ${paths.passphraseFile} (first line: the passphrase), or move ${paths.store} away to start over with a new store.`,
        { details: { store: paths.store, passphraseFile: paths.passphraseFile } },
      );
    }
    const store = await Store.open({
      backend: new DirectoryBackend({ path: paths.store }),
      passphrase,
    });
    return { store, passphrase, created: false };
  }
  if (passphrase === undefined) {
    passphrase = randomBytes(24).toString('base64url');
    // 'wx': never overwrite a passphrase file another run wrote meanwhile.
    await writeFile(paths.passphraseFile, `${passphrase}\n`, { mode: 0o600, flag: 'wx' });
  }
  const store = await Store.init({
    backend: new DirectoryBackend({ path: paths.store }),
    passphrase,
  });
  return { store, passphrase, created: true };
}
