import { randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { NbdClient } from '@lifeboat/nbd';
import type { CommittedCut } from '@lifeboat/process-server';
import { runCommand, startStorageDaemon } from '@lifeboat/testing';
import type { StorageDaemon } from '@lifeboat/testing';
import { afterAll, describe, expect, it } from 'vitest';
import { CliSession, until } from './cli-session.js';
import type { CliDaemon } from './cli-session.js';
import { startTestProcessServer } from './process-server-fixtures.js';
import type { TestProcessServer } from './process-server-fixtures.js';

const MiB = 1024 * 1024;
const C = 65536;

// The agent's kill test with real processes: `lifeboat agent start --qmp` is killed with
// SIGKILL (no clean stop, its state file as the kernel left it), then QEMU is killed too
// (its persistent bitmap left "in use", so inconsistent); both restarted, the agent resyncs and
// sends only the chunks that differ from the latest point (the in-process tests simulate the
// agent's death instead).
describe('lifeboat agent start killed with SIGKILL, QEMU killed, both restarted', () => {
  let ps: TestProcessServer | undefined;
  let session: CliSession | undefined;
  const cleanups: Array<() => Promise<unknown>> = [];

  afterAll(async () => {
    await session?.stopAll();
    for (const c of cleanups.splice(0).reverse()) await c().catch(() => undefined);
    await ps?.stop();
  });

  it('resyncs after the restart, sending only what differs (by bytes sent), and the point is byte-exact', async () => {
    ps = await startTestProcessServer('lb-agent-kill-');
    const { dir, pki, store, server } = ps;
    await writeFile(join(dir, 'agent.crt'), pki.client.cert);
    await writeFile(join(dir, 'agent.key'), pki.client.key);
    const img = join(dir, 'disk.qcow2');
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', img, '32M']);
    const model = Buffer.alloc(32 * MiB);
    let nbd: NbdClient | undefined;
    const put = async (offset: number, data: Buffer): Promise<void> => {
      await nbd?.write(offset, data);
      data.copy(model, offset);
    };
    const boot = async (): Promise<StorageDaemon> => {
      const q = await startStorageDaemon({ disks: [{ path: img, exportName: 'guest' }] });
      cleanups.push(() => q.stop());
      nbd = await NbdClient.connect({ path: q.nbdSocket as string }, { exportName: 'guest' });
      const g = nbd;
      cleanups.push(() => g.close());
      return q;
    };
    const committed: CommittedCut[] = [];
    server.on('committed', (c: CommittedCut) => {
      if (c.machine === 'kill-vm') committed.push(c);
    });
    session = new CliSession(dir);
    const s = session;
    /** Waits for `n` committed cuts of the machine while the agent runs. */
    const commits = (n: number, a: CliDaemon): Promise<true> =>
      until(
        `${n} committed cuts`,
        async () => {
          if (a.child.exitCode !== null) throw new Error(`the agent exited:\n${a.err()}`);
          return committed.length >= n ? true : undefined;
        },
        120_000,
        100,
      );
    const agent = (q: StorageDaemon): CliDaemon =>
      s.daemon([
        ...['agent', 'start', '--qmp', q.qmpSocket, '--nbd-socket', q.nbdSocket as string],
        ...['--process-server', `127.0.0.1:${server.port}`, '--server-name', 'localhost'],
        ...['--machine', 'kill-vm', '--state-dir', 'agent-state', '--interval', '1s'],
        ...['--cert', 'agent.crt', '--key', 'agent.key', '--ca', pki.caPath],
      ]);

    let qsd = await boot();
    await put(0, randomBytes(20 * MiB));
    await nbd?.flush();
    const first = agent(qsd);
    await commits(2, first);
    first.child.kill('SIGKILL');
    expect(await first.exited).toBeNull();

    // Changes no agent saw, flushed as a guest would; then QEMU dies too.
    await put(3 * C, randomBytes(C));
    await put(100 * C, randomBytes(C));
    await nbd?.flush();
    await nbd?.close();
    await qsd.stop({ kill: true });
    qsd = await boot();
    await put(200 * C, randomBytes(2 * C));
    await nbd?.flush();

    const before = committed.length;
    const second = agent(qsd);
    await second.wait(/warning LB_AGENT_RESYNC: Disk disk0 needs a resync/, 120_000);
    await commits(before + 2, second);
    const status = JSON.parse(await readFile(join(dir, 'agent-state', 'status.json'), 'utf8')) as {
      phase: string;
      bytesSent: number;
    };
    expect(await second.stop()).toBe(0);
    expect(status.phase).toBe('continuous');
    // The four chunks that differ from the latest point, not the 20 MiB of the disk.
    expect(status.bytesSent).toBe(4 * C);
    const last = committed[committed.length - 1]?.points[0];
    const reader = await store.openPoint(last?.id as string);
    expect((await reader.readAt(0, reader.size)).equals(model)).toBe(true);
  });
});
