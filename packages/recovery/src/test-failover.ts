import { copyFile, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { LifeboatError } from '@lifeboat/protocol';
import type { StoreApi } from '@lifeboat/store';
import { IsolatedSegment } from './isolated-segment.js';
import type { ListeningSocket } from './listening-sockets.js';
import type { PointReadFault } from './cached-point-source.js';
import { selectPoints, type PointSelector } from './point-selector.js';
import type { BootedMachine, MachineSpec, RecoveryHost } from './recovery-host.js';
import type { RecoveryJob, RecoveryJobRecord } from './recovery-job.js';
import type { MachineNic } from './recovery-machine.js';

/** How a test failover proves a machine booted. */
export interface BootVerification {
  /** A pattern the console must show. @default none */
  console?: RegExp;
  /** A guest TCP port that must answer through the isolated network. @default none */
  port?: { guestPort: number; send?: string; expect?: RegExp };
  /** Save a PNG screenshot (QMP screendump) with the job. @default true */
  screenshot?: boolean;
}

/** One machine of a test failover. */
export interface TestFailoverMachine extends Omit<MachineSpec, 'disks' | 'nics' | 'name'> {
  name: string;
  /** The store holding its points. @default the test failover's store */
  store?: StoreApi;
  /** Which point(s) to boot: point ids per disk, or a selector (latest, app, group, time). */
  points: { pointIds: string[] } | PointSelector;
  /** @default the plan's verification */
  verify?: BootVerification;
  /**
   * Its NIC instead of the plan's isolated network: a recovery-site network that the
   * machine's network mapping names for tests (never chosen by default). @default the plan's
   */
  nic?: MachineNic;
}

/** A test failover of one machine, or of the machines of one consistency group. */
export interface TestFailoverPlan {
  machines: TestFailoverMachine[];
  /**
   * `isolated-user`: each machine alone (user networking, restrict=on, the verified port
   * forwarded from 127.0.0.1 only); `segment`: the machines share one private segment and
   * reach each other and nothing else. @default 'isolated-user' for one machine, else 'segment'
   */
  network?: 'isolated-user' | 'segment';
  verify?: BootVerification;
  /** The job's id (the vault's, for a test failover it queued). @default a new one */
  jobId?: string;
}

/** A running test failover: its job, its machines, and its cleanup. */
export interface TestFailover {
  readonly job: RecoveryJobRecord;
  readonly machines: BootedMachine[];
  readonly segment: IsolatedSegment | undefined;
  /** Stops the machines, removes overlays, exports and the segment; returns that job. */
  cleanup(options?: { jobId?: string }): Promise<RecoveryJobRecord>;
}

/** Read faults of a machine's exports, as one error naming each point and range. */
export function damagedPointError(
  machine: string,
  faults: readonly PointReadFault[],
): LifeboatError {
  const ranges = faults.map(
    (f) => `point ${f.pointId} bytes ${f.offset}-${f.offset + f.length - 1} (${f.code})`,
  );
  return new LifeboatError(
    'LB_RECOVERY_POINT_DAMAGED',
    `Machine ${machine} read damaged data from the store: ${[...new Set(ranges)].slice(0, 5).join('; ')}. Run "lifeboat store verify", and boot an earlier point.`,
    { details: { machine, faults: faults.slice(0, 50) } },
  );
}

/** Runs a test failover as a job: select, network, boot, verify; machines stay until cleanup. */
export async function runTestFailover(
  host: RecoveryHost,
  store: StoreApi,
  plan: TestFailoverPlan,
): Promise<TestFailover> {
  const job = host.newJob(
    'test-failover',
    { machines: plan.machines.map((m) => m.name) },
    plan.jobId !== undefined ? { id: plan.jobId } : {},
  );
  const booted: BootedMachine[] = [];
  let segment: IsolatedSegment | undefined;
  let cleaned = false;
  let segmentClosed = false;
  const cleanup = async (options: { jobId?: string } = {}): Promise<RecoveryJobRecord> => {
    const cj = host.newJob(
      'test-failover-cleanup',
      { testFailover: job.record.id, machines: plan.machines.map((m) => m.name) },
      options.jobId !== undefined ? { id: options.jobId } : {},
    );
    try {
      const again = cleaned;
      if (again) {
        await cj.step('remove machines', async (d) => {
          d['removed'] = [];
          d['note'] = 'already cleaned up';
        });
      }
      for (const b of again ? [] : booted) {
        await cj.step(`remove ${b.machine.name}`, async (d) => {
          d['removed'] = await host.removeMachine(b.machine.name);
        });
      }
      if (segment && !segmentClosed) {
        segmentClosed = true;
        const s = segment;
        await cj.step('remove isolated network', async (d) => {
          await s.close();
          d['removed'] = [`segment ${s.socketPath} (${s.framesForwarded} frames forwarded)`];
        });
      }
      cleaned = true;
      return await cj.finish();
    } catch (err) {
      await cj.finish(err);
      throw err;
    }
  };
  try {
    const network = plan.network ?? (plan.machines.length > 1 ? 'segment' : 'isolated-user');
    const chosen = await job.step('select points', async (d) => {
      const out: string[][] = [];
      for (const m of plan.machines) {
        const ids =
          'pointIds' in m.points
            ? m.points.pointIds
            : (await selectPoints(m.store ?? store, m.points)).map((p) => p.id);
        out.push(ids);
        d[m.name] = ids;
      }
      return out;
    });
    if (network === 'segment' && plan.machines.some((m) => m.nic === undefined)) {
      segment = await job.step('create isolated network', async (d) => {
        const s = await IsolatedSegment.start(
          join(host.options.runDir, 'x', `seg-${job.record.id.slice(-6)}.sock`),
        );
        d['segment'] = s.socketPath;
        return s;
      });
    }
    for (const [i, m] of plan.machines.entries()) {
      const verify = m.verify ?? plan.verify ?? {};
      const nic: MachineNic =
        m.nic !== undefined
          ? m.nic
          : network === 'segment' && segment
            ? { kind: 'segment', segment }
            : {
                kind: 'isolated-user',
                forwardPorts: verify.port ? [verify.port.guestPort] : [],
              };
      const b = await job.step(`boot ${m.name}`, async (d) => {
        const { points: _points, verify: _verify, store: _store, nic: _nic, ...rest } = m;
        const spec: MachineSpec = {
          ...rest,
          disks: chosen[i]!.map((pointId) => ({ pointId })),
          nics: [nic],
        };
        const started = await host.bootMachine(m.store ?? store, spec);
        d['accelerator'] = started.machine.accel;
        d['network'] = nic.kind === 'bridge' ? `bridge ${nic.bridge}` : nic.kind;
        d['cpus'] = spec.cpus ?? 1;
        d['memoryMiB'] = spec.memoryMiB ?? 512;
        d['points'] = chosen[i];
        d['overlays'] = started.machine.disks.map((x) => x.overlay);
        return started;
      });
      booted.push(b);
      job.artifact(`${m.name}-console`, b.machine.consolePath);
    }
    for (const [i, b] of booted.entries()) {
      const m = plan.machines[i]!;
      const verify = m.verify ?? plan.verify ?? {};
      await verifyMachine(host, job, b, verify);
    }
    await job.finish();
  } catch (err) {
    // The console logs live in the machines' directories, which cleanup removes: keep a copy
    // with the job, where an operator looks for why the boot failed.
    for (const b of booted) {
      const kept = join(job.dir, `${b.machine.name}-console.log`);
      try {
        await mkdir(job.dir, { recursive: true });
        await copyFile(b.machine.consolePath, kept);
        job.artifact(`${b.machine.name}-console`, kept);
      } catch {
        // No console yet (QEMU never started): nothing to keep.
      }
    }
    await job.finish(err);
    await cleanup().catch(() => undefined);
    throw err;
  }
  return { job: job.record, machines: booted, segment, cleanup };
}

async function verifyMachine(
  host: RecoveryHost,
  job: RecoveryJob,
  b: BootedMachine,
  verify: BootVerification,
): Promise<void> {
  const m = b.machine;
  const faults = (): PointReadFault[] => b.exports.flatMap((e) => [...e.faults]);
  // A boot that fails because the store could not serve a range must say which point and range.
  const orFaults = async <T>(fn: () => Promise<T>): Promise<T> => {
    try {
      return await fn();
    } catch (err) {
      if (faults().length > 0) throw damagedPointError(m.name, faults());
      throw err;
    }
  };
  const timeout = host.options.bootTimeoutMs;
  if (verify.console) {
    const pattern = verify.console;
    await job.step(`console of ${m.name}`, (d) =>
      orFaults(async () => {
        const match = await m.waitForConsole(pattern, timeout);
        d['matched'] = match[0];
      }),
    );
  }
  if (verify.port) {
    const p = verify.port;
    await job.step(`port ${p.guestPort} of ${m.name}`, (d) =>
      orFaults(async () => {
        const answer = await m.waitForPort(p.guestPort, timeout, {
          ...(p.send !== undefined ? { send: p.send } : {}),
          ...(p.expect !== undefined ? { expect: p.expect } : {}),
        });
        d['answer'] = answer.slice(0, 200);
        d['hostPort'] = m.ports.get(p.guestPort);
      }),
    );
  }
  if (verify.screenshot ?? true) {
    await job.step(`screenshot of ${m.name}`, async (d) => {
      const path = join(job.dir, `${m.name}-screen.png`);
      const size = await m.screenshot(path);
      d['path'] = path;
      d['width'] = size.width;
      d['height'] = size.height;
      job.artifact(`${m.name}-screenshot`, path);
    });
  }
  await job.step(`isolation of ${m.name}`, async (d) => {
    const listening: ListeningSocket[] = await m.listening();
    const allowed = new Set(m.ports.values());
    const outside = listening.filter((l) => l.address !== '127.0.0.1' || !allowed.has(l.port));
    d['listening'] = listening.map((l) => `${l.address}:${l.port}`);
    if (outside.length > 0) {
      throw new LifeboatError(
        'LB_RECOVERY_NOT_ISOLATED',
        `Machine ${m.name} listens outside its isolated network (${outside.map((l) => `${l.address}:${l.port}`).join(', ')}). Clean up this test failover; report it as a bug.`,
        { details: { machine: m.name, listening: outside } },
      );
    }
  });
  if (faults().length > 0) throw damagedPointError(m.name, faults());
}
