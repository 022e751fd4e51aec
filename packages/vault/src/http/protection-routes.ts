import type { FastifyInstance } from 'fastify';
import { LifeboatError } from '@lifeboat/protocol';
import type { MachineRow, ProtectedItemRow, RecoveryPointRow } from '../db/schema.js';
import { newId, nowIso } from '../ids.js';
import { audit } from '../services/audit.js';
import { invalid, notFound } from '../services/errors.js';
import { listPage, listPageJson, pageQuerySchema, type JsonField } from '../services/list-page.js';
import { upsertPoints } from '../services/catalogue.js';
import { transition } from '../services/protection.js';
import { openTargetStore } from '../jobs/open-target-store.js';
import type { VaultContext } from '../vault-context.js';
import { principalOf } from './auth.js';
import { getRow, pageSchema, requireRef, responses } from './crud-routes.js';

const idParams = { type: 'object', properties: { id: { type: 'string' } }, required: ['id'] };
const isoTime = { type: 'string', format: 'date-time' };
/** Most ids one `GET /api/machines?ids=` takes (a page of the portal's rows). */
const MAX_IDS = 100;

/** A protected item as the API shows it, with its RPO computed now. */
export function itemToApi(r: ProtectedItemRow, now = Date.now()): Record<string, unknown> {
  const { activeKey: _a, ...rest } = r;
  return {
    ...rest,
    rpoSeconds:
      r.lastPointAt === null ? null : Math.max(0, (now - Date.parse(r.lastPointAt)) / 1000),
  };
}

/** A catalogue point as the API shows it. */
export function pointToApi(r: RecoveryPointRow): Record<string, unknown> {
  return { ...r, labels: JSON.parse(r.labels) as unknown };
}

const PAGING = new Set(['limit', 'cursor', 'offset']);

/**
 * What identifies a list's filters for the page cache (listPageJson's `cacheKey`): the list's
 * name and its querystring's filters in a fixed order, paging left out (listPageJson adds it).
 */
export function listCacheKey(list: string, query: Record<string, unknown>): string {
  const filters = Object.keys(query)
    .filter((k) => !PAGING.has(k) && query[k] !== undefined)
    .sort()
    .map((k) => [k, query[k]]);
  return `${list}\u0000${JSON.stringify(filters)}`;
}

/**
 * {@link itemToApi} as the database renders it in lists (same keys in the same order; a test
 * compares the list with the single-item route).
 */
export const itemJsonFields: readonly JsonField[] = [
  { key: 'id' },
  { key: 'machineId' },
  { key: 'policyId' },
  { key: 'processServerId' },
  { key: 'targetStoreId' },
  { key: 'networkMappingId' },
  { key: 'consistencyGroup' },
  { key: 'state' },
  { key: 'stateReason' },
  { key: 'stateChangedAt' },
  { key: 'generation' },
  { key: 'appliedGeneration' },
  { key: 'lastPointAt' },
  { key: 'rpoSeconds', column: 'lastPointAt', as: 'ageSeconds' },
  { key: 'backlogBytes' },
  { key: 'throughputBps' },
  { key: 'createdAt' },
  { key: 'updatedAt' },
];

/** {@link pointToApi} as the database renders it in lists. */
export const pointJsonFields: readonly JsonField[] = [
  { key: 'id' },
  { key: 'targetStoreId' },
  { key: 'protectedItemId' },
  { key: 'machine' },
  { key: 'disk' },
  { key: 'time' },
  { key: 'committedAt' },
  { key: 'kind' },
  { key: 'size' },
  { key: 'cut' },
  { key: 'consistencyGroup' },
  { key: 'labels', as: 'json' },
  { key: 'parent' },
];

const JSON_TYPE = 'application/json; charset=utf-8';

/** Machines and inventory, protected items and their state changes, recovery points. */
export function registerProtectionRoutes(app: FastifyInstance, vault: VaultContext): void {
  const { db } = vault;
  const hostsAtSite = (siteId: string) =>
    db.selectFrom('sourceHosts').select('id').where('siteId', '=', siteId);

  app.post(
    '/api/source-hosts/:id/discover',
    {
      config: { access: 'operator' },
      schema: {
        tags: ['source hosts'],
        summary: 'Ask the source host’s process server to discover its machines',
        params: idParams,
      },
    },
    async (request, reply) => {
      const { id } = request.params as { id: string };
      const host = await getRow(db, 'sourceHosts', id, 'source host');
      if (host['processServerId'] === null) {
        throw invalid(
          'sourceHost.processServerId',
          'the source host has no process server to discover it; set processServerId first.',
        );
      }
      const now = nowIso();
      await db
        .updateTable('sourceHosts')
        .set({ discoveryRequestedAt: now, updatedAt: now })
        .where('id', '=', id)
        .execute();
      await audit(db, principalOf(request), 'source-host.discover', { type: 'source-host', id });
      return reply.status(202).send({ id, discoveryRequestedAt: now });
    },
  );

  app.post(
    '/api/target-stores/:id/sync',
    {
      config: { access: 'operator' },
      schema: {
        tags: ['target stores'],
        summary: 'Bring the catalogue in step with the store (starts a catalogue-sync job)',
        params: idParams,
      },
    },
    async (request, reply) => {
      const { id } = request.params as { id: string };
      await getRow(db, 'targetStores', id, 'target store');
      const p = principalOf(request);
      const job = await vault.jobs.create(
        { kind: 'catalogue-sync', target: { type: 'target-store', id } },
        p,
      );
      await audit(db, p, 'target-store.sync', { type: 'target-store', id });
      return reply.status(202).send({ jobId: job?.id });
    },
  );

  app.post(
    '/api/target-stores/:id/check',
    {
      config: { access: 'operator' },
      schema: {
        tags: ['target stores'],
        summary:
          'Check that the vault can open the store with its passphrase and list its points (access and latency)',
        params: idParams,
      },
    },
    async (request) => {
      const { id } = request.params as { id: string };
      await getRow(db, 'targetStores', id, 'target store');
      const started = performance.now();
      let store: Awaited<ReturnType<typeof openTargetStore>> | undefined;
      try {
        store = await openTargetStore(vault, id);
        const opened = performance.now();
        const points = await store.listPoints();
        const listed = performance.now();
        return {
          id,
          ok: true,
          location: store.location,
          points: points.length,
          machines: new Set(points.map((p) => p.machine)).size,
          openMs: Math.round(opened - started),
          listMs: Math.round(listed - opened),
        };
      } catch (err) {
        // A store the vault cannot open is the answer to the check, not a fault of the route.
        const e = err instanceof LifeboatError ? err : undefined;
        return {
          id,
          ok: false,
          error: {
            code: e?.code ?? 'LB_VAULT_STORE_CHECK_FAILED',
            message: (err as Error).message,
          },
        };
      } finally {
        await store?.close().catch(() => undefined);
      }
    },
  );

  app.post(
    '/api/policies/:id/retention',
    {
      config: { access: 'operator' },
      schema: {
        tags: ['policies'],
        summary:
          "Run the policy's retention now (a retention job: prune the store, then the catalogue)",
        params: idParams,
      },
    },
    async (request, reply) => {
      const { id } = request.params as { id: string };
      await getRow(db, 'policies', id, 'policy');
      const p = principalOf(request);
      const job = await vault.jobs.create({ kind: 'retention', target: { type: 'policy', id } }, p);
      await audit(db, p, 'policy.retention', { type: 'policy', id }, { after: { jobId: job?.id } });
      return reply.status(202).send({ jobId: job?.id });
    },
  );

  app.put(
    '/api/source-hosts/:id/inventory',
    {
      config: { access: ['component', 'operator'] },
      schema: {
        tags: ['source hosts'],
        summary:
          'Report the machines and disks found on a source host (process server discovery, or an operator)',
        params: idParams,
        body: {
          type: 'object',
          properties: {
            machines: {
              type: 'array',
              maxItems: 100_000,
              items: {
                type: 'object',
                properties: {
                  externalId: { type: 'string', minLength: 1, maxLength: 500 },
                  name: { type: 'string', minLength: 1, maxLength: 500 },
                  endpoint: { type: 'string', maxLength: 4096 },
                  cpus: { type: 'integer', minimum: 1 },
                  memoryBytes: { type: 'integer', minimum: 0 },
                  os: { type: 'string', maxLength: 200 },
                  disks: {
                    type: 'array',
                    maxItems: 256,
                    items: {
                      type: 'object',
                      properties: {
                        name: { type: 'string', minLength: 1, maxLength: 200 },
                        node: { type: 'string', maxLength: 200 },
                        sizeBytes: { type: 'integer', minimum: 512 },
                      },
                      required: ['name', 'sizeBytes'],
                      additionalProperties: false,
                    },
                  },
                },
                required: ['externalId', 'name', 'disks'],
                additionalProperties: false,
              },
            },
          },
          required: ['machines'],
          additionalProperties: false,
        },
      },
    },
    async (request) => {
      const { id } = request.params as { id: string };
      const p = principalOf(request);
      const host = await getRow(db, 'sourceHosts', id, 'source host');
      if (p.type === 'component' && host['processServerId'] !== p.id) {
        throw new LifeboatError(
          'LB_VAULT_FORBIDDEN',
          'Only the source host’s own process server may report its inventory.',
        );
      }
      const body = request.body as {
        machines: Array<{
          externalId: string;
          name: string;
          endpoint?: string;
          cpus?: number;
          memoryBytes?: number;
          os?: string;
          disks: Array<{ name: string; node?: string; sizeBytes: number }>;
        }>;
      };
      const now = nowIso();
      const seen = new Set<string>();
      await db.transaction().execute(async (tx) => {
        for (const m of body.machines) {
          seen.add(m.externalId);
          const existing = await tx
            .selectFrom('machines')
            .select('id')
            .where('sourceHostId', '=', id)
            .where('externalId', '=', m.externalId)
            .executeTakeFirst();
          const fields = {
            name: m.name,
            endpoint: m.endpoint ?? null,
            cpus: m.cpus ?? null,
            memoryBytes: m.memoryBytes ?? null,
            os: m.os ?? null,
            present: 1,
            discoveredAt: now,
            updatedAt: now,
          };
          const machineId = existing?.id ?? newId('vm');
          if (existing === undefined) {
            await tx
              .insertInto('machines')
              .values({
                id: machineId,
                sourceHostId: id,
                externalId: m.externalId,
                createdAt: now,
                ...fields,
              })
              .execute();
          } else {
            await tx.updateTable('machines').set(fields).where('id', '=', machineId).execute();
          }
          await tx.deleteFrom('machineDisks').where('machineId', '=', machineId).execute();
          for (const d of m.disks) {
            await tx
              .insertInto('machineDisks')
              .values({
                id: newId('dsk'),
                machineId,
                name: d.name,
                node: d.node ?? null,
                sizeBytes: d.sizeBytes,
              })
              .execute();
          }
        }
        // Machines no longer found stay (they may be protected) but are marked absent.
        const all = await tx
          .selectFrom('machines')
          .select(['id', 'externalId'])
          .where('sourceHostId', '=', id)
          .execute();
        const gone = all.filter((m) => !seen.has(m.externalId)).map((m) => m.id);
        if (gone.length > 0) {
          await tx
            .updateTable('machines')
            .set({ present: 0, updatedAt: now })
            .where('id', 'in', gone)
            .execute();
        }
        await tx
          .updateTable('sourceHosts')
          .set({ discoveredAt: now, updatedAt: now })
          .where('id', '=', id)
          .execute();
      });
      await audit(
        db,
        p,
        'source-host.inventory',
        { type: 'source-host', id },
        { after: { machines: body.machines.length } },
      );
      return { sourceHostId: id, machines: body.machines.length, discoveredAt: now };
    },
  );

  app.get(
    '/api/machines',
    {
      schema: {
        tags: ['machines'],
        summary: 'List discovered machines',
        querystring: {
          type: 'object',
          properties: {
            ...pageQuerySchema,
            q: { type: 'string' },
            sourceHostId: { type: 'string' },
            siteId: { type: 'string', description: 'Machines of source hosts at this site' },
            present: { type: 'boolean' },
            ids: {
              type: 'string',
              description: `These machines only: ids separated by commas, at most ${MAX_IDS}`,
            },
          },
          additionalProperties: false,
        },
        response: responses(pageSchema),
      },
    },
    async (request) => {
      const q = request.query as {
        q?: string;
        sourceHostId?: string;
        siteId?: string;
        present?: boolean;
        ids?: string;
        limit?: number;
        cursor?: string;
        offset?: number;
      };
      const ids = q.ids === undefined ? undefined : [...new Set(q.ids.split(','))];
      if (ids !== undefined && (ids.length > MAX_IDS || ids.some((id) => id === '')))
        throw invalid(
          'query.ids',
          `ids takes 1 to ${MAX_IDS} machine ids separated by commas, none empty.`,
        );
      const page = await listPage(
        db,
        {
          table: 'machines',
          equals: {
            sourceHostId: q.sourceHostId,
            present: q.present === undefined ? undefined : q.present ? 1 : 0,
          },
          search: { column: 'name', q: q.q },
          where: (qb) => {
            let w =
              q.siteId === undefined ? qb : qb.where('sourceHostId', 'in', hostsAtSite(q.siteId));
            if (ids !== undefined) w = w.where('id', 'in', ids);
            return w;
          },
        },
        {
          ...(q.limit !== undefined ? { limit: q.limit } : {}),
          ...(q.cursor !== undefined ? { cursor: q.cursor } : {}),
          ...(q.offset !== undefined ? { offset: q.offset } : {}),
        },
      );
      return { ...page, items: page.items.map((m) => ({ ...m, present: m['present'] === 1 })) };
    },
  );

  app.get(
    '/api/machines/:id',
    { schema: { tags: ['machines'], summary: 'Get a machine with its disks', params: idParams } },
    async (request) => {
      const { id } = request.params as { id: string };
      const m = (await getRow(db, 'machines', id, 'machine')) as unknown as MachineRow;
      const disks = await db
        .selectFrom('machineDisks')
        .selectAll()
        .where('machineId', '=', id)
        .orderBy('name')
        .execute();
      return { ...m, present: m.present === 1, disks };
    },
  );

  const itemQuery = {
    type: 'object',
    properties: {
      ...pageQuerySchema,
      q: { type: 'string' },
      state: {
        type: 'string',
        enum: [
          'enabling',
          'initial-replication',
          'protected',
          'resync-needed',
          'failed-over',
          'disabled',
        ],
      },
      policyId: { type: 'string' },
      processServerId: { type: 'string' },
      targetStoreId: { type: 'string' },
      machineId: { type: 'string' },
      siteId: {
        type: 'string',
        description: 'Items whose machine runs at this site (its source host’s site)',
      },
      consistencyGroup: { type: 'string', minLength: 1, maxLength: 200 },
      sort: { type: 'string', enum: ['id', 'lastPointAt', 'stateChangedAt'] },
      order: { type: 'string', enum: ['asc', 'desc'] },
    },
    additionalProperties: false,
  };

  app.get(
    '/api/protected-items',
    {
      schema: {
        tags: ['protection'],
        summary: 'List protected items',
        querystring: itemQuery,
        response: responses(pageSchema),
      },
    },
    async (request, reply) => {
      const q = request.query as Record<string, string | undefined> & {
        limit?: number;
        offset?: number;
      };
      const page = await listPageJson(
        db,
        {
          dialect: vault.dialect,
          fields: itemJsonFields,
          cacheKey: listCacheKey('protected-items', q),
          table: 'protectedItems',
          sort: q['sort'] ?? 'id',
          descending: q['order'] === 'desc',
          equals: {
            state: q['state'],
            policyId: q['policyId'],
            processServerId: q['processServerId'],
            targetStoreId: q['targetStoreId'],
            machineId: q['machineId'],
            consistencyGroup: q['consistencyGroup'],
          },
          where: (qb) => {
            let r = qb;
            if (q['q'] !== undefined && q['q'] !== '') {
              r = r.where(
                'machineId',
                'in',
                db
                  .selectFrom('machines')
                  .select('id')
                  .where((e) =>
                    e(e.fn('lower', ['name']), 'like', `%${(q['q'] ?? '').toLowerCase()}%`),
                  ),
              );
            }
            const siteId = q['siteId'];
            if (siteId !== undefined) {
              r = r.where(
                'machineId',
                'in',
                db
                  .selectFrom('machines')
                  .select('id')
                  .where('sourceHostId', 'in', hostsAtSite(siteId)),
              );
            }
            return r;
          },
        },
        {
          ...(q['limit'] !== undefined ? { limit: q['limit'] } : {}),
          ...(q['cursor'] !== undefined ? { cursor: q['cursor'] } : {}),
          ...(q['offset'] !== undefined ? { offset: q['offset'] } : {}),
        },
      );
      return reply.type(JSON_TYPE).send(page);
    },
  );

  app.get(
    '/api/protected-items/:id',
    {
      schema: {
        tags: ['protection'],
        summary: 'Get a protected item with its disks',
        params: idParams,
      },
    },
    async (request) => {
      const { id } = request.params as { id: string };
      const item = (await getRow(
        db,
        'protectedItems',
        id,
        'protected item',
      )) as unknown as ProtectedItemRow;
      const disks = await db
        .selectFrom('protectedDisks')
        .selectAll()
        .where('protectedItemId', '=', id)
        .orderBy('name')
        .execute();
      return { ...itemToApi(item), disks };
    },
  );

  app.post(
    '/api/protected-items',
    {
      config: { access: 'operator' },
      schema: {
        tags: ['protection'],
        summary: 'Enable replication of a machine (starts an enable-replication job)',
        body: {
          type: 'object',
          properties: {
            machineId: { type: 'string', minLength: 1 },
            policyId: { type: 'string', minLength: 1 },
            processServerId: { type: 'string', minLength: 1 },
            targetStoreId: { type: 'string', minLength: 1 },
            networkMappingId: { type: 'string', minLength: 1 },
            consistencyGroup: { type: 'string', minLength: 1, maxLength: 200 },
            disks: { type: 'array', items: { type: 'string', minLength: 1 }, minItems: 1 },
          },
          required: ['machineId', 'policyId', 'processServerId', 'targetStoreId'],
          additionalProperties: false,
        },
      },
    },
    async (request, reply) => {
      const p = principalOf(request);
      const body = request.body as {
        machineId: string;
        policyId: string;
        processServerId: string;
        targetStoreId: string;
        networkMappingId?: string;
        consistencyGroup?: string;
        disks?: string[];
      };
      await requireRef(db, 'machines', body.machineId, 'body.machineId', 'machine');
      await requireRef(db, 'policies', body.policyId, 'body.policyId', 'policy');
      await requireRef(
        db,
        'targetStores',
        body.targetStoreId,
        'body.targetStoreId',
        'target store',
      );
      await requireRef(
        db,
        'networkMappings',
        body.networkMappingId,
        'body.networkMappingId',
        'network mapping',
      );
      const ps = await db
        .selectFrom('components')
        .select('id')
        .where('id', '=', body.processServerId)
        .where('kind', '=', 'process-server')
        .executeTakeFirst();
      if (ps === undefined)
        throw invalid(
          'body.processServerId',
          `no process server with id "${body.processServerId}".`,
        );
      let disks = await db
        .selectFrom('machineDisks')
        .selectAll()
        .where('machineId', '=', body.machineId)
        .orderBy('name')
        .execute();
      if (body.disks !== undefined) {
        const unknown = body.disks.filter((d) => !disks.some((x) => x.name === d));
        if (unknown.length > 0)
          throw invalid('body.disks', `the machine has no disk ${unknown.join(', ')}.`);
        disks = disks.filter((d) => body.disks?.includes(d.name));
      }
      if (disks.length === 0)
        throw invalid(
          'body.machineId',
          'the machine has no discovered disk to protect; run discovery first.',
        );
      const now = nowIso();
      const item: ProtectedItemRow = {
        id: newId('pi'),
        machineId: body.machineId,
        policyId: body.policyId,
        processServerId: body.processServerId,
        targetStoreId: body.targetStoreId,
        networkMappingId: body.networkMappingId ?? null,
        consistencyGroup: body.consistencyGroup ?? null,
        state: 'enabling',
        stateReason: 'replication requested',
        stateChangedAt: now,
        generation: 1,
        appliedGeneration: 0,
        lastPointAt: null,
        rpoSeconds: null,
        backlogBytes: 0,
        throughputBps: 0,
        activeKey: body.machineId,
        createdAt: now,
        updatedAt: now,
      };
      try {
        await db.transaction().execute(async (tx) => {
          await tx.insertInto('protectedItems').values(item).execute();
          for (const d of disks) {
            await tx
              .insertInto('protectedDisks')
              .values({
                id: newId('pd'),
                protectedItemId: item.id,
                name: d.name,
                sizeBytes: d.sizeBytes,
                lastPointAt: null,
                backlogBytes: 0,
                throughputBps: 0,
                initialDoneBytes: 0,
              })
              .execute();
          }
        });
      } catch (err) {
        const code = (err as { code?: unknown }).code;
        if (code === '23505' || code === 'SQLITE_CONSTRAINT_UNIQUE') {
          throw new LifeboatError(
            'LB_VAULT_CONFLICT',
            `Machine ${body.machineId} is already protected; disable that protection first.`,
            {
              details: { field: 'body.machineId' },
            },
          );
        }
        throw err;
      }
      await audit(
        db,
        p,
        'protected-item.create',
        { type: 'protected-item', id: item.id },
        { after: itemToApi(item) },
      );
      const job = await vault.jobs.create(
        { kind: 'enable-replication', target: { type: 'protected-item', id: item.id } },
        p,
      );
      return reply.status(201).send({ ...itemToApi(item), jobId: job?.id });
    },
  );

  app.patch(
    '/api/protected-items/:id',
    {
      config: { access: 'operator' },
      schema: {
        tags: ['protection'],
        summary: 'Change the policy, network mapping or consistency group of a protected item',
        params: idParams,
        body: {
          type: 'object',
          properties: {
            policyId: { type: 'string', minLength: 1 },
            networkMappingId: { type: ['string', 'null'], minLength: 1 },
            consistencyGroup: { type: ['string', 'null'], minLength: 1, maxLength: 200 },
          },
          additionalProperties: false,
          minProperties: 1,
        },
      },
    },
    async (request) => {
      const { id } = request.params as { id: string };
      const body = request.body as {
        policyId?: string;
        networkMappingId?: string | null;
        consistencyGroup?: string | null;
      };
      const before = (await getRow(
        db,
        'protectedItems',
        id,
        'protected item',
      )) as unknown as ProtectedItemRow;
      await requireRef(db, 'policies', body.policyId, 'body.policyId', 'policy');
      await requireRef(
        db,
        'networkMappings',
        body.networkMappingId,
        'body.networkMappingId',
        'network mapping',
      );
      const changes = { ...body, generation: before.generation + 1, updatedAt: nowIso() };
      await db.updateTable('protectedItems').set(changes).where('id', '=', id).execute();
      await audit(
        db,
        principalOf(request),
        'protected-item.update',
        { type: 'protected-item', id },
        {
          before: {
            policyId: before.policyId,
            networkMappingId: before.networkMappingId,
            consistencyGroup: before.consistencyGroup,
          },
          after: body,
        },
      );
      return itemToApi({ ...before, ...changes });
    },
  );

  const actionRoute = (
    action: string,
    summary: string,
    body: Record<string, unknown> | undefined,
    run: (
      item: ProtectedItemRow,
      body: Record<string, unknown>,
      p: ReturnType<typeof principalOf>,
    ) => Promise<unknown>,
  ): void => {
    app.post(
      `/api/protected-items/:id/${action}`,
      {
        config: { access: 'operator' },
        schema: {
          tags: ['protection'],
          summary,
          params: idParams,
          ...(body !== undefined
            ? { body: { type: 'object', properties: body, additionalProperties: false } }
            : {}),
        },
      },
      async (request) => {
        const { id } = request.params as { id: string };
        const item = (await getRow(
          db,
          'protectedItems',
          id,
          'protected item',
        )) as unknown as ProtectedItemRow;
        return run(item, (request.body ?? {}) as Record<string, unknown>, principalOf(request));
      },
    );
  };

  actionRoute(
    'disable',
    'Disable replication (the process server stops; optionally delete the points); starts a disable-replication job',
    { deletePoints: { type: 'boolean', default: false } },
    async (item, body, p) => {
      const next = await transition(vault, item, 'disabled', 'disabled by ' + p.name, p, {
        activeKey: null,
        generation: item.generation + 1,
      });
      const job = await vault.jobs.create(
        {
          kind: 'disable-replication',
          target: { type: 'protected-item', id: item.id },
          params: { deletePoints: body['deletePoints'] === true },
        },
        p,
      );
      return { ...itemToApi(next), jobId: job?.id };
    },
  );
  actionRoute(
    'resync',
    'Mark a protected item for resync (compares chunk hashes, sends what differs)',
    undefined,
    async (item, _b, p) =>
      itemToApi(
        await transition(vault, item, 'resync-needed', 'resync requested by ' + p.name, p, {
          generation: item.generation + 1,
        }),
      ),
  );
  actionRoute(
    'failover',
    'Record a failover of the machine to a recovery point (the recovery host boots it)',
    { pointId: { type: 'string', minLength: 1 } },
    async (item, body, p) => {
      if (body['pointId'] !== undefined) {
        const point = await db
          .selectFrom('recoveryPoints')
          .select('id')
          .where('id', '=', body['pointId'] as string)
          .where('protectedItemId', '=', item.id)
          .executeTakeFirst();
        if (point === undefined)
          throw invalid(
            'body.pointId',
            `no recovery point "${String(body['pointId'])}" of this item.`,
          );
      }
      return itemToApi(
        await transition(
          vault,
          item,
          'failed-over',
          `failed over by ${p.name}${body['pointId'] !== undefined ? ` to point ${String(body['pointId'])}` : ''}`,
          p,
          {
            generation: item.generation + 1,
          },
        ),
      );
    },
  );
  actionRoute(
    'reprotect',
    'Protect a failed-over machine again (replicates back what differs)',
    undefined,
    async (item, _b, p) => {
      const next = await transition(
        vault,
        item,
        'enabling',
        're-protect requested by ' + p.name,
        p,
        { generation: item.generation + 1 },
      );
      const job = await vault.jobs.create(
        { kind: 'enable-replication', target: { type: 'protected-item', id: item.id } },
        p,
      );
      return { ...itemToApi(next), jobId: job?.id };
    },
  );

  app.delete(
    '/api/protected-items/:id',
    {
      config: { access: 'operator' },
      schema: {
        tags: ['protection'],
        summary: 'Forget a disabled protected item (its catalogue points too)',
        params: idParams,
      },
    },
    async (request, reply) => {
      const { id } = request.params as { id: string };
      const item = (await getRow(
        db,
        'protectedItems',
        id,
        'protected item',
      )) as unknown as ProtectedItemRow;
      if (item.state !== 'disabled') {
        throw new LifeboatError(
          'LB_VAULT_INVALID_STATE',
          `Protected item ${id} is ${item.state}; disable it before deleting it.`,
          {
            details: { id, state: item.state },
          },
        );
      }
      await db.transaction().execute(async (tx) => {
        await tx.deleteFrom('protectedDisks').where('protectedItemId', '=', id).execute();
        await tx
          .updateTable('recoveryPoints')
          .set({ protectedItemId: null })
          .where('protectedItemId', '=', id)
          .execute();
        await tx.deleteFrom('protectedItems').where('id', '=', id).execute();
      });
      await audit(
        db,
        principalOf(request),
        'protected-item.delete',
        { type: 'protected-item', id },
        { before: itemToApi(item) },
      );
      return reply.status(204).send();
    },
  );

  const pointQuery = {
    type: 'object',
    properties: {
      ...pageQuerySchema,
      protectedItemId: { type: 'string' },
      targetStoreId: { type: 'string' },
      machine: { type: 'string' },
      disk: { type: 'string' },
      kind: { type: 'string', enum: ['crash', 'app'] },
      cut: { type: 'string' },
      since: isoTime,
      until: isoTime,
    },
    additionalProperties: false,
  };
  const listPoints = async (
    q: Record<string, unknown>,
    parent?: { table: string; id: string; noun: string },
  ): Promise<Buffer> =>
    listPageJson(
      db,
      {
        dialect: vault.dialect,
        fields: pointJsonFields,
        cacheKey: listCacheKey(parent === undefined ? 'points' : `points of ${parent.table}`, q),
        ...(parent !== undefined ? { parent } : {}),
        table: 'recoveryPoints',
        sort: 'time',
        descending: true,
        equals: {
          protectedItemId: q['protectedItemId'] as string | undefined,
          targetStoreId: q['targetStoreId'] as string | undefined,
          machine: q['machine'] as string | undefined,
          disk: q['disk'] as string | undefined,
          kind: q['kind'] as string | undefined,
          cut: q['cut'] as string | undefined,
        },
        where: (qb) => {
          let r = qb;
          if (q['since'] !== undefined)
            r = r.where('time', '>=', new Date(q['since'] as string).toISOString());
          if (q['until'] !== undefined)
            r = r.where('time', '<=', new Date(q['until'] as string).toISOString());
          return r;
        },
      },
      q,
    );

  app.get(
    '/api/recovery-points',
    {
      schema: {
        tags: ['recovery points'],
        summary: 'List recovery points (newest first)',
        querystring: pointQuery,
        response: responses(pageSchema),
      },
    },
    async (request, reply) =>
      reply.type(JSON_TYPE).send(await listPoints(request.query as Record<string, unknown>)),
  );

  app.get(
    '/api/protected-items/:id/points',
    {
      schema: {
        tags: ['recovery points'],
        summary: 'List the recovery points of one protected item (newest first)',
        params: idParams,
        querystring: {
          ...pointQuery,
          properties: (({ protectedItemId: _p, ...rest }) => rest)(pointQuery.properties),
        },
        response: responses(pageSchema),
      },
    },
    async (request, reply) => {
      const { id } = request.params as { id: string };
      const page = await listPoints(
        { ...(request.query as Record<string, unknown>), protectedItemId: id },
        { table: 'protectedItems', id, noun: 'protected item' },
      );
      return reply.type(JSON_TYPE).send(page);
    },
  );

  app.put(
    '/api/recovery-points',
    {
      config: { access: ['component', 'admin'] },
      schema: {
        tags: ['recovery points'],
        summary:
          'Upsert committed points into the catalogue (the process server calls this after each commit)',
        body: {
          type: 'object',
          properties: {
            targetStoreId: { type: 'string', minLength: 1 },
            points: {
              type: 'array',
              minItems: 1,
              maxItems: 10_000,
              items: {
                type: 'object',
                properties: {
                  id: { type: 'string', minLength: 1, maxLength: 200 },
                  machine: { type: 'string', minLength: 1, maxLength: 200 },
                  disk: { type: 'string', minLength: 1, maxLength: 200 },
                  time: isoTime,
                  committedAt: isoTime,
                  kind: { type: 'string', enum: ['crash', 'app'] },
                  size: { type: 'integer', minimum: 0 },
                  cut: { type: 'string', maxLength: 200 },
                  consistencyGroup: { type: 'string', maxLength: 200 },
                  labels: { type: 'object', additionalProperties: { type: 'string' } },
                  parent: { type: 'string', maxLength: 200 },
                },
                required: ['id', 'machine', 'disk', 'time', 'committedAt', 'kind', 'size'],
                additionalProperties: false,
              },
            },
          },
          required: ['targetStoreId', 'points'],
          additionalProperties: false,
        },
      },
    },
    async (request) => {
      const body = request.body as {
        targetStoreId: string;
        points: Array<{
          id: string;
          machine: string;
          disk: string;
          time: string;
          committedAt: string;
          kind: string;
          size: number;
          cut?: string;
          consistencyGroup?: string;
          labels?: Record<string, string>;
          parent?: string;
        }>;
      };
      await requireRef(
        db,
        'targetStores',
        body.targetStoreId,
        'body.targetStoreId',
        'target store',
      );
      return upsertPoints(vault, body.targetStoreId, body.points, principalOf(request));
    },
  );

  app.get(
    '/api/recovery-points/:storeId/:id',
    {
      schema: {
        tags: ['recovery points'],
        summary: 'Get one recovery point',
        params: {
          type: 'object',
          properties: { storeId: { type: 'string' }, id: { type: 'string' } },
          required: ['storeId', 'id'],
        },
      },
    },
    async (request) => {
      const { storeId, id } = request.params as { storeId: string; id: string };
      const row = await db
        .selectFrom('recoveryPoints')
        .selectAll()
        .where('targetStoreId', '=', storeId)
        .where('id', '=', id)
        .executeTakeFirst();
      if (row === undefined) throw notFound('recovery point', id);
      return pointToApi(row);
    },
  );
}
