import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readlink, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { VaultClient } from '@lifeboat/protocol';
import { RecoveryHost, RecoveryHostLink } from '@lifeboat/recovery';
import { DirectoryBackend, Store } from '@lifeboat/store';
import { buildTestImage, testImageAppend, type TestImage } from '@lifeboat/testing';
import { startVault, type Vault } from '@lifeboat/vault';
import {
  adminLogin,
  api,
  markedRoot,
  qemuUnder,
  seedVault,
  waitForJob,
  type SeededMachine,
} from './recovery-fixtures.js';

// A failover through the vault onto the recovery site's network: the protected item's network
// mapping names the recovery host's network "dr-lan", which the host (root, as CI runs)
// declares as a Linux bridge of its own. The recovered machine gets a tap on that bridge, its
// static address from the cloud-init seed, and answers on its port 22 from the host over the
// bridge; once the recovery host has removed it, the tap is gone.

const root = process.getuid?.() === 0;
const suffix = randomBytes(2).toString('hex');
const bridge = `lbfo-${suffix}`;
const testBridge = `lbft-${suffix}`;
const subnet = `10.213.${(parseInt(suffix, 16) % 100) + 20}`;
const testSubnet = `10.213.${(parseInt(suffix, 16) % 100) + 120}`;
let dir: string;
let image: TestImage;
let vault: Vault;
let admin: string;
let store: Store;
let host: RecoveryHost;
let link: RecoveryHostLink;
let web: SeededMachine;
let app: SeededMachine;

describe.skipIf(!root)('failover onto a mapped bridge network through the vault', () => {
  beforeAll(async () => {
    const ip = promisify(execFile);
    for (const [br, net] of [
      [bridge, subnet],
      [testBridge, testSubnet],
    ] as const) {
      await ip('ip', ['link', 'add', br, 'type', 'bridge']);
      await ip('ip', ['addr', 'add', `${net}.1/24`, 'dev', br]);
      await ip('ip', ['link', 'set', br, 'up']);
    }
    dir = await mkdtemp(join(tmpdir(), 'lb-fbn-'));
    image = await buildTestImage();
    const passphrase = 'bridge failover';
    store = await Store.init({
      backend: new DirectoryBackend({ path: join(dir, 'store') }),
      passphrase,
      kdfCost: 1024,
    });
    vault = await startVault({
      dataDir: join(dir, 'vault'),
      port: 0,
      logLevel: 'silent',
      passwordCost: 1024,
      initialAdmin: { username: 'admin', password: 'admin-password' },
    });
    admin = await adminLogin(vault.url);
    const seed = await seedVault(vault.url, admin, store, join(dir, 'store'), passphrase);
    web = await seed.protect('web', await markedRoot(image, dir, 'WEB'));
    app = await seed.protect('app', await markedRoot(image, dir, 'APP'));
    const key = await api<{ key: string }>(vault.url, admin, 'POST', '/api/registration-keys', {
      kind: 'recovery-host',
    });
    const reg = await api<{ token: string }>(vault.url, null, 'POST', '/api/register', {
      key: key.key,
      kind: 'recovery-host',
      name: 'rh-bridge',
    });
    host = await RecoveryHost.start({
      runDir: join(dir, 'run'),
      networks: {
        'dr-lan': { kind: 'bridge', bridge },
        'dr-test': { kind: 'bridge', bridge: testBridge },
      },
    });
    link = new RecoveryHostLink({
      vault: new VaultClient({ url: vault.url, token: reg.token }),
      host,
      openStore: async (s) =>
        Store.open({ backend: new DirectoryBackend({ path: s.path! }), passphrase: s.passphrase }),
      hydrationDir: join(dir, 'disks'),
      kernelDirs: [dirname(image.kernel)],
      defaultBoot: { kernel: image.kernel, append: testImageAppend({ hostname: 'recovered' }) },
      intervalMs: 300,
    });
    link.start();
    await link.sync();
  }, 300_000);

  afterAll(async () => {
    await link?.stop();
    await host?.close();
    await vault?.close();
    await store?.close();
    for (const br of [bridge, testBridge]) {
      await promisify(execFile)('ip', ['link', 'del', br]).catch(() => undefined);
    }
    if (dir !== undefined) {
      expect(await qemuUnder(dir)).toEqual([]);
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('the machine lands on the mapped network with its static address; its port answers over the bridge; the tap goes with it', async () => {
    const mapping = await api(vault.url, admin, 'POST', '/api/network-mappings', {
      name: 'lan',
      sourceNetwork: 'lan',
      targetNetwork: 'dr-lan',
    });
    await api(vault.url, admin, 'PATCH', `/api/protected-items/${web.itemId}`, {
      networkMappingId: mapping['id'],
    });
    const started = await api(vault.url, admin, 'POST', '/api/failovers', {
      protectedItemId: web.itemId,
      address: { address: `${subnet}.10/24`, gateway: `${subnet}.1` },
    });
    const m = (started['machines'] as Array<{ name: string; network: string | null }>)[0]!;
    expect(m.network).toBe('dr-lan');
    const job = await waitForJob(vault.url, admin, String(started['jobId']), 60_000);
    expect(job['state'], JSON.stringify(job['error'])).toBe('succeeded');
    const machine = host.running.get(m.name)!.machine;
    const [tap] = machine.tapDevices;
    expect(basename(await readlink(`/sys/class/net/${tap!}/master`))).toBe(bridge);
    expect(machine.ports.size).toBe(0);
    const banner = await machine.waitForPort(22, 60_000, { expect: /LIFEBOAT-TCP-OK/ });
    expect(banner).toContain(`LIFEBOAT-TCP-OK ${m.name}`);
    await host.removeMachine(m.name);
    expect(existsSync(`/sys/class/net/${tap!}`)).toBe(false);
  }, 90_000);

  it("a test failover uses the mapping's test network: the recovery host verifies the port over that bridge; cleanup removes the tap", async () => {
    const mapping = await api(vault.url, admin, 'POST', '/api/network-mappings', {
      name: 'lan-with-test',
      sourceNetwork: 'lan',
      targetNetwork: 'dr-lan',
      testNetwork: 'dr-test',
    });
    await api(vault.url, admin, 'PATCH', `/api/protected-items/${app.itemId}`, {
      networkMappingId: mapping['id'],
    });
    const started = await api(vault.url, admin, 'POST', '/api/test-failovers', {
      protectedItemIds: [app.itemId],
      addresses: [{ protectedItemId: app.itemId, address: `${testSubnet}.20/24` }],
      verify: { guestPort: 22, expect: 'LIFEBOAT-TCP-OK', screenshot: false },
    });
    const m = (started['machines'] as Array<{ name: string; network: string | null }>)[0]!;
    expect(m.network).toBe('dr-test');
    const job = await waitForJob(vault.url, admin, String(started['jobId']), 60_000);
    expect(job['state'], JSON.stringify(job['error'])).toBe('succeeded');
    const steps = job['steps'] as Array<{ name: string; detail?: Record<string, unknown> }>;
    expect(steps.find((s) => s.name === `boot ${m.name}`)?.detail?.['network']).toBe(
      `bridge ${testBridge}`,
    );
    const port = steps.find((s) => s.name === `port 22 of ${m.name}`)!;
    expect(String(port.detail?.['answer'])).toContain(`LIFEBOAT-TCP-OK ${m.name}`);
    const [tap] = host.running.get(m.name)!.machine.tapDevices;
    expect(basename(await readlink(`/sys/class/net/${tap!}/master`))).toBe(testBridge);
    const cleanup = await api(
      vault.url,
      admin,
      'POST',
      `/api/test-failovers/${String(started['id'])}/cleanup`,
    );
    const cleaned = await waitForJob(vault.url, admin, String(cleanup['jobId']), 30_000);
    expect(cleaned['state']).toBe('succeeded');
    expect(JSON.stringify(cleaned['steps'])).toContain(`tap ${tap!}`);
    expect(existsSync(`/sys/class/net/${tap!}`)).toBe(false);
  }, 90_000);
});
