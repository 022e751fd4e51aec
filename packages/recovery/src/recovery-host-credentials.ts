import { join } from 'node:path';
import {
  LifeboatError,
  certificateNeedsRenewal,
  createKeyAndCsr,
  isLifeboatError,
  loadComponentIdentity,
  saveComponentIdentity,
} from '@lifeboat/protocol';
import type {
  ComponentIdentity,
  IssuedIdentity,
  VaultObject,
  VaultClient,
} from '@lifeboat/protocol';

/** Options of {@link recoveryHostCredentials}. */
export interface RecoveryHostCredentialsOptions {
  /** Private directory of the recovery host; the identity lives in `identity.json` (0600). */
  dir: string;
  /** The vault (no token needed; its CA for an HTTPS vault). */
  vault: VaultClient;
  /** Component name for a new registration. */
  name: string;
  /** Reads the one-time registration key, when one is needed. @default none: fail instead */
  registrationKey?: () => Promise<string>;
  /** Where others reach it, for its certificate. @default none */
  address?: string;
  /** The CA the vault's server certificate chains to. @default the vault's own CA */
  ca?: string;
}

/**
 * The client of the vault with a component's token and client certificate; it trusts `ca`
 * (a vault serving an outside certificate), else the vault's own CA.
 */
export function componentClient(
  vault: VaultClient,
  identity: ComponentIdentity,
  ca?: string,
): VaultClient {
  return vault
    .as(identity.token)
    .withTls({ ca: ca ?? identity.ca, cert: identity.cert, key: identity.key });
}

/**
 * The recovery host's identity: the one an earlier start kept in `dir` when the vault still
 * accepts its token (a restart needs no new key), else a registration with the one-time key
 * (`POST /api/register` with a CSR: the private key is made here and never leaves the host).
 * Its id, token, certificate and key are kept in `<dir>/identity.json`, mode 0600; the
 * certificate is renewed when a third of its lifetime is left.
 */
export async function recoveryHostCredentials(
  options: RecoveryHostCredentialsOptions,
): Promise<ComponentIdentity> {
  const path = join(options.dir, 'identity.json');
  let known = await loadComponentIdentity(options.dir);
  if (known !== undefined && known.kind !== 'recovery-host') {
    throw new LifeboatError(
      'LB_RECOVERY_NOT_REGISTERED',
      `${path} holds the identity of a ${known.kind} (${known.id}), not of a recovery host. Give the recovery host a run directory of its own.`,
      { details: { path, id: known.id } },
    );
  }
  if (known !== undefined) {
    try {
      await componentClient(options.vault, known, options.ca).call(
        'POST',
        '/api/components/self/heartbeat',
        {},
      );
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
      known = undefined;
    }
  }
  if (known !== undefined) {
    if (certificateNeedsRenewal(known.cert)) {
      const pair = await createKeyAndCsr(known.id);
      const r = await componentClient(options.vault, known, options.ca).call<IssuedIdentity>(
        'POST',
        '/api/components/self/certificate',
        pair !== undefined ? { csr: pair.csr } : {},
      );
      const key = pair?.key ?? r.privateKey;
      if (key !== undefined) {
        known = { ...known, cert: r.certificate, key, ca: r.caCertificate };
        await saveComponentIdentity(options.dir, known);
      }
    }
    return known;
  }
  if (options.registrationKey === undefined) {
    throw new LifeboatError(
      'LB_RECOVERY_NOT_REGISTERED',
      `This recovery host is not registered with the vault at ${options.vault.url} (no ${path}). Give a one-time key from an admin ("lifeboat vault key create --kind recovery-host") with --registration-key-file.`,
      { details: { path } },
    );
  }
  const pair = await createKeyAndCsr(options.name);
  const r = await options.vault.call<VaultObject & IssuedIdentity>('POST', '/api/register', {
    key: (await options.registrationKey()).trim(),
    kind: 'recovery-host',
    name: options.name,
    ...(options.address !== undefined ? { address: options.address } : {}),
    ...(pair !== undefined ? { csr: pair.csr } : {}),
  });
  const key = pair?.key ?? r.privateKey;
  if (key === undefined) {
    throw new LifeboatError('LB_RECOVERY_NOT_REGISTERED', 'The vault returned no private key.');
  }
  const identity: ComponentIdentity = {
    id: String((r['component'] as VaultObject)['id']),
    name: options.name,
    kind: 'recovery-host',
    token: String(r['token']),
    cert: r.certificate,
    key,
    ca: r.caCertificate,
  };
  await saveComponentIdentity(options.dir, identity);
  return identity;
}
