import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GuestAgentClient } from '@lifeboat/qmp';
import { machineMac, type RecoveryHost } from '@lifeboat/recovery';
import type { Vault } from '@lifeboat/vault';
import {
  api,
  markedRoot,
  startRecoverySite,
  waitForJob,
  type RecoverySite,
  type SeededMachine,
} from './recovery-fixtures.js';

// A test failover of a consistency group through the vault: both machines boot on one isolated
// segment, each gets the static address the vault mapped for it through its cloud-init NoCloud
// seed disk (the test image's init applies it as a minimal stand-in for cloud-init, matched by
// MAC; seed-disk.test.ts checks real cloud-init reads the same document), and one reaches the
// other's port at that address, and nothing else.

let site: RecoverySite;
let vault: Vault;
let admin: string;
let host: RecoveryHost;
let app: SeededMachine;
let db: SeededMachine;

beforeAll(async () => {
  site = await startRecoverySite('lb-tfg-', 'group test failover');
  ({ vault, admin } = site);
  app = await site.seed.protect('app', await markedRoot(site.image, site.dir, 'APP'), {
    consistencyGroup: 'shop',
  });
  db = await site.seed.protect('db', await markedRoot(site.image, site.dir, 'DB'), {
    consistencyGroup: 'shop',
  });
  ({ host } = await site.addRecoveryHost('rh-group'));
}, 300_000);
afterAll(async () => {
  expect(await site?.close()).toEqual([]);
});

describe('test failover of a consistency group with mapped addresses', () => {
  it('boots both machines on one segment with their static addresses from the seed; each reaches the other at its address and nothing else', async () => {
    const started = await api(vault.url, admin, 'POST', '/api/test-failovers', {
      consistencyGroup: 'shop',
      addresses: [
        { protectedItemId: app.itemId, address: '10.9.0.1/24' },
        { protectedItemId: db.itemId, address: '10.9.0.2/24', gateway: '10.9.0.254' },
      ],
      verify: { console: 'LIFEBOAT-READY', screenshot: false },
    });
    expect(started['network']).toBe('segment');
    const job = await waitForJob(vault.url, admin, String(started['jobId']));
    expect(job['state'], JSON.stringify(job['error'])).toBe('succeeded');
    const names = (started['machines'] as Array<{ name: string; protectedItemId: string }>).map(
      (m) => m.name,
    );
    expect(names).toHaveLength(2);
    const [appName, dbName] = names as [string, string];
    try {
      const agents: GuestAgentClient[] = [];
      const machines = names.map((n) => host.running.get(n)!.machine);
      // Each NIC (MAC derived from the machine's name) got the address mapped for its item.
      const [appVm, dbVm] = machines as [(typeof machines)[0], (typeof machines)[0]];
      await appVm.waitForConsole(
        new RegExp(`LIFEBOAT-NET-SEED eth0 ${machineMac(appName, 0)} 10\\.9\\.0\\.1/24`),
        60_000,
      );
      await dbVm.waitForConsole(
        new RegExp(`LIFEBOAT-NET-SEED eth0 ${machineMac(dbName, 0)} 10\\.9\\.0\\.2/24`),
        60_000,
      );
      // The seed's host name (meta-data local-hostname), as cloud-init would set it.
      await appVm.waitForConsole(new RegExp(`LIFEBOAT-SEED /dev/vda ${appName}`), 10_000);
      for (const m of machines) {
        const a = new GuestAgentClient(m.qgaSocket!, 15_000);
        agents.push(a);
        await a.waitUntilReady(120_000);
        expect(await m.listening()).toEqual([]);
      }
      const connectTo = (a: GuestAgentClient, ip: string, port: number) =>
        a.exec('/bin/nc', ['-w', '3', ip, String(port)], 30_000);
      expect((await connectTo(agents[0]!, '10.9.0.2', 22)).stdout).toContain(
        `LIFEBOAT-TCP-OK ${dbName}`,
      );
      expect((await connectTo(agents[1]!, '10.9.0.1', 22)).stdout).toContain(
        `LIFEBOAT-TCP-OK ${appName}`,
      );
      // The gateway the vault mapped is configured, but nothing answers behind it.
      const route = await agents[1]!.exec('/bin/ip', ['route'], 30_000);
      expect(route.stdout).toMatch(/default via 10\.9\.0\.254 dev eth0/);
      for (const ip of ['10.9.0.254', '10.0.2.2', '192.0.2.1']) {
        const r = await connectTo(agents[0]!, ip, 22);
        expect(r.stdout).toBe('');
      }
    } finally {
      const cleanup = await api(
        vault.url,
        admin,
        'POST',
        `/api/test-failovers/${String(started['id'])}/cleanup`,
      );
      expect((await waitForJob(vault.url, admin, String(cleanup['jobId'])))['state']).toBe(
        'succeeded',
      );
    }
    expect(host.running.size).toBe(0);
  }, 420_000);
});
