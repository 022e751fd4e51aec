import { describe, expect, it } from 'vitest';
import {
  parseNetworkOption,
  parseNetworkOptions,
  resolveRecoveryHostOptions,
} from './recovery-host-options.js';

describe('recovery host networks', () => {
  it('parses NAME=bridge:BR, repeated, into networks by name', () => {
    expect(parseNetworkOption('prod=bridge:br0')).toEqual([
      'prod',
      { kind: 'bridge', bridge: 'br0' },
    ]);
    expect(parseNetworkOptions(['prod=bridge:br0', 'dr-test=bridge:lb-test.10'])).toEqual({
      prod: { kind: 'bridge', bridge: 'br0' },
      'dr-test': { kind: 'bridge', bridge: 'lb-test.10' },
    });
  });

  it.each([
    ['prod', /NAME=bridge:BRIDGE/],
    ['prod=br0', /NAME=bridge:BRIDGE/],
    ['prod=vlan:br0', /only network kind is bridge/],
    ['prod=bridge:a-bridge-name-too-long', /not a Linux interface name/],
    ['prod=bridge:br/0', /not a Linux interface name/],
    ['-x=bridge:br0', /must be 1-63 letters/],
    ['segment=bridge:br0', /built-in isolated network/],
    ['isolated-user=bridge:br0', /built-in isolated network/],
  ])('refuses %s with LB_RECOVERY_BAD_OPTION', (value, message) => {
    let err: unknown;
    try {
      parseNetworkOption(value);
    } catch (e) {
      err = e;
    }
    expect(err).toMatchObject({ code: 'LB_RECOVERY_BAD_OPTION' });
    expect((err as Error).message).toMatch(message);
  });

  it('refuses a name given twice', () => {
    expect(() => parseNetworkOptions(['a=bridge:br0', 'a=bridge:br1'])).toThrow(/given twice/);
  });

  it('validates networks given as options, and defaults to none', () => {
    expect(resolveRecoveryHostOptions({ runDir: '/tmp/x' }).networks).toEqual({});
    expect(
      resolveRecoveryHostOptions({
        runDir: '/tmp/x',
        networks: { prod: { kind: 'bridge', bridge: 'br0' } },
      }).networks,
    ).toEqual({ prod: { kind: 'bridge', bridge: 'br0' } });
    expect(() =>
      resolveRecoveryHostOptions({
        runDir: '/tmp/x',
        networks: { prod: { kind: 'bridge', bridge: '' } },
      }),
    ).toThrow(expect.objectContaining({ code: 'LB_RECOVERY_BAD_OPTION' }) as Error);
  });
});
