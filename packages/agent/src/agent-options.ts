import { LifeboatError } from '@lifeboat/protocol';
import type { ReplicationSink } from './replication-sink.js';

/** The few logger methods the agent uses (pino's logger fits). */
export interface AgentLogger {
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
  error(obj: object, msg?: string): void;
}

/**
 * Called around each cut (like the pre-/post-snapshot scripts of other replication tools):
 * `beforeCut` runs just before the QMP transaction, `afterCut` right after it (and after the
 * guest's file systems are thawed). A failing hook fails the cycle, which is retried.
 */
export interface CutHooks {
  beforeCut?(cutId: string): void | Promise<void>;
  afterCut?(cutId: string): void | Promise<void>;
}

/** Options of {@link Agent}. */
export interface AgentOptions {
  /** QMP socket of the running `qemu-system` or `qemu-storage-daemon` that holds the disks. */
  qmpSocket: string;
  /** The protected machine's id (as the process server and store know it). */
  machine: string;
  /** Where changes go: a ReplicationClient to a process server, or another sink. */
  sink: ReplicationSink;
  /** Directory for the state file and the temporary fleecing overlays (same file system as nothing in particular; a few MiB). */
  stateDir: string;
  /** Time between the starts of two cuts (policy's crash-consistent interval). Minimum 1000. @default 5000 */
  intervalMs?: number;
  /**
   * An NBD server QEMU already runs (UNIX socket path), e.g. qemu-storage-daemon's
   * `--nbd-server`. @default the agent starts one with `nbd-server-start` on a private socket
   */
  nbdSocket?: string;
  /** Protect only these block nodes. @default every disk found */
  disks?: string[];
  /** Host side of the guest agent's virtio-serial port (UNIX socket). @default none: crash-consistent points only */
  guestAgentSocket?: string;
  /** Time between app-consistent points; 0 means never. @default 3600000 when guestAgentSocket is set, else 0 */
  appConsistentIntervalMs?: number;
  /** Time limit of each guest agent step (connect, sync, freeze, thaw). @default 10000 */
  guestAgentTimeoutMs?: number;
  /** Largest single NBD read. @default 4194304 */
  readBytes?: number;
  /** Chunk size for resync comparisons when the sink does not say. @default 65536 */
  chunkSize?: number;
  /** A full read (initial replication, resync) saves its progress after this many bytes. @default 33554432 */
  checkpointBytes?: number;
  /** Time limit of each QMP command. @default 60000 */
  qmpTimeoutMs?: number;
  /** Consistency group of the machine, put on every cut. @default none */
  consistencyGroup?: string;
  /** A clean stop waits this long for the current step (a cut's acknowledgement) before abandoning it. @default 10000 */
  stopGraceMs?: number;
  /** Hooks around each cut. @default none */
  hooks?: CutHooks;
  /** Logger. @default silent */
  logger?: AgentLogger;
}

/** {@link AgentOptions} validated, defaults applied, frozen. */
export type ResolvedAgentOptions = Readonly<
  Required<Omit<AgentOptions, 'nbdSocket' | 'disks' | 'guestAgentSocket' | 'consistencyGroup'>> &
    Pick<AgentOptions, 'nbdSocket' | 'disks' | 'guestAgentSocket' | 'consistencyGroup'>
>;

const silent: AgentLogger = { info() {}, warn() {}, error() {} };

function bad(message: string, details: Record<string, unknown>): never {
  throw new LifeboatError('LB_AGENT_INVALID_OPTIONS', message, { details });
}

/** Validates agent options once, applying defaults. */
export function resolveAgentOptions(o: AgentOptions): ResolvedAgentOptions {
  if (!o.qmpSocket) bad('The agent needs the QMP socket of QEMU (--qmp PATH).', {});
  if (!o.machine) bad('The agent needs the machine id.', {});
  if (!o.stateDir) bad('The agent needs a state directory.', {});
  const intervalMs = o.intervalMs ?? 5000;
  if (!Number.isFinite(intervalMs) || intervalMs < 1000) {
    bad(`The cut interval must be at least 1000 ms, not ${intervalMs}.`, { intervalMs });
  }
  const appConsistentIntervalMs = o.appConsistentIntervalMs ?? (o.guestAgentSocket ? 3_600_000 : 0);
  if (!(appConsistentIntervalMs >= 0)) {
    bad('appConsistentIntervalMs must be 0 (never) or a positive number of ms.', {
      appConsistentIntervalMs,
    });
  }
  if (appConsistentIntervalMs > 0 && !o.guestAgentSocket) {
    bad('App-consistent points need the guest agent socket (guestAgentSocket).', {});
  }
  const chunkSize = o.chunkSize ?? 65536;
  if (!Number.isInteger(chunkSize) || chunkSize < 4096 || (chunkSize & (chunkSize - 1)) !== 0) {
    bad('chunkSize must be a power of two of at least 4096.', { chunkSize });
  }
  const readBytes = o.readBytes ?? 4 * 1024 * 1024;
  if (!Number.isInteger(readBytes) || readBytes < chunkSize || readBytes % chunkSize !== 0) {
    bad('readBytes must be a multiple of chunkSize.', { readBytes, chunkSize });
  }
  const resolved = {
    qmpSocket: o.qmpSocket,
    machine: o.machine,
    sink: o.sink,
    stateDir: o.stateDir,
    intervalMs,
    nbdSocket: o.nbdSocket,
    disks: o.disks,
    guestAgentSocket: o.guestAgentSocket,
    appConsistentIntervalMs,
    guestAgentTimeoutMs: o.guestAgentTimeoutMs ?? 10_000,
    readBytes,
    chunkSize,
    checkpointBytes: Math.max(o.checkpointBytes ?? 32 * 1024 * 1024, readBytes),
    qmpTimeoutMs: o.qmpTimeoutMs ?? 60_000,
    consistencyGroup: o.consistencyGroup,
    stopGraceMs: o.stopGraceMs ?? 10_000,
    hooks: o.hooks ?? {},
    logger: o.logger ?? silent,
  };
  return Object.freeze(resolved) as ResolvedAgentOptions;
}
