import type { RecoveryPointRow } from '../db/schema.js';
import type { VaultContext } from '../vault-context.js';
import type { Principal } from './principal.js';
import { transition } from './protection.js';

/** A committed point as the process server (or the store) describes it. */
export interface PointInput {
  id: string;
  machine: string;
  disk: string;
  time: string | Date;
  committedAt: string | Date;
  kind: string;
  size: number;
  cut?: string | undefined;
  consistencyGroup?: string | undefined;
  labels?: Record<string, string> | undefined;
  parent?: string | undefined;
}

const BATCH = 500;

/**
 * Upserts points of one target store into the catalogue, links them to the active protected
 * item of their machine (the store's `machine` is the vault's machine id), moves each disk's
 * and item's newest point forward, and completes initial replication once every disk of an
 * item has a point.
 */
export async function upsertPoints(
  vault: VaultContext,
  targetStoreId: string,
  points: PointInput[],
  actor: Principal,
): Promise<{ upserted: number; matched: number }> {
  const { db } = vault;
  let matched = 0;
  const touched = new Map<string, Awaited<ReturnType<typeof loadItems>>[number]>();
  const loadItems = (machines: string[]) =>
    db
      .selectFrom('protectedItems')
      .selectAll()
      .where('machineId', 'in', machines)
      .where('targetStoreId', '=', targetStoreId)
      .where('activeKey', 'is not', null)
      .execute();
  for (let start = 0; start < points.length; start += BATCH) {
    const batch = points.slice(start, start + BATCH);
    const items = await loadItems([...new Set(batch.map((pt) => pt.machine))]);
    const byMachine = new Map(items.map((i) => [i.machineId, i]));
    for (const i of items) touched.set(i.id, i);
    const rows: RecoveryPointRow[] = batch.map((pt) => ({
      id: pt.id,
      targetStoreId,
      protectedItemId: byMachine.get(pt.machine)?.id ?? null,
      machine: pt.machine,
      disk: pt.disk,
      time: new Date(pt.time).toISOString(),
      committedAt: new Date(pt.committedAt).toISOString(),
      kind: pt.kind,
      size: pt.size,
      cut: pt.cut ?? null,
      consistencyGroup: pt.consistencyGroup ?? null,
      labels: JSON.stringify(pt.labels ?? {}),
      parent: pt.parent ?? null,
    }));
    matched += rows.filter((r) => r.protectedItemId !== null).length;
    await db.transaction().execute(async (tx) => {
      for (const row of rows) {
        await tx
          .insertInto('recoveryPoints')
          .values(row)
          .onConflict((oc) =>
            oc.columns(['targetStoreId', 'id']).doUpdateSet({
              protectedItemId: row.protectedItemId,
              time: row.time,
              committedAt: row.committedAt,
              kind: row.kind,
              size: row.size,
              cut: row.cut,
              consistencyGroup: row.consistencyGroup,
              labels: row.labels,
              parent: row.parent,
            }),
          )
          .execute();
        if (row.protectedItemId !== null) {
          await tx
            .updateTable('protectedDisks')
            .set({ lastPointAt: row.time })
            .where('protectedItemId', '=', row.protectedItemId)
            .where('name', '=', row.disk)
            .where((eb) => eb.or([eb('lastPointAt', 'is', null), eb('lastPointAt', '<', row.time)]))
            .execute();
        }
      }
    });
  }
  for (const item of touched.values()) {
    const disks = await db
      .selectFrom('protectedDisks')
      .select(['lastPointAt'])
      .where('protectedItemId', '=', item.id)
      .execute();
    const times = disks.map((d) => d.lastPointAt);
    // The item's RPO is that of its oldest disk: a machine is only as recent as its stalest disk.
    const oldest = times.includes(null) ? null : ((times as string[]).sort()[0] ?? null);
    await db
      .updateTable('protectedItems')
      .set({ lastPointAt: oldest })
      .where('id', '=', item.id)
      .execute();
    if (oldest !== null && item.state === 'initial-replication') {
      await transition(
        vault,
        item,
        'protected',
        'initial replication finished: every disk has a point',
        actor,
      ).catch(() => undefined);
    }
  }
  return { upserted: points.length, matched };
}
