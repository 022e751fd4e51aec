import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { NbdClient } from '@lifeboat/nbd';
import { makeTempDir, runCommand, startStorageDaemon } from '@lifeboat/testing';
import type { StorageDaemon, TempDir } from '@lifeboat/testing';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  CliSession,
  StepTimer,
  addDirectoryStore,
  createKeyFile,
  startVaultAndLogIn,
  until,
  type Row,
} from './cli-session.js';

// Issue 5's end-to-end walk, through the CLI only, as a user types it: the built `lifeboat`
// in child processes (vault, process server and agent each their own, as on three machines),
// every step checked by what the CLI prints (--json where a script would parse it). The KVM
// host is a qemu-storage-daemon with a qcow2 disk; a "guest" writes into it over NBD.

describe('the vault, a process server and an agent through the CLI (issue 5)', () => {
  let tmp: TempDir;
  let qsd: StorageDaemon | undefined;
  let session: CliSession;
  const cli = (args: string[]) => session.run(args);
  const json = <T = Row>(args: string[]) => session.json<T>(args);
  const daemon = (args: string[]) => session.daemon(args);
  beforeAll(async () => {
    tmp = await makeTempDir('lb-vault-e2e-');
    session = new CliSession(tmp.path);
  });
  afterAll(async () => {
    await session?.stopAll();
    await qsd?.stop();
    await tmp?.remove();
  });

  it('registers components with keys, protects a KVM machine, alerts on a process server outage, and prunes by retention', async () => {
    // Seconds each part of the walk took, printed at the end (the time budget is ~2 minutes).
    const timer = new StepTimer();
    const mark = (what: string) => timer.mark(what);
    // Step 7: the vault, and an admin session for the commands that follow.
    const vault = await startVaultAndLogIn(session);
    const env = session.env;
    expect((await json(['vault', 'whoami']))['role']).toBe('admin');
    mark('vault started, logged in');

    // Step 8: one-time registration keys; the process server registers with its own.
    for (const kind of ['process-server', 'agent']) await createKeyFile(session, kind);
    const psArgs = [
      ...['process-server', 'start', '--vault', env['LIFEBOAT_VAULT_URL'] ?? ''],
      ...['--state-dir', 'ps', '--name', 'ps1', '--health', '127.0.0.1:0'],
      ...['--store-workers', '1', '--log-level', 'warn'],
    ];
    let ps = daemon([
      ...psArgs,
      ...['--registration-key-file', 'process-server.key', '--listen', '127.0.0.1:0'],
    ]);
    const started = await ps.wait(
      /process server (ps_\S+) \(ps1\) managed by .* listening on 127\.0\.0\.1:(\d+)/,
    );
    const psId = started[1] ?? '';
    const psPort = started[2] ?? '';
    await until('the process server to be healthy', async () => {
      const list = await json<{ items: Row[] }>(['vault', 'process-server', 'list']);
      return list.items.find((p) => p['id'] === psId && p['status'] === 'healthy');
    });
    // A used key is refused, with its code and what to do.
    const reuse = await cli([
      ...['vault', 'register', '--kind', 'process-server', '--name', 'ps2', '--out', 'ps2'],
      ...['--key', (await readFile(join(tmp.path, 'process-server.key'), 'utf8')).trim()],
    ]);
    expect(reuse.code).toBe(1);
    expect(reuse.stderr).toContain('LB_VAULT_REGISTRATION_KEY_USED');
    mark('process server registered');

    // Step 10: the agent on the KVM host registers through its process server.
    expect((await cli(['vault', 'ca', '--out', 'vault-ca.pem'])).code).toBe(0);
    const agent = daemon([
      ...['agent', 'start', '--process-server', `127.0.0.1:${psPort}`, '--state-dir', 'agent'],
      ...['--registration-key-file', 'agent.key', '--ca', 'vault-ca.pem', '--name', 'kvm1'],
      ...['--poll-interval', '1s'],
    ]);
    const agentId = (await agent.wait(/registered agent (agt_\S+) \(kvm1\)/))[1] ?? '';
    await until('the agent to be healthy', async () => {
      const list = await json<{ items: Row[] }>(['vault', 'agent', 'list']);
      return list.items.find((a) => a['id'] === agentId && a['status'] === 'healthy');
    });
    mark('agent registered');

    // Step 8: the KVM host (its disk in a qemu-storage-daemon) and its machine in the inventory.
    const image = join(tmp.path, 'vm1.qcow2');
    const size = 32 << 20;
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(size)]);
    qsd = await startStorageDaemon({ disks: [{ path: image, exportName: 'guest' }] });
    const host = await json([
      ...['vault', 'host', 'add', 'kvm1', '--process-server', psId, '--agent', agentId],
      ...['--qmp', `vm1=${qsd.qmpSocket}`],
    ]);
    const hostId = String(host['id']);
    expect((await cli(['vault', 'host', 'discover', hostId])).code).toBe(0);
    const machine = await until('the machine in the inventory', async () => {
      const list = await json<{ items: Row[] }>([
        ...['vault', 'machine', 'list', '--source-host-id', hostId],
      ]);
      return list.items.find((m) => m['externalId'] === 'vm1');
    });
    const machineId = String(machine['id']);
    const shown = await json<{ disks: Row[] }>(['vault', 'machine', 'show', machineId]);
    expect(shown.disks.map((d) => [d['name'], d['sizeBytes']])).toEqual([['disk0', size]]);
    expect((await cli(['vault', 'machine', 'list'])).stdout).toMatch(/vm1/);
    mark('KVM host discovered');

    // Step 9: a policy; step 5: a directory target store, registered and checked.
    const policy = await json([
      ...['vault', 'policy', 'add', 'gold', '--rpo', '10', '--crash-interval', '1'],
      ...['--keep', '1h'],
    ]);
    const policyId = String(policy['id']);
    const { storeId, storeArgs, check } = await addDirectoryStore(
      session,
      'a store passphrase for the e2e test',
    );
    expect(check).toMatchObject({ ok: true, points: 0 });
    mark('policy, store');

    // The guest writes while the machine is protected.
    const guest = await NbdClient.connect(
      { path: qsd.nbdSocket as string },
      { exportName: 'guest' },
    );
    let writing = true;
    let written = 0;
    const writer = (async () => {
      while (writing) {
        const offset = Math.floor(Math.random() * (size / 65536)) * 65536;
        await guest.write(offset, randomBytes(65536));
        written++;
        await new Promise((r) => setTimeout(r, 50));
      }
      await guest.flush();
    })();

    // Step 11: enable replication; the CLI follows the job until initial replication ends.
    const protect = await json([
      ...['vault', 'protect', machineId, '--policy', policyId],
      ...['--process-server', psId, '--target-store', storeId],
    ]);
    expect(protect['jobState']).toBe('succeeded');
    const itemId = String(protect['id']);
    expect((await json(['vault', 'item', 'show', itemId]))['state']).toBe('protected');
    await agent.wait(/protecting vm1 \(item \S+\): a cut every 1s/);
    const points = (): Promise<{ items: Row[] }> =>
      json(['vault', 'points', 'list', '--protected-item-id', itemId, '--all']);
    await until('points to follow', async () =>
      (await points()).items.length >= 3 ? true : undefined,
    );
    expect(written).toBeGreaterThan(0);
    mark('protected, points follow');

    // The latest point is the disk at its cut: quiesce the guest, then restore a later point.
    writing = false;
    await writer;
    const quiet = Date.now();
    const later = await until('a point after the writes', async () =>
      (await points()).items.find((p) => Date.parse(String(p['time'])) > quiet + 500),
    );
    const restored = await cli([
      ...storeArgs,
      ...['store', 'restore', String(later['id']), 'restored.raw'],
    ]);
    expect(restored.code, restored.stderr).toBe(0);
    const disk = await guest.readAt(0, size);
    expect((await readFile(join(tmp.path, 'restored.raw'))).equals(disk)).toBe(true);
    await guest.close();
    mark('latest point byte-exact');
    const acked = (): Set<string> =>
      new Set([...agent.err().matchAll(/^cut (\S+) crash .*\(item /gm)].map((m) => m[1] ?? ''));

    // The process server stops: the vault raises the RPO alert, as the CLI shows.
    const rpoAlerts = async (state: string): Promise<Row[]> =>
      (
        await json<{ items: Row[] }>([
          ...['vault', 'alerts', 'list', '--kind', 'rpo-exceeded', '--state', state],
        ])
      ).items.filter((a) => a['subjectId'] === itemId);
    expect(await rpoAlerts('active')).toEqual([]);
    expect(await ps.stop()).toBe(0);
    const raised = await until('the RPO alert', async () => (await rpoAlerts('active'))[0], 90_000);
    const table = await cli(['vault', 'alerts', 'list', '--state', 'active']);
    expect(table.stdout).toMatch(/rpo-exceeded/);
    await agent.wait(/warning LB_AGENT_PS_UNREACHABLE/);
    mark('outage: RPO alert');

    // It starts again (its identity is reused, no key this time): the alert clears.
    ps = daemon([...psArgs, '--listen', `127.0.0.1:${psPort}`]);
    expect((await ps.wait(/process server (ps_\S+) \(ps1\) managed by/))[1]).toBe(psId);
    await until(
      'the RPO alert to clear',
      async () => ((await rpoAlerts('active')).length === 0 ? true : undefined),
      90_000,
    );
    expect((await rpoAlerts('cleared')).map((a) => a['id'])).toContain(raised['id']);
    mark('back: alert cleared');

    // No point missing: every cut the agent saw acknowledged is a point in the store, and the
    // catalogue lists exactly the store's points.
    const storePoints = async (): Promise<Row[]> =>
      (await json<{ points: Row[] }>([...storeArgs, 'store', 'points', '--machine', machineId]))
        .points;
    await until('the catalogue to hold every acknowledged cut', async () => {
      const cuts = acked();
      const inStore = await storePoints();
      const catalogue = new Set((await points()).items.map((p) => p['id']));
      const storeCuts = new Set(inStore.map((p) => p['cut']));
      const missing = [...cuts].filter((c) => !storeCuts.has(c));
      const unlisted = inStore.filter((p) => !catalogue.has(p['id']));
      // The newest cut may be on its way; every older one must be there.
      return missing.length <= 1 && unlisted.length <= 1 && cuts.size > 3 ? true : undefined;
    });
    const cutsNow = [...acked()];
    const inStore = await storePoints();
    const storeCuts = new Set(inStore.map((p) => p['cut']));
    expect(cutsNow.slice(0, -1).filter((c) => !storeCuts.has(c))).toEqual([]);
    mark('no point missing');

    // Retention by the policy, run through the CLI: points beyond it go from both places.
    await json(['vault', 'policy', 'update', policyId, '--keep', '5s']);
    const before = await storePoints();
    const pruned = await json<{ state: string; result: { removed: number } }>([
      ...['vault', 'policy', 'prune', policyId],
    ]);
    expect(pruned.state).toBe('succeeded');
    expect(pruned.result.removed).toBeGreaterThan(0);
    const afterStore = new Set((await storePoints()).map((p) => p['id']));
    const removed = before.filter((p) => !afterStore.has(p['id'])).map((p) => p['id']);
    expect(removed.length).toBe(pruned.result.removed);
    const catalogue = new Set((await points()).items.map((p) => p['id']));
    expect(removed.filter((id) => catalogue.has(id))).toEqual([]);
    expect(catalogue.size).toBeGreaterThan(0);
    mark('pruned by retention');

    // Everything stops cleanly.
    expect(await agent.stop()).toBe(0);
    expect(await ps.stop()).toBe(0);
    expect(await vault.stop()).toBe(0);
    mark('stopped');
    console.info(timer.report());
  }, 300_000);
});
