import { EventEmitter } from 'node:events';
import { randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { runCli } from '@lifeboat/cli';
import type { CliIo } from '@lifeboat/cli';
import { NbdClient } from '@lifeboat/nbd';
import type { ProcessServer } from '@lifeboat/process-server';
import type { CommittedCut } from '@lifeboat/process-server';
import type { Store } from '@lifeboat/store';
import { runCommand, startStorageDaemon } from '@lifeboat/testing';
import type { StorageDaemon } from '@lifeboat/testing';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestProcessServer } from './process-server-fixtures.js';
import type { TestPki, TestProcessServer } from './process-server-fixtures.js';

function io(cwd: string): CliIo & { out: () => string; err: () => string } {
  let out = '';
  let err = '';
  return {
    stdout: { write: (s: string) => (out += s) },
    stderr: { write: (s: string) => (err += s) },
    stdin: Object.assign(new EventEmitter(), { resume() {}, pause() {} }),
    env: {},
    cwd,
    out: () => out,
    err: () => err,
  };
}

describe('lifeboat agent start | status', () => {
  let dir: string;
  let pki: TestPki;
  let store: Store;
  let server: ProcessServer;
  let ps: TestProcessServer | undefined;
  let qsd: StorageDaemon;

  beforeAll(async () => {
    ps = await startTestProcessServer('lb-agent-cli-');
    ({ dir, pki, store, server } = ps);
    const img = join(dir, 'disk.qcow2');
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', img, '8M']);
    qsd = await startStorageDaemon({ disks: [{ path: img, exportName: 'guest' }] });
  });
  afterAll(async () => {
    await qsd?.stop();
    await ps?.stop();
  });

  it('protects a machine until stopped, and status shows its last cut', async () => {
    const guest = await NbdClient.connect(
      { path: qsd.nbdSocket as string },
      { exportName: 'guest' },
    );
    const data = randomBytes(1024 * 1024);
    await guest.write(0, data);
    await guest.close();
    await writeFile(join(dir, 'agent.crt'), pki.client.cert);
    await writeFile(join(dir, 'agent.key'), pki.client.key);
    const committed: CommittedCut[] = [];
    server.on('committed', (c: CommittedCut) => committed.push(c));
    const stop = new AbortController();
    const startIo = io(dir);
    const running = runCli(
      [
        ...['agent', 'start', '--qmp', qsd.qmpSocket, '--nbd-socket', qsd.nbdSocket as string],
        ...['--process-server', `127.0.0.1:${server.port}`, '--server-name', 'localhost'],
        ...['--machine', 'cli-vm', '--state-dir', 'agent-state', '--interval', '1s'],
        ...['--cert', 'agent.crt', '--key', 'agent.key', '--ca', pki.caPath],
      ],
      { io: startIo, signal: stop.signal },
    );
    const deadline = Date.now() + 60_000;
    while (committed.length < 2 && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 100));
    expect(committed.length, startIo.err()).toBeGreaterThanOrEqual(2);
    const statusIo = io(dir);
    expect(
      await runCli(['agent', 'status', '--state-dir', 'agent-state', '--json'], { io: statusIo }),
    ).toBe(0);
    const status = JSON.parse(statusIo.out()) as { phase: string; lastCut?: { id: string } };
    expect(status.phase).toBe('continuous');
    expect(committed.map((c) => c.cutId)).toContain(status.lastCut?.id);
    stop.abort();
    expect(await running).toBe(0);
    expect(startIo.err()).toMatch(/agent protecting cli-vm \(disk0\)/);
    expect(startIo.err()).toMatch(/cut [0-9a-f-]+ crash/);
    const point = committed[committed.length - 1]?.points[0];
    const reader = await store.openPoint(point?.id as string);
    expect((await reader.readAt(0, data.length)).equals(data)).toBe(true);

    const missing = io(dir);
    expect(await runCli(['agent', 'status', '--state-dir', 'nowhere'], { io: missing })).not.toBe(
      0,
    );
    expect(missing.err()).toMatch(/LB_CLI_AGENT_NO_STATUS/);
  });
});
