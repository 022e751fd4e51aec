import { execFile } from 'node:child_process';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { pngSize } from '@lifeboat/recovery';
import {
  buildTestImage,
  createRootOverlay,
  makeTempDir,
  readExt4File,
  replayExt4Journal,
  startVm,
  testImageAppend,
} from '@lifeboat/testing';
import type { TempDir, TestVm } from '@lifeboat/testing';
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
import { qemuUnder } from './recovery-fixtures.js';

const run = promisify(execFile);

// Issue 7's end-to-end test: the reference workflow as a user types it, through the built
// `lifeboat` only, each role in its own process as on its own machine (docs/quickstart.md is
// the same walk across machines). The protected machine is a real VM (QEMU under TCG booting
// the project's test image, writing a file a second); every step asserts what the CLI prints.
// Step numbers are the reference workflow's; the agent (10) comes before the KVM host's
// inventory (8) because the agent on the KVM host is what reads its machines over QMP.

const MARK = `WF-${process.pid}`;
const RPO_SECONDS = 30;

describe('the reference workflow through the CLI (issue 7)', () => {
  let tmp: TempDir;
  let session: CliSession;
  let vm: TestVm | undefined;
  const cli = (args: string[], env?: Record<string, string>) => session.run(args, env);
  const json = <T = Row>(args: string[]) => session.json<T>(args);

  beforeAll(async () => {
    tmp = await makeTempDir('lb-workflow-');
    session = new CliSession(tmp.path);
  });
  afterAll(async () => {
    await session?.stopAll();
    await vm?.stop({ kill: true });
    if (tmp !== undefined) expect(await qemuUnder(tmp.path)).toEqual([]);
    await tmp?.remove();
  });

  it('walks steps 7, 8, 10, 5, 9, 11 and 12, then a planned failover, a change to a chosen point and commit', async () => {
    const timer = new StepTimer();
    const image = await buildTestImage();
    timer.mark('test image (cached)');

    // Step 7: the vault over HTTPS from its own CA (as across sites), users with roles, sites.
    const vault = await startVaultAndLogIn(session, { args: ['--tls-internal'] });
    const vaultCa = session.env['NODE_EXTRA_CA_CERTS'] ?? '';
    expect(vaultCa).toBe(join(tmp.path, 'vault', 'vault-ca.pem'));
    const vaultUrl = session.env['LIFEBOAT_VAULT_URL'] ?? '';
    expect(await json(['vault', 'whoami'])).toMatchObject({ name: 'admin', role: 'admin' });
    await writeFile(join(tmp.path, 'alice.pw'), 'alice operator password\n');
    await writeFile(join(tmp.path, 'victor.pw'), 'victor viewer password\n');
    for (const [user, role] of [
      ['alice', 'operator'],
      ['victor', 'viewer'],
    ] as const) {
      const added = await json([
        ...['vault', 'user', 'add', user, '--role', role],
        ...['--password-file', `${user}.pw`],
      ]);
      expect(added).toMatchObject({ username: user, role });
    }
    const users = await json<{ items: Row[] }>(['vault', 'user', 'list']);
    expect(users.items.map((u) => [u['username'], u['role']]).sort()).toEqual([
      ['admin', 'admin'],
      ['alice', 'operator'],
      ['victor', 'viewer'],
    ]);
    const source = await json(['vault', 'site', 'add', 'london', '--kind', 'source']);
    await json(['vault', 'site', 'add', 'dublin', '--kind', 'recovery']);
    timer.mark('step 7: vault, users, sites');

    // Step 8: one-time keys; the process server and the recovery host register with theirs.
    for (const kind of ['process-server', 'agent', 'recovery-host']) {
      await createKeyFile(session, kind);
    }
    const ps = session.daemon([
      ...['process-server', 'start', '--vault', vaultUrl, '--vault-ca', vaultCa],
      ...['--state-dir', 'ps', '--name', 'ps1'],
      ...['--registration-key-file', 'process-server.key', '--listen', '127.0.0.1:0'],
      ...['--health', '127.0.0.1:0', '--store-workers', '1', '--log-level', 'warn'],
    ]);
    const psStarted = await ps.wait(
      /process server (ps_\S+) \(ps1\) managed by .* listening on 127\.0\.0\.1:(\d+)/,
    );
    const psId = psStarted[1] ?? '';
    const psPort = psStarted[2] ?? '';
    // The test image has no boot loader: the recovery host boots its kernel when the vault
    // names no other (a real machine's disk boots with firmware and needs neither option).
    const rh = session.daemon([
      ...['recovery-host', 'start', '--vault', vaultUrl, '--vault-ca', vaultCa],
      ...['--run-dir', 'rh', '--name', 'rh1'],
      ...['--registration-key-file', 'recovery-host.key', '--poll-ms', '500'],
      ...['--kernel-dir', dirname(image.kernel), '--default-kernel', image.kernel],
      ...['--default-append', testImageAppend({ hostname: 'recovered' })],
    ]);
    const rhId = (await rh.wait(/recovery host rh1 \((\S+)\) registered with/))[1] ?? '';
    const healthy = (kind: string, id: string) =>
      until(`${kind} ${id} to be healthy`, async () =>
        (await json<{ items: Row[] }>(['vault', kind, 'list'])).items.find(
          (c) => c['id'] === id && c['status'] === 'healthy',
        ),
      );
    await healthy('process-server', psId);
    await healthy('recovery-host', rhId);
    timer.mark('step 8: process server, recovery host');

    // Step 10: the agent on the KVM host registers through its process server.
    expect((await cli(['vault', 'ca', '--out', 'vault-ca.pem'])).code).toBe(0);
    const agent = session.daemon([
      ...['agent', 'start', '--process-server', `127.0.0.1:${psPort}`, '--state-dir', 'agent'],
      ...['--registration-key-file', 'agent.key', '--ca', 'vault-ca.pem', '--name', 'kvm1'],
      ...['--poll-interval', '1s'],
    ]);
    const agentId = (await agent.wait(/registered agent (agt_\S+) \(kvm1\)/))[1] ?? '';
    await healthy('agent', agentId);
    timer.mark('step 10: agent');

    // The protected machine: a VM that marks its disk, then writes a file every second.
    const root = await createRootOverlay(image, join(tmp.path, 'vm1-root.qcow2'));
    vm = await startVm({
      kernel: image.kernel,
      disks: [{ path: root }],
      append: testImageAppend({
        hostname: 'vm1',
        mark: MARK,
        writer: true,
        writerIntervalMs: 1000,
      }),
      dir: join(tmp.path, 'vm1'),
    });
    await vm.waitForConsole(`LIFEBOAT-MARK-WRITTEN ${MARK}`, 180_000);
    timer.mark(`source VM booted (${vm.accel})`);

    // Step 8: the KVM host and its machine in the inventory.
    const host = await json([
      ...['vault', 'host', 'add', 'kvm1', '--process-server', psId, '--agent', agentId],
      ...['--qmp', `vm1=${vm.qmpSocket}`, '--site', String(source['id'])],
    ]);
    const hostId = String(host['id']);
    expect((await cli(['vault', 'host', 'discover', hostId])).code).toBe(0);
    const machine = await until('vm1 in the inventory', async () =>
      (
        await json<{ items: Row[] }>(['vault', 'machine', 'list', '--source-host-id', hostId])
      ).items.find((m) => m['externalId'] === 'vm1'),
    );
    const machineId = String(machine['id']);
    const shown = await json<{ disks: Row[] }>(['vault', 'machine', 'show', machineId]);
    expect(shown.disks.map((d) => d['sizeBytes'])).toEqual([256 << 20]);
    expect((await cli(['vault', 'machine', 'list'])).stdout).toMatch(/vm1/);
    timer.mark('step 8: KVM host, inventory');

    // Step 5: the target store, created, registered and checked by the vault.
    const { storeId, storeArgs, check } = await addDirectoryStore(session, 'workflow test store');
    expect(check).toMatchObject({ ok: true, points: 0 });
    timer.mark('step 5: target store');

    // Step 9: a replication policy.
    const policy = await json([
      ...['vault', 'policy', 'add', 'gold', '--rpo', String(RPO_SECONDS)],
      ...['--crash-interval', '2', '--keep', '1h'],
    ]);
    expect(policy).toMatchObject({ name: 'gold', rpoThresholdSeconds: RPO_SECONDS });
    timer.mark('step 9: policy');

    // Step 11: enable replication; the CLI follows the job until initial replication ends.
    const protect = await json([
      ...['vault', 'protect', machineId, '--policy', String(policy['id'])],
      ...['--process-server', psId, '--target-store', storeId],
    ]);
    expect(protect['jobState']).toBe('succeeded');
    const itemId = String(protect['id']);
    const enable = await json<{ steps: Row[]; logs: Row[] }>([
      ...['vault', 'jobs', 'show', String(protect['jobId'])],
    ]);
    expect(enable.steps.map((s) => [s['name'], s['state']])).toContainEqual([
      'initial-replication',
      'done',
    ]);
    expect(enable.logs.map((l) => l['message']).join('\n')).toMatch(/initial replication runs/);
    const item = () => json(['vault', 'item', 'show', itemId]);
    const points = async () =>
      (
        await json<{ items: Row[] }>([
          ...['vault', 'points', 'list', '--protected-item-id', itemId, '--all'],
        ])
      ).items;
    // Continuous replication: new points keep coming, and the RPO stays under the threshold.
    const initialPoints = (await points()).length;
    expect(initialPoints).toBeGreaterThan(0);
    const rpos: number[] = [];
    await until(
      'three more points',
      async () => {
        const i = await item();
        expect(i['state']).toBe('protected');
        rpos.push(Number(i['rpoSeconds']));
        return (await points()).length >= initialPoints + 3 ? true : undefined;
      },
      90_000,
    );
    expect(Math.max(...rpos)).toBeLessThan(RPO_SECONDS);
    const table = await cli(['vault', 'item', 'list']);
    expect(table.stdout).toMatch(/protected/);
    expect(
      (await json<{ items: Row[] }>(['vault', 'alerts', 'list', '--state', 'active'])).items,
    ).toEqual([]);
    timer.mark(`step 11: protected, RPO ≤ ${Math.max(...rpos).toFixed(1)} s`);

    // Step 12: a test failover of the latest point in an isolated network, verified by the
    // marker the source wrote, a guest port and a screenshot; kept, then cleaned up.
    const before = (await points()).length;
    const tf = await cli([
      ...['--json', 'failover', 'test', '--machine', 'vm1'],
      ...['--console', `LIFEBOAT-BOOT-OK recovered ${MARK}`],
      ...['--port', '22', '--expect', 'LIFEBOAT-TCP-OK recovered'],
      ...['--screenshot-out', 'vm1-test.png', '--keep'],
    ]);
    expect(tf.code, tf.stderr).toBe(0);
    const tested = JSON.parse(tf.stdout) as {
      testFailover: { id: string; state: string; machines: Array<{ verification: Row }> };
      job: { kind: string; state: string };
      cleanup: null;
      screenshots: string[];
    };
    expect(tested.job).toMatchObject({ kind: 'test-failover', state: 'succeeded' });
    expect(tested.testFailover.machines[0]!.verification).toMatchObject({
      console: `LIFEBOAT-BOOT-OK recovered ${MARK}`,
      port: { guestPort: 22, answer: expect.stringMatching(/LIFEBOAT-TCP-OK recovered/) },
      screenshot: { width: 720, height: 400 },
    });
    expect(tested.screenshots).toEqual([join(tmp.path, 'vm1-test.png')]);
    expect(pngSize(await readFile(join(tmp.path, 'vm1-test.png')))).toEqual({
      width: 720,
      height: 400,
    });
    // The item stays protected and replication goes on while the test machine runs.
    expect((await item())['state']).toBe('protected');
    await until('a point during the test failover', async () =>
      (await points()).length > before ? true : undefined,
    );
    const cleanup = await cli(['failover', 'cleanup', '--test-failover', tested.testFailover.id]);
    expect(cleanup.code, cleanup.stderr).toBe(0);
    expect(cleanup.stdout).toMatch(/removed machine vm1\S* \(QEMU pid \d+\)/);
    expect(cleanup.stdout).toMatch(/removed export \S+ of point /);
    expect(cleanup.stdout).toMatch(/removed overlay /);
    expect(cleanup.stdout).toMatch(/: cleaned-up/);
    expect(await qemuUnder(join(tmp.path, 'rh'))).toEqual([]);
    timer.mark('step 12: test failover verified, cleaned up');

    // A viewer may look but not fail over: 403 with its code, exit code 1 (docs/errors.md).
    const viewer = await cli([
      ...['vault', 'login', '--username', 'victor', '--password-file', 'victor.pw'],
    ]);
    expect(viewer.code).toBe(0);
    const asViewer = { LIFEBOAT_VAULT_TOKEN: viewer.stdout.trim() };
    expect((await cli(['vault', 'item', 'list'], asViewer)).code).toBe(0);
    const refused = await cli(['--json', 'failover', 'start', '--machine', 'vm1'], asViewer);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/^error LB_VAULT_FORBIDDEN: /m);
    expect(JSON.parse(refused.stdout)).toMatchObject({
      error: { code: 'LB_VAULT_FORBIDDEN', details: { status: 403 } },
    });
    expect((await item())['state']).toBe('protected');
    timer.mark('viewer refused');

    // A planned failover: the vault has the process server replicate a last cycle of the
    // paused source and stop it, then the recovery host boots that point. Nothing is lost:
    // the recovered machine holds every file the source had finished.
    expect(agent.err()).not.toMatch(/stopped item/);
    const sourceVm = vm;
    const fo = await cli(['--json', 'failover', 'start', '--machine', 'vm1', '--planned']);
    expect(fo.code, fo.stderr).toBe(0);
    const failover = (
      JSON.parse(fo.stdout) as {
        failover: { id: string; state: string; machines: Array<{ points: Row[] }> };
      }
    ).failover;
    expect(failover.state).toBe('booted');
    await until('the source machine to be stopped', async () =>
      sourceVm.process.exit !== undefined ? true : undefined,
    );
    vm = undefined;
    const finished = [...(await sourceVm.consoleText()).matchAll(/^LIFEBOAT-WROTE (\d+)/gm)];
    const lastWritten = Number(finished.at(-1)?.[1]);
    expect(lastWritten).toBeGreaterThan(0);
    expect((await item())['state']).toBe('failed-over');
    // The vault tells the source side to stop replicating it, and the agent says so.
    await agent.wait(new RegExp(`^stopped item ${itemId}$`, 'm'));
    expect(
      (await json<{ items: Row[] }>(['vault', 'item', 'list', '--state', 'failed-over'])).items.map(
        (i) => i['id'],
      ),
    ).toEqual([itemId]);
    // On the recovery host, its console names the writer's newest file: the source's last
    // one (or the next, made durable just before the pause but not yet reported).
    const recovered = /LIFEBOAT-LAST-INDEX (\d+)/;
    const lastSync = await until(
      'the recovered console',
      async () => {
        const text = await readConsoles(join(tmp.path, 'rh', 'm'));
        return /LIFEBOAT-READY recovered/.test(text) ? text : undefined;
      },
      180_000,
    );
    expect(lastSync).toContain(`LIFEBOAT-BOOT-OK recovered ${MARK}`);
    expect([lastWritten, lastWritten + 1]).toContain(Number(recovered.exec(lastSync)?.[1]));
    timer.mark('planned failover: nothing lost');

    // Before commit the point can change: an earlier point, chosen from the catalogue.
    const all = (await points()).sort((x, y) => String(x['time']).localeCompare(String(y['time'])));
    const chosen = all[all.length - 4]!;
    expect(failover.machines[0]!.points.map((p) => p['id'])).not.toContain(chosen['id']);
    // What that point holds, restored from the store: the index of the writer's newest file.
    const restored = join(tmp.path, 'chosen.raw');
    const r = await cli([...storeArgs, 'store', 'restore', String(chosen['id']), 'chosen.raw']);
    expect(r.code, r.stderr).toBe(0);
    await replayExt4Journal(restored);
    const index = (await readExt4File(restored, '/var/lifeboat/index'))?.toString().trim() ?? '';
    expect(Number(index)).toBeGreaterThan(0);
    expect(Number(index)).toBeLessThan(lastWritten);
    const newest = await readExt4File(restored, `/var/lifeboat/files/${index}.dat`);
    // The writer's file: 16 KiB of a line naming its counter, finished before the cut.
    expect(newest?.toString()).toBe(`LIFEBOAT-FILE ${index}\n`.repeat(2000).slice(0, 16384));
    const changed = await cli([
      ...['--json', 'failover', 'change-point', '--failover', failover.id],
      ...['--point', String(chosen['id'])],
    ]);
    expect(changed.code, changed.stderr).toBe(0);
    const rebooted = (
      JSON.parse(changed.stdout) as { failover: { machines: Array<{ points: Row[] }> } }
    ).failover;
    expect(rebooted.machines[0]!.points.map((p) => p['id'])).toEqual([chosen['id']]);
    // The machine boots that point now: its console names the same index.
    const chosenBoot = new RegExp(`^LIFEBOAT-LAST-INDEX ${index}\\r?$`, 'm');
    await until(
      'the console of the chosen point',
      async () =>
        chosenBoot.test(await readConsoles(join(tmp.path, 'rh', 'm'))) ? true : undefined,
      180_000,
    ).catch(async (err: Error) => {
      throw new Error(`${err.message}:\n${await readConsoles(join(tmp.path, 'rh', 'm'))}`);
    });
    expect((await item())['state']).toBe('failed-over');
    timer.mark('change of point');

    // Commit: final, then hydrated into a local file while the machine runs.
    const commit = await cli([
      '--json',
      'failover',
      'commit',
      '--failover',
      failover.id,
      '--verify',
    ]);
    expect(commit.code, commit.stderr).toBe(0);
    const committed = JSON.parse(commit.stdout) as {
      failover: { state: string; machines: Array<{ localDisks: string[] }> };
      jobs: Array<{ kind: string; state: string; steps: Array<{ name: string; detail?: Row }> }>;
    };
    expect(committed.jobs.map((j) => [j.kind, j.state])).toEqual([
      ['failover-commit', 'succeeded'],
      ['hydration', 'succeeded'],
    ]);
    expect(committed.failover.state).toBe('hydrated');
    const local = committed.failover.machines[0]!.localDisks;
    expect(local).toHaveLength(1);
    const steps = new Map(committed.jobs[1]!.steps.map((s) => [s.name, s.detail]));
    // The recovery host compared the copy with the point plus the guest's writes (paused),
    // and QEMU shows the machine running from the local file alone.
    expect(steps.get('verify copies')).toMatchObject({ identical: local });
    expect(steps.get('check the machine runs from local disks')).toMatchObject({ files: local });
    expect((await item())['state']).toBe('failed-over');
    // The local file holds what the chosen point holds, byte for byte (the recovered guest
    // only mounted it since): read with the guest running, as qemu-img allows (-U).
    const copy = join(tmp.path, 'local.raw');
    await run('qemu-img', ['convert', '-U', '-O', 'raw', local[0]!, copy]);
    await replayExt4Journal(copy);
    expect((await readExt4File(copy, '/var/lifeboat/index'))?.toString().trim()).toBe(index);
    expect(await readExt4File(copy, '/var/lifeboat/marker')).toEqual(
      await readExt4File(restored, '/var/lifeboat/marker'),
    );
    for (const n of [Number(index), Number(index) - 1, Number(index) - 5]) {
      if (n <= 0) continue;
      expect(await readExt4File(copy, `/var/lifeboat/files/${n}.dat`)).toEqual(
        await readExt4File(restored, `/var/lifeboat/files/${n}.dat`),
      );
    }
    const late = await cli(['failover', 'change-point', '--failover', failover.id]);
    expect(late.code).toBe(1);
    expect(late.stderr).toMatch(/LB_VAULT_INVALID_STATE/);
    timer.mark('commit, hydrated to a local file');

    // Everything stops cleanly, the failed-over machine with its recovery host.
    for (const d of [rh, agent, ps, vault]) expect(await d.stop()).toBe(0);
    expect(await qemuUnder(tmp.path)).toEqual([]);
    timer.mark('stopped');
    console.info(timer.report());
  }, 400_000);
});

/** The console logs of the machines running on a recovery host (`<run-dir>/m/<machine>/`). */
async function readConsoles(dir: string): Promise<string> {
  const found = (await readdir(dir, { recursive: true })).filter((f) => f.endsWith('console.log'));
  const texts = await Promise.all(found.map((f) => readFile(join(dir, f), 'utf8').catch(() => '')));
  return texts.join('\n');
}
