import { LifeboatError } from '@lifeboat/protocol';
import type { RetentionPolicy } from '@lifeboat/store';
import { upsertPoints } from '../services/catalogue.js';
import { SYSTEM } from '../services/principal.js';
import { transition } from '../services/protection.js';
import type { JobHandler } from './job-handler.js';
import { openTargetStore } from './open-target-store.js';

/**
 * enable-replication: hands the item to its process server (desired state it polls), waits for
 * it to take the item (enabling → initial-replication), then for every disk's first point
 * (→ protected). Only waits and checks, so it resumes safely after a vault restart.
 */
export const enableReplicationJob: JobHandler = {
  kind: 'enable-replication',
  resumable: true,
  steps: ['validate', 'wait-for-process-server', 'initial-replication'],
  async run(job) {
    const db = job.vault.db;
    const id = job.targetId ?? '';
    const load = () =>
      db.selectFrom('protectedItems').selectAll().where('id', '=', id).executeTakeFirst();
    const item = await job.step('validate', async () => {
      const row = await load();
      if (row === undefined) {
        throw new LifeboatError('LB_VAULT_NOT_FOUND', `Protected item ${id} no longer exists.`, {
          details: { id },
        });
      }
      const ps = await db
        .selectFrom('components')
        .select(['name'])
        .where('id', '=', row.processServerId)
        .executeTakeFirst();
      await job.log(
        `Process server ${ps?.name ?? row.processServerId} will find item ${id} in its assignments (generation ${row.generation}).`,
      );
      return row;
    });
    const gone = (state: string) => state === 'disabled' || state === 'failed-over';
    await job.step('wait-for-process-server', () =>
      job.waitFor(
        'the process server to take the item (is it running and registered?)',
        async () => {
          const row = await load();
          if (row === undefined || gone(row.state))
            throw new LifeboatError('LB_VAULT_JOB_CANCELLED', 'The item was disabled meanwhile.');
          return row.state !== 'enabling' ? row : undefined;
        },
        job.vault.options.processServerAckTimeoutMs,
      ),
    );
    await job.progress(0.1);
    await job.log('The process server took the item; initial replication runs.');
    const disks = await db
      .selectFrom('protectedDisks')
      .selectAll()
      .where('protectedItemId', '=', item.id)
      .execute();
    const total = disks.reduce((a, d) => a + d.sizeBytes, 0);
    await job.step('initial-replication', () =>
      job.waitFor(
        'initial replication to commit a point of every disk',
        async () => {
          const row = await load();
          if (row === undefined || gone(row.state))
            throw new LifeboatError('LB_VAULT_JOB_CANCELLED', 'The item was disabled meanwhile.');
          if (row.state === 'protected') return row;
          const now = await db
            .selectFrom('protectedDisks')
            .select(['initialDoneBytes'])
            .where('protectedItemId', '=', item.id)
            .execute();
          const done = now.reduce((a, d) => a + d.initialDoneBytes, 0);
          if (total > 0) await job.progress(0.1 + 0.9 * Math.min(1, done / total));
          return undefined;
        },
        job.vault.options.initialReplicationTimeoutMs,
      ),
    );
    return { state: 'protected' };
  },
};

/**
 * disable-replication: the item is already `disabled` (the process server sees `stop` in its
 * assignments); optionally deletes its points from the store and the catalogue, once the
 * process server has stopped the agent and committed what its journal still held for the
 * item, so that no point lands after the deletion.
 */
export const disableReplicationJob: JobHandler = {
  kind: 'disable-replication',
  resumable: true,
  steps: ['stop', 'drain', 'delete-points'],
  async run(job) {
    const db = job.vault.db;
    const id = job.targetId ?? '';
    const item = await job.step('stop', async () => {
      const row = await db
        .selectFrom('protectedItems')
        .selectAll()
        .where('id', '=', id)
        .executeTakeFirst();
      if (row === undefined)
        throw new LifeboatError('LB_VAULT_NOT_FOUND', `Protected item ${id} no longer exists.`, {
          details: { id },
        });
      if (row.state !== 'disabled')
        await transition(job.vault, row, 'disabled', 'disabled by job', SYSTEM, {
          activeKey: null,
        });
      await job.log('The process server is told to stop (desired state "stop").');
      return row;
    });
    await job.step('drain', async () => {
      if (job.params['deletePoints'] !== true) return;
      // The process server reports the stop as applied (the agent let go) together with the
      // item's journal backlog; at zero, every cut it acknowledged is a point in the store.
      try {
        await job.waitFor(
          'the process server to stop the agent and commit its last cuts',
          async () => {
            const row = await db
              .selectFrom('protectedItems')
              .select(['state', 'generation', 'appliedGeneration', 'backlogBytes'])
              .where('id', '=', id)
              .executeTakeFirst();
            if (row === undefined || row.state !== 'disabled') {
              throw new LifeboatError(
                'LB_VAULT_JOB_CANCELLED',
                `Protected item ${id} was enabled again or removed meanwhile; its points are kept.`,
                { details: { id } },
              );
            }
            return row.appliedGeneration >= row.generation && row.backlogBytes === 0
              ? row
              : undefined;
          },
          job.vault.options.processServerAckTimeoutMs,
        );
        await job.log('The process server stopped the agent and has nothing left to commit.');
      } catch (err) {
        if (!(err instanceof LifeboatError) || err.code !== 'LB_VAULT_JOB_TIMEOUT') throw err;
        await job.log(
          `The process server did not confirm the stop in ${Math.round(job.vault.options.processServerAckTimeoutMs / 1000)} s (is it running?). The points are deleted now; a point it commits later stays in the store ('lifeboat store points' lists it).`,
          'warn',
        );
      }
    });
    let deleted = 0;
    await job.step('delete-points', async () => {
      if (job.params['deletePoints'] !== true) {
        await job.log('Points are kept (deletePoints was not asked).');
        return;
      }
      const points = await db
        .selectFrom('recoveryPoints')
        .select(['id'])
        .where('targetStoreId', '=', item.targetStoreId)
        .where('machine', '=', item.machineId)
        .execute();
      const store = await openTargetStore(job.vault, item.targetStoreId);
      try {
        // Also points the catalogue missed: the store is the truth.
        const inStore = await store.listPoints({ machine: item.machineId });
        const ids = [...new Set([...points.map((p) => p.id), ...inStore.map((p) => p.id)])];
        const existing = new Set(inStore.map((p) => p.id));
        await store.deletePoints(ids.filter((p) => existing.has(p)));
        deleted = ids.length;
      } finally {
        await store.close();
      }
      await db
        .deleteFrom('recoveryPoints')
        .where('targetStoreId', '=', item.targetStoreId)
        .where('machine', '=', item.machineId)
        .execute();
      await job.log(
        `Deleted ${deleted} points; their data is freed by the store's next garbage collection.`,
      );
    });
    return { deletedPoints: deleted };
  },
};

/**
 * retention: prunes, per target store, the points of every machine protected under the
 * policy, then removes the pruned points from the catalogue. Pruning is idempotent, so the
 * job resumes after a restart.
 */
export const retentionJob: JobHandler = {
  kind: 'retention',
  resumable: true,
  steps: ['prune', 'catalogue'],
  async run(job) {
    const db = job.vault.db;
    const policyId = job.targetId ?? '';
    const policy = await db
      .selectFrom('policies')
      .selectAll()
      .where('id', '=', policyId)
      .executeTakeFirst();
    if (policy === undefined)
      throw new LifeboatError('LB_VAULT_NOT_FOUND', `Policy ${policyId} no longer exists.`, {
        details: { id: policyId },
      });
    const retention = JSON.parse(policy.retention) as RetentionPolicy;
    const items = await db
      .selectFrom('protectedItems')
      .select(['machineId', 'targetStoreId'])
      .where('policyId', '=', policyId)
      .where('state', '!=', 'disabled')
      .execute();
    const removed: Array<{ store: string; id: string }> = [];
    let kept = 0;
    await job.step('prune', async () => {
      const byStore = new Map<string, string[]>();
      // push, not a spread copy per item: that was quadratic (seconds at 10,000 items).
      for (const i of items) {
        const list = byStore.get(i.targetStoreId);
        if (list === undefined) byStore.set(i.targetStoreId, [i.machineId]);
        else list.push(i.machineId);
      }
      let done = 0;
      for (const [storeId, machines] of byStore) {
        const store = await openTargetStore(job.vault, storeId);
        try {
          for (const machine of machines) {
            job.signal.throwIfAborted();
            const report = await store.prune(retention, { machine });
            kept += report.kept.length;
            for (const p of report.removed) removed.push({ store: storeId, id: p.id });
            done++;
            await job.progress((0.9 * done) / items.length);
          }
        } finally {
          await store.close();
        }
      }
      await job.log(`Pruned ${removed.length} points of ${items.length} machines; kept ${kept}.`);
    });
    await job.step('catalogue', async () => {
      for (let i = 0; i < removed.length; i += 500) {
        const batch = removed.slice(i, i + 500);
        for (const storeId of new Set(batch.map((b) => b.store))) {
          await db
            .deleteFrom('recoveryPoints')
            .where('targetStoreId', '=', storeId)
            .where(
              'id',
              'in',
              batch.filter((b) => b.store === storeId).map((b) => b.id),
            )
            .execute();
        }
      }
    });
    return { removed: removed.length, kept, machines: items.length };
  },
};

/**
 * catalogue-sync: makes the catalogue of one target store equal to the store (the truth):
 * upserts every point the store has, removes catalogue rows of points the store no longer
 * has. Rebuilds the catalogue of a vault whose database was lost, from the store alone.
 */
export const catalogueSyncJob: JobHandler = {
  kind: 'catalogue-sync',
  resumable: true,
  steps: ['list-store', 'upsert', 'remove-missing'],
  async run(job) {
    const db = job.vault.db;
    const storeId = job.targetId ?? '';
    const points = await job.step('list-store', async () => {
      const store = await openTargetStore(job.vault, storeId);
      try {
        return await store.listPoints();
      } finally {
        await store.close();
      }
    });
    await job.log(`The store has ${points.length} points.`);
    const { matched } = await job.step('upsert', () =>
      upsertPoints(
        job.vault,
        storeId,
        points.map((p) => ({ ...p, labels: p.labels })),
        SYSTEM,
      ),
    );
    await job.progress(0.8);
    const removed = await job.step('remove-missing', async () => {
      const inStore = new Set(points.map((p) => p.id));
      const rows = await db
        .selectFrom('recoveryPoints')
        .select('id')
        .where('targetStoreId', '=', storeId)
        .execute();
      const gone = rows.map((r) => r.id).filter((id) => !inStore.has(id));
      for (let i = 0; i < gone.length; i += 500) {
        await db
          .deleteFrom('recoveryPoints')
          .where('targetStoreId', '=', storeId)
          .where('id', 'in', gone.slice(i, i + 500))
          .execute();
      }
      return gone.length;
    });
    await job.log(
      `Catalogue in step: ${points.length} points (${matched} of protected items), ${removed} removed.`,
    );
    return { points: points.length, matched, removed };
  },
};
