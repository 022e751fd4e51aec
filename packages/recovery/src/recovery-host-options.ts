import { LifeboatError } from '@lifeboat/protocol';
import type { RecoveryJobListener } from './recovery-job.js';
import type { QmpSession } from './qmp-session.js';

/** Options for {@link RecoveryHost.start}. */
export interface RecoveryHostOptions {
  /** Private directory for exports' sockets, machines' overlays and jobs (created mode 0700). */
  runDir: string;
  /** Bytes of chunk cache per exported point. @default 67108864 */
  cacheBytes?: number;
  /** Chunks read ahead once a client reads sequentially. @default 16 */
  readAheadChunks?: number;
  /** `kvm`, `tcg`, or `auto` (KVM when it really works, else TCG). @default 'auto' */
  accel?: 'auto' | 'kvm' | 'tcg';
  /** How long a boot may take to show its console pattern and port. @default 180000 */
  bootTimeoutMs?: number;
  /** Receives every change of every job (e.g. to report it to the vault). @default none */
  onJob?: RecoveryJobListener;
  /** Connects to a QMP socket. @default `@lifeboat/qmp`'s client */
  connectQmp?: (socketPath: string) => Promise<QmpSession>;
  /** @default 'qemu-system-x86_64' */
  qemuBinary?: string;
  /** @default 'qemu-img' */
  qemuImg?: string;
}

/** Validated {@link RecoveryHostOptions}. */
export interface ResolvedRecoveryHostOptions {
  readonly runDir: string;
  readonly cacheBytes: number;
  readonly readAheadChunks: number;
  readonly accel: 'auto' | 'kvm' | 'tcg';
  readonly bootTimeoutMs: number;
  readonly onJob: RecoveryJobListener | undefined;
  readonly connectQmp: ((socketPath: string) => Promise<QmpSession>) | undefined;
  readonly qemuBinary: string;
  readonly qemuImg: string;
}

function positive(name: string, value: number | undefined, fallback: number, min = 1): number {
  const v = value ?? fallback;
  if (!Number.isSafeInteger(v) || v < min) {
    throw new LifeboatError(
      'LB_RECOVERY_BAD_OPTION',
      `${name} must be an integer of at least ${min}, not ${String(value)}.`,
      { details: { option: name, value } },
    );
  }
  return v;
}

/** Validates options once into a frozen value. */
export function resolveRecoveryHostOptions(o: RecoveryHostOptions): ResolvedRecoveryHostOptions {
  if (typeof o.runDir !== 'string' || o.runDir.length === 0) {
    throw new LifeboatError('LB_RECOVERY_BAD_OPTION', 'runDir must name a directory.', {
      details: { option: 'runDir' },
    });
  }
  // UNIX socket paths are limited to 107 bytes; sockets live two levels below runDir.
  if (Buffer.byteLength(o.runDir) > 60) {
    throw new LifeboatError(
      'LB_RECOVERY_BAD_OPTION',
      `runDir ${o.runDir} is too long for UNIX socket paths inside it (at most 60 bytes). Choose a shorter directory.`,
      { details: { option: 'runDir', value: o.runDir } },
    );
  }
  const accel = o.accel ?? 'auto';
  if (!['auto', 'kvm', 'tcg'].includes(accel)) {
    throw new LifeboatError(
      'LB_RECOVERY_BAD_OPTION',
      `accel must be auto, kvm or tcg, not ${accel}.`,
    );
  }
  return Object.freeze({
    runDir: o.runDir,
    cacheBytes: positive('cacheBytes', o.cacheBytes, 64 * 1024 * 1024, 65536),
    readAheadChunks: positive('readAheadChunks', o.readAheadChunks, 16, 0),
    accel,
    bootTimeoutMs: positive('bootTimeoutMs', o.bootTimeoutMs, 180_000),
    onJob: o.onJob,
    connectQmp: o.connectQmp,
    qemuBinary: o.qemuBinary ?? 'qemu-system-x86_64',
    qemuImg: o.qemuImg ?? 'qemu-img',
  });
}
