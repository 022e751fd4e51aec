import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ManagedAgent, registerAgent } from '@lifeboat/agent';
import { startManagedProcessServer } from '@lifeboat/process-server';
import type { ManagedProcessServer } from '@lifeboat/process-server';
import { VaultClient } from '@lifeboat/protocol';
import type { VaultObject } from '@lifeboat/protocol';
import { RecoveryHost, RecoveryHostLink } from '@lifeboat/recovery';
import { DirectoryBackend, Store } from '@lifeboat/store';
import {
  buildTestImage,
  createRootOverlay,
  startVm,
  testImageAppend,
  type TestVm,
} from '@lifeboat/testing';
import { startVault, type Vault } from '@lifeboat/vault';
import { until as poll } from './poll.js';
import { qemuUnder } from './recovery-fixtures.js';

// A planned failover along the standalone path: vault → process server (managed, its own
// component) → agent of the KVM host (managed, polling its process server) → the source VM
// paused, cut, committed and quit → recovery host boots the last cut. The vault never connects
// to a component, and the agent talks only to its process server.

// Slow steps here (a planned failover's last sync under TCG): two minutes unless told.
const until = <T>(what: string, check: () => Promise<T | undefined>, ms = 120_000): Promise<T> =>
  poll(what, check, ms, 250);

let dir: string;
let vault: Vault;
let admin: VaultClient;
let ps: ManagedProcessServer | undefined;
let agent: ManagedAgent | undefined;
let vm: TestVm | undefined;
let host: RecoveryHost | undefined;
let link: RecoveryHostLink | undefined;
let store: Store;
const passphrase = 'planned failover managed';

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lb-pfm-'));
  vault = await startVault({
    dataDir: join(dir, 'vault'),
    port: 0,
    logLevel: 'silent',
    passwordCost: 1024,
    initialAdmin: { username: 'admin', password: 'admin-password' },
    jobPollIntervalMs: 100,
  });
  const login = await new VaultClient({ url: vault.url }).call('POST', '/api/auth/login', {
    username: 'admin',
    password: 'admin-password',
  });
  admin = new VaultClient({ url: vault.url, token: String(login['token']) });
  store = await Store.init({
    backend: new DirectoryBackend({ path: join(dir, 'store') }),
    passphrase,
    kdfCost: 1024,
  });
});
afterAll(async () => {
  await link?.stop();
  await host?.close();
  await agent?.stop();
  await ps?.close();
  await vm?.stop({ kill: true });
  await store?.close();
  await vault?.close();
  expect(await qemuUnder(dir)).toEqual([]);
  await rm(dir, { recursive: true, force: true });
});

const key = async (kind: string): Promise<string> =>
  String((await admin.call('POST', '/api/registration-keys', { kind }))['key']);

describe('planned failover through a managed process server and agent', () => {
  it('pauses and cuts the source on its KVM host, commits, quits it, and boots the last cut on the recovery host', async () => {
    const image = await buildTestImage();
    const root = await createRootOverlay(image, join(dir, 'root.qcow2'));
    vm = await startVm({
      kernel: image.kernel,
      disks: [{ path: root }],
      append: testImageAppend({ hostname: 'prod', writer: true, writerIntervalMs: 300 }),
      memoryMiB: 256,
    });
    await vm.waitForConsole('LIFEBOAT-WROTE 2', 180_000);

    ps = await startManagedProcessServer({
      vaultUrl: vault.url,
      stateDir: join(dir, 'ps'),
      registrationKey: await key('process-server'),
      name: 'ps1',
      address: '127.0.0.1',
      host: '127.0.0.1',
      port: 0,
      healthPort: null,
      storeWorkerCount: 0,
      intervalMs: 300,
      logLevel: 'silent',
    });
    const psAt = { host: '127.0.0.1', port: ps.server.port };
    const identity = await registerAgent({
      processServer: psAt,
      ca: ps.identity.ca,
      key: await key('agent'),
      name: 'kvm1',
      stateDir: join(dir, 'agent'),
    });
    agent = ManagedAgent.start({
      processServer: psAt,
      stateDir: join(dir, 'agent'),
      identity,
      pollIntervalMs: 300,
    });
    const rhReg = await admin.call<{ token: string }>('POST', '/api/register', {
      key: await key('recovery-host'),
      kind: 'recovery-host',
      name: 'rh1',
    });
    host = await RecoveryHost.start({ runDir: join(dir, 'run') });
    link = new RecoveryHostLink({
      vault: new VaultClient({ url: vault.url, token: rhReg.token }),
      host,
      openStore: async (s) =>
        Store.open({ backend: new DirectoryBackend({ path: s.path! }), passphrase: s.passphrase }),
      hydrationDir: join(dir, 'disks'),
      kernelDirs: [dirname(image.kernel)],
      defaultBoot: { kernel: image.kernel, append: testImageAppend({ hostname: 'recovered' }) },
      intervalMs: 300,
    });
    link.start();

    const kvm = await admin.call('POST', '/api/source-hosts', {
      name: 'kvm1',
      kind: 'kvm',
      processServerId: ps.identity.id,
      agentId: identity.id,
      endpoints: [{ name: 'prod', qmp: vm.qmpSocket }],
    });
    await admin.call('POST', `/api/source-hosts/${String(kvm['id'])}/discover`);
    const machine = await until('the inventory', async () => {
      const m = await admin.call<{ items: VaultObject[] }>(
        'GET',
        `/api/machines?sourceHostId=${String(kvm['id'])}`,
      );
      return m.items.find((x) => x['externalId'] === 'prod');
    });
    const ts = await admin.call('POST', '/api/target-stores', {
      name: 'dr',
      kind: 'directory',
      path: join(dir, 'store'),
      passphrase,
    });
    const policy = await admin.call('POST', '/api/policies', {
      name: 'fast',
      rpoThresholdSeconds: 60,
      crashConsistentIntervalSeconds: 2,
      retention: { rules: [{ for: '1h' }] },
    });
    const item = await admin.call('POST', '/api/protected-items', {
      machineId: machine['id'],
      policyId: policy['id'],
      processServerId: ps.identity.id,
      targetStoreId: ts['id'],
    });
    const itemId = String(item['id']);
    await until(
      'the item to be protected',
      async () => {
        const i = await admin.call('GET', `/api/protected-items/${itemId}`);
        return i['state'] === 'protected' ? i : undefined;
      },
      240_000,
    );
    // Continuous replication (the final cut needs it): a second point after the first.
    await until('a second point', async () => {
      const p = await store.listPoints({ machine: String(machine['id']) });
      return p.length >= 2 ? p : undefined;
    });

    const started = await admin.call<{
      id: string;
      jobId: string;
      jobs: Array<{ id: string; kind: string }>;
      machines: Array<{ name: string }>;
    }>('POST', '/api/failovers', { protectedItemId: itemId, planned: true, memoryMiB: 256 });
    const job = await until(
      'the failover',
      async () => {
        const j = await admin.call('GET', `/api/jobs/${started.jobId}`);
        return ['succeeded', 'failed'].includes(String(j['state'])) ? j : undefined;
      },
      300_000,
    );
    const sync = await admin.call('GET', `/api/jobs/${started.jobs[0]!.id}`);
    expect(sync['kind']).toBe('final-sync');
    expect(sync['state'], JSON.stringify(sync['error'])).toBe('succeeded');
    expect(job['state'], JSON.stringify(job['error'])).toBe('succeeded');

    // The source is gone, and its last finished file is in the recovered machine.
    await until(
      'the source to exit',
      async () => (vm!.process.exit !== undefined ? true : undefined),
      30_000,
    );
    const lastWritten = Math.max(
      ...[...(await vm.consoleText()).matchAll(/LIFEBOAT-WROTE (\d+)/g)].map((m) => Number(m[1])),
    );
    const recovered = host.running.get(started.machines[0]!.name)!.machine;
    const m = await recovered.waitForConsole(/LIFEBOAT-LAST-INDEX (\d+)/, 180_000);
    expect(Number(m[1])).toBeGreaterThanOrEqual(lastWritten);
    const pointIds = (sync['result'] as { pointIds: string[] }).pointIds;
    expect(pointIds).toHaveLength(1);
    const run = await admin.call<{
      state: string;
      machines: Array<{ points: Array<{ id: string }> }>;
    }>('GET', `/api/failovers/${started.id}`);
    expect(run.state).toBe('booted');
    expect(run.machines[0]!.points.map((p) => p.id)).toEqual(pointIds);
    expect((await admin.call('GET', `/api/protected-items/${itemId}`))['state']).toBe(
      'failed-over',
    );
    // The agent does not start the machine again (its source is gone).
    await new Promise((r) => setTimeout(r, 1500));
    expect(agent.status().items.map((i) => i.id)).not.toContain(itemId);
  }, 600_000);
});
