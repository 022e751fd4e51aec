import { DEFAULT_MAX_PAYLOAD_BYTES, LifeboatError } from '@lifeboat/protocol';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Logger } from 'pino';
import type { PointDigests } from './point-digests.js';
import type {
  ReplicatorStore,
  StoreWorkerOptions,
  StoreWorkerPoolHealth,
} from './store-worker-pool.js';

/** The store the process server commits to: a `Store`, or anything routing its calls to one. */
export type ProcessServerStore = ReplicatorStore & {
  /** Where it is (`dir:/path`, `azure:account/container`), for the health report. */
  readonly location: string;
  /**
   * A machine's point as resync digests (`computePointDigests`). A `Store` needs none (the
   * server computes them from it); without either, resyncs send every allocated range.
   */
  pointDigests?(machine: string, point: string, key: Uint8Array): Promise<PointDigests>;
  /** Its store worker threads, for health (null when it runs none). */
  workerHealth?(): StoreWorkerPoolHealth | null;
};

/** Who is on the other end of a connection to the mTLS port. */
export interface PeerIdentity {
  /** True when the client presented a certificate signed by the configured CA. */
  authorized: boolean;
  /** Its subject's common name (the vault id of the component), when authorized. */
  id: string | undefined;
  /** Why it is not authorized. */
  reason: string | undefined;
}

/**
 * Serves HTTP/1.1 requests that arrive on the mTLS port with ALPN `http/1.1` (agents asking
 * for their assignments); connections without ALPN speak the replication protocol.
 */
export type PeerHttpHandler = (
  request: IncomingMessage,
  response: ServerResponse,
  peer: PeerIdentity,
) => void;

/** PEM material of the process server's TLS endpoint. */
export interface ProcessServerTls {
  /** The server's certificate (PEM). */
  cert: string | Buffer;
  /** The server's private key (PEM). */
  key: string | Buffer;
  /** The CA whose client certificates are accepted (PEM); every agent must present one. */
  ca: string | Buffer;
}

/** Options for {@link ProcessServer.start}. */
export interface ProcessServerOptions {
  /**
   * The target store points are committed to (owned by the caller: not closed by stop). Store
   * work then runs on the ingest thread; give `storeWorkers` instead to run it on worker threads.
   */
  store?: ProcessServerStore;
  /** Run store work (hashing, compression, encryption, uploads) on worker threads that open their own store. */
  storeWorkers?: StoreWorkerOptions;
  /** Directory of the cache journal and machine state (local disk, fsync honoured). */
  journalDir: string;
  /** TLS certificate, key and client CA. */
  tls: ProcessServerTls;
  /** Address agents connect to. @default '0.0.0.0' */
  host?: string;
  /** Port agents connect to; 0 picks a free one. @default 9443 */
  port?: number;
  /** Address of the health/metrics HTTP listener. @default '127.0.0.1' */
  healthHost?: string;
  /** Port of the health/metrics listener; 0 picks a free one, null disables it. @default 9444 */
  healthPort?: number | null;
  /** Journal size limit; above it agents are slowed, never failed. @default 1073741824 */
  journalMaxBytes?: number;
  /** Journal segment size. @default 67108864 */
  journalSegmentBytes?: number;
  /** How long the journal may stay full before the machines waiting on it are marked for resync. @default 600000 */
  overflowTimeoutMs?: number;
  /** Largest frame payload accepted (announced in the welcome). @default DEFAULT_MAX_PAYLOAD_BYTES */
  maxPayloadBytes?: number;
  /** Ingest limit of the whole server in bytes per second; 0 is unlimited. Changeable with setBandwidthLimits. @default 0 */
  bandwidthBytesPerSecond?: number;
  /** Ingest limit per machine in bytes per second; 0 is unlimited. @default 0 */
  machineBandwidthBytesPerSecond?: number;
  /** Store operations (writes, commits) running at once across all machines. @default 8 */
  storeConcurrency?: number;
  /** A connection must send its hello within this time. @default 10000 */
  helloTimeoutMs?: number;
  /** A session whose acknowledgements stay unread this long is closed. @default 120000 */
  stallTimeoutMs?: number;
  /** First delay before retrying the store after a failure. @default 500 */
  storeRetryInitialMs?: number;
  /** Longest delay between store retries. @default 15000 */
  storeRetryMaxMs?: number;
  /** Bytes a session may have waiting for the journal's fsync before its socket is paused. @default 8388608 */
  sessionUnsyncedBytes?: number;
  /** Skip fsync of the journal (benchmarks that isolate the fsync cost only). @default false */
  unsafeNoSync?: boolean;
  /** HTTPS routes on the mTLS port (ALPN `http/1.1`), e.g. the agents' control routes. @default none */
  httpHandler?: PeerHttpHandler;
  /**
   * Decides whether an agent may open a replication session for a machine; a returned error
   * refuses the hello with its code and message. @default any agent with a valid certificate
   */
  authorizeSession?: (peer: PeerIdentity, machine: string) => LifeboatError | undefined;
  /** Where logs go. @default pino at `logLevel` on stdout */
  logger?: Logger;
  /** Level of the default logger ('silent' in tests). @default 'info' */
  logLevel?: 'fatal' | 'error' | 'warn' | 'info' | 'debug' | 'trace' | 'silent';
}

/** Validated, frozen options. */
export type ResolvedProcessServerOptions = Readonly<
  Required<
    Omit<
      ProcessServerOptions,
      'logger' | 'healthPort' | 'store' | 'storeWorkers' | 'httpHandler' | 'authorizeSession'
    >
  > & {
    healthPort: number | null;
    logger: Logger | undefined;
    store: ProcessServerStore | undefined;
    storeWorkers: StoreWorkerOptions | undefined;
    httpHandler: PeerHttpHandler | undefined;
    authorizeSession: ProcessServerOptions['authorizeSession'];
  }
>;

function invalid(what: string): LifeboatError {
  return new LifeboatError('LB_PS_INVALID_OPTIONS', `Invalid process server option: ${what}.`, {
    details: { option: what },
  });
}

function nonNegative(name: string, v: number): number {
  if (!Number.isFinite(v) || v < 0) throw invalid(`${name} must be a non-negative number`);
  return v;
}

/** Checks options once and fills defaults. */
export function resolveProcessServerOptions(o: ProcessServerOptions): ResolvedProcessServerOptions {
  if (!o.journalDir) throw invalid('journalDir is required');
  if ((o.store === undefined) === (o.storeWorkers === undefined))
    throw invalid('give exactly one of store and storeWorkers');
  if (!o.tls?.cert || !o.tls.key || !o.tls.ca)
    throw invalid('tls.cert, tls.key and tls.ca are required (mutual TLS)');
  const port = o.port ?? 9443;
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw invalid('port must be 0-65535');
  const healthPort = o.healthPort === undefined ? 9444 : o.healthPort;
  if (
    healthPort !== null &&
    (!Number.isInteger(healthPort) || healthPort < 0 || healthPort > 65535)
  )
    throw invalid('healthPort must be 0-65535 or null');
  const maxPayloadBytes = o.maxPayloadBytes ?? DEFAULT_MAX_PAYLOAD_BYTES;
  if (maxPayloadBytes < 64 * 1024 || maxPayloadBytes > 64 * 1024 * 1024)
    throw invalid('maxPayloadBytes must be between 64 KiB and 64 MiB');
  const journalMaxBytes = o.journalMaxBytes ?? 1024 * 1024 * 1024;
  if (journalMaxBytes < 4 * 1024 * 1024) throw invalid('journalMaxBytes must be at least 4 MiB');
  const storeConcurrency = o.storeConcurrency ?? 8;
  if (!Number.isInteger(storeConcurrency) || storeConcurrency < 1)
    throw invalid('storeConcurrency must be a positive integer');
  return Object.freeze({
    store: o.store,
    storeWorkers: o.storeWorkers,
    journalDir: o.journalDir,
    tls: o.tls,
    host: o.host ?? '0.0.0.0',
    port,
    healthHost: o.healthHost ?? '127.0.0.1',
    healthPort,
    journalMaxBytes,
    journalSegmentBytes: o.journalSegmentBytes ?? 64 * 1024 * 1024,
    overflowTimeoutMs: nonNegative('overflowTimeoutMs', o.overflowTimeoutMs ?? 600_000),
    maxPayloadBytes,
    bandwidthBytesPerSecond: nonNegative('bandwidthBytesPerSecond', o.bandwidthBytesPerSecond ?? 0),
    machineBandwidthBytesPerSecond: nonNegative(
      'machineBandwidthBytesPerSecond',
      o.machineBandwidthBytesPerSecond ?? 0,
    ),
    storeConcurrency,
    helloTimeoutMs: nonNegative('helloTimeoutMs', o.helloTimeoutMs ?? 10_000),
    stallTimeoutMs: nonNegative('stallTimeoutMs', o.stallTimeoutMs ?? 120_000),
    storeRetryInitialMs: nonNegative('storeRetryInitialMs', o.storeRetryInitialMs ?? 500),
    storeRetryMaxMs: nonNegative('storeRetryMaxMs', o.storeRetryMaxMs ?? 15_000),
    sessionUnsyncedBytes: nonNegative(
      'sessionUnsyncedBytes',
      o.sessionUnsyncedBytes ?? 8 * 1024 * 1024,
    ),
    unsafeNoSync: o.unsafeNoSync ?? false,
    httpHandler: o.httpHandler,
    authorizeSession: o.authorizeSession,
    logger: o.logger,
    logLevel: o.logLevel ?? 'info',
  });
}
