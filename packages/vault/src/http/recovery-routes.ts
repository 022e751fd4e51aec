import type { FastifyInstance } from 'fastify';
import { LifeboatError } from '@lifeboat/protocol';
import type { RecoveryRunRow } from '../db/schema.js';
import { newId, nowIso } from '../ids.js';
import { notFound } from '../services/errors.js';
import { listPage, pageQuerySchema } from '../services/list-page.js';
import {
  changeFailoverPoint,
  cleanupTestFailover,
  commitFailover,
  loadRun,
  requireJob,
  runToApi,
  runsToApi,
  startFailover,
  startTestFailover,
  type FailoverRequest,
  type PointChoice,
  type RunKind,
  type TestFailoverRequest,
} from '../services/recovery-runs.js';
import type { VaultContext } from '../vault-context.js';
import { principalOf } from './auth.js';
import { pageSchema, responses } from './crud-routes.js';

const idParams = { type: 'object', properties: { id: { type: 'string' } }, required: ['id'] };

const pointSchema = {
  type: 'object',
  description:
    'Which point: { pointId } (one machine; its cut gives its other disks), or { pick: latest | latest-app, at? } (latest at or before `at`). Default: latest.',
  properties: {
    pointId: { type: 'string', minLength: 1, maxLength: 200 },
    pick: { type: 'string', enum: ['latest', 'latest-app'] },
    at: { type: 'string', format: 'date-time' },
  },
  additionalProperties: false,
} as const;

const verifySchema = {
  type: 'object',
  description:
    'How the recovery host proves the boot: a console pattern (regular expression), a guest TCP port answering through the isolated network (its answer matching `expect`), a PNG screenshot.',
  properties: {
    console: { type: 'string', minLength: 1, maxLength: 500 },
    guestPort: { type: 'integer', minimum: 1, maximum: 65535 },
    expect: { type: 'string', minLength: 1, maxLength: 500 },
    screenshot: { type: 'boolean' },
  },
  additionalProperties: false,
} as const;

const addressProps = {
  address: { type: 'string', minLength: 9, maxLength: 18 },
  gateway: { type: 'string', minLength: 7, maxLength: 15 },
  nameservers: {
    type: 'array',
    maxItems: 4,
    items: { type: 'string', minLength: 7, maxLength: 15 },
  },
} as const;

const bootSchema = {
  type: 'object',
  description:
    "How to boot when the point's labels do not say: firmware (bios or uefi), or a kernel file the recovery host allows (its --kernel-dir) with its command line.",
  properties: {
    firmware: { type: 'string', enum: ['bios', 'uefi'] },
    kernel: { type: 'string', minLength: 1, maxLength: 1000 },
    append: { type: 'string', maxLength: 2000 },
    initrd: { type: 'string', minLength: 1, maxLength: 1000 },
  },
  additionalProperties: false,
} as const;

const common = {
  network: { type: 'string', enum: ['isolated-user', 'segment'] },
  verify: verifySchema,
  recoveryHostId: { type: 'string', minLength: 1, maxLength: 200 },
  boot: bootSchema,
  cpus: { type: 'integer', minimum: 1, maximum: 64 },
  memoryMiB: { type: 'integer', minimum: 64, maximum: 1_048_576 },
} as const;

const runQuery = {
  type: 'object',
  properties: {
    ...pageQuerySchema,
    state: { type: 'string', minLength: 1, maxLength: 50 },
    protectedItemId: { type: 'string', minLength: 1, maxLength: 200 },
    recoveryHostId: { type: 'string', minLength: 1, maxLength: 200 },
  },
  additionalProperties: false,
} as const;

/** Test failovers, failovers, and jobs' artifacts (docs/architecture.md). */
export function registerRecoveryRoutes(app: FastifyInstance, vault: VaultContext): void {
  const { db } = vault;

  const listAndGet = (kind: RunKind, path: string, tag: string): void => {
    app.get(
      path,
      {
        schema: {
          tags: [tag],
          summary: `List ${kind}s (newest first)`,
          querystring: runQuery,
          response: responses(pageSchema),
        },
      },
      async (request) => {
        const q = request.query as {
          state?: string;
          protectedItemId?: string;
          recoveryHostId?: string;
          limit?: number;
          cursor?: string;
          offset?: number;
        };
        const page = await listPage(
          db,
          {
            table: 'recoveryRuns',
            descending: true,
            equals: { kind, state: q.state, recoveryHostId: q.recoveryHostId },
            where: (qb) =>
              q.protectedItemId === undefined
                ? qb
                : qb.where('protectedItemIds', 'like', `%${JSON.stringify(q.protectedItemId)}%`),
          },
          q,
        );
        return {
          ...page,
          items: await runsToApi(vault, page.items as unknown as RecoveryRunRow[]),
        };
      },
    );
    app.get(
      `${path}/:id`,
      {
        schema: {
          tags: [tag],
          summary: `Get a ${kind}: state, machines, points, verification, artifacts, jobs`,
          params: idParams,
        },
      },
      async (request) =>
        runToApi(vault, await loadRun(vault, kind, (request.params as { id: string }).id)),
    );
  };

  app.post(
    '/api/test-failovers',
    {
      config: { access: 'operator' },
      schema: {
        tags: ['test failovers'],
        summary:
          'Start a test failover of protected items or a consistency group on a recovery host (isolated network, verified boot)',
        body: {
          type: 'object',
          properties: {
            protectedItemIds: {
              type: 'array',
              minItems: 1,
              maxItems: 20,
              uniqueItems: true,
              items: { type: 'string', minLength: 1, maxLength: 200 },
            },
            consistencyGroup: { type: 'string', minLength: 1, maxLength: 200 },
            point: pointSchema,
            ...common,
            addresses: {
              type: 'array',
              maxItems: 20,
              items: {
                type: 'object',
                properties: {
                  protectedItemId: { type: 'string', minLength: 1, maxLength: 200 },
                  ...addressProps,
                },
                required: ['protectedItemId', 'address'],
                additionalProperties: false,
              },
            },
          },
          additionalProperties: false,
        },
      },
    },
    async (request, reply) =>
      reply
        .status(202)
        .send(
          await startTestFailover(vault, principalOf(request), request.body as TestFailoverRequest),
        ),
  );
  listAndGet('test-failover', '/api/test-failovers', 'test failovers');
  app.post(
    '/api/test-failovers/:id/cleanup',
    {
      config: { access: 'operator' },
      schema: {
        tags: ['test failovers'],
        summary:
          'Clean up a test failover: remove its machines, overlays, exports and network (says what it removed)',
        params: idParams,
      },
    },
    async (request, reply) =>
      reply
        .status(202)
        .send(
          await cleanupTestFailover(
            vault,
            principalOf(request),
            (request.params as { id: string }).id,
          ),
        ),
  );

  app.post(
    '/api/failovers',
    {
      config: { access: 'operator' },
      schema: {
        tags: ['failovers'],
        summary:
          'Fail a protected item over to a recovery host: unplanned from a point, or planned (a last sync, the source stopped, nothing lost)',
        body: {
          type: 'object',
          properties: {
            protectedItemId: { type: 'string', minLength: 1, maxLength: 200 },
            point: pointSchema,
            planned: { type: 'boolean' },
            ...common,
            network: { type: 'string', enum: ['isolated-user'] },
            address: {
              type: 'object',
              properties: addressProps,
              required: ['address'],
              additionalProperties: false,
            },
          },
          required: ['protectedItemId'],
          additionalProperties: false,
        },
      },
    },
    async (request, reply) =>
      reply
        .status(202)
        .send(await startFailover(vault, principalOf(request), request.body as FailoverRequest)),
  );
  listAndGet('failover', '/api/failovers', 'failovers');
  app.post(
    '/api/failovers/:id/change-point',
    {
      config: { access: 'operator' },
      schema: {
        tags: ['failovers'],
        summary:
          'Boot other points in a failover before commit (the guest restarts; its writes so far are discarded)',
        params: idParams,
        body: {
          type: 'object',
          properties: { point: pointSchema },
          additionalProperties: false,
        },
      },
    },
    async (request, reply) => {
      const { id } = request.params as { id: string };
      const body = (request.body ?? {}) as { point?: PointChoice };
      return reply
        .status(202)
        .send(
          await changeFailoverPoint(
            vault,
            principalOf(request),
            id,
            body.point ?? { pick: 'latest' },
          ),
        );
    },
  );
  app.post(
    '/api/failovers/:id/commit',
    {
      config: { access: 'operator' },
      schema: {
        tags: ['failovers'],
        summary:
          'Commit a failover (final), then hydrate its disks into local files on the recovery host while it runs',
        params: idParams,
        body: {
          type: 'object',
          properties: {
            hydrate: { type: 'boolean' },
            format: { type: 'string', enum: ['qcow2', 'raw'] },
            verify: { type: 'boolean' },
          },
          additionalProperties: false,
        },
      },
    },
    async (request, reply) => {
      const { id } = request.params as { id: string };
      return reply.status(202).send(
        await commitFailover(
          vault,
          principalOf(request),
          id,
          (request.body ?? {}) as {
            hydrate?: boolean;
            format?: 'qcow2' | 'raw';
            verify?: boolean;
          },
        ),
      );
    },
  );

  app.get(
    '/api/jobs/:id/artifacts',
    {
      schema: {
        tags: ['jobs'],
        summary:
          "A job's artifacts (boot screenshots, console log tails), without their bytes, by name",
        params: idParams,
        querystring: {
          type: 'object',
          properties: { ...pageQuerySchema },
          additionalProperties: false,
        },
      },
    },
    async (request) => {
      const { id } = request.params as { id: string };
      await requireJob(vault, id);
      const page = await listPage(
        db,
        {
          table: 'jobArtifacts',
          sort: 'name',
          equals: { jobId: id },
          columns: ['name', 'contentType', 'size', 'createdAt'],
        },
        request.query as { limit?: number },
      );
      return {
        ...page,
        items: page.items.map(({ id: _row, ...r }) => ({
          ...r,
          url: `/api/jobs/${id}/artifacts/${String(r['name'])}`,
        })),
      };
    },
  );
  app.get(
    '/api/jobs/:id/artifacts/:name',
    {
      schema: {
        tags: ['jobs'],
        summary:
          "One artifact's bytes (image/png screenshot, text/plain console log); send the bearer header",
        params: {
          type: 'object',
          properties: { id: { type: 'string' }, name: { type: 'string' } },
          required: ['id', 'name'],
        },
      },
    },
    async (request, reply) => {
      const { id, name } = request.params as { id: string; name: string };
      await requireJob(vault, id);
      const row = await db
        .selectFrom('jobArtifacts')
        .selectAll()
        .where('jobId', '=', id)
        .where('name', '=', name)
        .executeTakeFirst();
      if (row === undefined) throw notFound('artifact', `${id}/${name}`);
      return reply
        .type(row.contentType)
        .header('cache-control', 'private, max-age=3600')
        .header('x-content-type-options', 'nosniff')
        .send(Buffer.from(row.data, 'base64'));
    },
  );

  app.put(
    '/api/components/self/jobs/:id/artifacts/:name',
    {
      config: { access: 'component' },
      schema: {
        tags: ['jobs'],
        summary:
          'Upload a file saved with a job the component runs (a boot screenshot, a console log tail), base64',
        params: {
          type: 'object',
          properties: {
            id: { type: 'string', minLength: 1, maxLength: 200 },
            name: { type: 'string', pattern: '^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$' },
          },
          required: ['id', 'name'],
        },
        body: {
          type: 'object',
          properties: {
            contentType: { type: 'string', enum: ['image/png', 'text/plain'] },
            data: { type: 'string', maxLength: 11_200_000 },
          },
          required: ['contentType', 'data'],
          additionalProperties: false,
        },
      },
    },
    async (request) => {
      const p = principalOf(request);
      const { id, name } = request.params as { id: string; name: string };
      const body = request.body as { contentType: string; data: string };
      // The vault's id for a job it queued for this component, else the component's own id.
      let job = await db.selectFrom('jobs').selectAll().where('id', '=', id).executeTakeFirst();
      const assignedTo =
        job === undefined
          ? undefined
          : (JSON.parse(job.params) as { assignedTo?: string }).assignedTo;
      if (job === undefined || assignedTo === undefined) {
        job = await db
          .selectFrom('jobs')
          .selectAll()
          .where('id', '=', `job_${p.id}_${id}`.slice(0, 100))
          .executeTakeFirst();
      } else if (assignedTo !== p.id) {
        throw new LifeboatError('LB_VAULT_FORBIDDEN', `Job ${id} belongs to another component.`);
      }
      if (job === undefined) throw notFound('job', id);
      const bytes = Buffer.from(body.data, 'base64');
      const now = nowIso();
      await db
        .deleteFrom('jobArtifacts')
        .where('jobId', '=', job.id)
        .where('name', '=', name)
        .execute();
      await db
        .insertInto('jobArtifacts')
        .values({
          id: newId('art'),
          jobId: job.id,
          name,
          contentType: body.contentType,
          size: bytes.length,
          data: bytes.toString('base64'),
          createdAt: now,
        })
        .execute();
      await db.updateTable('jobs').set({ updatedAt: now }).where('id', '=', job.id).execute();
      return {
        jobId: job.id,
        name,
        size: bytes.length,
        url: `/api/jobs/${job.id}/artifacts/${name}`,
      };
    },
  );
}
