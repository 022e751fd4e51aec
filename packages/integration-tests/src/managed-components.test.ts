import { X509Certificate, randomBytes } from 'node:crypto';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { ManagedAgent, ProcessServerApi, registerAgent } from '@lifeboat/agent';
import type { MachineAssignment } from '@lifeboat/agent';
import { NbdClient } from '@lifeboat/nbd';
import { startManagedProcessServer } from '@lifeboat/process-server';
import type { ManagedProcessServer } from '@lifeboat/process-server';
import {
  ReplicationClient,
  VaultClient,
  isLifeboatError,
  loadComponentIdentity,
} from '@lifeboat/protocol';
import type { VaultObject } from '@lifeboat/protocol';
import { DirectoryBackend, Store } from '@lifeboat/store';
import { makeTempDir, runCommand, startStorageDaemon } from '@lifeboat/testing';
import type { StorageDaemon, TempDir } from '@lifeboat/testing';
import { startVault } from '@lifeboat/vault';
import type { Vault } from '@lifeboat/vault';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { until } from './poll.js';

// A process server and an agent managed by the vault, in this process: registration with
// one-time keys (the agent's through its process server), certificates renewed, the target
// store taken from the assignments, inventory from the agent of the KVM host, replication of
// exactly the assigned machine (started, restarted on a policy change, stopped on disable),
// and an agent refused for a machine that is not its own. The CLI-only walk through the same
// path is vault-cli-e2e.test.ts.

describe('process server and agent managed by the vault', () => {
  let tmp: TempDir;
  let vault: Vault;
  let admin: VaultClient;
  let ps: ManagedProcessServer | undefined;
  let agent: ManagedAgent | undefined;
  let qsd: StorageDaemon;
  let store: Store;
  const passphrase = 'managed-components-passphrase';

  beforeAll(async () => {
    tmp = await makeTempDir('lb-managed-');
    vault = await startVault({
      dataDir: join(tmp.path, 'vault'),
      port: 0,
      logLevel: 'silent',
      passwordCost: 1024,
      initialAdmin: { username: 'admin', password: 'admin-password' },
      schedulerIntervalMs: 1000,
      jobPollIntervalMs: 100,
    });
    const login = await new VaultClient({ url: vault.url }).call('POST', '/api/auth/login', {
      username: 'admin',
      password: 'admin-password',
    });
    admin = new VaultClient({ url: vault.url, token: String(login['token']) });
    store = await Store.init({
      backend: new DirectoryBackend({ path: join(tmp.path, 'store') }),
      passphrase,
    });
    const img = join(tmp.path, 'vm1.qcow2');
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', img, '16M']);
    qsd = await startStorageDaemon({ disks: [{ path: img, exportName: 'guest' }] });
  });
  afterAll(async () => {
    await agent?.stop();
    await ps?.close();
    await qsd?.stop();
    await store?.close();
    await vault?.close();
    await tmp?.remove();
  });

  const key = async (kind: string): Promise<string> =>
    String((await admin.call('POST', '/api/registration-keys', { kind }))['key']);

  it('registers, discovers, replicates what is assigned and stops on disable', async () => {
    ps = await startManagedProcessServer({
      vaultUrl: vault.url,
      stateDir: join(tmp.path, 'ps'),
      registrationKey: await key('process-server'),
      name: 'ps1',
      address: '127.0.0.1',
      host: '127.0.0.1',
      port: 0,
      healthPort: null,
      storeWorkerCount: 0,
      intervalMs: 500,
      logLevel: 'silent',
    });
    const psId = ps.identity.id;
    // The identity is kept 0600; the certificate's subject is the vault id.
    expect((await stat(join(tmp.path, 'ps', 'identity.json'))).mode & 0o777).toBe(0o600);
    expect(new X509Certificate(ps.identity.cert).subject).toContain(`CN=${psId}`);
    const psAt = { host: '127.0.0.1', port: ps.server.port };

    // An agent with a used or unknown key is refused through the process server, with the vault's code.
    const agentKey = await key('agent');
    const refused = await registerAgent({
      processServer: psAt,
      ca: ps.identity.ca,
      key: 'lbk_not-a-key',
      name: 'kvm1',
      stateDir: join(tmp.path, 'nobody'),
    }).catch((e: unknown) => e);
    expect(isLifeboatError(refused) && refused.code).toBe('LB_VAULT_REGISTRATION_KEY_UNKNOWN');
    const identity = await registerAgent({
      processServer: psAt,
      ca: ps.identity.ca,
      key: agentKey,
      name: 'kvm1',
      stateDir: join(tmp.path, 'agent'),
    });
    expect(identity.id).toMatch(/^agt_/);
    const reused = await registerAgent({
      processServer: psAt,
      ca: ps.identity.ca,
      key: agentKey,
      name: 'kvm1-again',
      stateDir: join(tmp.path, 'nobody'),
    }).catch((e: unknown) => e);
    expect(isLifeboatError(reused) && reused.code).toBe('LB_VAULT_REGISTRATION_KEY_USED');
    // Without a client certificate, the agents' routes are closed.
    const anonymous = new ProcessServerApi({ ...psAt, ca: ps.identity.ca });
    const closed = await anonymous.call('GET', '/agent/v1/assignments').catch((e: unknown) => e);
    expect(isLifeboatError(closed) && closed.code).toBe('LB_PS_AGENT_UNAUTHORIZED');

    const started: MachineAssignment[] = [];
    const stopped: string[] = [];
    const cuts: string[] = [];
    agent = ManagedAgent.start({
      processServer: psAt,
      stateDir: join(tmp.path, 'agent'),
      identity,
      pollIntervalMs: 300,
      // Renews at its first round: the renewed certificate must work for everything after.
      renewFraction: 1,
    });
    agent.on('started', (_id: string, a: MachineAssignment) => started.push(a));
    agent.on('stopped', (id: string) => stopped.push(id));
    agent.on('cut', (_id: string, c: { cutId: string }) => cuts.push(c.cutId));
    const renewed = new Promise<string>((r) => agent?.once('renewed', r));
    expect(Date.parse(await renewed)).toBeGreaterThan(Date.now());

    // The KVM host is the agent's; its inventory comes from the agent.
    const host = await admin.call('POST', '/api/source-hosts', {
      name: 'kvm1',
      kind: 'kvm',
      processServerId: psId,
      agentId: identity.id,
      endpoints: [{ name: 'vm1', qmp: qsd.qmpSocket }],
    });
    await admin.call('POST', `/api/source-hosts/${String(host['id'])}/discover`);
    const machine = await until('the inventory', async () => {
      const m = await admin.call<{ items: VaultObject[] }>(
        'GET',
        `/api/machines?sourceHostId=${String(host['id'])}`,
      );
      return m.items.find((x) => x['externalId'] === 'vm1');
    });
    const detail = await admin.call<{ disks: VaultObject[] }>(
      'GET',
      `/api/machines/${String(machine['id'])}`,
    );
    expect(detail.disks.map((d) => [d['name'], d['sizeBytes']])).toEqual([['disk0', 16 << 20]]);

    const guest = await NbdClient.connect(
      { path: qsd.nbdSocket as string },
      { exportName: 'guest' },
    );
    const data = randomBytes(1 << 20);
    await guest.write(4 << 20, data);
    await guest.flush();

    const ts = await admin.call('POST', '/api/target-stores', {
      name: 'dr',
      kind: 'directory',
      path: join(tmp.path, 'store'),
      passphrase,
    });
    const policy = await admin.call('POST', '/api/policies', {
      name: 'fast',
      rpoThresholdSeconds: 30,
      crashConsistentIntervalSeconds: 1,
      retention: { rules: [{ for: '1h' }] },
    });
    const item = await admin.call('POST', '/api/protected-items', {
      machineId: machine['id'],
      policyId: policy['id'],
      processServerId: psId,
      targetStoreId: ts['id'],
    });
    const itemId = String(item['id']);
    await until('the item to be protected', async () => {
      const i = await admin.call('GET', `/api/protected-items/${itemId}`);
      return i['state'] === 'protected' ? i : undefined;
    });
    expect(started.map((a) => a.id)).toEqual([itemId]);
    // The process server took the store from its assignments; the point holds the guest's bytes.
    const points = await until('a point after the write', async () => {
      const p = await store.listPoints({ machine: String(machine['id']) });
      return p.length > 0 ? p : undefined;
    });
    const reader = await store.openPoint(points[points.length - 1]!.id);
    expect(Buffer.from(await reader.readAt(4 << 20, data.length)).equals(data)).toBe(true);
    const catalogue = await admin.call<{ items: VaultObject[] }>(
      'GET',
      `/api/recovery-points?protectedItemId=${itemId}`,
    );
    expect(catalogue.items.length).toBeGreaterThan(0);
    expect((await admin.call('GET', `/api/agents/${identity.id}`))['status']).toBe('healthy');

    // An agent may replicate only its own machines: another certificate is refused.
    const otherKey = await key('agent');
    const other = await registerAgent({
      processServer: psAt,
      ca: ps.identity.ca,
      key: otherKey,
      name: 'intruder',
      stateDir: join(tmp.path, 'intruder'),
    });
    const intruder = new ReplicationClient({
      ...psAt,
      ca: other.ca,
      cert: other.cert,
      key: other.key,
      machine: String(machine['id']),
      disks: [{ name: 'disk0', size: 16 << 20 }],
      reconnectInitialDelayMs: 50,
    });
    // Refused at its hello; it keeps retrying (the host may get that agent later).
    const failure = new Promise<unknown>((r) => intruder.once('server-error', r));
    void intruder.start().catch(() => undefined);
    const f = await Promise.race([
      failure,
      new Promise((r) => setTimeout(() => r('no failure'), 20_000)),
    ]);
    await intruder.close();
    expect(isLifeboatError(f) && f.code).toBe('LB_PS_AGENT_NOT_ASSIGNED');

    // A new interval restarts the machine with it; nothing else.
    await admin.call('PATCH', `/api/policies/${String(policy['id'])}`, {
      crashConsistentIntervalSeconds: 2,
    });
    await until('the restart with the new interval', async () =>
      started.length === 2 ? true : undefined,
    );
    expect(started[1]?.policy.crashConsistentIntervalSeconds).toBe(2);
    const cutsBefore = cuts.length;
    await until('a cut after the restart', async () =>
      cuts.length > cutsBefore ? true : undefined,
    );

    // Disabling stops it on the agent, and the vault sees the stop applied.
    await admin.call('POST', `/api/protected-items/${itemId}/disable`, {});
    await until('the agent to stop the machine', async () =>
      stopped.includes(itemId) ? true : undefined,
    );
    await until('the stop to be applied', async () => {
      const i = await admin.call('GET', `/api/protected-items/${itemId}`);
      return i['appliedGeneration'] === i['generation'] ? true : undefined;
    });
    expect(agent.status().items).toEqual([]);

    // The process server renews its own certificate too, and keeps serving with it.
    const serial = new X509Certificate(ps.identity.cert).serialNumber;
    await ps.renewCertificate();
    expect(new X509Certificate(ps.identity.cert).serialNumber).not.toBe(serial);
    const renewedAgent = await loadComponentIdentity(join(tmp.path, 'agent'));
    expect(renewedAgent?.cert).not.toBe(identity.cert);
    const ok = await new ProcessServerApi({
      ...psAt,
      ca: ps.identity.ca,
      cert: renewedAgent?.cert as string,
      key: renewedAgent?.key as string,
    }).call<{ agentId: string }>('GET', '/agent/v1/assignments');
    expect(ok.agentId).toBe(identity.id);
  }, 240_000);

  it('works with an HTTPS vault that requires component certificates', async () => {
    const secure = await startVault({
      dataDir: join(tmp.path, 'vault-tls'),
      port: 0,
      logLevel: 'silent',
      passwordCost: 1024,
      initialAdmin: { username: 'admin', password: 'admin-password' },
      tls: 'internal',
      requireComponentCertificates: true,
    });
    const managed: { ps?: ManagedProcessServer } = {};
    try {
      expect(secure.url).toMatch(/^https:/);
      const ca = secure.context.ca.certificate;
      const anonymous = new VaultClient({ url: secure.url, tls: { ca } });
      // Without the vault's CA, the client refuses the server's certificate.
      const untrusted = await new VaultClient({ url: secure.url })
        .call('GET', '/api/health')
        .catch((e: unknown) => e);
      expect(isLifeboatError(untrusted) && untrusted.code).toBe('LB_VAULT_CLIENT_UNREACHABLE');
      const login = await anonymous.call('POST', '/api/auth/login', {
        username: 'admin',
        password: 'admin-password',
      });
      const key = await anonymous
        .as(String(login['token']))
        .call('POST', '/api/registration-keys', { kind: 'process-server' });
      managed.ps = await startManagedProcessServer({
        vaultUrl: secure.url,
        vaultCa: ca,
        stateDir: join(tmp.path, 'ps-tls'),
        registrationKey: String(key['key']),
        name: 'ps-tls',
        host: '127.0.0.1',
        port: 0,
        healthPort: null,
        storeWorkerCount: 0,
        intervalMs: 300,
        logLevel: 'silent',
      });
      const id = managed.ps.identity.id;
      // Its heartbeats reach the vault over mutual TLS; a token without the certificate does not.
      await until('the process server to be healthy', async () => {
        const c = await anonymous
          .as(String(login['token']))
          .call('GET', `/api/process-servers/${id}`);
        return c['status'] === 'healthy' ? c : undefined;
      });
      const bare = await anonymous
        .as(managed.ps.identity.token)
        .call('GET', '/api/components/self/assignments')
        .catch((e: unknown) => e);
      expect(isLifeboatError(bare) && bare.code).toBe('LB_VAULT_CLIENT_CERTIFICATE');
    } finally {
      await managed.ps?.close();
      await secure.close();
    }
  }, 120_000);
});
