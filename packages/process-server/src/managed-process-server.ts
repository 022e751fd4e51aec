import { join } from 'node:path';
import {
  LifeboatError,
  VaultClient,
  certificateNeedsRenewal,
  createKeyAndCsr,
  isLifeboatError,
  loadComponentIdentity,
  saveComponentIdentity,
} from '@lifeboat/protocol';
import type { ComponentIdentity, IssuedIdentity, VaultObject } from '@lifeboat/protocol';
import { pino } from 'pino';
import type { Logger } from 'pino';
import { AgentHub } from './agent-hub.js';
import { ProcessServer } from './process-server.js';
import type { ProcessServerOptions } from './process-server-options.js';
import { RoutedStore } from './routed-store.js';
import { VaultLink } from './vault-link.js';
import type { Assignments } from './vault-link.js';

/** Options of {@link startManagedProcessServer}. */
export interface ManagedProcessServerOptions extends Omit<
  ProcessServerOptions,
  'store' | 'storeWorkers' | 'journalDir' | 'tls' | 'httpHandler' | 'authorizeSession' | 'logger'
> {
  /** The vault's URL (`https://vault:9440`). */
  vaultUrl: string;
  /** CA that signed an HTTPS vault's certificate (PEM), e.g. its `GET /api/ca.pem`. @default the system's */
  vaultCa?: string | Buffer;
  /** Keeps the identity (id, token, certificate, key: 0600), the stores file and, by default, the journal. */
  stateDir: string;
  /** The one-time registration key; needed on the first start only. @default none */
  registrationKey?: string;
  /** Name shown in the vault (and in the certificate). */
  name: string;
  /** Where agents reach it, `host[:port]` (goes into the certificate's names). @default none */
  address?: string;
  /** Directory of the cache journal. @default `<stateDir>/journal` */
  journalDir?: string;
  /** Store worker threads per target store (0: store work on the ingest thread). @default 2 */
  storeWorkerCount?: number;
  /** How often it polls the vault and sends heartbeats. @default 2000 */
  intervalMs?: number;
  /** How often it checks whether its certificate needs renewing. @default 3600000 */
  renewalCheckMs?: number;
  /** Renew when less than this fraction of the certificate's lifetime is left. @default 1/3 */
  renewFraction?: number;
  /** Where logs go. @default pino at `logLevel` */
  logger?: Logger;
  /** A background failure (a round against the vault, a renewal). @default logged */
  onError?: (what: string, err: unknown) => void;
}

/** A process server managed by the vault, and its parts. */
export interface ManagedProcessServer {
  readonly server: ProcessServer;
  readonly link: VaultLink;
  readonly agents: AgentHub;
  readonly stores: RoutedStore;
  /** Its identity as registered (renewals replace the certificate). */
  readonly identity: ComponentIdentity;
  /** Renews the certificate now (the timer does it when due). */
  renewCertificate(): Promise<void>;
  /** Stops the link, the server and the stores. */
  close(): Promise<void>;
}

/** Registers with the one-time key, or loads the identity of an earlier start. */
async function identityOf(
  o: ManagedProcessServerOptions,
  vault: VaultClient,
  logger: Logger,
): Promise<ComponentIdentity> {
  const known = await loadComponentIdentity(o.stateDir);
  if (known !== undefined) {
    if (known.kind !== 'process-server') {
      throw new LifeboatError(
        'LB_PS_NOT_REGISTERED',
        `${o.stateDir} holds the identity of a ${known.kind} (${known.id}), not of a process server. Give the process server a state directory of its own.`,
        { details: { stateDir: o.stateDir, id: known.id } },
      );
    }
    if (o.registrationKey !== undefined)
      logger.info({ id: known.id }, 'already registered; the registration key is not used');
    return known;
  }
  if (o.registrationKey === undefined) {
    throw new LifeboatError(
      'LB_PS_NOT_REGISTERED',
      `This process server is not registered yet (no identity in ${o.stateDir}). Ask an admin for a key (lifeboat vault key create --kind process-server) and start it with --registration-key-file.`,
      { details: { stateDir: o.stateDir } },
    );
  }
  const pair = await createKeyAndCsr(o.name);
  const r = await vault.call<VaultObject & IssuedIdentity>('POST', '/api/register', {
    key: o.registrationKey,
    kind: 'process-server',
    name: o.name,
    ...(o.address !== undefined ? { address: o.address } : {}),
    ...(pair !== undefined ? { csr: pair.csr } : {}),
  });
  const key = pair?.key ?? r.privateKey;
  if (key === undefined) {
    throw new LifeboatError('LB_PS_NOT_REGISTERED', 'The vault returned no private key.', {});
  }
  const identity: ComponentIdentity = {
    id: String((r['component'] as VaultObject)['id']),
    name: o.name,
    kind: 'process-server',
    token: String(r['token']),
    cert: r.certificate,
    key,
    ca: r.caCertificate,
  };
  await saveComponentIdentity(o.stateDir, identity);
  logger.info({ id: identity.id }, 'registered with the vault');
  return identity;
}

/**
 * Starts a process server managed by the vault (`lifeboat process-server start --vault`):
 * registers on its first start with a one-time key (its key pair is made here; the vault's CA
 * signs a CSR) and keeps its identity in its state directory; renews its certificate before it
 * expires; takes its target stores from its assignments; serves its agents on its mTLS port
 * (registration relay, assignments, reports); and keeps the vault informed (heartbeats, item
 * reports, inventories, catalogue upserts).
 */
export async function startManagedProcessServer(
  o: ManagedProcessServerOptions,
): Promise<ManagedProcessServer> {
  const logger = o.logger ?? pino({ name: 'process-server', level: o.logLevel ?? 'info' });
  // The same failure every round (a host without an agent, the vault down) is logged once a minute.
  const lastLogged = new Map<string, number>();
  const onError =
    o.onError ??
    ((what: string, err: unknown) => {
      const key = `${what}|${isLifeboatError(err) ? err.code : ''}|${(err as Error).message}`;
      const now = Date.now();
      if (now - (lastLogged.get(key) ?? 0) < 60_000) return;
      lastLogged.set(key, now);
      if (lastLogged.size > 1000) lastLogged.clear();
      logger.warn(
        { err: isLifeboatError(err) ? err.toJSON() : { message: (err as Error).message } },
        what,
      );
    });
  const tlsCa = o.vaultCa !== undefined ? { ca: o.vaultCa } : {};
  const anonymous = new VaultClient({ url: o.vaultUrl, tls: tlsCa });
  let identity = await identityOf(o, anonymous, logger);
  const clientOf = (id: ComponentIdentity): VaultClient =>
    new VaultClient({
      url: o.vaultUrl,
      token: id.token,
      tls: { ...tlsCa, cert: id.cert, key: id.key },
    });
  let api = clientOf(identity);

  const stores = new RoutedStore({
    stateDir: o.stateDir,
    workers: o.storeWorkerCount ?? 2,
    logger,
  });
  await stores.load();
  const applyAssignments = (a: Assignments): Promise<void> =>
    stores.update(a.targetStores, a.items);
  // Learn the stores before the journal replays, when the vault answers; when it does not,
  // the stores of the last run serve the replay.
  try {
    await applyAssignments(await api.call<Assignments>('GET', '/api/components/self/assignments'));
  } catch (err) {
    if (isLifeboatError(err) && err.details['status'] === 401) {
      throw new LifeboatError(
        'LB_PS_NOT_REGISTERED',
        `The vault does not accept this process server's token (${identity.id}): it was unregistered, or the vault's database was replaced. Move ${join(o.stateDir, 'identity.json')} away and start again with a new registration key.`,
        { cause: err, details: { id: identity.id } },
      );
    }
    onError('cannot read the assignments at start; using the stores of the last run', err);
  }

  const renew = async (): Promise<void> => {
    const pair = await createKeyAndCsr(identity.id);
    const r = await api.call<IssuedIdentity>(
      'POST',
      '/api/components/self/certificate',
      pair !== undefined ? { csr: pair.csr } : {},
    );
    const key = pair?.key ?? r.privateKey;
    if (key === undefined) return;
    identity = { ...identity, cert: r.certificate, key, ca: r.caCertificate };
    await saveComponentIdentity(o.stateDir, identity);
    api = clientOf(identity);
    live.link?.setApi(api);
    live.server?.setTls({ cert: identity.cert, key: identity.key, ca: identity.ca });
    logger.info({ id: identity.id, expiresAt: r.certificateExpiresAt }, 'certificate renewed');
  };
  const fraction = o.renewFraction ?? 1 / 3;
  // What a renewal updates, once it runs.
  const live: { server?: ProcessServer; link?: VaultLink } = {};
  if (certificateNeedsRenewal(identity.cert, new Date(), fraction)) {
    await renew().catch((err: unknown) => onError('cannot renew the certificate', err));
  }

  const hub = new AgentHub({ vault: anonymous, logger });
  const {
    vaultUrl: _u,
    vaultCa: _c,
    stateDir: _s,
    registrationKey: _k,
    name: _n,
    address,
    journalDir,
    storeWorkerCount: _w,
    intervalMs,
    renewalCheckMs,
    renewFraction: _f,
    logger: _l,
    onError: _e,
    ...serverOptions
  } = o;
  const server = await ProcessServer.start({
    ...serverOptions,
    store: stores,
    journalDir: journalDir ?? join(o.stateDir, 'journal'),
    tls: { cert: identity.cert, key: identity.key, ca: identity.ca },
    httpHandler: hub.handle,
    authorizeSession: (peer, machine) => hub.authorizeSession(peer, machine),
    logger,
  }).catch(async (err: unknown) => {
    await stores.close();
    throw err;
  });
  const link = new VaultLink({
    api,
    server,
    agents: hub,
    ...(intervalMs !== undefined ? { intervalMs } : {}),
    targetStoreOf: (machine) => stores.storeIdOf(machine),
    onAssignments: applyAssignments,
    ...(address !== undefined ? { address } : {}),
    onError: (err) => onError('round with the vault failed', err),
  });
  live.server = server;
  live.link = link;
  hub.on('changed', () => link.syncSoon());
  link.start();
  const renewal = setInterval(() => {
    if (!certificateNeedsRenewal(identity.cert, new Date(), fraction)) return;
    renew().catch((err: unknown) => onError('cannot renew the certificate', err));
  }, renewalCheckMs ?? 3_600_000);
  renewal.unref();
  return {
    server,
    link,
    agents: hub,
    stores,
    get identity() {
      return identity;
    },
    renewCertificate: renew,
    close: async () => {
      clearInterval(renewal);
      await link.stop();
      await server.stop();
      await stores.close();
    },
  };
}
