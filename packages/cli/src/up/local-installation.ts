import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ProcessServer, VaultLink } from '@lifeboat/process-server';
import type { CommittedCut } from '@lifeboat/process-server';
import { LifeboatError, VaultClient } from '@lifeboat/protocol';
import type { VaultObject as ApiObject } from '@lifeboat/protocol';
import { RecoveryHost, RecoveryHostLink, vaultJobReporter } from '@lifeboat/recovery';
import type { Store } from '@lifeboat/store';
import { startVault } from '@lifeboat/vault';
import type { Vault } from '@lifeboat/vault';
import { componentCredentials } from './component-credentials.js';
import type { ComponentCredentials } from './component-credentials.js';
import { openAssignedStore } from '../open-assigned-store.js';
import { LocalAgents } from './local-agents.js';
import { openUpStore, upPaths } from './up-data-dir.js';
import type { UpPaths } from './up-data-dir.js';

/** Options of {@link startLocalInstallation}. */
export interface LocalInstallationOptions {
  /** The data directory (absolute). */
  dataDir: string;
  /** The vault API's address. @default '127.0.0.1' */
  host?: string;
  /** The vault API's port (0 = any free one). @default 0 */
  port?: number;
  /** pino log level of the roles. @default 'warn' */
  logLevel?: 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';
  /** A background failure (vault unreachable, agent failed); the roles keep running. */
  onError?: (what: string, err: unknown) => void;
}

/** The four roles of one machine, wired together. */
export interface LocalInstallation {
  readonly paths: UpPaths;
  readonly storeCreated: boolean;
  readonly store: Store;
  readonly vault: Vault;
  /** The vault API as the admin. */
  readonly admin: VaultClient;
  readonly adminToken: string;
  /** The running process server (a new instance after {@link startProcessServer}). */
  readonly processServer: ProcessServer;
  readonly processServerCredentials: ComponentCredentials;
  readonly agents: LocalAgents;
  readonly link: VaultLink;
  readonly recoveryHost: RecoveryHost;
  /** The recovery host's link to the vault: runs the test failovers and failovers it queues. */
  readonly recoveryLink: RecoveryHostLink;
  /** The vault's id of the data directory's target store. */
  readonly targetStoreId: string;
  /** Calls `listener` for every cut the process server commits, across restarts; returns the unsubscribe. */
  onCommitted(listener: (cut: CommittedCut) => void): () => void;
  /**
   * Stops the process server (as if its machine went down): its journal stays, agents retry,
   * its heartbeats stop. For the demo's fault tests.
   */
  stopProcessServer(): Promise<void>;
  /** Starts the process server again, on the same port with the same journal and credentials. */
  startProcessServer(): Promise<void>;
  /** Resolves once the recovery host's jobs are reported to the vault. */
  reportJobs(): Promise<void>;
  /** Stops every role, newest first; never throws. */
  close(): Promise<void>;
}

const PS_NAME = 'local-process-server';
const CLOSE_TIMEOUT_MS = 20_000;

/** Resolves true when `p` settles within `ms`, false otherwise (`p` keeps running). */
async function within(p: Promise<void>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), ms)));
  try {
    return await Promise.race([p.then(() => true), late]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Starts the vault, a process server, the agents and a recovery host in this process on the
 * data directory's embedded defaults (SQLite, a directory store), all on loopback: the
 * composition root of `lifeboat up`. The process server's certificates come from the vault's
 * CA through a registration key `up` creates for itself; agents are started by the vault's
 * assignments (enable replication), not by `up`.
 */
export async function startLocalInstallation(
  options: LocalInstallationOptions,
): Promise<LocalInstallation> {
  const paths = upPaths(options.dataDir);
  const logLevel = options.logLevel ?? 'warn';
  const onError = options.onError ?? (() => undefined);
  const closers: Array<{ what: string; close: () => Promise<void> }> = [];
  const add = (what: string, close: () => Promise<void>): void =>
    void closers.push({ what, close });
  const close = async (): Promise<void> => {
    while (closers.length > 0) {
      const c = closers.pop();
      if (c === undefined) break;
      // A role that does not stop in time must not keep the others running.
      const stopped = await within(c.close(), CLOSE_TIMEOUT_MS).catch((err) => {
        onError(`stopping ${c.what}`, err);
        return true;
      });
      if (!stopped) {
        onError(
          `stopping ${c.what}`,
          new Error(`did not stop within ${CLOSE_TIMEOUT_MS / 1000} s; going on with the others`),
        );
      }
    }
  };
  try {
    const { store, created } = await openUpStore(paths);
    add('the store', () => store.close());
    const vault = await startVault({
      dataDir: paths.vault,
      host: options.host ?? '127.0.0.1',
      port: options.port ?? 0,
      logLevel,
    });
    add('the vault', () => vault.close());
    const anonymous = new VaultClient({ url: vault.url });
    const password = await readFile(join(paths.vault, 'initial-admin-password'), 'utf8').catch(
      () => {
        throw new LifeboatError(
          'LB_UP_NO_ADMIN_PASSWORD',
          `The vault in ${paths.vault} has users but ${join(paths.vault, 'initial-admin-password')} is gone, so lifeboat up cannot log in as admin. Put the admin password back in that file (first line).`,
          { details: { vault: paths.vault } },
        );
      },
    );
    const login = await anonymous.call<ApiObject>('POST', '/api/auth/login', {
      username: 'admin',
      password: password.split('\n')[0]?.trim() ?? '',
    });
    const adminToken = String(login['token']);
    const admin = anonymous.as(adminToken);

    const psCreds = await componentCredentials(
      admin,
      join(paths.credentials, 'process-server'),
      'process-server',
      PS_NAME,
    );
    const agentCreds = await componentCredentials(
      admin,
      join(paths.credentials, 'agent'),
      'agent',
      'local-agent',
    );
    const rhCreds = await componentCredentials(
      admin,
      join(paths.credentials, 'recovery-host'),
      'recovery-host',
      'local-recovery-host',
    );
    // The recovery host reports its jobs (test failovers) to the vault with its own token.
    const reporter = vaultJobReporter({
      url: vault.url,
      token: rhCreds.token,
      onError: (err) => onError('reporting a recovery job to the vault', err),
    });
    add('recovery job reports', () => reporter.flush());
    // Jobs the vault queued are the link's to report (on the vault's own ids); this reporter
    // reports the jobs `up` runs itself (the demo's test failover).
    const linked: { rh?: RecoveryHostLink } = {};
    const recoveryHost = await RecoveryHost.start({
      runDir: paths.recovery,
      onJob: (job) => {
        if (linked.rh?.owns(job.id) !== true) reporter.listener(job);
      },
    });
    add('the recovery host', () => recoveryHost.close());
    const committedListeners = new Set<(cut: CommittedCut) => void>();
    const forward = (cut: CommittedCut): void => {
      for (const l of committedListeners) l(cut);
    };
    const startPs = async (port: number, healthPort: number): Promise<ProcessServer> => {
      const ps = await ProcessServer.start({
        store,
        journalDir: paths.journal,
        tls: { cert: psCreds.cert, key: psCreds.key, ca: psCreds.ca },
        host: '127.0.0.1',
        port,
        healthHost: '127.0.0.1',
        healthPort,
        journalMaxBytes: 1024 ** 3,
        logLevel,
      });
      ps.on('committed', forward);
      return ps;
    };
    let processServer: ProcessServer | undefined = await startPs(0, 0);
    const psPort = processServer.port;
    const psHealthPort = processServer.healthPort;
    add('the process server', async () => {
      await processServer?.stop();
      processServer = undefined;
    });
    const agents = new LocalAgents({
      processServer: { host: '127.0.0.1', port: psPort, name: PS_NAME },
      credentials: agentCreds,
      stateDir: paths.agents,
    });
    add('the agents', () => agents.close());
    agents.on('failed', (item: string, err: unknown) => onError(`agent of item ${item}`, err));
    const targetStoreId = await ensureTargetStore(
      admin,
      paths.store,
      await readPassphraseOf(paths),
    );
    const link = new VaultLink({
      api: admin.as(psCreds.token),
      server: processServer,
      agents,
      // Every machine of `up` goes to the data directory's store.
      targetStoreOf: () => targetStoreId,
      onError: (err) => onError('process server link', err),
    });
    link.start();
    add('the process server link', () => link.stop());
    // The recovery host takes the vault's test failovers and failovers like a separate one.
    const hostLink = new RecoveryHostLink({
      vault: new VaultClient({ url: vault.url, token: rhCreds.token }),
      host: recoveryHost,
      openStore: openAssignedStore,
      hydrationDir: join(paths.recovery, 'disks'),
      onError: (err) => onError('recovery host link', err),
    });
    linked.rh = hostLink;
    hostLink.start();
    add('the recovery host link', () => hostLink.stop());
    // The agent has no poll loop of its own yet: a heartbeat shows it alive.
    const beat = setInterval(() => {
      for (const c of [agentCreds]) {
        admin
          .as(c.token)
          .call('POST', '/api/components/self/heartbeat', {})
          .catch((err) => onError(`heartbeat of ${c.name}`, err));
      }
    }, 10_000);
    add('heartbeats', async () => clearInterval(beat));

    const running = (): ProcessServer => {
      if (processServer === undefined) {
        throw new LifeboatError(
          'LB_UP_PROCESS_SERVER_STOPPED',
          'The process server of lifeboat up is stopped; start it again first.',
        );
      }
      return processServer;
    };
    return {
      get processServer() {
        return running();
      },
      onCommitted: (listener) => {
        committedListeners.add(listener);
        return () => void committedListeners.delete(listener);
      },
      stopProcessServer: async () => {
        const ps = processServer;
        processServer = undefined;
        link.setServer(undefined);
        await ps?.stop();
      },
      startProcessServer: async () => {
        if (processServer !== undefined) return;
        processServer = await startPs(psPort, psHealthPort);
        link.setServer(processServer);
      },
      reportJobs: () => reporter.flush(),
      paths,
      storeCreated: created,
      store,
      vault,
      admin,
      adminToken,
      processServerCredentials: psCreds,
      agents,
      link,
      recoveryHost,
      recoveryLink: hostLink,
      targetStoreId,
      close,
    };
  } catch (err) {
    await close();
    throw err;
  }
}

async function readPassphraseOf(paths: UpPaths): Promise<string> {
  return (await readFile(paths.passphraseFile, 'utf8')).split('\n')[0]?.trim() ?? '';
}

/** Registers the data directory's store in the vault once (step 5), by path. */
async function ensureTargetStore(
  admin: VaultClient,
  path: string,
  passphrase: string,
): Promise<string> {
  const list = await admin.call<{ items: ApiObject[] }>('GET', '/api/target-stores?limit=1000');
  const known = list.items.find((s) => s['kind'] === 'directory' && s['path'] === path);
  if (known !== undefined) return String(known['id']);
  const created = await admin.call<ApiObject>('POST', '/api/target-stores', {
    name: 'local',
    kind: 'directory',
    path,
    passphrase,
  });
  return String(created['id']);
}
