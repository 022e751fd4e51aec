import { describe, expect, it } from 'vitest';
import { mapNetworks } from './network-mapping.js';
import { machineMac } from './recovery-machine.js';
import { networkConfig } from './seed-disk.js';

describe('mapNetworks', () => {
  it('puts each NIC on its mapped network with its static address, keeping or deriving MACs', () => {
    const r = mapNetworks(
      'web',
      [{ network: 'prod', mac: '52:54:00:12:34:56' }, { network: 'backup' }],
      [
        {
          source: 'prod',
          target: { kind: 'isolated-user', forwardPorts: [22] },
          addresses: { '52:54:00:12:34:56': { address: '10.0.5.10/24', gateway: '10.0.5.1' } },
        },
        {
          source: 'backup',
          target: { kind: 'isolated-user' },
          addresses: { '*': { address: '10.9.0.10/16' } },
        },
      ],
    );
    expect(r.nics).toEqual([
      { kind: 'isolated-user', forwardPorts: [22], mac: '52:54:00:12:34:56' },
      { kind: 'isolated-user', mac: machineMac('web', 1) },
    ]);
    expect(r.addresses).toEqual([
      { mac: '52:54:00:12:34:56', address: '10.0.5.10/24', gateway: '10.0.5.1' },
      { mac: machineMac('web', 1), address: '10.9.0.10/16' },
    ]);
    expect(networkConfig(r.addresses)).toContain('via: 10.0.5.1');
  });

  it('refuses a NIC whose network has no mapping', () => {
    expect(() => mapNetworks('web', [{ network: 'dmz' }], [])).toThrow(
      expect.objectContaining({ code: 'LB_RECOVERY_BAD_NETWORK' }),
    );
  });
});
