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
