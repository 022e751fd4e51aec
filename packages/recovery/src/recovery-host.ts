import { mkdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { LifeboatError } from '@lifeboat/protocol';
import type { StoreApi } from '@lifeboat/store';
import { kvmAvailable, kvmBootsKernel } from '@lifeboat/qmp';
import { PointExport } from './point-export.js';
import { resolveRecoveryHostOptions } from './recovery-host-options.js';
import type { RecoveryHostOptions, ResolvedRecoveryHostOptions } from './recovery-host-options.js';
import { RecoveryJob, type RecoveryJobKind, type RecoveryJobListener } from './recovery-job.js';
import {
  RecoveryMachine,
  bridgeExists,
  machineMac,
  noBridgeError,
  type DiskExport,
  type MachineBoot,
  type MachineNic,
} from './recovery-machine.js';
import { buildSeedDisk, type SeedDiskOptions } from './seed-disk.js';
import type { QmpSession } from './qmp-session.js';
import { connectQmpSession } from './qmp-connect.js';

/** A disk of a machine to boot: a point of the store, or an export that already runs. */
export type MachineDiskSpec = { pointId: string } | { export: DiskExport };

/** A machine to boot, as recorded for the protected machine (CPU, memory, disks, boot). */
export interface MachineSpec {
  /** Name, unique on this recovery host: letters, digits and dashes, at most 24. */
  name: string;
  /** Disks in boot order. */
  disks: MachineDiskSpec[];
  /** @default 1 */
  cpus?: number;
  /** @default 512 */
  memoryMiB?: number;
  boot: MachineBoot;
  /** @default 'nvme' */
  diskBus?: 'nvme' | 'virtio';
  /** @default [] (no network) */
  nics?: MachineNic[];
  /** A cloud-init NoCloud seed disk (host name, static addresses). @default none */
  seed?: Omit<SeedDiskOptions, 'dir'>;
  /** A QEMU guest agent channel. @default false */
  guestAgent?: boolean;
}

/** A machine booted by the recovery host, with the exports it owns. */
export interface BootedMachine {
  machine: RecoveryMachine;
  /** Exports started for this machine (closed with it). */
  exports: PointExport[];
  /** The seed disk, when one was built. */
  seedDisk?: string;
  /** The machine's directory (overlays, console, sockets). */
  dir: string;
}

const NAME = /^[a-z0-9][a-z0-9-]{0,23}$/;

/**
 * The recovery host: serves recovery points over NBD and boots them with QEMU. Everything it
 * creates lives in its private run directory; `close()` stops every machine and export.
 */
export class RecoveryHost {
  private readonly machines = new Map<string, BootedMachine>();
  private readonly exports = new Set<PointExport>();
  private readonly listeners = new Set<RecoveryJobListener>();
  private exportSeq = 0;

  private constructor(
    /** The validated options. */
    readonly options: ResolvedRecoveryHostOptions,
    /** The accelerator machines use. */
    readonly accel: 'kvm' | 'tcg',
    private readonly connectQmp: (socketPath: string) => Promise<QmpSession>,
  ) {}

  /** Creates the run directory and picks the accelerator (KVM only when it really works). */
  static async start(options: RecoveryHostOptions): Promise<RecoveryHost> {
    const o = resolveRecoveryHostOptions(options);
    await mkdir(o.runDir, { recursive: true, mode: 0o700 });
    await mkdir(join(o.runDir, 'x'), { recursive: true, mode: 0o700 });
    await mkdir(join(o.runDir, 'm'), { recursive: true, mode: 0o700 });
    await mkdir(join(o.runDir, 'jobs'), { recursive: true, mode: 0o700 });
    const accel =
      o.accel === 'auto' ? ((await kvmAvailable(o.qemuBinary)) ? 'kvm' : 'tcg') : o.accel;
    return new RecoveryHost(o, accel, o.connectQmp ?? connectQmpSession);
  }

  /**
   * Starts a job whose record is kept in `<runDir>/jobs/<id>/job.json`; `id` is the vault's id
   * of a job it queued (default: a new one).
   */
  newJob(
    kind: RecoveryJobKind,
    target: Record<string, unknown>,
    options: { id?: string } = {},
  ): RecoveryJob {
    return new RecoveryJob(
      kind,
      target,
      join(this.options.runDir, 'jobs'),
      (job) => {
        this.options.onJob?.(job);
        for (const l of this.listeners) l(job);
      },
      options.id,
    );
  }

  /** Receives every change of every job from now on (besides `onJob`); returns the unsubscribe. */
  subscribe(listener: RecoveryJobListener): () => void {
    this.listeners.add(listener);
    return () => void this.listeners.delete(listener);
  }

  /** Serves a point read-only over NBD on a UNIX socket in the run directory. */
  async exportPoint(
    store: StoreApi,
    pointId: string,
    options: { name?: string } = {},
  ): Promise<PointExport> {
    const name = options.name ?? `p${++this.exportSeq}-${pointId.slice(0, 12)}`;
    const e = await PointExport.start(store, pointId, {
      name,
      dir: join(this.options.runDir, 'x'),
      cacheBytes: this.options.cacheBytes,
      readAheadChunks: this.options.readAheadChunks,
    });
    this.exports.add(e);
    return e;
  }

  /** Stops serving an export. */
  async closeExport(e: PointExport): Promise<void> {
    this.exports.delete(e);
    await e.close();
  }

  /**
   * The NIC for one of this host's declared networks (`--network`), checked now: an unknown
   * name, or a bridge the host does not have, is an error naming what to fix.
   */
  networkNic(network: string, machine: string, mac?: string): MachineNic {
    const n = Object.hasOwn(this.options.networks, network)
      ? this.options.networks[network]
      : undefined;
    if (n === undefined) {
      const known = Object.keys(this.options.networks);
      throw new LifeboatError(
        'LB_RECOVERY_NO_NETWORK',
        `Machine ${machine} is to be attached to network ${network}, which this recovery host does not declare (it has ${known.length > 0 ? known.join(', ') : 'none'}). Start it with --network ${network}=bridge:<bridge>, or fix the network mapping.`,
        { details: { machine, network, networks: known } },
      );
    }
    if (!bridgeExists(n.bridge)) throw noBridgeError(n.bridge, machine, network);
    return { kind: 'bridge', bridge: n.bridge, ...(mac !== undefined ? { mac } : {}) };
  }

  /** The declared networks as reported to the vault: name, bridge, and whether it exists. */
  networkReport(): Array<{ name: string; kind: 'bridge'; bridge: string; present: boolean }> {
    return Object.entries(this.options.networks).map(([name, n]) => ({
      name,
      kind: n.kind,
      bridge: n.bridge,
      present: bridgeExists(n.bridge),
    }));
  }

  /** Machines running now, by name. */
  get running(): ReadonlyMap<string, BootedMachine> {
    return this.machines;
  }

  /**
   * Boots a machine: exports its points (if given as point ids), creates a qcow2 overlay per
   * disk backed by the export, builds the seed disk, and starts QEMU. Resolves once QEMU runs
   * (not once the guest has booted: see RecoveryMachine.waitForConsole).
   */
  async bootMachine(store: StoreApi | undefined, spec: MachineSpec): Promise<BootedMachine> {
    if (!NAME.test(spec.name)) {
      throw new LifeboatError(
        'LB_RECOVERY_BAD_MACHINE',
        `Machine name "${spec.name}" must be 1-24 lowercase letters, digits or dashes.`,
        { details: { name: spec.name } },
      );
    }
    if (this.machines.has(spec.name)) {
      throw new LifeboatError(
        'LB_RECOVERY_MACHINE_EXISTS',
        `A machine named ${spec.name} already runs on this recovery host. Clean it up first or choose another name.`,
        { details: { name: spec.name } },
      );
    }
    const dir = join(this.options.runDir, 'm', spec.name);
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const owned: PointExport[] = [];
    try {
      const disks: DiskExport[] = [];
      for (const [i, d] of spec.disks.entries()) {
        if ('export' in d) {
          disks.push(d.export);
          continue;
        }
        if (!store) {
          throw new LifeboatError(
            'LB_RECOVERY_BAD_MACHINE',
            `Disk ${i} of ${spec.name} names a point but no store was given.`,
          );
        }
        const e = await this.exportPoint(store, d.pointId, { name: `${spec.name}-d${i}` });
        owned.push(e);
        disks.push(e);
      }
      // Static addresses without a MAC belong to the NIC of the same index.
      const addresses = (spec.seed?.addresses ?? []).map((a, i) => ({
        ...a,
        mac: (a.mac ?? spec.nics?.[i]?.mac ?? machineMac(spec.name, i)).toLowerCase(),
      }));
      const seedDisk = spec.seed
        ? await buildSeedDisk({ ...spec.seed, dir, addresses })
        : undefined;
      // A guest that takes its static address from the seed is reached there on user networking.
      const nics = spec.nics?.map((n, i): MachineNic => {
        if (n.kind === 'segment' || n.guestAddress !== undefined) return n;
        const mac = (n.mac ?? machineMac(spec.name, i)).toLowerCase();
        const a = addresses.find((x) => x.mac === mac);
        return a !== undefined ? { ...n, guestAddress: a.address } : n;
      });
      // KVM that starts QEMU may still hang on a real kernel (nested virtualisation): when
      // booting a kernel under 'auto', prove KVM runs it once, else use TCG.
      let accel = this.accel;
      if (accel === 'kvm' && this.options.accel === 'auto' && 'kernel' in spec.boot) {
        if (!(await kvmBootsKernel(spec.boot.kernel, this.options.qemuBinary))) accel = 'tcg';
      }
      const machine = await RecoveryMachine.start({
        name: spec.name,
        dir,
        disks,
        boot: spec.boot,
        accel,
        connectQmp: this.connectQmp,
        qemuBinary: this.options.qemuBinary,
        qemuImg: this.options.qemuImg,
        ...(spec.cpus !== undefined ? { cpus: spec.cpus } : {}),
        ...(spec.memoryMiB !== undefined ? { memoryMiB: spec.memoryMiB } : {}),
        ...(spec.diskBus !== undefined ? { diskBus: spec.diskBus } : {}),
        ...(nics !== undefined ? { nics } : {}),
        ...(seedDisk !== undefined ? { seedDisk } : {}),
        ...(spec.guestAgent !== undefined ? { guestAgent: spec.guestAgent } : {}),
      });
      const booted: BootedMachine = {
        machine,
        exports: owned,
        dir,
        ...(seedDisk !== undefined ? { seedDisk } : {}),
      };
      this.machines.set(spec.name, booted);
      return booted;
    } catch (err) {
      for (const e of owned) await this.closeExport(e);
      await rm(dir, { recursive: true, force: true });
      throw err;
    }
  }

  /**
   * Stops a machine and removes what it owned: QEMU, its overlays, seed disk, sockets and the
   * exports started for it. Returns what was removed, for the job's record.
   */
  async removeMachine(name: string, options: { keep?: string[] } = {}): Promise<string[]> {
    const b = this.machines.get(name);
    if (!b) return [];
    const removed: string[] = [];
    const taps = b.machine.tapDevices;
    await b.machine.stop();
    removed.push(`machine ${name} (QEMU pid ${b.machine.pid ?? '?'})`);
    for (const t of taps) removed.push(`tap ${t}`);
    for (const e of b.exports) {
      await this.closeExport(e);
      removed.push(`export ${e.name} of point ${e.pointId} (${e.socketPath})`);
    }
    for (const d of b.machine.disks) {
      if (options.keep?.includes(d.overlay)) continue;
      const size = await stat(d.overlay)
        .then((s) => s.size)
        .catch(() => undefined);
      if (size !== undefined) removed.push(`overlay ${d.overlay} (${size} bytes)`);
    }
    if (b.seedDisk !== undefined) removed.push(`seed disk ${b.seedDisk}`);
    if (!options.keep?.length) {
      await rm(b.dir, { recursive: true, force: true });
    } else {
      for (const d of b.machine.disks) {
        if (!options.keep.includes(d.overlay)) await rm(d.overlay, { force: true });
      }
    }
    this.machines.delete(name);
    return removed;
  }

  /** Stops every machine and export. */
  async close(): Promise<void> {
    for (const name of [...this.machines.keys()]) await this.removeMachine(name);
    for (const e of [...this.exports]) await this.closeExport(e);
  }
}
