import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
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
