import { chmod, mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { LifeboatError, isLifeboatError } from '@lifeboat/protocol';
import type { VaultClient } from './vault-client.js';

/** What a recovery host got from the vault when it registered. */
export interface RecoveryHostCredentials {
  /** Its component id. */
  id: string;
  name: string;
  /** Bearer token (`lbc_...`) for the component routes. */
  token: string;
  /** Its certificate and private key, and the vault CA's certificate (PEM). */
  cert: string;
  key: string;
  ca: string;
  /** The vault it registered with. */
  vaultUrl: string;
}

/** Options of {@link recoveryHostCredentials}. */
export interface RecoveryHostCredentialsOptions {
  /** Private directory of the recovery host; the credentials live in `credentials.json` (0600). */
  dir: string;
  /** The vault (no token needed). */
  vault: VaultClient;
  /** Component name for a new registration. */
  name: string;
  /** Reads the one-time registration key, when one is needed. @default none: fail instead */
  registrationKey?: () => Promise<string>;
  /** Where others reach it, for its certificate. @default none */
  address?: string;
}

const FILE = 'credentials.json';

/**
 * The recovery host's identity: the credentials of an earlier run in `dir` when the vault still
 * accepts their token (a restart does not need a new key), else a registration with the
 * one-time key (`POST /api/register`), whose id, token, certificate and key are kept in
 * `<dir>/credentials.json`, mode 0600.
 */
export async function recoveryHostCredentials(
  options: RecoveryHostCredentialsOptions,
): Promise<RecoveryHostCredentials> {
  const path = join(options.dir, FILE);
  const known = await readFile(path, 'utf8').then(
    (t) => JSON.parse(t) as RecoveryHostCredentials,
    () => undefined,
  );
  if (known !== undefined) {
    try {
      await options.vault
        .with(known.token, { ca: known.ca, cert: known.cert, key: known.key })
        .call('POST', '/api/components/self/heartbeat', {});
      return known;
    } catch (err) {
      const refused = isLifeboatError(err) && err.details['status'] === 401;
      if (!refused) throw err;
      if (options.registrationKey === undefined) {
        throw new LifeboatError(
          'LB_RECOVERY_NOT_REGISTERED',
          `The vault at ${options.vault.url} no longer accepts this recovery host's token (${path}): it was unregistered or the vault was replaced. Register again with a new key (--registration-key-file).`,
          { cause: err, details: { path } },
        );
      }
    }
  }
  if (options.registrationKey === undefined) {
    throw new LifeboatError(
      'LB_RECOVERY_NOT_REGISTERED',
      `This recovery host is not registered with the vault at ${options.vault.url} (no ${path}). Give a one-time key from an admin ("lifeboat vault key create --kind recovery-host") with --registration-key-file.`,
      { details: { path } },
    );
  }
  const key = (await options.registrationKey()).trim();
  const r = await options.vault.call<Record<string, unknown>>('POST', '/api/register', {
    key,
    kind: 'recovery-host',
    name: options.name,
    ...(options.address !== undefined ? { address: options.address } : {}),
  });
  const creds: RecoveryHostCredentials = {
    id: String((r['component'] as Record<string, unknown>)['id']),
    name: options.name,
    token: String(r['token']),
    cert: String(r['certificate']),
    key: String(r['privateKey'] ?? ''),
    ca: String(r['caCertificate']),
    vaultUrl: options.vault.url,
  };
  await mkdir(options.dir, { recursive: true, mode: 0o700 });
  const tmp = `${path}.tmp`;
  await writeFile(tmp, JSON.stringify(creds, null, 2), { mode: 0o600 });
  await chmod(tmp, 0o600);
  await rename(tmp, path);
  return creds;
}
