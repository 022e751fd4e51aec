import { describe, expect, it } from 'vitest';
import type { Component, NetworkMapping, ProtectedItem } from '../types';
import { mappedNetworks, networkErrors, networkWords } from './recovery-fields';

const mapping = (
  id: string,
  targetNetwork: string,
  testNetwork: string | null,
): NetworkMapping => ({
  id,
  name: `map-${id}`,
  sourceNetwork: 'lan',
  targetNetwork,
  testNetwork,
});
const item = (id: string, networkMappingId: string | null) =>
  ({ id, networkMappingId }) as ProtectedItem;
const host = (id: string, status: string, networks?: unknown[]): Component => ({
  id,
  kind: 'recovery-host',
  name: id,
  status,
  lastHeartbeatAt: null,
  health: networks === undefined ? {} : { networks },
});

describe('the wizards’ mapped networks (the vault’s rules)', () => {
  const maps = [mapping('m1', 'dr-lan', 'dr-test'), mapping('m2', 'dr-lan', null)];
  const items = [item('a', 'm1'), item('b', 'm2'), item('c', null)];

  it('a failover takes the target network, a test failover the test network unless one is chosen', () => {
    expect(mappedNetworks('failover', items, maps).map((n) => [n.itemId, n.network])).toEqual([
      ['a', 'dr-lan'],
      ['b', 'dr-lan'],
    ]);
    expect(mappedNetworks('test-failover', items, maps).map((n) => [n.itemId, n.network])).toEqual([
      ['a', 'dr-test'],
    ]);
    expect(mappedNetworks('test-failover', items, maps, true)).toEqual([]);
    // A mapping that names the built-in isolated network needs no bridge.
    expect(
      mappedNetworks('failover', [item('d', 'm3')], [mapping('m3', 'isolated', null)]),
    ).toEqual([]);
  });

  it('names the host that lacks the network or its bridge', () => {
    const needs = mappedNetworks('failover', items, maps);
    const hosts = [
      host('rh1', 'healthy', [{ name: 'other', present: true }]),
      host('rh2', 'healthy', [{ name: 'dr-lan', present: false }]),
    ];
    expect(networkErrors(needs, '', hosts)['network']).toContain(
      'No healthy recovery host has network dr-lan',
    );
    expect(networkErrors(needs, 'rh1', hosts)['network']).toContain(
      'rh1 has no network dr-lan (it has other)',
    );
    expect(networkErrors(needs, 'rh2', hosts)['network']).toContain('its bridge does not exist');
    const ok = [...hosts, host('rh3', 'healthy', [{ name: 'dr-lan', present: true }])];
    expect(networkErrors(needs, '', ok)).toEqual({});
    expect(networkErrors(needs, 'rh3', ok)).toEqual({});
    expect(networkErrors([], 'rh1', hosts)).toEqual({});
  });

  it('says which machine boots where', () => {
    const needs = mappedNetworks('test-failover', items, maps);
    expect(networkWords(needs, 3, (id) => `vm-${id}`, 'A private segment')).toBe(
      'vm-a: dr-test (mapping map-m1); the other 2 machines: a private segment',
    );
    expect(networkWords([], 1, String, 'No network')).toBe('No network');
  });
});
