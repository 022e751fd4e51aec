import type { JobHandler } from './job-handler.js';
import { openTargetStore } from './open-target-store.js';

/**
 * store-gc: garbage-collects one target store (`StoreApi.gc()`): deletes the packs no point
 * references any more (after retention pruned their points), repacks the ones mostly dead, and
 * consolidates the index objects (one per commit until then). The scheduler runs it per store
 * every `storeGcIntervalSeconds`; an operator can start one (`POST /api/target-stores/:id/gc`).
 * gc takes the store's exclusive lock: writers finish their sessions first and new ones wait
 * for it (a process server keeps journaling meanwhile). Idempotent, so it resumes after a
 * restart.
 */
export const storeGcJob: JobHandler = {
  kind: 'store-gc',
  resumable: true,
  steps: ['collect'],
  async run(job) {
    const storeId = job.targetId ?? '';
    const report = await job.step('collect', async () => {
      const store = await openTargetStore(job.vault, storeId);
      try {
        // gc reports each of its phases from 0; the job's fraction only goes up, by 5% or
        // more at a time (each is a database write), one write after the other.
        let last = 0;
        let written: Promise<void> = Promise.resolve();
        const report = await store.gc({
          onProgress: (p) => {
            const f = p.total > 0 ? p.done / p.total : 0;
            if (f < last + 0.05) return;
            last = f;
            written = written.then(() => job.progress(0.95 * f)).catch(() => undefined);
          },
        });
        await written;
        return report;
      } finally {
        await store.close();
      }
    });
    await job.log(
      `Freed ${report.bytesFreed} bytes: ${report.packsDeleted} packs deleted, ${report.packsRepacked} repacked, ${report.objectsDeleted} other objects deleted.`,
    );
    return { ...report };
  },
};
