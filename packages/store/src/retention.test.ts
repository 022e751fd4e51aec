import { describe, expect, it } from 'vitest';
import { isLifeboatError } from '@lifeboat/protocol';
import { parseDuration, selectKept } from './retention.js';
import type { PointInfo } from './store-types.js';

const H = 3_600_000;
const T0 = Date.UTC(2026, 10, 1);

function pt(id: string, hoursAfterT0: number, kind: 'crash' | 'app' = 'crash'): PointInfo {
  const time = new Date(T0 + hoursAfterT0 * H);
  return { id, machine: 'm', disk: 'd', time, committedAt: time, kind, size: 512, labels: {} };
}

describe('retention', () => {
  it('parses durations and rejects bad ones', () => {
    expect(parseDuration('90s')).toBe(90_000);
    expect(parseDuration('24h')).toBe(24 * H);
    expect(parseDuration('2w')).toBe(14 * 24 * H);
    for (const bad of ['', '5', 'h', '-1h', '1y', '0h']) {
      expect(() => parseDuration(bad)).toThrow();
      try {
        parseDuration(bad);
      } catch (err) {
        expect(isLifeboatError(err, 'LB_STORE_INVALID_POLICY')).toBe(true);
      }
    }
  });

  it('keeps all recent points, one per hour after that, and always the newest', () => {
    // Points every 15 minutes for 6 hours.
    const points = Array.from({ length: 25 }, (_, i) => pt(`p${i}`, i / 4));
    const kept = selectKept(
      points,
      { rules: [{ for: '1h' }, { for: '6h', every: '1h' }] },
      new Date(T0 + 6 * H),
    );
    // Last hour: p20..p24 (ages 0..60 min); hourly buckets keep the newest of each hour.
    for (const id of ['p20', 'p21', 'p22', 'p23', 'p24']) expect(kept.has(id)).toBe(true);
    for (const id of ['p3', 'p7', 'p11', 'p15', 'p19']) expect(kept.has(id)).toBe(true);
    expect(kept.has('p1')).toBe(false);
    expect(kept.has('p0')).toBe(false); // its hour's newest is p3
    expect(kept.size).toBe(10);
  });

  it('measures ages from the newest point, so a stalled disk keeps its history', () => {
    const points = [pt('a', 0), pt('b', 1), pt('c', 2)];
    const kept = selectKept(points, { rules: [{ for: '24h' }] }, new Date(T0 + 1000 * H));
    expect([...kept].sort()).toEqual(['a', 'b', 'c']);
    const tight = selectKept(points, { rules: [{ for: '30m' }] }, new Date(T0 + 1000 * H));
    expect([...tight]).toEqual(['c']);
  });

  it('keeps app-consistent points for keepAppConsistentFor', () => {
    const points = [pt('a', 0, 'app'), pt('b', 1), pt('c', 50)];
    const kept = selectKept(
      points,
      { rules: [{ for: '1h' }], keepAppConsistentFor: '3d' },
      new Date(T0 + 50 * H),
    );
    expect([...kept].sort()).toEqual(['a', 'c']);
  });
});
