import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { readlink } from 'node:fs/promises';
import { basename } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { RecoveryHost } from '@lifeboat/recovery';
import type { Vault } from '@lifeboat/vault';
import {
  api,
  markedRoot,
  startRecoverySite,
  waitForJob,
  type RecoverySite,
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
let site: RecoverySite | undefined;
let vault: Vault;
let admin: string;
let host: RecoveryHost;
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
    site = await startRecoverySite('lb-fbn-', 'bridge failover');
    ({ vault, admin } = site);
    web = await site.seed.protect('web', await markedRoot(site.image, site.dir, 'WEB'));
    app = await site.seed.protect('app', await markedRoot(site.image, site.dir, 'APP'));
    ({ host } = await site.addRecoveryHost('rh-bridge', {
      networks: {
        'dr-lan': { kind: 'bridge', bridge },
        'dr-test': { kind: 'bridge', bridge: testBridge },
      },
    }));
  }, 300_000);

  afterAll(async () => {
    const left = await site?.close();
    for (const br of [bridge, testBridge]) {
      await promisify(execFile)('ip', ['link', 'del', br]).catch(() => undefined);
    }
    expect(left ?? []).toEqual([]);
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
