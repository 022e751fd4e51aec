import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Agent, StoreSink } from '@lifeboat/agent';
import { RecoveryHost, pngSize, runTestFailover } from '@lifeboat/recovery';
import { DirectoryBackend, Store } from '@lifeboat/store';
import {
  buildTestImage,
  createRootOverlay,
  startVm,
  testImageAppend,
  type TestVm,
} from '@lifeboat/testing';

// Step 12 on a real replicated machine: a VM runs and writes, the agent replicates it into a
// store (crash-consistent cut through QMP), and while the VM keeps running the recovery host
// boots that point in an isolated network and verifies it.

let dir: string;
let store: Store;
let vm: TestVm | undefined;
let agent: Agent | undefined;
let host: RecoveryHost | undefined;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lb-rr-'));
  store = await Store.init({
    backend: new DirectoryBackend({ path: join(dir, 'store') }),
    passphrase: 'test',
    kdfCost: 1024,
  });
});
afterAll(async () => {
  await agent?.stop().catch(() => undefined);
  await host?.close();
  await vm?.stop({ kill: true });
  await store.close();
  await rm(dir, { recursive: true, force: true });
});

describe('test failover of a replicated machine', () => {
  it('boots the point the agent cut from the running VM, shows the marker it wrote before the cut, and exposes nothing', async () => {
    const image = await buildTestImage();
    const root = await createRootOverlay(image, join(dir, 'root.qcow2'));
    vm = await startVm({
      kernel: image.kernel,
      disks: [{ path: root }],
      append: testImageAppend({
        hostname: 'prod',
        mark: 'BEFORE-THE-CUT',
        writer: true,
        writerIntervalMs: 200,
      }),
    });
    await vm.waitForConsole('LIFEBOAT-MARK-WRITTEN BEFORE-THE-CUT', 180_000);
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
    // Replication continues while the test failover runs.
    const points = await store.listPoints({ machine: 'prod' });
    expect(points.length).toBeGreaterThan(0);

    let cutsDuring = 0;
    agent.on('cut', () => cutsDuring++);
    host = await RecoveryHost.start({ runDir: join(dir, 'run') });
    const tf = await runTestFailover(host, store, {
      machines: [
        {
          name: 'prod-test',
          points: { machine: 'prod' },
          boot: { kernel: image.kernel, append: testImageAppend({ hostname: 'recovered' }) },
          memoryMiB: 256,
        },
      ],
      verify: {
        console: /LIFEBOAT-BOOT-OK recovered BEFORE-THE-CUT/,
        port: { guestPort: 22, expect: /LIFEBOAT-TCP-OK recovered/ },
        screenshot: true,
      },
    });
    try {
      expect(tf.job.state).toBe('succeeded');
      expect(pngSize(await readFile(tf.job.artifacts['prod-test-screenshot']!))).toEqual({
        width: 720,
        height: 400,
      });
      const listening = await tf.machines[0]!.machine.listening();
      expect(listening.every((l) => l.address === '127.0.0.1')).toBe(true);
      // Replication went on during the test failover, and the source is still writing.
      expect(cutsDuring).toBeGreaterThan(0);
      const before = (await vm.consoleText()).length;
      await vm.waitForConsole(/LIFEBOAT-WROTE \d+/, 60_000, before);
    } finally {
      expect((await tf.cleanup()).state).toBe('succeeded');
    }
    await agent.stop();
  }, 420_000);
});
