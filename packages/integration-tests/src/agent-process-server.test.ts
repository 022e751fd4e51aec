import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { Agent, discoverDisks } from '@lifeboat/agent';
import { NbdClient } from '@lifeboat/nbd';
import type { ProcessServer } from '@lifeboat/process-server';
import type { CommittedCut } from '@lifeboat/process-server';
import { ReplicationClient } from '@lifeboat/protocol';
import { QmpClient } from '@lifeboat/qmp';
import type { Store } from '@lifeboat/store';
import { runCommand, startStorageDaemon } from '@lifeboat/testing';
import type { StorageDaemon } from '@lifeboat/testing';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestProcessServer } from './process-server-fixtures.js';
import type { TestPki, TestProcessServer } from './process-server-fixtures.js';

const MiB = 1024 * 1024;

describe('agent -> ReplicationClient (mTLS) -> process server -> store', () => {
  let dir: string;
  let pki: TestPki;
  let store: Store;
  let server: ProcessServer;
  let ps: TestProcessServer | undefined;
  let qsd: StorageDaemon;
  let guest: NbdClient | undefined;
  let client: ReplicationClient | undefined;
  let agent: Agent | undefined;

  beforeAll(async () => {
    ps = await startTestProcessServer('lb-agent-ps-');
    ({ dir, pki, store, server } = ps);
    const img = join(dir, 'disk.qcow2');
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', img, '16M']);
    qsd = await startStorageDaemon({ disks: [{ path: img, exportName: 'guest' }] });
  });

  afterAll(async () => {
    await agent?.stop();
    await client?.close();
    await guest?.close();
    await qsd?.stop();
    await ps?.stop();
  });

  it('every point the process server commits is byte-exact against the disk at its cut', async () => {
    guest = await NbdClient.connect({ path: qsd.nbdSocket as string }, { exportName: 'guest' });
    const model = Buffer.alloc(16 * MiB);
    const put = async (offset: number, data: Buffer): Promise<void> => {
      await guest?.write(offset, data);
      data.copy(model, offset);
    };
    await put(MiB, randomBytes(2 * MiB));

    // The agent's disks are what QEMU has; the client announces them in its hello.
    const qmp = await QmpClient.connect({ path: qsd.qmpSocket });
    const disks = await discoverDisks(qmp);
    await qmp.close();
    client = new ReplicationClient({
      host: '127.0.0.1',
      port: server.port,
      servername: 'localhost',
      ca: pki.ca,
      cert: pki.client.cert,
      key: pki.client.key,
      machine: 'vm-ps',
      disks: disks.map((d) => ({ name: d.name, size: d.size })),
    });
    await client.start();

    const snapshots = new Map<string, Buffer>();
    let paused = false;
    let inFlight: Promise<void> = Promise.resolve();
    agent = new Agent({
      qmpSocket: qsd.qmpSocket,
      nbdSocket: qsd.nbdSocket as string,
      machine: 'vm-ps',
      sink: client,
      stateDir: join(dir, 'agent'),
      intervalMs: 1000,
      hooks: {
        beforeCut: async (cutId) => {
          paused = true;
          await inFlight;
          snapshots.set(cutId, Buffer.from(model));
        },
        afterCut: () => {
          paused = false;
        },
      },
    });
    const committed: CommittedCut[] = [];
    server.on('committed', (c: CommittedCut) => committed.push(c));
    await agent.start();
    let writing = true;
    const writer = (async () => {
      while (writing) {
        if (paused) {
          await new Promise((r) => setTimeout(r, 5));
          continue;
        }
        const len = 4096 * (1 + Math.floor(Math.random() * 16));
        const off = 4096 * Math.floor(Math.random() * ((16 * MiB - len) / 4096));
        inFlight = put(off, randomBytes(len));
        await inFlight;
      }
    })();
    const deadline = Date.now() + 120_000;
    while (committed.length < 3 && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 100));
    writing = false;
    await writer;
    await agent.stop();
    expect(committed.length).toBeGreaterThanOrEqual(3);
    for (const cut of committed) {
      const expected = snapshots.get(cut.cutId);
      expect(expected, `the agent took cut ${cut.cutId}`).toBeDefined();
      const point = cut.points[0];
      const reader = await store.openPoint(point?.id as string);
      const actual = await reader.readAt(0, reader.size);
      expect(actual.equals(expected as Buffer), `point of cut ${cut.cutId}`).toBe(true);
    }
  });
});

describe('resync through a process server after the agent and QEMU are killed', () => {
  let ps: TestProcessServer | undefined;
  const cleanups: Array<() => Promise<unknown>> = [];

  afterAll(async () => {
    for (const c of cleanups.splice(0).reverse()) await c().catch(() => undefined);
    await ps?.stop();
  });

  it('sends only the chunks that differ from the latest point (by bytes sent), and every point after is byte-exact', async () => {
    // Store work on a worker thread, as `lifeboat process-server start` runs it: the baseline's
    // digests are computed there.
    ps = await startTestProcessServer('lb-agent-ps-resync-', {}, 1);
    const { dir, pki, store, server } = ps;
    const img = join(dir, 'disk.qcow2');
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', img, '32M']);
    const C = 65536;
    const model = Buffer.alloc(32 * MiB);
    const snapshots = new Map<string, Buffer>();
    let nbd: NbdClient | undefined;
    const put = async (offset: number, data: Buffer): Promise<void> => {
      if (!nbd) throw new Error('no guest connection');
      await nbd.write(offset, data);
      data.copy(model, offset);
    };
    const boot = async (): Promise<StorageDaemon> => {
      const q = await startStorageDaemon({ disks: [{ path: img, exportName: 'guest' }] });
      cleanups.push(() => q.stop());
      const g = await NbdClient.connect({ path: q.nbdSocket as string }, { exportName: 'guest' });
      cleanups.push(() => g.close());
      nbd = g;
      return q;
    };
    const connect = async (): Promise<ReplicationClient> => {
      const c = new ReplicationClient({
        host: '127.0.0.1',
        port: server.port,
        servername: 'localhost',
        ca: pki.ca,
        cert: pki.client.cert,
        key: pki.client.key,
        machine: 'vm-resync',
        disks: [{ name: 'disk0', size: 32 * MiB }],
      });
      cleanups.push(() => c.close());
      await c.start();
      return c;
    };
    const agentOn = (q: StorageDaemon, sink: ReplicationClient): Agent => {
      const a = new Agent({
        qmpSocket: q.qmpSocket,
        nbdSocket: q.nbdSocket as string,
        machine: 'vm-resync',
        sink,
        stateDir: join(dir, 'agent'),
        intervalMs: 1000,
        readBytes: MiB,
        // No writer runs during a cut here, so the model at the hook is the disk at the cut.
        hooks: { beforeCut: (cutId) => void snapshots.set(cutId, Buffer.from(model)) },
      });
      cleanups.push(() => a.stop());
      return a;
    };

    let qsd = await boot();
    await put(0, randomBytes(20 * MiB));
    let client = await connect();
    const first = agentOn(qsd, client);
    await first.start();
    const firstCut = await first.nextCut(180_000);
    await client.waitForCommit();
    await first.stop({ crash: true });
    await client.close();
    expect(firstCut.bytes + first.bytesSent).toBeGreaterThanOrEqual(20 * MiB);

    // Changes the agent never cut, flushed as a guest would; then QEMU dies too.
    await put(3 * C, randomBytes(C));
    await put(100 * C, randomBytes(C));
    await nbd?.flush();
    await nbd?.close();
    await qsd.stop({ kill: true });
    qsd = await boot();
    await put(200 * C, randomBytes(2 * C));

    client = await connect();
    const second = agentOn(qsd, client);
    const warnings: string[] = [];
    second.on('warning', (w: { code: string }) => warnings.push(w.code));
    const bytesBefore = client.stats.bytesSent;
    await second.start();
    const resyncCut = await second.nextCut(180_000);
    expect(warnings).toContain('LB_AGENT_RESYNC');
    // Exactly the four chunks that differ from the latest point went over the network: the
    // data bytes the agent read and sent, and the frames on the wire (DATA prefix + zero
    // frames are small; 20 MiB would be there without the baseline).
    expect(second.bytesSent).toBe(4 * C);
    expect(resyncCut.bytes).toBe(0);
    expect(client.stats.bytesSent - bytesBefore).toBeLessThan(4 * C + 64 * 1024);

    // Later points (changes only) stay exact.
    await put(7 * C, randomBytes(3 * C));
    await second.nextCut(120_000);
    await put(250 * C, randomBytes(C));
    await second.nextCut(120_000);
    await client.waitForCommit();
    await second.stop();

    const points = await store.listPoints({ machine: 'vm-resync' });
    const after = points.filter((p) => p.time.getTime() >= resyncCut.time);
    expect(after.length).toBeGreaterThanOrEqual(3);
    for (const p of points) {
      const expected = snapshots.get(p.cut ?? '');
      expect(expected, `the agent took cut ${p.cut}`).toBeDefined();
      const reader = await store.openPoint(p.id);
      const actual = await reader.readAt(0, reader.size);
      expect(actual.equals(expected as Buffer), `point of cut ${p.cut}`).toBe(true);
    }
    expect(snapshots.size).toBeGreaterThanOrEqual(points.length);
  });
});
