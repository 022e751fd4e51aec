import type { FastifyInstance } from 'fastify';
import { LifeboatError } from '@lifeboat/protocol';
import type { AlertRow, ComponentRow, JobRow } from '../db/schema.js';
import { nowIso } from '../ids.js';
import { alertToApi } from '../services/alert-service.js';
import { audit } from '../services/audit.js';
import { listPage, pageQuerySchema } from '../services/list-page.js';
import { applyRunJobReport } from '../services/recovery-runs.js';
import type { VaultContext } from '../vault-context.js';
import { principalOf } from './auth.js';
import { componentStatus } from './component-routes.js';
import { getRow, pageSchema, responses } from './crud-routes.js';

const idParams = { type: 'object', properties: { id: { type: 'string' } }, required: ['id'] };

/** A job as the API shows it. */
export function jobToApi(j: JobRow): Record<string, unknown> {
  return {
    ...j,
    params: JSON.parse(j.params) as unknown,
    steps: JSON.parse(j.steps) as unknown,
    result: j.result === null ? null : (JSON.parse(j.result) as unknown),
    error: j.error === null ? null : (JSON.parse(j.error) as unknown),
    cancelRequested: j.cancelRequested === 1,
  };
}

/** Jobs, alerts, audit log, dashboard summary, health and metrics. */
export function registerOperationsRoutes(app: FastifyInstance, vault: VaultContext): void {
  const { db } = vault;

  app.get(
    '/api/jobs',
    {
      schema: {
        tags: ['jobs'],
        summary: 'List jobs (newest first)',
        querystring: {
          type: 'object',
          properties: {
            ...pageQuerySchema,
            state: {
              type: 'string',
              enum: ['queued', 'running', 'succeeded', 'failed', 'cancelled'],
            },
            kind: { type: 'string' },
            targetId: { type: 'string' },
          },
          additionalProperties: false,
        },
        response: responses(pageSchema),
      },
    },
    async (request) => {
      const q = request.query as {
        state?: string;
        kind?: string;
        targetId?: string;
        limit?: number;
        cursor?: string;
        offset?: number;
      };
      const page = await listPage(
        db,
        {
          table: 'jobs',
          descending: true,
          equals: { state: q.state, kind: q.kind, targetId: q.targetId },
        },
        q,
      );
      return { ...page, items: page.items.map((j) => jobToApi(j as unknown as JobRow)) };
    },
  );

  app.get(
    '/api/jobs/:id',
    {
      schema: {
        tags: ['jobs'],
        summary: 'Get a job with its steps and progress',
        params: idParams,
      },
    },
    async (request) =>
      jobToApi(
        (await getRow(
          db,
          'jobs',
          (request.params as { id: string }).id,
          'job',
        )) as unknown as JobRow,
      ),
  );

  app.get(
    '/api/jobs/:id/logs',
    {
      schema: {
        tags: ['jobs'],
        summary: "A job's log, oldest first",
        params: idParams,
        querystring: {
          type: 'object',
          properties: {
            ...pageQuerySchema,
            level: { type: 'string', enum: ['info', 'warn', 'error'] },
          },
          additionalProperties: false,
        },
        response: responses(pageSchema),
      },
    },
    async (request) => {
      const { id } = request.params as { id: string };
      const { level, ...page } = request.query as { level?: string; limit?: number };
      await getRow(db, 'jobs', id, 'job');
      return listPage(db, { table: 'jobLogs', equals: { jobId: id, level } }, page);
    },
  );

  app.post(
    '/api/jobs/:id/cancel',
    {
      config: { access: 'operator' },
      schema: { tags: ['jobs'], summary: 'Cancel a queued or running job', params: idParams },
    },
    async (request) => {
      const { id } = request.params as { id: string };
      const job = (await getRow(db, 'jobs', id, 'job')) as unknown as JobRow;
      const now = nowIso();
      const onComponent = job.leaseOwner?.startsWith('component:') === true;
      if (job.state === 'queued') {
        await db
          .updateTable('jobs')
          .set({ state: 'cancelled', leaseOwner: null, finishedAt: now, updatedAt: now })
          .where('id', '=', id)
          .where('state', '=', 'queued')
          .execute();
        if (onComponent) {
          await applyRunJobReport(
            vault,
            job,
            {
              state: 'failed',
              error: {
                code: 'LB_VAULT_JOB_CANCELLED',
                message: `Job ${id} was cancelled by ${principalOf(request).name} before the component started it.`,
              },
            },
            principalOf(request),
          );
        }
      } else if (job.state === 'running' && onComponent) {
        throw new LifeboatError(
          'LB_VAULT_INVALID_STATE',
          `Job ${id} runs on a component (${job.leaseOwner?.slice('component:'.length) ?? '?'}), which cannot stop it half-way. Wait for it to end; a test failover can then be cleaned up.`,
          { details: { id, state: job.state } },
        );
      } else if (job.state === 'running') {
        await db
          .updateTable('jobs')
          .set({ cancelRequested: 1, updatedAt: now })
          .where('id', '=', id)
          .execute();
      } else {
        throw new LifeboatError(
          'LB_VAULT_INVALID_STATE',
          `Job ${id} already ended (${job.state}).`,
          { details: { id, state: job.state } },
        );
      }
      await audit(
        db,
        principalOf(request),
        'job.cancel',
        { type: 'job', id },
        { before: { state: job.state } },
      );
      return jobToApi((await getRow(db, 'jobs', id, 'job')) as unknown as JobRow);
    },
  );

  app.get(
    '/api/alerts',
    {
      schema: {
        tags: ['alerts'],
        summary: 'List alerts (newest first)',
        querystring: {
          type: 'object',
          properties: {
            ...pageQuerySchema,
            state: { type: 'string', enum: ['active', 'cleared'] },
            kind: { type: 'string' },
            severity: { type: 'string', enum: ['warning', 'error', 'critical'] },
            subjectId: { type: 'string' },
            acknowledged: { type: 'boolean' },
          },
          additionalProperties: false,
        },
        response: responses(pageSchema),
      },
    },
    async (request) => {
      const q = request.query as {
        state?: string;
        kind?: string;
        severity?: string;
        subjectId?: string;
        acknowledged?: boolean;
        limit?: number;
      };
      const page = await listPage(
        db,
        {
          table: 'alerts',
          descending: true,
          equals: { state: q.state, kind: q.kind, severity: q.severity, subjectId: q.subjectId },
          where: (qb) =>
            q.acknowledged === undefined
              ? qb
              : qb.where('acknowledgedAt', q.acknowledged ? 'is not' : 'is', null),
        },
        q,
      );
      return { ...page, items: page.items.map((a) => alertToApi(a as unknown as AlertRow)) };
    },
  );

  app.post(
    '/api/alerts/:id/acknowledge',
    {
      config: { access: 'operator' },
      schema: { tags: ['alerts'], summary: 'Acknowledge an alert', params: idParams },
    },
    async (request) => {
      const { id } = request.params as { id: string };
      const alert = (await getRow(db, 'alerts', id, 'alert')) as unknown as AlertRow;
      const p = principalOf(request);
      const changes = {
        acknowledgedAt: alert.acknowledgedAt ?? nowIso(),
        acknowledgedBy: alert.acknowledgedBy ?? p.name,
      };
      await db.updateTable('alerts').set(changes).where('id', '=', id).execute();
      await audit(db, p, 'alert.acknowledge', { type: 'alert', id }, { after: changes });
      return alertToApi({ ...alert, ...changes });
    },
  );

  app.get(
    '/api/audit',
    {
      config: { access: 'operator' },
      schema: {
        tags: ['audit'],
        summary: 'The audit log (newest first)',
        querystring: {
          type: 'object',
          properties: {
            ...pageQuerySchema,
            actorId: { type: 'string' },
            action: { type: 'string' },
            targetType: { type: 'string' },
            targetId: { type: 'string' },
            since: { type: 'string', format: 'date-time' },
          },
          additionalProperties: false,
        },
        response: responses(pageSchema),
      },
    },
    async (request) => {
      const q = request.query as {
        actorId?: string;
        action?: string;
        targetType?: string;
        targetId?: string;
        since?: string;
        limit?: number;
      };
      const page = await listPage(
        db,
        {
          table: 'audit',
          descending: true,
          equals: {
            actorId: q.actorId,
            action: q.action,
            targetType: q.targetType,
            targetId: q.targetId,
          },
          where: (qb) =>
            q.since === undefined ? qb : qb.where('time', '>=', new Date(q.since).toISOString()),
        },
        q,
      );
      return {
        ...page,
        items: page.items.map((a) => ({
          ...a,
          summary: JSON.parse(a['summary'] as string) as unknown,
        })),
      };
    },
  );

  app.get(
    '/api/summary',
    {
      schema: {
        tags: ['dashboard'],
        summary: 'Health at a glance: items by state, worst RPOs, alerts, jobs, components',
      },
    },
    async () => {
      const now = Date.now();
      // Many dashboards poll this at once: compute it at most once per summaryCacheMs.
      if (summaryCache !== undefined && summaryCache.until > now) return summaryCache.value;
      const value = await computeSummary(now);
      summaryCache = { until: now + vault.options.summaryCacheMs, value };
      return value;
    },
  );

  let summaryCache: { until: number; value: unknown } | undefined;
  const computeSummary = async (now: number): Promise<unknown> => {
    {
      const byState = await db
        .selectFrom('protectedItems')
        .select(['state', (eb) => eb.fn.countAll().as('n')])
        .groupBy('state')
        .execute();
      const worst = await db
        .selectFrom('protectedItems')
        .innerJoin('machines', 'machines.id', 'protectedItems.machineId')
        .select([
          'protectedItems.id as id',
          'machines.name as machineName',
          'protectedItems.state as state',
          'protectedItems.lastPointAt as lastPointAt',
          'protectedItems.policyId as policyId',
        ])
        .where('protectedItems.state', 'in', ['protected', 'resync-needed', 'initial-replication'])
        .where('protectedItems.lastPointAt', 'is not', null)
        .orderBy('protectedItems.lastPointAt', 'asc')
        .limit(10)
        .execute();
      const alerts = await db
        .selectFrom('alerts')
        .select(['severity', (eb) => eb.fn.countAll().as('n')])
        .where('state', '=', 'active')
        .groupBy('severity')
        .execute();
      const unacknowledged = await db
        .selectFrom('alerts')
        .select((eb) => eb.fn.countAll().as('n'))
        .where('state', '=', 'active')
        .where('acknowledgedAt', 'is', null)
        .executeTakeFirst();
      const jobs = await db
        .selectFrom('jobs')
        .select(['state', (eb) => eb.fn.countAll().as('n')])
        .where('state', 'in', ['queued', 'running'])
        .groupBy('state')
        .execute();
      const components = (await db
        .selectFrom('components')
        .selectAll()
        .where('kind', 'in', ['process-server', 'recovery-host'])
        .orderBy('name')
        .limit(500)
        .execute()) as ComponentRow[];
      const stores = await db
        .selectFrom('targetStores')
        .leftJoin('targetStoreStats', 'targetStoreStats.targetStoreId', 'targetStores.id')
        .select([
          'targetStores.id as id',
          'targetStores.name as name',
          'targetStores.kind as kind',
          'targetStoreStats.measuredAt as measuredAt',
          'targetStoreStats.points as points',
          'targetStoreStats.logicalBytes as logicalBytes',
          'targetStoreStats.storedBytes as storedBytes',
        ])
        .orderBy('targetStores.name')
        .limit(500)
        .execute();
      const measured = stores.filter((st) => st.measuredAt !== null);
      const logical = measured.reduce((a, st) => a + Number(st.logicalBytes ?? 0), 0);
      const stored = measured.reduce((a, st) => a + Number(st.storedBytes ?? 0), 0);
      const counts = (rows: Array<{ n: unknown } & Record<string, unknown>>, key: string) =>
        Object.fromEntries(rows.map((r) => [r[key] as string, Number(r.n)]));
      const itemStates = counts(byState, 'state');
      return {
        protectedItems: {
          total: Object.values(itemStates).reduce((a, b) => a + b, 0),
          byState: itemStates,
        },
        worstRpo: worst.map((w) => ({
          ...w,
          rpoSeconds: w.lastPointAt === null ? null : (now - Date.parse(w.lastPointAt)) / 1000,
        })),
        alerts: {
          active: counts(alerts, 'severity'),
          unacknowledged: Number(unacknowledged?.n ?? 0),
        },
        jobs: counts(jobs, 'state'),
        // Figures of the latest store-stats job of each store (null before its first).
        stores: {
          logicalBytes: logical,
          storedBytes: stored,
          dedupRatio: stored === 0 ? null : logical / stored,
          items: stores.map((st) => ({
            ...st,
            dedupRatio:
              st.measuredAt === null || !st.storedBytes
                ? null
                : Number(st.logicalBytes ?? 0) / Number(st.storedBytes),
          })),
        },
        components: components.map((c) => ({
          id: c.id,
          kind: c.kind,
          name: c.name,
          status: componentStatus(c, vault, now),
          lastHeartbeatAt: c.lastHeartbeatAt,
          health: JSON.parse(c.health) as unknown,
        })),
      };
    }
  };

  app.get(
    '/api/health',
    {
      config: { access: 'public' },
      schema: { tags: ['health'], summary: 'Liveness of this vault instance and its database' },
    },
    async () => {
      await db.selectFrom('settings').select('key').limit(1).execute();
      return {
        status: 'ok',
        instanceId: vault.instanceId,
        database: vault.dialect,
        time: nowIso(),
      };
    },
  );

  app.get(
    '/metrics',
    {
      config: { access: 'viewer' },
      schema: { tags: ['health'], summary: 'Prometheus metrics (bearer token of any user)' },
    },
    async (_request, reply) =>
      reply.type(vault.metrics.registry.contentType).send(await vault.metrics.registry.metrics()),
  );
}
