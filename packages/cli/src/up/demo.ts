import { access } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { CommittedCut } from '@lifeboat/process-server';
import { LifeboatError } from '@lifeboat/protocol';
import { runTestFailover } from '@lifeboat/recovery';
import type { TestFailover } from '@lifeboat/recovery';
import type { LocalInstallation } from './local-installation.js';
import type { VaultObject as ApiObject } from '@lifeboat/protocol';

/** How the demo talks to the terminal. */
export interface DemoOutput {
  /** A step heading. */
  step(text: string): void;
  /** A line of output. */
  line(text: string): void;
  /** The live RPO line (replaced in place on a terminal). */
  live(text: string): void;
  /** True when the output is a terminal (the RPO line then updates every second). */
  readonly tty: boolean;
}

/** What the demo left running (the source VM) and what it found out. */
export interface Demo {
  readonly itemId: string;
  readonly machineId: string;
  /** The id of the vault's test-failover job (undefined when it was skipped). */
  readonly testFailoverJobId: string | undefined;
  /** Stops the live RPO line, the alert watch and the source VM. */
  stop(): Promise<void>;
}

const POLICY = {
  name: 'demo-5s',
  crashConsistentIntervalSeconds: 5,
  rpoThresholdSeconds: 30,
  retention: { rules: [{ for: '1d' }] },
};
const MARK = 'LIFEBOAT-DEMO-MARK';

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(done, ms);
    signal.addEventListener('abort', done, { once: true });
    function done(): void {
      clearTimeout(t);
      signal.removeEventListener('abort', done);
      resolve();
    }
  });
}

function throwIfAborted(signal: AbortSignal): void {
  if (signal.aborted) {
    throw new LifeboatError('LB_CLI_ABORTED', 'Interrupted; everything started was stopped.');
  }
}

async function waitJob(
  inst: LocalInstallation,
  jobId: string,
  signal: AbortSignal,
  onProgress: (job: ApiObject) => void,
): Promise<ApiObject> {
  for (;;) {
    throwIfAborted(signal);
    const job = await inst.admin.call<ApiObject>('GET', `/api/jobs/${jobId}`);
    onProgress(job);
    if (['succeeded', 'failed', 'cancelled'].includes(String(job['state']))) return job;
    await sleep(1000, signal);
  }
}

async function findOrCreate(
  inst: LocalInstallation,
  path: string,
  match: (x: ApiObject) => boolean,
  body: ApiObject,
): Promise<ApiObject> {
  const list = await inst.admin.call<{ items: ApiObject[] }>('GET', `${path}?limit=1000`);
  return list.items.find(match) ?? (await inst.admin.call<ApiObject>('POST', path, body));
}

/**
 * The demo of `lifeboat up --demo`, the reference workflow on this machine: builds the test
 * image, starts a VM that writes continuously, adds it to the vault as a KVM host's machine,
 * protects it with a 5-second policy (the vault's enable-replication job hands it to the process
 * server, which starts the agent), shows the RPO live, runs a test failover on the recovery host
 * (reported to the vault as a job) that boots the latest point in an isolated network and
 * verifies it, and cleans up. The VM keeps
 * running and replicating until {@link Demo.stop}.
 */
export async function runDemo(
  inst: LocalInstallation,
  out: DemoOutput,
  signal: AbortSignal,
  options: { testFailover?: boolean } = {},
): Promise<Demo> {
  const stops: Array<() => Promise<void>> = [];
  const stop = async (): Promise<void> => {
    while (stops.length > 0)
      await stops
        .pop()?.()
        .catch(() => undefined);
  };
  try {
    out.step(
      'Building the test image (Debian cloud kernel, busybox, mke2fs -d; cached after the first run)',
    );
    // The test image is the demo's workload; it lives in @lifeboat/testing (loaded only here).
    const testing = await import('@lifeboat/testing');
    const image = await testing.buildTestImage();
    out.line(`kernel ${image.kernel}`);
    out.line(`root file system ${image.rootImage}`);
    // The test image has no boot loader: test failovers and failovers the vault asks the
    // recovery host for (the portal's wizards, "lifeboat failover test") boot its kernel.
    inst.recoveryLink.allowKernelDir(dirname(image.kernel));
    inst.recoveryLink.setDefaultBoot({
      kernel: image.kernel,
      append: testing.testImageAppend({ hostname: 'recovered' }),
    });
    throwIfAborted(signal);

    out.step('Starting a small VM with QEMU that writes a file every second');
    const root = join(inst.paths.demo, 'demo-vm-root.qcow2');
    const { mkdir } = await import('node:fs/promises');
    await mkdir(inst.paths.demo, { recursive: true, mode: 0o700 });
    if (
      !(await access(root).then(
        () => true,
        () => false,
      ))
    ) {
      await testing.createRootOverlay(image, root);
    }
    const vmStarted = Date.now();
    const vm = await testing.startVm({
      kernel: image.kernel,
      disks: [{ path: root }],
      append: testing.testImageAppend({
        hostname: 'demo-vm',
        mark: MARK,
        writer: true,
        writerIntervalMs: 1000,
      }),
      memoryMiB: 256,
    });
    stops.push(() => vm.stop());
    out.line(
      `QEMU pid ${vm.process.child.pid ?? '?'} (${vm.accel.toUpperCase()}), QMP ${vm.qmpSocket}, console ${vm.console}`,
    );
    await vm.waitForConsole(`LIFEBOAT-MARK-WRITTEN ${MARK}`, 300_000);
    out.line(`the guest booted and wrote the marker ${MARK}; its writer runs`);
    throwIfAborted(signal);

    out.step('Adding the KVM host and its machine to the vault, and a 5-second replication policy');
    const psId = inst.processServerCredentials.id;
    const host = await findOrCreate(
      inst,
      '/api/source-hosts',
      (h) => h['name'] === 'demo-kvm-host',
      {
        name: 'demo-kvm-host',
        kind: 'kvm',
        processServerId: psId,
        endpoints: [{ name: 'demo-vm', qmp: vm.qmpSocket }],
      },
    );
    const hostId = String(host['id']);
    // A later run's VM has a new QMP socket.
    await inst.admin.call('PATCH', `/api/source-hosts/${hostId}`, {
      endpoints: [{ name: 'demo-vm', qmp: vm.qmpSocket }],
    });
    await inst.admin.call('POST', `/api/source-hosts/${hostId}/discover`);
    let machine: ApiObject | undefined;
    for (let i = 0; machine === undefined; i++) {
      if (i > 120)
        throw new LifeboatError(
          'LB_UP_DEMO_FAILED',
          'The process server did not report the KVM host inventory within 2 minutes.',
        );
      await inst.link.sync();
      const ms = await inst.admin.call<{ items: ApiObject[] }>(
        'GET',
        `/api/machines?sourceHostId=${hostId}`,
      );
      machine = ms.items.find((m) => m['externalId'] === 'demo-vm');
      if (machine === undefined) await sleep(1000, signal);
      throwIfAborted(signal);
    }
    const machineId = String(machine['id']);
    out.line(`KVM host ${hostId}: machine ${machineId} (demo-vm)`);
    const policy = await findOrCreate(
      inst,
      '/api/policies',
      (p) => p['name'] === POLICY.name,
      POLICY,
    );
    out.line(
      `policy ${String(policy['id'])}: a crash-consistent point every ${POLICY.crashConsistentIntervalSeconds} s, RPO alert above ${POLICY.rpoThresholdSeconds} s, kept 1 day`,
    );

    out.step(
      'Enabling replication (the vault hands the machine to the process server, which starts the agent)',
    );
    const rpoByCut = (cut: CommittedCut): void => {
      if (cut.machine !== machineId) return;
      const rpo = (Date.now() - cut.time.getTime()) / 1000;
      lastCut = { time: cut.time.getTime(), id: cut.points[0]?.id.slice(0, 12) ?? '?' };
      out.live(
        `rpo ${rpo.toFixed(1)}s (threshold ${POLICY.rpoThresholdSeconds}s): point ${lastCut.id} committed, ${cut.kind}, ${cut.points.length} disk(s), ${Math.round(cut.latencyMs)} ms after the cut reached the process server`,
      );
    };
    let lastCut: { time: number; id: string } | undefined;
    if (out.tty) {
      // On a terminal the RPO line ticks every second: it grows until the next point lands.
      const ticker = setInterval(() => {
        if (lastCut === undefined) return;
        out.live(
          `rpo ${((Date.now() - lastCut.time) / 1000).toFixed(1)}s (threshold ${POLICY.rpoThresholdSeconds}s): newest point ${lastCut.id}`,
        );
      }, 1000);
      stops.push(async () => clearInterval(ticker));
    }
    const unsubscribe = inst.onCommitted(rpoByCut);
    stops.push(async () => unsubscribe());
    let itemId: string;
    let jobId: string | undefined;
    try {
      const item = await inst.admin.call<ApiObject>('POST', '/api/protected-items', {
        machineId,
        policyId: policy['id'],
        processServerId: psId,
        targetStoreId: inst.targetStoreId,
      });
      itemId = String(item['id']);
      jobId = String(item['jobId']);
    } catch (err) {
      // Protected by an earlier run: its item is still active and replication resumes.
      const items = await inst.admin.call<{ items: ApiObject[] }>(
        'GET',
        `/api/protected-items?machineId=${machineId}&limit=100`,
      );
      const active = items.items.find((i) => i['state'] !== 'disabled');
      if (active === undefined) throw err;
      itemId = String(active['id']);
      out.line(`machine already protected by item ${itemId} (${String(active['state'])})`);
    }
    if (jobId !== undefined) {
      out.line(`protected item ${itemId}; job ${jobId} (enable-replication)`);
      let shown = -1;
      const job = await waitJob(inst, jobId, signal, (j) => {
        const p = Math.floor(Number(j['progress']) * 10);
        if (p !== shown) {
          shown = p;
          out.line(
            `enable-replication: ${String(j['state'])}, ${(Number(j['progress']) * 100).toFixed(0)}%`,
          );
        }
      });
      if (job['state'] !== 'succeeded') {
        throw new LifeboatError(
          'LB_UP_DEMO_FAILED',
          `Enabling replication ${String(job['state'])}: ${JSON.stringify(job['error'])}.`,
          { details: { job: jobId } },
        );
      }
    }
    // The first point of this run's VM (a later run finds the points of earlier ones), so the
    // test failover boots something new.
    for (let i = 0; ; i++) {
      const pts = await inst.admin.call<ApiObject>(
        'GET',
        `/api/protected-items/${itemId}/points?limit=1`,
      );
      const first = (pts['items'] as ApiObject[] | undefined)?.[0];
      if (first !== undefined && Date.parse(String(first['time'])) >= vmStarted) {
        out.line(
          `first recovery point committed: ${String(first['id'])} (${String(first['disk'])}, taken ${String(first['time'])})`,
        );
        break;
      }
      if (i > 600)
        throw new LifeboatError('LB_UP_DEMO_FAILED', 'No recovery point within 10 minutes.');
      await sleep(1000, signal);
      throwIfAborted(signal);
    }
    const watch = watchAlerts(inst, out);
    stops.push(watch);
    if (options.testFailover === false) {
      return { itemId, machineId, testFailoverJobId: undefined, stop };
    }

    out.step(
      'Test failover: booting the latest point in an isolated network, verifying, cleaning up',
    );
    // The recovery host runs it and reports it to the vault as a job with its steps
    // (PUT /api/components/self/jobs/:id), as a separately installed recovery host does.
    let tf: TestFailover;
    try {
      tf = await runTestFailover(inst.recoveryHost, inst.store, {
        machines: [
          {
            name: 'demo-vm-test',
            points: { machine: machineId },
            boot: {
              kernel: image.kernel,
              append: testing.testImageAppend({ hostname: 'recovered' }),
            },
            memoryMiB: 256,
          },
        ],
        verify: {
          console: new RegExp(`LIFEBOAT-BOOT-OK recovered ${MARK}`),
          port: { guestPort: 22, expect: /LIFEBOAT-TCP-OK recovered/ },
          screenshot: true,
        },
      });
    } catch (err) {
      await inst.reportJobs();
      throw err;
    }
    for (const s of tf.job.steps) {
      out.line(
        `  ${s.name}: ${s.state}${s.durationMs !== undefined ? ` in ${(s.durationMs / 1000).toFixed(1)} s` : ''} ${JSON.stringify(s.detail ?? {}).slice(0, 160)}`,
      );
    }
    for (const [name, path] of Object.entries(tf.job.artifacts)) out.line(`  ${name}: ${path}`);
    const cleanup = await tf.cleanup();
    for (const s of cleanup.steps) out.line(`  ${s.name}: ${s.state}`);
    if (cleanup.state !== 'succeeded') {
      throw new LifeboatError(
        'LB_UP_DEMO_FAILED',
        `The test failover's cleanup ${cleanup.state}: ${cleanup.error?.message ?? ''}.`,
        { details: { job: cleanup.id } },
      );
    }
    await inst.reportJobs();
    const jobs = await inst.admin.call<{ items: ApiObject[] }>(
      'GET',
      '/api/jobs?kind=test-failover&limit=100',
    );
    const reported = jobs.items.find(
      (j) => (j['params'] as { externalId?: string } | undefined)?.externalId === tf.job.id,
    );
    const tfId = reported === undefined ? undefined : String(reported['id']);
    out.line(
      `test failover verified; the test machine and its overlay were removed${tfId !== undefined ? ` (vault job ${tfId})` : ''}`,
    );
    return { itemId, machineId, testFailoverJobId: tfId, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

/** Prints alerts as they are raised and cleared (every 5 s); returns the stop function. */
function watchAlerts(inst: LocalInstallation, out: DemoOutput): () => Promise<void> {
  const known = new Map<string, string>();
  let busy = false;
  const t = setInterval(() => {
    if (busy) return;
    busy = true;
    inst.admin
      .call<{ items: ApiObject[] }>('GET', '/api/alerts?state=active&limit=100')
      .then((r) => {
        const now = new Set<string>();
        for (const a of r.items) {
          const id = String(a['id']);
          now.add(id);
          if (!known.has(id)) {
            known.set(id, String(a['kind']));
            out.line(`ALERT ${String(a['kind'])}: ${String(a['message'] ?? '')}`);
          }
        }
        for (const [id, kind] of known) {
          if (!now.has(id)) {
            known.delete(id);
            out.line(`alert cleared: ${kind}`);
          }
        }
      })
      .catch(() => undefined)
      .finally(() => (busy = false));
  }, 5000);
  return async () => clearInterval(t);
}
