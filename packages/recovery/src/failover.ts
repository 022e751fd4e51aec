import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { LifeboatError } from '@lifeboat/protocol';
import type { StoreApi } from '@lifeboat/store';
import type { BootedMachine, MachineSpec, RecoveryHost } from './recovery-host.js';
import type { RecoveryJobRecord } from './recovery-job.js';
import { exportUri } from './recovery-machine.js';
import { mapNetworks, type NetworkMapping, type SourceNic } from './network-mapping.js';
import { runTool } from './run-tool.js';
import { damagedPointError } from './test-failover.js';

/**
 * The source side of a planned failover: replicate a last cycle, then stop the source, so
 * nothing is lost. Implemented by whoever reaches the source (the agent through its process
 * server); the recovery host only calls it.
 */
export interface PlannedFailoverSource {
  /** Takes a last consistent cut and waits until its point is committed; returns its point ids. */
  finalSync(): Promise<string[]>;
  /** Shuts the source machine down (and keeps it down). */
  stopSource(): Promise<void>;
}

/** A failover of one machine, as its spec without disks plus the points to boot. */
export interface FailoverPlan extends Omit<MachineSpec, 'disks'> {
  /** Point ids, one per disk in boot order (unplanned failover, or the start point). */
  pointIds: string[];
  /** A planned failover: last sync, then stop the source, then boot the new point. */
  planned?: PlannedFailoverSource;
  /** The machine's NICs at the source; with `networkMappings`, they replace `nics`. */
  sourceNics?: SourceNic[];
  /** Source network -> recovery network (and static addresses, through cloud-init). */
  networkMappings?: NetworkMapping[];
  /** The start job's id (the vault's, for a failover it queued). @default a new one */
  jobId?: string;
}

/** The machine spec a failover boots: its points, and its NICs and seed from the network mapping. */
export function failoverMachineSpec(plan: FailoverPlan, pointIds: string[]): MachineSpec {
  const { pointIds: _p, planned: _pl, sourceNics, networkMappings, jobId: _j, ...spec } = plan;
  const out: MachineSpec = { ...spec, disks: pointIds.map((pointId) => ({ pointId })) };
  if (sourceNics !== undefined) {
    const mapped = mapNetworks(spec.name, sourceNics, networkMappings ?? []);
    out.nics = mapped.nics;
    if (mapped.addresses.length > 0) {
      out.seed = {
        instanceId: `${spec.name}-failover`,
        hostname: spec.name,
        ...spec.seed,
        addresses: mapped.addresses,
      };
    }
  }
  return out;
}

/** Where hydration writes the machine's disks. */
export interface HydrationOptions {
  /** Directory of the local disk files (one per disk: `<name>-disk<N>.<format>`). */
  dir: string;
  /** @default 'qcow2' */
  format?: 'qcow2' | 'raw';
  /**
   * Before the switch, pause the guest a moment, check with `qemu-img compare` that each
   * local file equals the point plus the guest's writes, and resume. @default false
   */
  verify?: boolean;
  /** How long mirroring may take before it is reported as stuck. @default 3600000 */
  timeoutMs?: number;
  /** The job's id (the vault's, for a hydration it queued). @default a new one */
  jobId?: string;
}

/** Failover state: booted (point may change), committed, hydrated (runs from local files). */
export type FailoverState = 'booted' | 'committed' | 'hydrated' | 'removed';

/**
 * A failover of one machine: boot a point (after a last sync and a stop of the source when
 * planned), change the point while not committed, commit, then hydrate the disks into local
 * files while the machine runs (QEMU drive-mirror, then a switch without restarting the guest),
 * after which the machine no longer needs the store.
 */
export class Failover {
  state: FailoverState = 'booted';
  /** Jobs of this failover, oldest first. */
  readonly jobs: RecoveryJobRecord[] = [];
  /** The local disk files once hydrated. */
  localDisks: string[] = [];

  private constructor(
    private readonly host: RecoveryHost,
    private readonly store: StoreApi,
    private readonly plan: FailoverPlan,
    /** The running machine. */
    public booted: BootedMachine,
    /** The points it boots now. */
    public pointIds: string[],
  ) {}

  /** Starts a failover: (planned: last sync, stop source), then boot the points. */
  static async start(host: RecoveryHost, store: StoreApi, plan: FailoverPlan): Promise<Failover> {
    const job = host.newJob(
      'failover',
      { machine: plan.name, pointIds: plan.pointIds, planned: plan.planned !== undefined },
      plan.jobId !== undefined ? { id: plan.jobId } : {},
    );
    try {
      let pointIds = plan.pointIds;
      if (plan.planned) {
        const source = plan.planned;
        pointIds = await job.step('last sync of the source', async (d) => {
          const ids = await source.finalSync();
          d['pointIds'] = ids;
          return ids;
        });
        await job.step('stop the source', () => source.stopSource());
      }
      const booted = await job.step(`boot ${plan.name}`, async (d) => {
        const spec = failoverMachineSpec(plan, pointIds);
        const b = await host.bootMachine(store, spec);
        d['points'] = pointIds;
        d['accelerator'] = b.machine.accel;
        d['networks'] = (spec.nics ?? []).map((n) =>
          n.kind === 'bridge' ? `bridge ${n.bridge}` : n.kind,
        );
        return b;
      });
      const f = new Failover(host, store, plan, booted, pointIds);
      f.jobs.push(await job.finish());
      return f;
    } catch (err) {
      await job.finish(err);
      throw err;
    }
  }

  /** The running machine. */
  get machine(): BootedMachine['machine'] {
    return this.booted.machine;
  }

  /** Boots other points instead (the guest restarts; its writes so far are discarded). */
  async changePoint(
    pointIds: string[],
    options: { jobId?: string } = {},
  ): Promise<RecoveryJobRecord> {
    if (this.state !== 'booted') {
      throw new LifeboatError(
        'LB_RECOVERY_FAILOVER_STATE',
        `The failover of ${this.plan.name} is ${this.state}; the point can change only before commit.`,
        { details: { machine: this.plan.name, state: this.state } },
      );
    }
    const job = this.host.newJob(
      'failover-change-point',
      { machine: this.plan.name, from: this.pointIds, to: pointIds },
      options.jobId !== undefined ? { id: options.jobId } : {},
    );
    try {
      await job.step(`remove ${this.plan.name}`, async (d) => {
        d['removed'] = await this.host.removeMachine(this.plan.name);
      });
      this.booted = await job.step(`boot ${this.plan.name}`, async (d) => {
        const b = await this.host.bootMachine(this.store, failoverMachineSpec(this.plan, pointIds));
        d['points'] = pointIds;
        return b;
      });
      this.pointIds = pointIds;
      const r = await job.finish();
      this.jobs.push(r);
      return r;
    } catch (err) {
      this.jobs.push(await job.finish(err));
      throw err;
    }
  }

  /** Makes the failover final: the point can no longer change; hydration may start. */
  async commit(options: { jobId?: string } = {}): Promise<RecoveryJobRecord> {
    const job = this.host.newJob(
      'failover-commit',
      { machine: this.plan.name, pointIds: this.pointIds },
      options.jobId !== undefined ? { id: options.jobId } : {},
    );
    try {
      await job.step('commit', async (d) => {
        if (this.state !== 'booted') {
          throw new LifeboatError(
            'LB_RECOVERY_FAILOVER_STATE',
            `The failover of ${this.plan.name} is already ${this.state}.`,
            { details: { machine: this.plan.name, state: this.state } },
          );
        }
        if (this.machine.exit) {
          throw new LifeboatError(
            'LB_RECOVERY_QEMU',
            `Machine ${this.plan.name} is not running (QEMU exited); change the point or clean up.`,
          );
        }
        this.state = 'committed';
        d['pointIds'] = this.pointIds;
      });
      const r = await job.finish();
      this.jobs.push(r);
      return r;
    } catch (err) {
      this.jobs.push(await job.finish(err));
      throw err;
    }
  }

  /**
   * Copies every disk into a local file while the guest runs (drive-mirror, sync full: the
   * point's data from the store plus the overlay's writes, and every write made meanwhile),
   * then switches the guest to the local files and stops the exports: the machine no longer
   * depends on the store.
   */
  async hydrate(options: HydrationOptions): Promise<RecoveryJobRecord> {
    if (this.state !== 'committed') {
      throw new LifeboatError(
        'LB_RECOVERY_FAILOVER_STATE',
        `Hydration needs a committed failover; the failover of ${this.plan.name} is ${this.state}. Commit it first.`,
        { details: { machine: this.plan.name, state: this.state } },
      );
    }
    const format = options.format ?? 'qcow2';
    const timeoutMs = options.timeoutMs ?? 3_600_000;
    const job = this.host.newJob(
      'hydration',
      { machine: this.plan.name, pointIds: this.pointIds, format },
      options.jobId !== undefined ? { id: options.jobId } : {},
    );
    const qmp = this.machine.qmp;
    const disks = this.machine.disks;
    try {
      await mkdir(options.dir, { recursive: true });
      const targets = disks.map((d, i) =>
        join(options.dir, `${this.plan.name}-disk${i}.${format}`),
      );
      for (const [i, d] of disks.entries()) {
        await job.step(`mirror ${d.node}`, async (detail) => {
          const ready = qmp.waitForEvent(
            'BLOCK_JOB_READY',
            (e) => e['device'] === `hydrate-${d.node}`,
            timeoutMs,
          );
          const failed = qmp.waitForEvent(
            'BLOCK_JOB_COMPLETED',
            (e) => e['device'] === `hydrate-${d.node}` && e['error'] !== undefined,
            timeoutMs,
          );
          ready.catch(() => undefined);
          failed.catch(() => undefined);
          await qmp.execute('drive-mirror', {
            'job-id': `hydrate-${d.node}`,
            device: d.node,
            target: targets[i],
            format,
            sync: 'full',
            mode: 'absolute-paths',
            'on-source-error': 'report',
          });
          const first = await Promise.race([ready.then(() => 'ready'), failed.then((e) => e)]);
          if (first !== 'ready') {
            const faults = this.booted.exports.flatMap((e) => [...e.faults]);
            if (faults.length > 0) throw damagedPointError(this.plan.name, faults);
            throw new LifeboatError(
              'LB_RECOVERY_HYDRATION',
              `Copying disk ${i} of ${this.plan.name} failed: ${String((first as Record<string, unknown>)['error'])}. The machine still runs from the store; retry hydration.`,
              { details: { machine: this.plan.name, disk: i } },
            );
          }
          detail['target'] = targets[i];
          detail['bytes'] = d.export.size;
        });
      }
      if (options.verify) {
        await job.step('verify copies', async (detail) => {
          await qmp.execute('stop');
          try {
            // Paused, with the mirrors in sync: overlay over point == local file, byte for byte.
            await this.waitMirrorsInSync(
              disks.map((d) => `hydrate-${d.node}`),
              timeoutMs,
            );
            // Switch while paused, then compare: QEMU no longer holds the overlays, and the
            // guest has written nothing since the copies caught up.
            await this.switchToLocal(
              disks.map((d) => d.node),
              timeoutMs,
            );
            for (const [i, d] of disks.entries()) {
              await runTool(
                'LB_RECOVERY_HYDRATION',
                this.host.options.qemuImg,
                ['compare', '-U', '-f', 'qcow2', '-F', format, d.overlay, targets[i]!],
                `Comparing the local copy of disk ${i} of ${this.plan.name} with the point plus the guest's writes`,
              );
            }
            detail['identical'] = targets;
          } finally {
            await qmp.execute('cont');
          }
        });
      } else {
        await job.step('switch to local disks', () =>
          this.switchToLocal(
            disks.map((d) => d.node),
            timeoutMs,
          ),
        );
      }
      await job.step('check the machine runs from local disks', async (detail) => {
        const blocks = (await qmp.execute('query-block')) as Array<{
          qdev?: string;
          inserted?: { file: string; backing_file_depth?: number };
        }>;
        const files = blocks.map((b) => b.inserted?.file).filter((f) => f !== undefined);
        for (const t of targets) {
          const b = blocks.find((x) => x.inserted?.file === t);
          if (!b || (b.inserted?.backing_file_depth ?? 0) !== 0) {
            throw new LifeboatError(
              'LB_RECOVERY_HYDRATION',
              `After the switch, ${this.plan.name} does not run from ${t} alone (QEMU shows ${files.join(', ')}). Keep the exports; report this.`,
              { details: { machine: this.plan.name, files } },
            );
          }
        }
        detail['files'] = files;
      });
      await job.step('stop exports', async (detail) => {
        const removed: string[] = [];
        for (const e of this.booted.exports) {
          await this.host.closeExport(e);
          removed.push(`export ${e.name} of point ${e.pointId}`);
        }
        // The overlays were the guest's disks until the switch; they are no longer used.
        detail['removed'] = removed;
        detail['unusedOverlays'] = disks.map(
          (d) => `${d.overlay} (backed by ${exportUri(d.export)})`,
        );
      });
      this.localDisks = targets;
      this.state = 'hydrated';
      const r = await job.finish();
      this.jobs.push(r);
      return r;
    } catch (err) {
      for (const d of disks) {
        await qmp
          .execute('block-job-cancel', { device: `hydrate-${d.node}`, force: true })
          .catch(() => undefined);
      }
      this.jobs.push(await job.finish(err));
      throw err;
    }
  }

  private async waitMirrorsInSync(jobIds: string[], timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const jobs = (await this.machine.qmp.execute('query-block-jobs')) as Array<{
        device: string;
        offset: number;
        len: number;
        ready: boolean;
        busy: boolean;
      }>;
      const ours = jobs.filter((j) => jobIds.includes(j.device));
      if (
        ours.length === jobIds.length &&
        ours.every((j) => j.ready && j.offset === j.len && !j.busy)
      )
        return;
      if (Date.now() > deadline) {
        throw new LifeboatError(
          'LB_RECOVERY_HYDRATION',
          'The disk copies did not catch up with the guest in time.',
          {
            details: { jobs: ours },
          },
        );
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  private async switchToLocal(nodes: string[], timeoutMs: number): Promise<void> {
    const qmp = this.machine.qmp;
    for (const node of nodes) {
      const done = qmp.waitForEvent(
        'BLOCK_JOB_COMPLETED',
        (e) => e['device'] === `hydrate-${node}`,
        timeoutMs,
      );
      await qmp.execute('block-job-complete', { device: `hydrate-${node}` });
      const e = await done;
      if (e['error'] !== undefined) {
        throw new LifeboatError(
          'LB_RECOVERY_HYDRATION',
          `Switching ${this.plan.name}'s ${node} to its local file failed: ${String(e['error'])}.`,
        );
      }
    }
  }

  /** Stops the machine and removes overlays and exports; keeps the hydrated local files. */
  async cleanup(): Promise<RecoveryJobRecord> {
    const job = this.host.newJob('failover-cleanup', { machine: this.plan.name });
    try {
      await job.step(`remove ${this.plan.name}`, async (d) => {
        d['removed'] = await this.host.removeMachine(this.plan.name);
        if (this.localDisks.length > 0) d['kept'] = this.localDisks;
      });
      this.state = 'removed';
      const r = await job.finish();
      this.jobs.push(r);
      return r;
    } catch (err) {
      this.jobs.push(await job.finish(err));
      throw err;
    }
  }
}
