import { execFile } from 'node:child_process';
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildSeedDisk, networkConfig } from './seed-disk.js';

const run = promisify(execFile);
let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lb-seed-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('cloud-init NoCloud seed disk', () => {
  it('is an ISO labelled cidata with meta-data, user-data and the static address in network-config', async () => {
    const iso = await buildSeedDisk({
      dir,
      instanceId: 'web-failover-1',
      hostname: 'web',
      addresses: [
        {
          mac: '52:54:00:AA:BB:CC',
          address: '10.1.2.3/24',
          gateway: '10.1.2.1',
          nameservers: ['10.1.2.53'],
        },
      ],
    });
    const { stdout: pvd } = await run('isoinfo', ['-d', '-i', iso]);
    expect(pvd).toMatch(/Volume id: cidata/);
    const file = async (name: string) =>
      (await run('isoinfo', ['-i', iso, '-J', '-x', `/${name}`])).stdout;
    expect(await file('meta-data')).toBe('instance-id: web-failover-1\nlocal-hostname: web\n');
    expect(await file('user-data')).toMatch(/^#cloud-config/);
    const net = await file('network-config');
    expect(net).toBe(
      networkConfig([
        {
          mac: '52:54:00:aa:bb:cc',
          address: '10.1.2.3/24',
          gateway: '10.1.2.1',
          nameservers: ['10.1.2.53'],
        },
      ]),
    );
    expect(net).toContain('macaddress: "52:54:00:aa:bb:cc"');
    expect(net).toContain('addresses: ["10.1.2.3/24"]');
    expect(net).toContain('via: 10.1.2.1');
  });

  it("is read by the real cloud-init (Debian's package): the NIC of the mapped MAC gets the static address, gateway and DNS", async () => {
    // The guests that run cloud-init read network-config (version 2) with this parser; here
    // its own converter renders what it would write to the guest's systemd-networkd and
    // ifupdown. No guest in the tests runs cloud-init (the test image is busybox: its init
    // applies the same document itself, see packages/testing/scripts/guest-init.sh).
    await run('cloud-init', ['--version']).catch((cause: unknown) => {
      throw new Error(
        'cloud-init is not installed: run scripts/install-deps.sh (Debian package cloud-init)',
        { cause },
      );
    });
    const iso = await buildSeedDisk({
      dir,
      instanceId: 'db-failover-1',
      hostname: 'db',
      addresses: [
        {
          mac: '52:54:00:12:34:56',
          address: '10.20.0.7/24',
          gateway: '10.20.0.1',
          nameservers: ['10.20.0.53'],
        },
        { mac: '52:54:00:65:43:21', address: '192.168.7.7/16' },
      ],
    });
    // The document as the guest finds it on the CD-ROM.
    const seeded = join(dir, 'network-config-from-iso');
    await writeFile(
      seeded,
      (await run('isoinfo', ['-i', iso, '-J', '-x', '/network-config'])).stdout,
    );
    const rendered = async (kind: 'networkd' | 'eni'): Promise<string> => {
      const out = join(dir, `net-${kind}`);
      const { stderr } = await run('cloud-init', [
        'devel',
        'net-convert',
        '--network-data',
        seeded,
        '--kind',
        'yaml',
        '--output-kind',
        kind,
        '--distro',
        'debian',
        '--directory',
        out,
        // The guest's NICs, as the kernel would name them before set-name renames them.
        '--mac',
        'ens3,52:54:00:12:34:56',
        '--mac',
        'ens4,52:54:00:65:43:21',
      ]);
      expect(stderr).not.toMatch(/error|warn/i);
      const files: string[] = [];
      const walk = async (d: string): Promise<void> => {
        for (const e of await readdir(d, { withFileTypes: true })) {
          if (e.isDirectory()) await walk(join(d, e.name));
          else files.push(join(d, e.name));
        }
      };
      await walk(out);
      return (await Promise.all(files.sort().map((f) => readFile(f, 'utf8')))).join('\n');
    };
    const networkd = await rendered('networkd');
    expect(networkd).toMatch(/\[Match\]\s+MACAddress=52:54:00:12:34:56\s+Name=eth0/);
    expect(networkd).toMatch(/Address=10\.20\.0\.7\/24/);
    expect(networkd).toMatch(/Gateway=10\.20\.0\.1/);
    expect(networkd).toMatch(/DNS=10\.20\.0\.53/);
    expect(networkd).toMatch(/DHCP=no/);
    expect(networkd).toMatch(/MACAddress=52:54:00:65:43:21\s+Name=eth1/);
    expect(networkd).toMatch(/Address=192\.168\.7\.7\/16/);
    const eni = await rendered('eni');
    expect(eni).toMatch(/iface eth0 inet static\s+address 10\.20\.0\.7\/24/);
    expect(eni).toMatch(/route add default gw 10\.20\.0\.1/);
    // ... and names the NIC of that MAC eth0 before ifupdown configures it.
    expect(eni).toMatch(/ATTR\{address\}=="52:54:00:12:34:56", NAME="eth0"/);
    expect(eni).toMatch(/iface eth1 inet static\s+address 192\.168\.7\.7\/16/);
  });

  it('refuses a bad address, MAC or instance id with LB_RECOVERY_BAD_NETWORK', async () => {
    for (const addresses of [
      [{ mac: '52:54:00:aa:bb:cc', address: '10.1.2.300/24' }],
      [{ mac: '52:54:00:aa:bb:cc', address: '10.1.2.3' }],
      [{ mac: 'nope', address: '10.1.2.3/24' }],
      [{ mac: '52:54:00:aa:bb:cc', address: '10.1.2.3/24', gateway: 'gw' }],
    ]) {
      await expect(buildSeedDisk({ dir, instanceId: 'x', addresses })).rejects.toMatchObject({
        code: 'LB_RECOVERY_BAD_NETWORK',
      });
    }
    await expect(buildSeedDisk({ dir, instanceId: 'a b' })).rejects.toMatchObject({
      code: 'LB_RECOVERY_BAD_NETWORK',
    });
  });
});
