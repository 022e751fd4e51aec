import { LifeboatError } from '@lifeboat/protocol';
import type { PointInfo, StoreApi } from '@lifeboat/store';

/**
 * Which recovery point to boot: a point id, the latest, the latest app-consistent, or the
 * latest at or before a time; for a machine (and disk), or for every machine of a consistency
 * group (then one point per disk, all from the newest cut every disk of the group has).
 */
export interface PointSelector {
  /** A point id; every other field is ignored. */
  pointId?: string;
  machine?: string;
  disk?: string;
  consistencyGroup?: string;
  /** @default 'latest' */
  pick?: 'latest' | 'latest-app';
  /** Latest at or before this time. */
  at?: Date;
}

/** Chooses the point(s) a selector names; several for a machine's disks or a group's. */
export async function selectPoints(store: StoreApi, sel: PointSelector): Promise<PointInfo[]> {
  if (sel.pointId !== undefined) return [await store.getPoint(sel.pointId)];
  if (sel.machine === undefined && sel.consistencyGroup === undefined) {
    throw new LifeboatError(
      'LB_RECOVERY_BAD_SELECTOR',
      'Name a point id, a machine or a consistency group to choose a recovery point.',
    );
  }
  const points = await store.listPoints({
    ...(sel.machine !== undefined ? { machine: sel.machine } : {}),
    ...(sel.disk !== undefined ? { disk: sel.disk } : {}),
    ...(sel.consistencyGroup !== undefined ? { consistencyGroup: sel.consistencyGroup } : {}),
    ...(sel.pick === 'latest-app' ? { kind: 'app' as const } : {}),
    ...(sel.at !== undefined ? { until: sel.at } : {}),
  });
  // Disks of a machine (and machines of a group) must come from one cut, or the recovered
  // set is not consistent: take the newest cut that covers every disk seen.
  const disks = new Set(points.map((p) => `${p.machine}/${p.disk}`));
  const byCut = new Map<string, PointInfo[]>();
  for (const p of points) {
    const key = p.cut ?? `${p.machine}/${p.disk}@${p.id}`;
    byCut.set(key, [...(byCut.get(key) ?? []), p]);
  }
  const complete = [...byCut.values()]
    .filter((ps) => new Set(ps.map((p) => `${p.machine}/${p.disk}`)).size === disks.size)
    .sort((a, b) => b[0]!.time.getTime() - a[0]!.time.getTime());
  const chosen = complete[0];
  if (!chosen || disks.size === 0) {
    const what = describe(sel);
    throw new LifeboatError(
      'LB_RECOVERY_NO_POINT',
      disks.size === 0
        ? `No recovery point matches ${what}. List the points (lifeboat points) and choose another.`
        : `No single cut covers every disk of ${what}. Choose a point id per disk, or an earlier time.`,
      { details: { selector: { ...sel, at: sel.at?.toISOString() } } },
    );
  }
  return chosen.sort((a, b) => a.machine.localeCompare(b.machine) || a.disk.localeCompare(b.disk));
}

function describe(sel: PointSelector): string {
  const parts = [
    sel.consistencyGroup !== undefined ? `consistency group ${sel.consistencyGroup}` : undefined,
    sel.machine !== undefined ? `machine ${sel.machine}` : undefined,
    sel.disk !== undefined ? `disk ${sel.disk}` : undefined,
    sel.pick === 'latest-app' ? 'app-consistent' : undefined,
    sel.at !== undefined ? `at or before ${sel.at.toISOString()}` : undefined,
  ].filter((p) => p !== undefined);
  return parts.join(', ');
}
