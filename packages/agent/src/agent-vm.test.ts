import { mkdtemp, open, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import type { Server, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DirectoryBackend, Store } from '@lifeboat/store';
import {
  buildTestImage,
  checkExt4,
  createRootOverlay,
  readExt4File,
  replayExt4Journal,
  runCommand,
  startVm,
  testImageAppend,
} from '@lifeboat/testing';
import type { TestVm } from '@lifeboat/testing';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Agent } from './agent.js';
import { StoreSink } from './store-sink.js';

/** Writes a point to a sparse raw file, only its non-zero extents. */
async function restore(store: Store, pointId: string, path: string): Promise<void> {
  const r = await store.openPoint(pointId);
  const fh = await open(path, 'w');
  try {
    await fh.truncate(r.size);
    for await (const e of r.extents()) {
      if (e.zero) continue;
      for (let off = e.offset; off < e.offset + e.length; off += 8 << 20) {
        const len = Math.min(8 << 20, e.offset + e.length - off);
        await fh.write(await r.readAt(off, len), 0, len, off);
      }
    }
  } finally {
    await fh.close();
  }
}

/**
 * Checks a restored root file system: clean, every file the index names finished, and the
 * newest file the guest said it had finished (on its console) before the cut is there.
 */
async function checkGuestFiles(raw: string, finishedBeforeCut: number): Promise<number> {
  const check = await checkExt4(raw);
  expect(check.clean, check.output).toBe(true);
  const index = Number((await readExt4File(raw, '/var/lifeboat/index'))?.toString().trim());
  expect(finishedBeforeCut).toBeGreaterThan(0);
  expect(index).toBeGreaterThanOrEqual(finishedBeforeCut);
  const file = await readExt4File(raw, `/var/lifeboat/files/${finishedBeforeCut}.dat`);
  expect(file?.toString().startsWith(`LIFEBOAT-FILE ${finishedBeforeCut}\n`)).toBe(true);
  // The writer keeps the newest 100 files; each was fsynced before the index named it.
  for (let n = Math.max(1, index - 20); n <= index; n++) {
    const file = await readExt4File(raw, `/var/lifeboat/files/${n}.dat`);
    expect(file?.length, `file ${n} of index ${index}`).toBe(16384);
    expect(file?.toString().startsWith(`LIFEBOAT-FILE ${n}\n`)).toBe(true);
  }
  return index;
}

describe('agent protecting a real VM (test image, writer, guest agent)', () => {
  let dir: string;
  let store: Store;
  let vm: TestVm | undefined;
  let silent: Server | undefined;
  const silentClients = new Set<Socket>();
  const agents: Agent[] = [];

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'lifeboat-agent-vm-'));
    store = await Store.init({
      backend: new DirectoryBackend({ path: join(dir, 'store') }),
      passphrase: 'test',
      kdfCost: 1024,
    });
  });
  afterAll(async () => {
    for (const a of agents) await a.stop().catch(() => undefined);
    await vm?.stop({ kill: true });
    for (const c of silentClients) c.destroy();
    await new Promise((r) => (silent ? silent.close(r) : r(undefined)));
    await store.close();
    await rm(dir, { recursive: true, force: true });
  });

  it('app-consistent points freeze the guest; without an answering guest agent the point is crash-consistent with a warning; both restore clean with the files finished before the cut', async () => {
    const image = await buildTestImage();
    const root = await createRootOverlay(image, join(dir, 'root.qcow2'));
    const data = join(dir, 'data.qcow2');
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', data, '4M']);
    vm = await startVm({
      kernel: image.kernel,
      disks: [{ path: root }, { path: data }],
      append: testImageAppend({ hostname: 'prot1', writer: true, writerIntervalMs: 50 }),
      guestAgent: true,
      // Not the defaults, so the recorded hardware below is read from QEMU, not assumed.
      cpus: 2,
      memoryMiB: 320,
    });
    await vm.waitForConsole('LIFEBOAT-QGA-STARTED', 180_000);
    await vm.waitForConsole('LIFEBOAT-WROTE 5', 180_000);

    const sink = new StoreSink(store, 'prot1');
    const stateDir = join(dir, 'agent');
    // The guest prints LIFEBOAT-WROTE n once file n and the index naming it are durable: the
    // newest n on the console before a cut must be in that cut's point.
    const finishedBefore = new Map<string, number>();
    const hooks = {
      beforeCut: async (cutId: string): Promise<void> => {
        const wrote = [...((await vm?.consoleText()) ?? '').matchAll(/LIFEBOAT-WROTE (\d+)/g)];
        finishedBefore.set(cutId, Number(wrote[wrote.length - 1]?.[1] ?? 0));
      },
    };
    const app = new Agent({
      qmpSocket: vm.qmpSocket,
      machine: 'prot1',
      sink,
      stateDir,
      intervalMs: 1000,
      guestAgentSocket: vm.qgaSocket as string,
      appConsistentIntervalMs: 1000,
      hooks,
    });
    agents.push(app);
    await app.start();
    const first = await app.nextCut();
    expect(first.kind).toBe('app');
    const second = await app.nextCut();
    expect(second.kind).toBe('app');
    await app.stop();

    const appCut = sink.committed[sink.committed.length - 1];
    const appPoints = appCut?.points ?? [];
    // Every point records the machine's hardware, as the recovery host reads it.
    for (const p of sink.committed.flatMap((c) => c.points)) {
      expect(p.labels).toMatchObject({
        'machine.cpus': '2',
        'machine.memory-mib': '320',
        'machine.firmware': 'bios',
        'machine.disk-bus': 'nvme',
        // The test VM boots its kernel directly: BIOS alone would not boot its disk.
        'machine.boot': 'kernel',
      });
    }
    expect(app.status().hardware).toEqual({
      cpus: 2,
      memoryMiB: 320,
      firmware: 'bios',
      diskBus: 'nvme',
      boot: 'kernel',
    });
    const appRoot = join(dir, 'app-root.raw');
    await restore(store, appPoints.find((p) => p.disk === 'disk0')?.id as string, appRoot);
    // A frozen ext4 has its journal checkpointed: clean without any replay.
    const index = await checkGuestFiles(appRoot, finishedBefore.get(appCut?.cutId ?? '') ?? 0);
    const stampDisk = await store.openPoint(
      appPoints.find((p) => p.disk === 'disk1')?.id as string,
    );
    const stamp = Number(
      /LIFEBOAT-STAMP (\d+)/.exec((await stampDisk.readAt(0, 512)).toString('latin1'))?.[1],
    );
    expect([index - 1, index]).toContain(stamp);

    // A guest agent socket that accepts and never answers, as QEMU's does when no agent runs.
    const dead = join(dir, 'dead-qga.sock');
    silent = createServer((c) => silentClients.add(c));
    await new Promise<void>((r) => silent?.listen(dead, r));
    const crash = new Agent({
      qmpSocket: vm.qmpSocket,
      machine: 'prot1',
      sink,
      stateDir,
      intervalMs: 1000,
      guestAgentSocket: dead,
      appConsistentIntervalMs: 1000,
      guestAgentTimeoutMs: 1000,
      hooks,
    });
    agents.push(crash);
    const warnings: Array<{ code: string; message: string }> = [];
    crash.on('warning', (w: { code: string; message: string }) => warnings.push(w));
    await crash.start();
    const fallback = await crash.nextCut();
    await crash.stop();
    expect(fallback.kind).toBe('crash');
    expect(fallback.warning).toMatch(/did not answer/);
    expect(warnings.map((w) => w.code)).toContain('LB_AGENT_APP_CONSISTENT_FAILED');
    // The restart continued from the bitmaps: no resync, only changes.
    expect(warnings.map((w) => w.code)).not.toContain('LB_AGENT_RESYNC');
    const crashRoot = join(dir, 'crash-root.raw');
    const crashCut = sink.committed[sink.committed.length - 1];
    const crashPoints = crashCut?.points ?? [];
    expect(crashPoints[0]?.kind).toBe('crash');
    await restore(store, crashPoints.find((p) => p.disk === 'disk0')?.id as string, crashRoot);
    // Crash-consistent: the journal is replayed first, as mounting would.
    await replayExt4Journal(crashRoot);
    const later = await checkGuestFiles(crashRoot, finishedBefore.get(crashCut?.cutId ?? '') ?? 0);
    expect(later).toBeGreaterThanOrEqual(index);
  }, 300_000);
});
