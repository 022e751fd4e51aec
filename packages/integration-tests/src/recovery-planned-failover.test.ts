import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Agent, StoreSink } from '@lifeboat/agent';
import { QmpClient } from '@lifeboat/qmp';
import { Failover, RecoveryHost, type PlannedFailoverSource } from '@lifeboat/recovery';
import { DirectoryBackend, Store } from '@lifeboat/store';
import {
  buildTestImage,
  createRootOverlay,
  startVm,
  testImageAppend,
  type TestVm,
} from '@lifeboat/testing';

// A planned failover loses nothing: the source is paused, a last cut is replicated, the
// source is stopped, and only then the recovery host boots that last point. The source side
// of the hook (PlannedFailoverSource) is implemented here over the agent and a second QMP
// monitor of the source VM, as the agent/process server would.

let dir: string;
let store: Store;
let vm: TestVm | undefined;
let agent: Agent | undefined;
let host: RecoveryHost | undefined;
let monitor: QmpClient | undefined;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lb-pf-'));
  store = await Store.init({
    backend: new DirectoryBackend({ path: join(dir, 'store') }),
    passphrase: 'test',
    kdfCost: 1024,
  });
});
afterAll(async () => {
  await agent?.stop().catch(() => undefined);
  await monitor?.close().catch(() => undefined);
  await host?.close();
  await vm?.stop({ kill: true });
  await store.close();
  await rm(dir, { recursive: true, force: true });
});

describe('planned failover', () => {
  it('pauses the source, replicates a last cut, stops the source, and boots a point holding every file the source finished', async () => {
    const image = await buildTestImage();
    const root = await createRootOverlay(image, join(dir, 'root.qcow2'));
    const monitorSocket = join(dir, 'monitor.sock');
    vm = await startVm({
      kernel: image.kernel,
      disks: [{ path: root }],
      append: testImageAppend({ hostname: 'prod', writer: true, writerIntervalMs: 100 }),
      // The agent holds the QMP socket; the failover pauses and stops the source on a second one.
      extraArgs: ['-qmp', `unix:${monitorSocket},server=on,wait=off`],
    });
    await vm.waitForConsole('LIFEBOAT-WROTE 3', 180_000);
    const sink = new StoreSink(store, 'prod');
    agent = new Agent({
      qmpSocket: vm.qmpSocket,
      machine: 'prod',
      sink,
      stateDir: join(dir, 'agent'),
      intervalMs: 1000,
    });
    await agent.start();
    await agent.nextCut();
    monitor = await QmpClient.connect({ path: monitorSocket });

    let lastWritten = -1;
    const source: PlannedFailoverSource = {
      async finalSync() {
        const m = monitor!;
        await m.execute('stop');
        lastWritten = Math.max(
          ...[...(await vm!.consoleText()).matchAll(/LIFEBOAT-WROTE (\d+)/g)].map((x) =>
            Number(x[1]),
          ),
        );
        // The cut in flight may have started before the pause: the one after it did not.
        await agent!.nextCut();
        await agent!.nextCut();
        return sink.committed.at(-1)!.points.map((p) => p.id);
      },
      async stopSource() {
        await agent!.stop();
        await monitor!.execute('quit').catch(() => undefined);
      },
    };

    host = await RecoveryHost.start({ runDir: join(dir, 'run') });
    const f = await Failover.start(host, store, {
      name: 'prod-fo',
      pointIds: [],
      planned: source,
      boot: { kernel: image.kernel, append: testImageAppend({ hostname: 'recovered' }) },
      memoryMiB: 256,
    });
    try {
      const job = f.jobs[0]!;
      expect(job.state).toBe('succeeded');
      expect(job.steps.map((s) => s.name)).toEqual([
        'last sync of the source',
        'stop the source',
        'boot prod-fo',
      ]);
      expect(f.pointIds).toEqual(sink.committed.at(-1)!.points.map((p) => p.id));
      // The source was stopped before the recovered machine booted.
      const deadline = Date.now() + 30_000;
      while (vm.process.exit === undefined && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 100));
      }
      expect(vm.process.exit).toBeDefined();
      const m = await f.machine.waitForConsole(/LIFEBOAT-LAST-INDEX (\d+)/, 180_000);
      // Every file the source reported durable is in the recovered machine.
      expect(Number(m[1])).toBeGreaterThanOrEqual(lastWritten);
      expect(lastWritten).toBeGreaterThanOrEqual(3);
    } finally {
      await f.cleanup();
    }
  }, 420_000);
});
