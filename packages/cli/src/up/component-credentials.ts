import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { isLifeboatError } from '@lifeboat/protocol';
import type { VaultClient, VaultObject as ApiObject } from '@lifeboat/protocol';

/** What a component got from the vault when it registered. */
export interface ComponentCredentials {
  id: string;
  name: string;
  /** Bearer token (`lbc_...`) for the component routes. */
  token: string;
  /** Its certificate, private key and the vault CA's certificate (PEM). */
  cert: string;
  key: string;
  ca: string;
}

async function load(dir: string): Promise<ComponentCredentials | undefined> {
  try {
    return JSON.parse(
      await readFile(join(dir, 'credentials.json'), 'utf8'),
    ) as ComponentCredentials;
  } catch {
    return undefined;
  }
}

/**
 * The credentials of one of `up`'s own components: those of an earlier run when the vault still
 * accepts their token, else a new registration with a one-time key the admin creates for it
 * (the same two calls `lifeboat vault key create` and `lifeboat vault register` make).
 */
export async function componentCredentials(
  admin: VaultClient,
  dir: string,
  kind: 'process-server' | 'recovery-host' | 'agent',
  name: string,
): Promise<ComponentCredentials> {
  const known = await load(dir);
  if (known !== undefined) {
    try {
      await admin.as(known.token).call('POST', '/api/components/self/heartbeat', {});
      return known;
    } catch (err) {
      // A vault whose database was replaced does not know the component any more: register again.
      if (!isLifeboatError(err) || err.details['status'] !== 401) throw err;
    }
  }
  const key = await admin.call<ApiObject>('POST', '/api/registration-keys', {
    kind,
    expiresInSeconds: 600,
    description: `lifeboat up: ${name}`,
  });
  const r = await admin.call<ApiObject>('POST', '/api/register', { key: key['key'], kind, name });
  const creds: ComponentCredentials = {
    id: String((r['component'] as ApiObject)['id']),
    name,
    token: String(r['token']),
    cert: String(r['certificate']),
    key: String(r['privateKey']),
    ca: String(r['caCertificate']),
  };
  await mkdir(dir, { recursive: true, mode: 0o700 });
  await writeFile(join(dir, 'credentials.json'), JSON.stringify(creds, null, 2), { mode: 0o600 });
  return creds;
}
