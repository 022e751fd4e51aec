import { nowIso } from '../ids.js';
import type { JobHandler } from './job-handler.js';
import { openTargetStore } from './open-target-store.js';

/**
 * store-stats: measures one target store (`StoreApi.stats()`: points, logical, unique and
 * stored bytes, packs, chunks) and keeps the figures in `targetStoreStats`, which the
 * dashboard and `GET /api/target-stores/:id/stats` read. The scheduler runs it per store every
 * `storeStatsIntervalSeconds`; an operator can start one (`POST /api/target-stores/:id/stats`).
 * It only reads the store, so it resumes after a restart.
 */
export const storeStatsJob: JobHandler = {
  kind: 'store-stats',
  resumable: true,
  steps: ['measure', 'record'],
  async run(job) {
    const storeId = job.targetId ?? '';
    const stats = await job.step('measure', async () => {
      const store = await openTargetStore(job.vault, storeId);
      try {
        return await store.stats();
      } finally {
        await store.close();
      }
    });
    await job.step('record', async () => {
      const row = {
        targetStoreId: storeId,
        measuredAt: nowIso(),
        jobId: job.id,
        points: stats.points,
        machines: stats.machines,
        disks: stats.disks,
        logicalBytes: stats.logicalBytes,
        uniqueBytes: stats.uniqueBytes,
        storedBytes: stats.storedBytes,
        packs: stats.packs,
        chunks: stats.chunks,
      };
      const { targetStoreId: _id, ...changes } = row;
      await job.vault.db
        .insertInto('targetStoreStats')
        .values(row)
        .onConflict((oc) => oc.column('targetStoreId').doUpdateSet(changes))
        .execute();
      await job.log(
        `${stats.points} points, ${stats.logicalBytes} logical bytes stored in ${stats.storedBytes} bytes (dedup and compression ${stats.dedupRatio.toFixed(2)}x).`,
      );
    });
    return { ...stats };
  },
};
