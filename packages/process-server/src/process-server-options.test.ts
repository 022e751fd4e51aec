import { describe, expect, it } from 'vitest';
import { resolveProcessServerOptions } from './process-server-options.js';
import { TokenBucket } from './token-bucket.js';

const tls = { cert: 'c', key: 'k', ca: 'a' };
const spec = { kind: 'directory' as const, path: '/x', passphrase: 'p' };

describe('process server options', () => {
  it('fills defaults once and freezes them', () => {
    const o = resolveProcessServerOptions({ storeWorkers: { spec }, journalDir: '/j', tls });
    expect(o.port).toBe(9443);
    expect(o.healthPort).toBe(9444);
    expect(o.healthHost).toBe('127.0.0.1');
    expect(o.journalMaxBytes).toBe(1024 ** 3);
    expect(Object.isFrozen(o)).toBe(true);
  });

  it('rejects what cannot work, naming the option', () => {
    const bad = (extra: object): unknown => {
      try {
        resolveProcessServerOptions({ storeWorkers: { spec }, journalDir: '/j', tls, ...extra });
        return undefined;
      } catch (err) {
        return err;
      }
    };
    expect(bad({ tls: { cert: 'c', key: 'k' } })).toMatchObject({ code: 'LB_PS_INVALID_OPTIONS' });
    expect(bad({ port: 70000 })).toMatchObject({ code: 'LB_PS_INVALID_OPTIONS' });
    expect(bad({ journalMaxBytes: 1024 })).toMatchObject({ code: 'LB_PS_INVALID_OPTIONS' });
    expect(bad({ bandwidthBytesPerSecond: -1 })).toMatchObject({ code: 'LB_PS_INVALID_OPTIONS' });
    expect(bad({ store: {} as never })).toMatchObject({
      code: 'LB_PS_INVALID_OPTIONS',
      message: /exactly one of store and storeWorkers/,
    });
  });
});

describe('TokenBucket', () => {
  it('lets a burst of one second through, then asks for a pause proportional to the excess', () => {
    const b = new TokenBucket(1000);
    expect(b.take(1000)).toBe(0);
    const wait = b.take(500);
    expect(wait).toBeGreaterThan(400);
    expect(wait).toBeLessThanOrEqual(500);
  });

  it('is unlimited at 0 and follows rate changes', () => {
    const b = new TokenBucket(0);
    expect(b.take(1e12)).toBe(0);
    b.setRate(100);
    expect(b.take(300)).toBeGreaterThan(0);
    b.setRate(0);
    expect(b.take(1e9)).toBe(0);
  });
});
