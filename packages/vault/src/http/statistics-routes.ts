import type { FastifyInstance } from 'fastify';
import type { TargetStoreStatsRow } from '../db/schema.js';
import { audit } from '../services/audit.js';
import type { VaultContext } from '../vault-context.js';
import { principalOf } from './auth.js';
import { getRow, responses } from './crud-routes.js';

const idParams = { type: 'object', properties: { id: { type: 'string' } }, required: ['id'] };

/** A store's measured figures as the API shows them, with the ratio they give. */
export function storeStatsToApi(row: TargetStoreStatsRow): Record<string, unknown> {
  return {
    ...row,
    dedupRatio: row.storedBytes === 0 ? 0 : row.logicalBytes / row.storedBytes,
  };
}

const storeStatsSchema = {
  type: 'object',
  properties: {
    targetStoreId: { type: 'string' },
    stats: {
      type: ['object', 'null'],
      description:
        'The latest measurement (null before the first): logicalBytes is the sum of every point’s disk size, storedBytes the bytes of all objects in the store, dedupRatio = logicalBytes / storedBytes (deduplication and compression together)',
      properties: {
        measuredAt: { type: 'string' },
        jobId: { type: ['string', 'null'] },
        points: { type: 'integer' },
        machines: { type: 'integer' },
        disks: { type: 'integer' },
        logicalBytes: { type: 'number' },
        uniqueBytes: { type: 'number' },
        storedBytes: { type: 'number' },
        packs: { type: 'integer' },
        chunks: { type: 'integer' },
        dedupRatio: { type: 'number' },
      },
    },
    job: {
      type: ['object', 'null'],
      description: 'The newest store-stats job of this store',
      properties: { id: { type: 'string' }, state: { type: 'string' } },
    },
  },
} as const;

const bucketSchema = {
  type: 'object',
  properties: {
    time: { type: 'string' },
    rpoSeconds: { type: ['number', 'null'] },
    throughputBps: { type: ['number', 'null'] },
    throughputMaxBps: { type: ['number', 'null'] },
    backlogBytes: { type: ['number', 'null'] },
  },
} as const;

/** Store size and deduplication, and each protected item's RPO and throughput history. */
export function registerStatisticsRoutes(app: FastifyInstance, vault: VaultContext): void {
  const { db } = vault;

  app.get(
    '/api/target-stores/:id/stats',
    {
      schema: {
        tags: ['target stores'],
        summary:
          'The target store’s size and deduplication as last measured by a store-stats job (never a scan per request)',
        params: idParams,
        response: responses(storeStatsSchema),
      },
    },
    async (request) => {
      const { id } = request.params as { id: string };
      await getRow(db, 'targetStores', id, 'target store');
      const row = await db
        .selectFrom('targetStoreStats')
        .selectAll()
        .where('targetStoreId', '=', id)
        .executeTakeFirst();
      const job = await db
        .selectFrom('jobs')
        .select(['id', 'state'])
        .where('kind', '=', 'store-stats')
        .where('targetId', '=', id)
        .orderBy('id', 'desc')
        .limit(1)
        .executeTakeFirst();
      return {
        targetStoreId: id,
        stats: row === undefined ? null : storeStatsToApi(row),
        job: job ?? null,
      };
    },
  );

  // Operator routes that start a job on one target store now.
  for (const [path, kind, summary] of [
    ['stats', 'store-stats', 'Measure the target store now (starts a store-stats job)'],
    [
      'gc',
      'store-gc',
      'Garbage-collect the target store now (starts a store-gc job: frees the data of pruned points; writers wait while it runs)',
    ],
  ] as const) {
    app.post(
      `/api/target-stores/:id/${path}`,
      {
        config: { access: 'operator' },
        schema: { tags: ['target stores'], summary, params: idParams },
      },
      async (request, reply) => {
        const { id } = request.params as { id: string };
        await getRow(db, 'targetStores', id, 'target store');
        const p = principalOf(request);
        const job = await vault.jobs.create({ kind, target: { type: 'target-store', id } }, p);
        await audit(db, p, `target-store.${path}`, { type: 'target-store', id });
        return reply.status(202).send({ jobId: job?.id });
      },
    );
  }

  app.get(
    '/api/protected-items/:id/history',
    {
      schema: {
        tags: ['protection'],
        summary:
          'RPO (from the catalogue’s points) and throughput and backlog (from heartbeat reports) of a protected item over the last hours, in time buckets',
        params: idParams,
        querystring: {
          type: 'object',
          properties: {
            hours: { type: 'number', minimum: 0.05, maximum: 168, default: 6 },
            bucketSeconds: {
              type: 'integer',
              minimum: 1,
              maximum: 86_400,
              description:
                'Width of a bucket; by default the sample width or wider, so that there are at most 360 buckets',
            },
          },
          additionalProperties: false,
        },
        response: responses({
          type: 'object',
          properties: {
            since: { type: 'string' },
            until: { type: 'string' },
            bucketSeconds: { type: 'integer' },
            retentionHours: { type: 'number' },
            buckets: { type: 'array', items: bucketSchema },
          },
        }),
      },
    },
    async (request) => {
      const { id } = request.params as { id: string };
      const q = request.query as { hours: number; bucketSeconds?: number };
      await getRow(db, 'protectedItems', id, 'protected item');
      const sample = vault.options.historyBucketSeconds;
      const bucketSeconds =
        q.bucketSeconds ?? sample * Math.max(1, Math.ceil((q.hours * 3600) / 360 / sample));
      const until = Date.now();
      const since = until - q.hours * 3_600_000;
      const buckets = await vault.history.history(id, since, until, bucketSeconds);
      return {
        since: new Date(since).toISOString(),
        until: new Date(until).toISOString(),
        bucketSeconds,
        retentionHours: vault.options.historyRetentionHours,
        buckets,
      };
    },
  );
}
