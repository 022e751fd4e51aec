import { randomBytes } from 'node:crypto';
import { open, readFile, stat } from 'node:fs/promises';
import { join, resolve, sep } from 'node:path';
import { LifeboatError, isLifeboatError } from '@lifeboat/protocol';
import type { StoreApi } from '@lifeboat/store';
import { Failover, type PlannedFailoverSource } from './failover.js';
import { recordedMachineConfig } from './recorded-config.js';
import type { RecoveryHost } from './recovery-host.js';
import type { RecoveryJobKind, RecoveryJobRecord } from './recovery-job.js';
import type { MachineBoot } from './recovery-machine.js';
import type { SeedDiskOptions } from './seed-disk.js';
import { runTestFailover, type TestFailover, type TestFailoverMachine } from './test-failover.js';
import type { VaultClient } from '@lifeboat/protocol';
import { vaultJobReporter, type VaultJobReporter } from './vault-job-reporter.js';

/** A target store as the vault hands it to the recovery host (secrets unsealed). */
export interface AssignedTargetStore {
  id: string;
  kind: 'directory' | 'azure';
  path: string | null;
  container: string | null;
  connectionString: string | null;
  passphrase: string;
}

/** A machine of an operation, as the vault chose it. */
interface OperationMachine {
  name: string;
  protectedItemId: string;
  machineId: string;
  machineName: string;
  targetStoreId: string;
  pointIds: string[];
  cpus?: number;
  memoryMiB?: number;
  address?: { address: string; gateway?: string; nameservers?: string[] };
  boot?: { firmware?: 'bios' | 'uefi'; kernel?: string; append?: string; initrd?: string };
  /** One of this host's declared networks (from the item's network mapping). @default isolated */
  network?: string;
}

interface Verify {
  console?: string;
  guestPort?: number;
  expect?: string;
  screenshot?: boolean;
}

/** One operation of the recovery host's assignments (a job the vault queued for it). */
export interface RecoveryOperation {
  jobId: string;
  kind: RecoveryJobKind;
  state: 'queued' | 'running';
  runId: string;
  runKind: 'test-failover' | 'failover';
  spec: Record<string, unknown>;
  /** A planned failover: the process server's last sync, as far as it got. */
  finalSync?: {
    jobId: string;
    state: string;
    result: { pointIds?: string[]; sourceStopped?: boolean } | null;
    error: { code: string; message: string } | null;
  };
}

/** Options of {@link RecoveryHostLink}. */
export interface RecoveryHostLinkOptions {
  /** The vault, with the recovery host's token (and client certificate over HTTPS). */
  vault: VaultClient;
  host: RecoveryHost;
  /** Opens a target store with what the vault handed over. */
  openStore: (store: AssignedTargetStore) => Promise<StoreApi>;
  /** Where committed failovers' disks are hydrated (one directory per run). */
  hydrationDir: string;
  /**
   * Directories whose kernel files an operation may boot directly (`boot.kernel`), for disks
   * without a boot loader. @default [] (none: such an operation fails)
   */
  kernelDirs?: string[];
  /** How machines boot when neither the operation nor the points' labels say. @default BIOS */
  defaultBoot?: MachineBoot;
  /** How often it sends a heartbeat and reads its assignments. @default 2000 */
  intervalMs?: number;
  /** How long a planned failover waits for the source's last sync. @default 900000 */
  finalSyncTimeoutMs?: number;
  /** Reported in heartbeats. @default none */
  version?: string;
  /** A failed round or report (the vault unreachable); the link keeps going. @default ignore */
  onError?: (err: unknown) => void;
}

interface Run {
  kind: 'test-failover' | 'failover';
  chain: Promise<void>;
  testFailover?: TestFailover;
  failover?: Failover;
}

const CONSOLE_TAIL = 64 * 1024;

/**
 * The recovery host's side of the control flow (docs/architecture.md): heartbeats with its
 * process instance and health, and polls its assignments for the jobs the vault queued (test
 * failovers, their cleanup, failovers, changes of point, commits, hydrations). It runs each
 * with `@lifeboat/recovery`, one at a time per run, and reports it on the vault's own job id,
 * with its artifacts (screenshots, console log tails) uploaded before the job's end. The vault
 * never connects to it.
 */
export class RecoveryHostLink {
  /** This process's instance: the vault fails the runs an earlier instance held. */
  readonly instanceId = `rh-${Date.now().toString(36)}-${randomBytes(4).toString('hex')}`;
  private readonly runs = new Map<string, Run>();
  private readonly known = new Set<string>();
  private readonly held = new Map<string, RecoveryJobRecord>();
  private readonly operations = new Map<string, RecoveryOperation>();
  private readonly stores = new Map<string, Promise<StoreApi>>();
  private storeAccess = new Map<string, AssignedTargetStore>();
  private readonly reporter: VaultJobReporter;
  private readonly unsubscribe: () => void;
  private timer: NodeJS.Timeout | undefined;
  private round: Promise<void> = Promise.resolve();
  private readonly kernelDirs: string[];
  private defaultBoot: MachineBoot | undefined;
  private stopping = false;
  private stopped = false;
  // The client with the recovery host's token and certificate (a renewal replaces it).
  private vault: VaultClient;

  constructor(private readonly options: RecoveryHostLinkOptions) {
    this.vault = options.vault;
    this.kernelDirs = [...(options.kernelDirs ?? [])];
    this.defaultBoot = options.defaultBoot;
    this.reporter = vaultJobReporter({
      client: { call: (method, path, body) => this.vault.call(method, path, body) },
      result: (job) => this.resultOf(job),
      onError: (err) => options.onError?.(err),
    });
    this.unsubscribe = options.host.subscribe((job) => {
      if (this.stopped) return;
      // A job the vault queued ends only once its artifacts are uploaded (see execute).
      if (this.operations.has(job.id) && job.state !== 'running') {
        this.held.set(job.id, JSON.parse(JSON.stringify(job)) as RecoveryJobRecord);
        return;
      }
      this.reporter.listener(job);
    });
  }

  /** True for a job this link runs for the vault (reported by it, on the vault's id). */
  owns(jobId: string): boolean {
    return this.operations.has(jobId) || this.known.has(jobId);
  }

  /** Talks to the vault through this client from now on (its certificate was renewed). */
  setVault(vault: VaultClient): void {
    this.vault = vault;
  }

  /** Lets operations boot kernel files from `dir` too (e.g. a test image built later). */
  allowKernelDir(dir: string): void {
    if (!this.kernelDirs.includes(dir)) this.kernelDirs.push(dir);
  }

  /** How machines boot from now on when neither the operation nor the points' labels say. */
  setDefaultBoot(boot: MachineBoot | undefined): void {
    this.defaultBoot = boot;
  }

  /** Starts the heartbeat and polling (a first round at once). */
  start(): void {
    const tick = (): void => {
      this.round = this.round.then(() => this.once()).catch((err) => this.options.onError?.(err));
    };
    this.timer = setInterval(tick, this.options.intervalMs ?? 2000);
    tick();
  }

  /** Runs one round now and waits for it. */
  async sync(): Promise<void> {
    // A round that failed before (the vault unreachable) does not stop this one.
    this.round = this.round.catch(() => undefined).then(() => this.once());
    await this.round;
  }

  /** Resolves once every operation started so far has ended and been reported. */
  async idle(): Promise<void> {
    for (;;) {
      const chains = [...this.runs.values()].map((r) => r.chain);
      await Promise.all(chains);
      if ([...this.runs.values()].every((r, i) => r.chain === chains[i])) break;
    }
    await this.reporter.flush();
  }

  /**
   * Stops polling, waits for running operations, sends the last reports and closes the stores
   * it opened. The machines stay until the recovery host itself is closed.
   */
  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    clearInterval(this.timer);
    await this.round.catch(() => undefined);
    await this.idle().catch(() => undefined);
    this.stopped = true;
    this.unsubscribe();
    for (const s of this.stores.values()) {
      await s.then((x) => x.close()).catch(() => undefined);
    }
    this.stores.clear();
  }

  private async once(): Promise<void> {
    if (this.stopping) return;
    const { host } = this.options;
    const vault = this.vault;
    const usage = process.memoryUsage();
    await vault.call('POST', '/api/components/self/heartbeat', {
      ...(this.options.version !== undefined ? { version: this.options.version } : {}),
      health: {
        instanceId: this.instanceId,
        accelerator: host.accel,
        machines: host.running.size,
        runs: this.runs.size,
        memoryBytes: usage.rss,
        // The vault checks network mappings' target and test networks against these.
        networks: host.networkReport(),
      },
    });
    const a = await vault.call<{
      operations: RecoveryOperation[];
      targetStores: AssignedTargetStore[];
    }>('GET', '/api/components/self/assignments');
    this.storeAccess = new Map(a.targetStores.map((s) => [s.id, s]));
    for (const op of a.operations) {
      const seen = this.operations.get(op.jobId);
      if (seen !== undefined) {
        // Newer state of an operation in progress (a planned failover's last sync).
        if (op.finalSync !== undefined) seen.finalSync = op.finalSync;
        continue;
      }
      if (this.known.has(op.jobId)) continue;
      this.known.add(op.jobId);
      if (op.state === 'running') {
        // Running but not here: an earlier instance of this recovery host started it.
        await this.reportDirect(
          op,
          new LifeboatError(
            'LB_RECOVERY_HOST_RESTARTED',
            `The recovery host restarted while running this ${op.kind}; what it had started is gone. Start it again (a test failover can be cleaned up).`,
            { details: { jobId: op.jobId, instanceId: this.instanceId } },
          ),
        ).catch((err) => this.options.onError?.(err));
        continue;
      }
      const run = this.runs.get(op.runId) ?? { kind: op.runKind, chain: Promise.resolve() };
      this.runs.set(op.runId, run);
      this.operations.set(op.jobId, op);
      run.chain = run.chain.then(() => this.execute(run, op));
    }
  }

  /** Runs one operation and reports its end (after its artifacts); never rejects. */
  private async execute(run: Run, op: RecoveryOperation): Promise<void> {
    let failure: unknown;
    try {
      await this.perform(run, op);
    } catch (err) {
      failure = err;
    }
    try {
      const final = this.held.get(op.jobId);
      if (final === undefined) {
        // It failed before its job started (a store that does not open, a refused kernel).
        await this.reportDirect(op, failure ?? new Error('the operation ended without a job'));
      } else {
        await this.uploadArtifacts(op, final);
        this.reporter.listener(final);
        await this.reporter.flush();
      }
    } catch (err) {
      this.options.onError?.(err);
    } finally {
      this.held.delete(op.jobId);
      this.operations.delete(op.jobId);
      if (run.kind === 'test-failover' && op.kind === 'test-failover-cleanup') {
        this.runs.delete(op.runId);
      }
    }
  }

  private async perform(run: Run, op: RecoveryOperation): Promise<void> {
    const { host } = this.options;
    switch (op.kind) {
      case 'test-failover': {
        const machines = op.spec['machines'] as OperationMachine[];
        const verify = (op.spec['verify'] as Verify | undefined) ?? {};
        const planned: TestFailoverMachine[] = [];
        for (const m of machines) planned.push(await this.testMachine(op, m));
        const first = planned[0]!.store!;
        run.testFailover = await runTestFailover(host, first, {
          jobId: op.jobId,
          machines: planned,
          network: op.spec['network'] === 'segment' ? 'segment' : 'isolated-user',
          verify: {
            ...(verify.console !== undefined ? { console: new RegExp(verify.console) } : {}),
            ...(verify.guestPort !== undefined
              ? {
                  port: {
                    guestPort: verify.guestPort,
                    ...(verify.expect !== undefined ? { expect: new RegExp(verify.expect) } : {}),
                  },
                }
              : {}),
            screenshot: verify.screenshot ?? true,
          },
        });
        return;
      }
      case 'test-failover-cleanup': {
        if (run.testFailover !== undefined) {
          await run.testFailover.cleanup({ jobId: op.jobId });
          return;
        }
        // Not started here (an earlier instance, or its start failed): remove what is left.
        const job = host.newJob(
          'test-failover-cleanup',
          { testFailover: op.runId },
          { id: op.jobId },
        );
        try {
          for (const name of (op.spec['machines'] as string[] | undefined) ?? []) {
            await job.step(`remove ${name}`, async (d) => {
              d['removed'] = await host.removeMachine(name);
            });
          }
          await job.finish();
        } catch (err) {
          await job.finish(err);
        }
        return;
      }
      case 'failover': {
        const m = op.spec['machine'] as OperationMachine;
        const verify = (op.spec['verify'] as Verify | undefined) ?? {};
        const store = await this.store(m.targetStoreId);
        const planned = op.spec['planned'] !== undefined;
        const hardware = await this.hardware(store, m, planned);
        run.failover = await Failover.start(host, store, {
          jobId: op.jobId,
          name: m.name,
          pointIds: m.pointIds,
          guestAgent: true,
          ...hardware,
          nics: [
            m.network !== undefined
              ? host.networkNic(m.network, m.name)
              : {
                  kind: 'isolated-user',
                  ...(verify.guestPort !== undefined ? { forwardPorts: [verify.guestPort] } : {}),
                },
          ],
          ...(m.address !== undefined ? { seed: seedOf(m, op.runId) } : {}),
          ...(planned ? { planned: this.plannedSource(op) } : {}),
        });
        return;
      }
      case 'failover-change-point':
        await this.failoverOf(run, op).changePoint(op.spec['pointIds'] as string[], {
          jobId: op.jobId,
        });
        return;
      case 'failover-commit':
        await this.failoverOf(run, op).commit({ jobId: op.jobId });
        return;
      case 'hydration': {
        const f = this.failoverOf(run, op);
        await f.hydrate({
          dir: join(this.options.hydrationDir, op.runId),
          format: op.spec['format'] === 'raw' ? 'raw' : 'qcow2',
          verify: op.spec['verify'] === true,
          jobId: op.jobId,
        });
        return;
      }
      default:
        throw new LifeboatError(
          'LB_RECOVERY_CONTROL',
          `This recovery host does not know operations of kind ${String(op.kind)}; upgrade it to the vault's version.`,
          { details: { kind: op.kind } },
        );
    }
  }

  private failoverOf(run: Run, op: RecoveryOperation): Failover {
    if (run.failover === undefined) {
      throw new LifeboatError(
        'LB_RECOVERY_NO_SUCH_RUN',
        `Failover ${op.runId} does not run on this recovery host (it restarted, or the failover never booted). Start a new failover.`,
        { details: { runId: op.runId, instanceId: this.instanceId } },
      );
    }
    return run.failover;
  }

  /** The source side of a planned failover, as the vault relays it from the process server. */
  private plannedSource(op: RecoveryOperation): PlannedFailoverSource {
    const timeoutMs = this.options.finalSyncTimeoutMs ?? 900_000;
    let result: { pointIds?: string[]; sourceStopped?: boolean } | null = null;
    return {
      finalSync: async () => {
        const deadline = Date.now() + timeoutMs;
        for (;;) {
          const fs = this.operations.get(op.jobId)?.finalSync;
          if (fs?.state === 'succeeded') {
            result = fs.result;
            const ids = result?.pointIds ?? [];
            if (ids.length === 0) {
              throw new LifeboatError(
                'LB_RECOVERY_FINAL_SYNC',
                'The process server reported its last sync without the points it committed.',
                { details: { finalSyncJobId: fs.jobId } },
              );
            }
            return ids;
          }
          if (fs !== undefined && ['failed', 'cancelled'].includes(fs.state)) {
            throw new LifeboatError(
              'LB_RECOVERY_FINAL_SYNC',
              `The source's last sync failed on its process server: ${fs.error?.message ?? fs.state}. Nothing was booted; the source may still run. Retry, or run an unplanned failover.`,
              { details: { finalSyncJobId: fs.jobId, error: fs.error } },
            );
          }
          if (Date.now() > deadline || this.stopping) {
            throw new LifeboatError(
              'LB_RECOVERY_FINAL_SYNC',
              `The source's last sync did not end within ${Math.round(timeoutMs / 1000)} s. Check the process server and agent of the machine.`,
              { details: { finalSyncJobId: fs?.jobId } },
            );
          }
          await new Promise((r) => setTimeout(r, 250));
        }
      },
      stopSource: async () => {
        // The agent stops the source right after its last cut is committed, before reporting.
        if (result?.sourceStopped !== true) {
          throw new LifeboatError(
            'LB_RECOVERY_FINAL_SYNC',
            'The process server did not confirm that the source machine is stopped; booting the copy beside it could split the machine in two. Stop the source, then run an unplanned failover from the point of the last sync.',
            { details: { pointIds: result?.pointIds ?? [] } },
          );
        }
      },
    };
  }

  private async testMachine(
    op: RecoveryOperation,
    m: OperationMachine,
  ): Promise<TestFailoverMachine> {
    const store = await this.store(m.targetStoreId);
    const nic =
      m.network !== undefined ? this.options.host.networkNic(m.network, m.name) : undefined;
    return {
      name: m.name,
      store,
      ...(nic !== undefined ? { nic } : {}),
      points: { pointIds: m.pointIds },
      // A guest agent channel: harmless without an agent in the guest, and lets an operator
      // (or a test) look inside the isolated machine.
      guestAgent: true,
      ...(await this.hardware(store, m, false)),
      ...(m.address !== undefined ? { seed: seedOf(m, op.runId) } : {}),
    };
  }

  /** CPUs, memory, disk bus and boot: the operation's, else the points' labels, else defaults. */
  private async hardware(
    store: StoreApi,
    m: OperationMachine,
    planned: boolean,
  ): Promise<{
    boot: MachineBoot;
    cpus?: number;
    memoryMiB?: number;
    diskBus?: 'nvme' | 'virtio';
  }> {
    const point =
      m.pointIds[0] !== undefined
        ? await store.getPoint(m.pointIds[0])
        : planned
          ? (await store.listPoints({ machine: m.machineId })).at(-1)
          : undefined;
    const rec = point !== undefined ? recordedMachineConfig(point) : {};
    let boot: MachineBoot;
    if (m.boot?.kernel !== undefined) {
      boot = {
        kernel: await this.allowedBootFile(m.boot.kernel),
        ...(m.boot.append !== undefined ? { append: m.boot.append } : {}),
        ...(m.boot.initrd !== undefined
          ? { initrd: await this.allowedBootFile(m.boot.initrd) }
          : {}),
      };
    } else if (m.boot?.firmware !== undefined) {
      boot = { firmware: m.boot.firmware };
    } else if (rec.firmware !== undefined && !(rec.kernelBoot === true && this.defaultBoot)) {
      boot = { firmware: rec.firmware };
    } else {
      // Also a source that booted a kernel file directly (which the store does not hold): the
      // recovery host's default boot, when it has one, is what can boot its disks.
      boot = this.defaultBoot ?? { firmware: rec.firmware ?? 'bios' };
    }
    const cpus = m.cpus ?? rec.cpus;
    const memoryMiB = m.memoryMiB ?? rec.memoryMiB;
    return {
      boot,
      ...(cpus !== undefined ? { cpus } : {}),
      ...(memoryMiB !== undefined ? { memoryMiB } : {}),
      ...(rec.diskBus !== undefined ? { diskBus: rec.diskBus } : {}),
    };
  }

  /** A kernel or initrd file inside one of the allowed directories (never anything else). */
  private async allowedBootFile(file: string): Promise<string> {
    const path = resolve(file);
    const dirs = this.kernelDirs.map((d) => resolve(d));
    const inside = dirs.some((d) => path.startsWith(d.endsWith(sep) ? d : d + sep));
    const isFile = await stat(path).then(
      (s) => s.isFile(),
      () => false,
    );
    if (!inside || !isFile) {
      throw new LifeboatError(
        'LB_RECOVERY_BOOT_FILE',
        inside
          ? `The boot file ${path} does not exist on this recovery host.`
          : `This recovery host boots kernel files only from its allowed directories (${dirs.join(', ') || 'none: start it with --kernel-dir'}), not ${path}.`,
        { details: { path, allowed: dirs } },
      );
    }
    return path;
  }

  private store(id: string): Promise<StoreApi> {
    let s = this.stores.get(id);
    if (s === undefined) {
      const access = this.storeAccess.get(id);
      if (access === undefined) {
        return Promise.reject(
          new LifeboatError(
            'LB_RECOVERY_NO_STORE',
            `The vault did not hand this recovery host target store ${id}.`,
            { details: { targetStoreId: id } },
          ),
        );
      }
      s = this.options.openStore(access);
      // A store that failed to open is tried again by the next operation.
      s.catch(() => this.stores.delete(id));
      this.stores.set(id, s);
    }
    return s;
  }

  /** What the vault folds into the run: verification and points per machine, this instance. */
  private resultOf(job: RecoveryJobRecord): Record<string, unknown> {
    const op = this.operations.get(job.id);
    if (op === undefined) return {};
    const names =
      op.kind === 'test-failover'
        ? (op.spec['machines'] as OperationMachine[]).map((m) => m.name)
        : [
            typeof op.spec['machine'] === 'string'
              ? op.spec['machine']
              : ((op.spec['machine'] as OperationMachine | undefined)?.name ?? ''),
          ];
    const run = this.runs.get(op.runId);
    const machines = names.map((name) => {
      const step = (prefix: string) =>
        job.steps.find((s) => s.name.startsWith(prefix) && s.name.endsWith(` ${name}`));
      const console = step('console of')?.detail?.['matched'];
      const port = step('port ')?.detail;
      const shot = step('screenshot of')?.detail;
      const verification =
        console !== undefined || port !== undefined || shot !== undefined
          ? {
              ...(console !== undefined ? { console } : {}),
              ...(port !== undefined
                ? {
                    port: {
                      guestPort: Number(step('port ')!.name.split(' ')[1]),
                      answer: port['answer'],
                    },
                  }
                : {}),
              ...(shot !== undefined
                ? { screenshot: { width: shot['width'], height: shot['height'] } }
                : {}),
            }
          : undefined;
      const f = run?.failover;
      return {
        name,
        ...(verification !== undefined ? { verification } : {}),
        ...(f !== undefined && job.state === 'succeeded' ? { pointIds: f.pointIds } : {}),
        ...(f !== undefined && f.localDisks.length > 0 ? { localDisks: f.localDisks } : {}),
      };
    });
    return { instanceId: this.instanceId, machines };
  }

  /** Uploads the job's screenshots and console log tails (newest 64 KiB) to the vault. */
  private async uploadArtifacts(op: RecoveryOperation, job: RecoveryJobRecord): Promise<void> {
    for (const [name, path] of Object.entries(job.artifacts)) {
      const png = name.endsWith('-screenshot');
      let data: Buffer;
      try {
        data = png ? await readFile(path) : await tail(path, CONSOLE_TAIL);
      } catch {
        continue; // removed meanwhile: the job's record still names it
      }
      await this.vault
        .call('PUT', `/api/components/self/jobs/${op.jobId}/artifacts/${name}`, {
          contentType: png ? 'image/png' : 'text/plain',
          data: data.toString('base64'),
        })
        .catch((err) => this.options.onError?.(err));
    }
  }

  /** Reports an operation that failed before any of its steps ran. */
  private async reportDirect(op: RecoveryOperation, err: unknown): Promise<void> {
    const now = new Date().toISOString();
    const error = isLifeboatError(err)
      ? { code: err.code, message: err.message, details: err.details }
      : { code: 'LB_RECOVERY_INTERNAL', message: err instanceof Error ? err.message : String(err) };
    await this.vault.call('PUT', `/api/components/self/jobs/${op.jobId}`, {
      kind: op.kind,
      target: { runId: op.runId },
      state: 'failed',
      steps: [{ name: 'prepare', state: 'failed', startedAt: now, endedAt: now, error }],
      error,
      result: { instanceId: this.instanceId },
    });
  }
}

function seedOf(m: OperationMachine, runId: string): Omit<SeedDiskOptions, 'dir'> {
  return {
    instanceId: `${m.name}-${runId.slice(-8)}`,
    hostname: m.name,
    addresses: [
      {
        address: m.address!.address,
        ...(m.address!.gateway !== undefined ? { gateway: m.address!.gateway } : {}),
        ...(m.address!.nameservers !== undefined ? { nameservers: m.address!.nameservers } : {}),
      },
    ],
  };
}

async function tail(path: string, bytes: number): Promise<Buffer> {
  const fh = await open(path, 'r');
  try {
    const { size } = await fh.stat();
    const start = Math.max(0, size - bytes);
    const buf = Buffer.alloc(size - start);
    await fh.read(buf, 0, buf.length, start);
    return buf;
  } finally {
    await fh.close();
  }
}
