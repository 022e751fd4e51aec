import { storeError } from './store-error.js';
import type { PointInfo, RetentionPolicy } from './store-types.js';

const UNITS: Record<string, number> = {
  s: 1000,
  m: 60_000,
  h: 3_600_000,
  d: 86_400_000,
  w: 604_800_000,
};

/** Parses `90s`, `15m`, `24h`, `7d`, `4w` into milliseconds. */
export function parseDuration(text: string): number {
  const m = /^(\d+)([smhdw])$/.exec(typeof text === 'string' ? text.trim() : '');
  const unit = m === null ? undefined : UNITS[m[2] as string];
  if (m === null || unit === undefined || Number(m[1]) <= 0) {
    throw storeError(
      'LB_STORE_INVALID_POLICY',
      `${JSON.stringify(text)} is not a duration. Use a positive number followed by s, m, h, d or w (e.g. 24h, 7d).`,
      { duration: text },
    );
  }
  return Number(m[1]) * unit;
}

/**
 * Which points of ONE disk a policy keeps. Ages are measured from the disk's newest point (not
 * from the clock), so a disk whose replication stopped keeps its history instead of thinning
 * down to one point. In a rule with `every`, time is cut into buckets of that length aligned
 * to the epoch and the newest point of each bucket is kept. The newest point is always kept.
 */
export function selectKept(
  points: readonly PointInfo[],
  policy: RetentionPolicy,
  now: Date,
): Set<string> {
  if (typeof policy !== 'object' || policy === null || !Array.isArray(policy.rules)) {
    throw storeError('LB_STORE_INVALID_POLICY', 'A retention policy needs a rules array.', {});
  }
  const rules = policy.rules.map((r) => ({
    for: parseDuration(r.for),
    every: r.every === undefined ? undefined : parseDuration(r.every),
  }));
  const appFor =
    policy.keepAppConsistentFor === undefined
      ? undefined
      : parseDuration(policy.keepAppConsistentFor);
  const kept = new Set<string>();
  if (points.length === 0) return kept;
  const sorted = [...points].sort(
    (a, b) => a.time.getTime() - b.time.getTime() || (a.id < b.id ? -1 : 1),
  );
  const newest = sorted[sorted.length - 1] as PointInfo;
  kept.add(newest.id);
  const ref = Math.min(newest.time.getTime(), now.getTime());
  const age = (p: PointInfo): number => Math.max(0, ref - p.time.getTime());
  for (const p of sorted)
    if (appFor !== undefined && p.kind === 'app' && age(p) <= appFor) kept.add(p.id);
  for (const rule of rules) {
    const bucketNewest = new Map<number, PointInfo>();
    for (const p of sorted) {
      if (age(p) > rule.for) continue;
      if (rule.every === undefined) {
        kept.add(p.id);
        continue;
      }
      // Sorted oldest first, so the last one set per bucket is the bucket's newest.
      bucketNewest.set(Math.floor(p.time.getTime() / rule.every), p);
    }
    for (const p of bucketNewest.values()) kept.add(p.id);
  }
  return kept;
}
