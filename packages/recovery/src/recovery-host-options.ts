import { LifeboatError } from '@lifeboat/protocol';
import { BUILT_IN_NETWORKS } from '@lifeboat/protocol/networks';
import type { RecoveryJobListener } from './recovery-job.js';
import type { QmpSession } from './qmp-session.js';
import { validIfName } from './recovery-machine.js';

/** A network of the recovery host that recovered machines can be attached to. */
export interface RecoveryNetwork {
  /** A Linux bridge of the host (each machine NIC gets a tap on it). */
  kind: 'bridge';
  /** The bridge's interface name. */
  bridge: string;
}

/** Names of the built-in isolated networks, which a declared network cannot take. */
export { BUILT_IN_NETWORKS };

const NETWORK_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

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
  /**
   * The recovery site's networks by name (what network mappings' target and test networks
   * name), e.g. `{ prod: { kind: 'bridge', bridge: 'br0' } }`. @default {} (isolated only)
   */
  networks?: Record<string, RecoveryNetwork>;
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
  readonly networks: Readonly<Record<string, Readonly<RecoveryNetwork>>>;
}

function badNetwork(message: string, value: unknown): LifeboatError {
  return new LifeboatError('LB_RECOVERY_BAD_OPTION', message, {
    details: { option: 'networks', value },
  });
}

/** Validates one declared network (its name and bridge). */
function checkNetwork(name: string, n: RecoveryNetwork): RecoveryNetwork {
  if (!NETWORK_NAME.test(name)) {
    throw badNetwork(
      `Network name "${name}" must be 1-63 letters, digits, dots, dashes or underscores, starting with a letter or digit.`,
      name,
    );
  }
  if (BUILT_IN_NETWORKS.includes(name)) {
    throw badNetwork(
      `Network name "${name}" is the built-in isolated network's; choose another name.`,
      name,
    );
  }
  if (n?.kind !== 'bridge') {
    throw badNetwork(
      `Network ${name} must be of kind bridge, not ${String((n as { kind?: unknown })?.kind)}.`,
      name,
    );
  }
  if (typeof n.bridge !== 'string' || !validIfName(n.bridge)) {
    throw badNetwork(
      `Bridge "${String(n.bridge)}" of network ${name} is not a Linux interface name (1-15 letters, digits, dots, dashes or underscores).`,
      n.bridge,
    );
  }
  return Object.freeze({ kind: 'bridge', bridge: n.bridge });
}

/**
 * Parses a `--network NAME=bridge:BR` option value into its name and network (the CLI's
 * syntax for {@link RecoveryHostOptions.networks}).
 */
export function parseNetworkOption(value: string): [string, RecoveryNetwork] {
  const m = /^([^=]+)=([a-z]+):(.+)$/.exec(value);
  if (m === null) {
    throw badNetwork(`--network ${value}: give NAME=bridge:BRIDGE, e.g. prod=bridge:br0.`, value);
  }
  const [, name, kind, bridge] = m as unknown as [string, string, string, string];
  if (kind !== 'bridge') {
    throw badNetwork(`--network ${value}: the only network kind is bridge, not ${kind}.`, value);
  }
  return [name, checkNetwork(name, { kind, bridge })];
}

/** Parses repeated `--network` values into networks by name; a name given twice is an error. */
export function parseNetworkOptions(values: readonly string[]): Record<string, RecoveryNetwork> {
  const out: Record<string, RecoveryNetwork> = {};
  for (const v of values) {
    const [name, n] = parseNetworkOption(v);
    if (name in out) throw badNetwork(`--network ${name} is given twice.`, v);
    out[name] = n;
  }
  return out;
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
    networks: Object.freeze(
      Object.fromEntries(
        Object.entries(o.networks ?? {}).map(([name, n]) => [name, checkNetwork(name, n)]),
      ),
    ),
  });
}
