import { isAbsolute, join, resolve } from 'node:path';
import { LifeboatError } from '@lifeboat/protocol';
import type { StoreApi } from '@lifeboat/store';
import type { JobHandler } from './jobs/job-handler.js';
import { DEFAULT_WEBHOOK_RETRY_DELAYS_MS } from './services/alert-service.js';

/** What the vault knows of a target store when it must open it (retention, point deletion). */
export interface TargetStoreAccess {
  id: string;
  kind: 'directory' | 'azure';
  path: string | null;
  container: string | null;
  connectionString: string | null;
  passphrase: string;
}

/** Options of a vault instance. */
export interface VaultOptions {
  /** Directory for the SQLite database, the secret key file and the initial admin password. */
  dataDir: string;
  /** PostgreSQL connection URL; when absent the vault uses `<dataDir>/vault.sqlite`. */
  databaseUrl?: string;
  /** The AES-256-GCM key sealing stored secrets; keep it out of database backups. @default `<dataDir>/secret.key` */
  secretKeyFile?: string;
  /** Address to listen on. @default '127.0.0.1' */
  host?: string;
  /** Port to listen on (0 = any free port). @default 9440 */
  port?: number;
  /**
   * Serve HTTPS: `'internal'` with a server certificate the vault issues itself from its own CA
   * at every start (clients trust `GET /api/ca.pem`, e.g. with NODE_EXTRA_CA_CERTS), or PEM
   * files. With HTTPS, a component that presents a client certificate must present its own
   * (signed by the vault's CA, subject = its id); `requireComponentCertificates` makes that
   * mandatory for component routes (mutual TLS). @default plain HTTP
   */
  tls?: 'internal' | { certFile: string; keyFile: string };
  /** With `tls`, refuse component calls without their client certificate. @default false */
  requireComponentCertificates?: boolean;
  /** pino log level ('silent' in tests); one line per request only at 'debug' and 'trace'. @default 'info' */
  logLevel?: string;
  /** The first admin, created when the database has no user. @default 'admin' with a random password written to `<dataDir>/initial-admin-password` */
  initialAdmin?: { username: string; password: string };
  /**
   * How long a resolved token is cached; a revocation on another vault instance takes effect
   * after at most this long (on this instance at once). 0 turns the cache off. @default 5000
   */
  authCacheMs?: number;
  /** How often GET /api/events looks for changes while a client listens. @default 1000 */
  eventPollMs?: number;
  /** How long GET /api/summary may be served from memory (0 = always fresh). @default 1000 */
  summaryCacheMs?: number;
  /**
   * How long a list's `total` may be served from memory: this instance's writes to the
   * counted tables clear it at once, another instance's (same PostgreSQL) show after at most
   * this long. 0 = always counted. @default 1000
   */
  countCacheMs?: number;
  /**
   * How long a rendered page of the protected items' and recovery points' lists may be served
   * from memory: this instance's writes to the tables the list reads clear it at once, another
   * instance's show after at most this long; the `rpoSeconds` of a served page are as of its
   * rendering, at most this long before. 0 = always rendered. @default 1000
   */
  listCacheMs?: number;
  /** Lifetime of a login session. @default 43200 */
  sessionTtlSeconds?: number;
  /** A process server or recovery host without a heartbeat for this long is unhealthy. @default 60 */
  heartbeatTimeoutSeconds?: number;
  /** Journal use above this fraction raises the journal alert. @default 0.9 */
  journalFullRatio?: number;
  /** How often the scheduler evaluates alerts and creates scheduled jobs. @default 5000 */
  schedulerIntervalMs?: number;
  /** How often the job runner looks for queued jobs. @default 1000 */
  jobPollIntervalMs?: number;
  /** A running job whose lease is not renewed for this long is recovered by another instance. @default 30000 */
  jobLeaseMs?: number;
  /**
   * Jobs run at once by this instance. Most jobs mostly wait (enabling waits for initial
   * replication, hours), so this is high: a low value would queue every other enable behind
   * the first few. @default 50
   */
  jobConcurrency?: number;
  /** Attempts of a resumable job interrupted by a vault restart before it fails. @default 3 */
  jobMaxAttempts?: number;
  /** How long enabling waits for the process server to take the item. @default 600000 */
  processServerAckTimeoutMs?: number;
  /** How long enabling waits for initial replication to finish. @default 86400000 */
  initialReplicationTimeoutMs?: number;
  /**
   * Width of the time buckets in which heartbeat reports of throughput and backlog are kept
   * per protected item (the machine page's chart). @default 60
   */
  historyBucketSeconds?: number;
  /** How long those per-item samples are kept; older ones are deleted by the scheduler. @default 24 */
  historyRetentionHours?: number;
  /**
   * How often the scheduler measures each target store's size and deduplication (a
   * `store-stats` job; it reads the store's index and every point's tree once). @default 3600
   */
  storeStatsIntervalSeconds?: number;
  /**
   * How often the scheduler garbage-collects each target store (a `store-gc` job: frees the
   * data of points that retention pruned, consolidates index objects; writers wait while it
   * holds the store's exclusive lock). @default 86400
   */
  storeGcIntervalSeconds?: number;
  /** Alerts are POSTed here as JSON when raised and cleared. */
  webhookUrl?: string;
  /**
   * Waits before each retry of a webhook delivery that failed (no answer, 429 or 5xx), in ms;
   * a delivery is given up (and logged) after the last. Pending deliveries are in the database
   * and survive a restart. @default 1 s, 5 s, 30 s, 2 min, 10 min, 30 min, then hourly (about 9 h)
   */
  webhookRetryDelaysMs?: number[];
  /**
   * How often, in ms, pending webhook deliveries are looked for besides those this instance
   * makes (another instance's, after it stopped). @default 5000
   */
  webhookPollMs?: number;
  /** Validity of component certificates. @default 90 */
  certificateDays?: number;
  /** scrypt cost N of password hashes (tests lower it). @default 16384 */
  passwordCost?: number;
  /** Opens a target store (retention, deleting points). @default opening with `@lifeboat/store` */
  openStore?: (store: TargetStoreAccess) => Promise<StoreApi>;
  /** Extra job kinds (tests, extensions). */
  jobHandlers?: JobHandler[];
}

/** {@link VaultOptions} with defaults applied, frozen. */
export type ResolvedVaultOptions = Readonly<
  Required<
    Omit<VaultOptions, 'databaseUrl' | 'initialAdmin' | 'webhookUrl' | 'openStore' | 'tls'>
  > &
    Pick<VaultOptions, 'databaseUrl' | 'initialAdmin' | 'webhookUrl' | 'openStore' | 'tls'>
>;

function positive(name: string, value: number, min = 1): number {
  if (!Number.isFinite(value) || value < min) {
    throw new LifeboatError(
      'LB_VAULT_BAD_OPTION',
      `Vault option ${name} must be a number >= ${min}, got ${value}.`,
      { details: { option: name, value } },
    );
  }
  return value;
}

/** Validates options once and applies defaults. */
export function resolveVaultOptions(options: VaultOptions): ResolvedVaultOptions {
  if (typeof options.dataDir !== 'string' || options.dataDir === '') {
    throw new LifeboatError('LB_VAULT_BAD_OPTION', 'Vault option dataDir is required.', {
      details: { option: 'dataDir' },
    });
  }
  const dataDir = isAbsolute(options.dataDir) ? options.dataDir : resolve(options.dataDir);
  if (options.databaseUrl !== undefined && !/^postgres(ql)?:\/\//.test(options.databaseUrl)) {
    throw new LifeboatError(
      'LB_VAULT_BAD_OPTION',
      'Vault option databaseUrl must be a postgres:// URL (leave it out for the SQLite file).',
      { details: { option: 'databaseUrl' } },
    );
  }
  const port = options.port ?? 9440;
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new LifeboatError(
      'LB_VAULT_BAD_OPTION',
      `Vault option port must be 0-65535, got ${port}.`,
      {
        details: { option: 'port', value: port },
      },
    );
  }
  const ratio = options.journalFullRatio ?? 0.9;
  if (!(ratio > 0 && ratio <= 1)) {
    throw new LifeboatError(
      'LB_VAULT_BAD_OPTION',
      'Vault option journalFullRatio must be in (0, 1].',
      {
        details: { option: 'journalFullRatio', value: ratio },
      },
    );
  }
  return Object.freeze({
    dataDir,
    ...(options.databaseUrl !== undefined ? { databaseUrl: options.databaseUrl } : {}),
    secretKeyFile: options.secretKeyFile ?? join(dataDir, 'secret.key'),
    host: options.host ?? '127.0.0.1',
    port,
    logLevel: options.logLevel ?? 'info',
    ...(options.tls !== undefined ? { tls: options.tls } : {}),
    requireComponentCertificates: options.requireComponentCertificates ?? false,
    ...(options.initialAdmin !== undefined ? { initialAdmin: options.initialAdmin } : {}),
    authCacheMs: positive('authCacheMs', options.authCacheMs ?? 5000, 0),
    eventPollMs: positive('eventPollMs', options.eventPollMs ?? 1000, 10),
    summaryCacheMs: positive('summaryCacheMs', options.summaryCacheMs ?? 1000, 0),
    countCacheMs: positive('countCacheMs', options.countCacheMs ?? 1000, 0),
    listCacheMs: positive('listCacheMs', options.listCacheMs ?? 1000, 0),
    sessionTtlSeconds: positive('sessionTtlSeconds', options.sessionTtlSeconds ?? 43_200),
    heartbeatTimeoutSeconds: positive(
      'heartbeatTimeoutSeconds',
      options.heartbeatTimeoutSeconds ?? 60,
    ),
    journalFullRatio: ratio,
    schedulerIntervalMs: positive('schedulerIntervalMs', options.schedulerIntervalMs ?? 5000, 10),
    jobPollIntervalMs: positive('jobPollIntervalMs', options.jobPollIntervalMs ?? 1000, 10),
    jobLeaseMs: positive('jobLeaseMs', options.jobLeaseMs ?? 30_000, 100),
    jobConcurrency: positive('jobConcurrency', options.jobConcurrency ?? 50),
    jobMaxAttempts: positive('jobMaxAttempts', options.jobMaxAttempts ?? 3),
    processServerAckTimeoutMs: positive(
      'processServerAckTimeoutMs',
      options.processServerAckTimeoutMs ?? 600_000,
    ),
    initialReplicationTimeoutMs: positive(
      'initialReplicationTimeoutMs',
      options.initialReplicationTimeoutMs ?? 86_400_000,
    ),
    historyBucketSeconds: positive('historyBucketSeconds', options.historyBucketSeconds ?? 60),
    historyRetentionHours: positive(
      'historyRetentionHours',
      options.historyRetentionHours ?? 24,
      1 / 60,
    ),
    storeStatsIntervalSeconds: positive(
      'storeStatsIntervalSeconds',
      options.storeStatsIntervalSeconds ?? 3600,
      10,
    ),
    storeGcIntervalSeconds: positive(
      'storeGcIntervalSeconds',
      options.storeGcIntervalSeconds ?? 86_400,
      60,
    ),
    ...(options.webhookUrl !== undefined ? { webhookUrl: options.webhookUrl } : {}),
    webhookRetryDelaysMs: (
      options.webhookRetryDelaysMs ?? [...DEFAULT_WEBHOOK_RETRY_DELAYS_MS]
    ).map((ms, i) => positive(`webhookRetryDelaysMs[${i}]`, ms)),
    webhookPollMs: positive('webhookPollMs', options.webhookPollMs ?? 5000, 10),
    certificateDays: positive('certificateDays', options.certificateDays ?? 90),
    passwordCost: positive('passwordCost', options.passwordCost ?? 16_384, 2),
    ...(options.openStore !== undefined ? { openStore: options.openStore } : {}),
    jobHandlers: options.jobHandlers ?? [],
  });
}
