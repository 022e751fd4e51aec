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
const subnet = `10.213.${(parseInt(suffix, 16) % 200) + 20}`;
let dir: string;
let image: TestImage;
let vault: Vault;
let admin: string;
let store: Store;
let host: RecoveryHost;
let link: RecoveryHostLink;
let web: SeededMachine;

describe.skipIf(!root)('failover onto a mapped bridge network through the vault', () => {
  beforeAll(async () => {
    const ip = promisify(execFile);
    await ip('ip', ['link', 'add', bridge, 'type', 'bridge']);
    await ip('ip', ['addr', 'add', `${subnet}.1/24`, 'dev', bridge]);
    await ip('ip', ['link', 'set', bridge, 'up']);
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
      networks: { 'dr-lan': { kind: 'bridge', bridge } },
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
    await promisify(execFile)('ip', ['link', 'del', bridge]).catch(() => undefined);
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
});
