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
    if (certificateNeedsRenewal(known.cert)) known = await renewCertificate(options, known);
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

/** Has the vault sign a new certificate (a new key pair made here) and saves the identity. */
async function renewCertificate(
  options: { dir: string; vault: VaultClient; ca?: string },
  known: ComponentIdentity,
): Promise<ComponentIdentity> {
  const pair = await createKeyAndCsr(known.id);
  const r = await componentClient(options.vault, known, options.ca).call<IssuedIdentity>(
    'POST',
    '/api/components/self/certificate',
    pair !== undefined ? { csr: pair.csr } : {},
  );
  const key = pair?.key ?? r.privateKey;
  if (key === undefined) return known;
  const renewed = { ...known, cert: r.certificate, key, ca: r.caCertificate };
  await saveComponentIdentity(options.dir, renewed);
  return renewed;
}

/** Options of {@link keepRecoveryHostCertificate}. */
export interface KeepCertificateOptions {
  /** The recovery host's private directory (its `identity.json`). */
  dir: string;
  /** The vault, without a token (as for {@link recoveryHostCredentials}). */
  vault: VaultClient;
  /** The identity in use now. */
  identity: ComponentIdentity;
  /** The CA the vault's server certificate chains to. @default the vault's own CA */
  ca?: string;
  /** Gets the client with the renewed certificate (e.g. `RecoveryHostLink.setVault`). */
  onRenewed: (client: VaultClient, identity: ComponentIdentity) => void;
  /** How often to check. @default 3600000 (hourly) */
  checkMs?: number;
  /** Renew when less than this fraction of the certificate's lifetime is left. @default 1/3 */
  fraction?: number;
  /** A renewal that failed (the vault unreachable); it is tried again at the next check. */
  onError?: (err: unknown) => void;
}

/**
 * Renews a running recovery host's certificate before it expires: checks every `checkMs` (and
 * at once), and when less than `fraction` of its lifetime is left has the vault sign a new one,
 * saves it in `identity.json` and hands a client with it to `onRenewed`. A recovery host runs
 * for months; renewing only at start would let its certificate run out under it.
 */
export function keepRecoveryHostCertificate(o: KeepCertificateOptions): {
  /** Checks (and renews when due) now. */
  check(): Promise<void>;
  stop(): void;
} {
  let identity = o.identity;
  let running: Promise<void> | undefined;
  const check = (): Promise<void> => {
    running ??= (async () => {
      if (!certificateNeedsRenewal(identity.cert, new Date(), o.fraction ?? 1 / 3)) return;
      identity = await renewCertificate(o, identity);
      o.onRenewed(componentClient(o.vault, identity, o.ca), identity);
    })().finally(() => {
      running = undefined;
    });
    return running;
  };
  const timer = setInterval(
    () => void check().catch((err) => o.onError?.(err)),
    o.checkMs ?? 3_600_000,
  );
  timer.unref();
  void check().catch((err) => o.onError?.(err));
  return { check, stop: () => clearInterval(timer) };
}
