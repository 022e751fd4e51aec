import type { FastifyInstance } from 'fastify';
import { LifeboatError } from '@lifeboat/protocol';
import type { ComponentRow } from '../db/schema.js';
import { hashToken, newId, newSecret, nowIso } from '../ids.js';
import { audit } from '../services/audit.js';
import { notFound } from '../services/errors.js';
import { listPage, pageQuerySchema } from '../services/list-page.js';
import type { ComponentKind, Principal } from '../services/principal.js';
import { reportComponentJob } from '../services/component-jobs.js';
import { applyItemReports, assignmentsFor } from '../services/protection.js';
import {
  processServerOperations,
  recoveryHostAssignments,
  recoveryHostInstance,
} from '../services/recovery-runs.js';
import type { VaultContext } from '../vault-context.js';
import { principalOf } from './auth.js';
import { getRow, pageSchema, requireRef, responses } from './crud-routes.js';

const kinds = ['process-server', 'recovery-host', 'agent'] as const;
const idParams = { type: 'object', properties: { id: { type: 'string' } }, required: ['id'] };

/** Health status derived from the last heartbeat. */
export function componentStatus(c: ComponentRow, vault: VaultContext, now = Date.now()): string {
  if (c.lastHeartbeatAt === null) return 'never-seen';
  const age = now - Date.parse(c.lastHeartbeatAt);
  return age > vault.options.heartbeatTimeoutSeconds * 1000 ? 'unreachable' : 'healthy';
}

/** A component as the API shows it. */
export function componentToApi(c: ComponentRow, vault: VaultContext): Record<string, unknown> {
  return { ...c, health: JSON.parse(c.health) as unknown, status: componentStatus(c, vault) };
}

function asComponent(
  p: Principal,
  kind?: ComponentKind,
): Extract<Principal, { type: 'component' }> {
  if (p.type !== 'component' || (kind !== undefined && p.kind !== kind)) {
    throw new LifeboatError(
      'LB_VAULT_FORBIDDEN',
      `Only a registered ${kind ?? 'component'} may call this.`,
    );
  }
  return p;
}

/** Registration keys, registration, certificates, heartbeats, and the lists of components. */
export function registerComponentRoutes(app: FastifyInstance, vault: VaultContext): void {
  const { db } = vault;

  app.get(
    '/api/ca.pem',
    {
      config: { access: 'public' },
      schema: { tags: ['registration'], summary: "The vault CA's certificate (PEM)" },
    },
    async (_request, reply) => reply.type('application/x-pem-file').send(vault.ca.certificate),
  );

  app.post(
    '/api/registration-keys',
    {
      config: { access: 'admin' },
      schema: {
        tags: ['registration'],
        summary: 'Create a one-time registration key (the key is shown once)',
        body: {
          type: 'object',
          properties: {
            kind: { type: 'string', enum: kinds },
            expiresInSeconds: {
              type: 'integer',
              minimum: 60,
              maximum: 30 * 86_400,
              default: 86_400,
            },
            description: { type: 'string', maxLength: 500 },
          },
          required: ['kind'],
          additionalProperties: false,
        },
      },
    },
    async (request, reply) => {
      const body = request.body as { kind: string; expiresInSeconds: number; description?: string };
      const p = principalOf(request);
      const key = newSecret('lbk');
      const now = new Date();
      const row = {
        id: newId('key'),
        kind: body.kind,
        keyHash: hashToken(key),
        description: body.description ?? '',
        expiresAt: nowIso(new Date(now.getTime() + body.expiresInSeconds * 1000)),
        usedAt: null,
        usedByComponentId: null,
        createdBy: p.name,
        createdAt: nowIso(now),
      };
      await db.insertInto('registrationKeys').values(row).execute();
      const api = { ...row, keyHash: undefined };
      await audit(
        db,
        p,
        'registration-key.create',
        { type: 'registration-key', id: row.id },
        { after: api },
      );
      return reply.status(201).send({ ...api, key });
    },
  );

  app.get(
    '/api/registration-keys',
    {
      config: { access: 'admin' },
      schema: {
        tags: ['registration'],
        summary: 'List registration keys (never the keys themselves)',
        querystring: {
          type: 'object',
          properties: {
            ...pageQuerySchema,
            kind: { type: 'string', enum: kinds },
            state: { type: 'string', enum: ['unused', 'used', 'expired'] },
          },
          additionalProperties: false,
        },
        response: responses(pageSchema),
      },
    },
    async (request) => {
      const q = request.query as {
        kind?: string;
        state?: string;
        limit?: number;
        cursor?: string;
        offset?: number;
      };
      const now = nowIso();
      const page = await listPage(
        db,
        {
          table: 'registrationKeys',
          equals: { kind: q.kind },
          where: (qb) =>
            q.state === 'used'
              ? qb.where('usedAt', 'is not', null)
              : q.state === 'unused'
                ? qb.where('usedAt', 'is', null).where('expiresAt', '>=', now)
                : q.state === 'expired'
                  ? qb.where('usedAt', 'is', null).where('expiresAt', '<', now)
                  : qb,
        },
        q,
      );
      return {
        ...page,
        items: page.items.map((k) => ({
          ...k,
          keyHash: undefined,
          state:
            k['usedAt'] !== null ? 'used' : (k['expiresAt'] as string) < now ? 'expired' : 'unused',
        })),
      };
    },
  );

  app.delete(
    '/api/registration-keys/:id',
    {
      config: { access: 'admin' },
      schema: { tags: ['registration'], summary: 'Revoke an unused key', params: idParams },
    },
    async (request, reply) => {
      const { id } = request.params as { id: string };
      const before = await getRow(db, 'registrationKeys', id, 'registration key');
      await db.deleteFrom('registrationKeys').where('id', '=', id).execute();
      await audit(
        db,
        principalOf(request),
        'registration-key.delete',
        { type: 'registration-key', id },
        {
          before: { ...before, keyHash: undefined },
        },
      );
      return reply.status(204).send();
    },
  );

  app.post(
    '/api/register',
    {
      config: { access: 'public' },
      schema: {
        tags: ['registration'],
        summary:
          'Register a process server, recovery host or agent with a one-time key; returns its certificate and token',
        body: {
          type: 'object',
          properties: {
            key: { type: 'string', minLength: 1, maxLength: 200 },
            kind: { type: 'string', enum: kinds },
            name: {
              type: 'string',
              minLength: 1,
              maxLength: 200,
              pattern: '^[A-Za-z0-9][A-Za-z0-9._-]*$',
            },
            siteId: { type: 'string', minLength: 1, maxLength: 100 },
            address: { type: 'string', minLength: 1, maxLength: 500 },
            version: { type: 'string', maxLength: 100 },
            csr: { type: 'string', minLength: 1, maxLength: 20_000 },
          },
          required: ['key', 'kind', 'name'],
          additionalProperties: false,
        },
      },
    },
    async (request, reply) => {
      const body = request.body as {
        key: string;
        kind: ComponentKind;
        name: string;
        siteId?: string;
        address?: string;
        version?: string;
        csr?: string;
      };
      const key = await db
        .selectFrom('registrationKeys')
        .selectAll()
        .where('keyHash', '=', hashToken(body.key))
        .executeTakeFirst();
      if (key === undefined) {
        throw new LifeboatError(
          'LB_VAULT_REGISTRATION_KEY_UNKNOWN',
          'The registration key is unknown or was revoked. Ask an admin for a new key (lifeboat vault key create).',
        );
      }
      if (key.usedAt !== null) {
        throw new LifeboatError(
          'LB_VAULT_REGISTRATION_KEY_USED',
          'The registration key was already used; keys are one-time. Ask an admin for a new key.',
          {
            details: { keyId: key.id, usedAt: key.usedAt },
          },
        );
      }
      const now = new Date();
      if (key.expiresAt < nowIso(now)) {
        throw new LifeboatError(
          'LB_VAULT_REGISTRATION_KEY_EXPIRED',
          `The registration key expired at ${key.expiresAt}. Ask an admin for a new key.`,
          {
            details: { keyId: key.id, expiresAt: key.expiresAt },
          },
        );
      }
      if (key.kind !== body.kind) {
        throw new LifeboatError(
          'LB_VAULT_INVALID_INPUT',
          `Invalid body.kind: this key registers a ${key.kind}, not a ${body.kind}.`,
          {
            details: { field: 'body.kind' },
          },
        );
      }
      await requireRef(db, 'sites', body.siteId, 'body.siteId', 'site');
      const componentId = newId(
        body.kind === 'process-server' ? 'ps' : body.kind === 'recovery-host' ? 'rh' : 'agt',
      );
      const cert = await vault.ca.issue(
        componentId,
        [body.name, ...(body.address !== undefined ? [body.address.replace(/:\d+$/, '')] : [])],
        body.csr,
      );
      // Consume the key with a conditional update: of two registrations racing with one key, one wins.
      const consumed = await db
        .updateTable('registrationKeys')
        .set({ usedAt: nowIso(now), usedByComponentId: componentId })
        .where('id', '=', key.id)
        .where('usedAt', 'is', null)
        .executeTakeFirst();
      if (Number(consumed.numUpdatedRows) !== 1) {
        throw new LifeboatError(
          'LB_VAULT_REGISTRATION_KEY_USED',
          'The registration key was already used; keys are one-time. Ask an admin for a new key.',
          {
            details: { keyId: key.id },
          },
        );
      }
      const token = newSecret('lbc');
      const row: ComponentRow = {
        id: componentId,
        kind: body.kind,
        name: body.name,
        siteId: body.siteId ?? null,
        address: body.address ?? null,
        version: body.version ?? null,
        certificateSerial: cert.serial,
        certificateExpiresAt: cert.expiresAt,
        lastHeartbeatAt: null,
        health: '{}',
        createdAt: nowIso(now),
        updatedAt: nowIso(now),
      };
      await db.insertInto('components').values(row).execute();
      await db
        .insertInto('tokens')
        .values({
          id: newId('tok'),
          kind: 'component',
          name: body.name,
          tokenHash: hashToken(token),
          userId: null,
          componentId,
          expiresAt: null,
          lastUsedAt: null,
          createdAt: nowIso(now),
        })
        .execute();
      const actor: Principal = {
        type: 'component',
        id: componentId,
        name: body.name,
        kind: body.kind,
        tokenId: '',
      };
      await audit(
        db,
        actor,
        `${body.kind}.register`,
        { type: body.kind, id: componentId },
        {
          after: {
            name: body.name,
            siteId: row.siteId,
            keyId: key.id,
            certificateSerial: cert.serial,
          },
        },
      );
      return reply.status(201).send({
        component: componentToApi(row, vault),
        token,
        certificate: cert.certificate,
        caCertificate: vault.ca.certificate,
        certificateExpiresAt: cert.expiresAt,
        ...(cert.privateKey !== undefined ? { privateKey: cert.privateKey } : {}),
      });
    },
  );

  app.post(
    '/api/components/self/certificate',
    {
      config: { access: 'component' },
      schema: {
        tags: ['registration'],
        summary: 'Renew the calling component’s certificate (before it expires)',
        body: {
          type: 'object',
          properties: { csr: { type: 'string', minLength: 1, maxLength: 20_000 } },
          additionalProperties: false,
        },
      },
    },
    async (request) => {
      const p = asComponent(principalOf(request));
      const body = (request.body ?? {}) as { csr?: string };
      const row = (await getRow(db, 'components', p.id, 'component')) as unknown as ComponentRow;
      const cert = await vault.ca.issue(
        p.id,
        [row.name, ...(row.address !== null ? [row.address.replace(/:\d+$/, '')] : [])],
        body.csr,
      );
      await db
        .updateTable('components')
        .set({
          certificateSerial: cert.serial,
          certificateExpiresAt: cert.expiresAt,
          updatedAt: nowIso(),
        })
        .where('id', '=', p.id)
        .execute();
      await audit(
        db,
        p,
        `${p.kind}.renew-certificate`,
        { type: p.kind, id: p.id },
        {
          before: { certificateSerial: row.certificateSerial },
          after: { certificateSerial: cert.serial, certificateExpiresAt: cert.expiresAt },
        },
      );
      return {
        certificate: cert.certificate,
        caCertificate: vault.ca.certificate,
        certificateExpiresAt: cert.expiresAt,
        ...(cert.privateKey !== undefined ? { privateKey: cert.privateKey } : {}),
      };
    },
  );

  app.post(
    '/api/components/self/heartbeat',
    {
      config: { access: 'component' },
      schema: {
        tags: ['components'],
        summary:
          'Heartbeat with health and per-item replication status (process servers, recovery hosts, agents)',
        body: {
          type: 'object',
          properties: {
            version: { type: 'string', maxLength: 100 },
            address: { type: 'string', maxLength: 500 },
            health: {
              type: 'object',
              properties: {
                journalUsedBytes: { type: 'number', minimum: 0 },
                journalCapacityBytes: { type: 'number', minimum: 0 },
                storeReachable: { type: 'boolean' },
                cpuPercent: { type: 'number', minimum: 0 },
                memoryBytes: { type: 'number', minimum: 0 },
              },
              additionalProperties: true,
            },
            items: {
              type: 'array',
              maxItems: 100_000,
              items: {
                type: 'object',
                properties: {
                  id: { type: 'string', minLength: 1 },
                  state: {
                    type: 'string',
                    enum: ['initial-replication', 'protected', 'resync-needed'],
                  },
                  reason: { type: 'string', maxLength: 1000 },
                  appliedGeneration: { type: 'integer', minimum: 0 },
                  backlogBytes: { type: 'number', minimum: 0 },
                  throughputBps: { type: 'number', minimum: 0 },
                  disks: {
                    type: 'array',
                    items: {
                      type: 'object',
                      properties: {
                        name: { type: 'string', minLength: 1 },
                        backlogBytes: { type: 'number', minimum: 0 },
                        throughputBps: { type: 'number', minimum: 0 },
                        initialDoneBytes: { type: 'number', minimum: 0 },
                      },
                      required: ['name'],
                      additionalProperties: false,
                    },
                  },
                },
                required: ['id'],
                additionalProperties: false,
              },
            },
          },
          additionalProperties: false,
        },
      },
    },
    async (request) => {
      const p = asComponent(principalOf(request));
      const body = request.body as {
        version?: string;
        address?: string;
        health?: Record<string, unknown>;
        items?: Parameters<typeof applyItemReports>[2];
      };
      const now = nowIso();
      await db
        .updateTable('components')
        .set({
          lastHeartbeatAt: now,
          updatedAt: now,
          ...(body.health !== undefined ? { health: JSON.stringify(body.health) } : {}),
          ...(body.version !== undefined ? { version: body.version } : {}),
          ...(body.address !== undefined ? { address: body.address } : {}),
        })
        .where('id', '=', p.id)
        .execute();
      const rejected = body.items !== undefined ? await applyItemReports(vault, p, body.items) : [];
      const instance = body.health?.['instanceId'];
      if (p.kind === 'recovery-host' && typeof instance === 'string') {
        await recoveryHostInstance(vault, p.id, instance);
      }
      return { serverTime: now, rejected };
    },
  );

  app.get(
    '/api/components/self/assignments',
    {
      config: { access: 'component' },
      schema: {
        tags: ['components'],
        summary:
          "A component's desired state: a process server's items to replicate or stop (with policy and store) and its operations (final syncs); a recovery host's operations (test failovers, failovers) and the stores they read",
      },
    },
    async (request) => {
      const p = asComponent(principalOf(request));
      if (p.kind === 'recovery-host') return recoveryHostAssignments(vault, p.id);
      if (p.kind !== 'process-server') {
        throw new LifeboatError(
          'LB_VAULT_FORBIDDEN',
          'Only a registered process server or recovery host has assignments.',
        );
      }
      return {
        ...((await assignmentsFor(vault, p.id)) as Record<string, unknown>),
        operations: await processServerOperations(vault, p.id),
      };
    },
  );

  app.put(
    '/api/components/self/jobs/:id',
    {
      config: { access: 'component' },
      schema: {
        tags: ['jobs'],
        summary:
          "Report a job a component runs itself (a recovery host's test failover): the vault shows it with its steps, and fails it if the component stops reporting",
        params: idParams,
        body: {
          type: 'object',
          properties: {
            kind: { type: 'string', minLength: 1, maxLength: 100 },
            target: { type: 'object', additionalProperties: true },
            state: { type: 'string', enum: ['running', 'succeeded', 'failed'] },
            progress: { type: 'number', minimum: 0, maximum: 1 },
            steps: {
              type: 'array',
              maxItems: 200,
              items: {
                type: 'object',
                properties: {
                  name: { type: 'string', minLength: 1, maxLength: 200 },
                  state: {
                    type: 'string',
                    enum: ['pending', 'running', 'succeeded', 'failed', 'done'],
                  },
                  startedAt: { type: 'string', format: 'date-time' },
                  endedAt: { type: 'string', format: 'date-time' },
                  durationMs: { type: 'number' },
                  detail: { type: 'object', additionalProperties: true },
                  error: { type: 'object', additionalProperties: true },
                },
                required: ['name', 'state'],
                additionalProperties: false,
              },
            },
            error: {
              type: 'object',
              properties: {
                code: { type: 'string' },
                message: { type: 'string' },
                details: { type: 'object', additionalProperties: true },
              },
              required: ['code', 'message'],
              additionalProperties: false,
            },
            result: { type: 'object', additionalProperties: true },
          },
          required: ['kind', 'state', 'steps'],
          additionalProperties: false,
        },
      },
    },
    async (request) => {
      const p = asComponent(principalOf(request));
      const { id: externalId } = request.params as { id: string };
      const body = request.body as {
        kind: string;
        target?: Record<string, unknown>;
        state: 'running' | 'succeeded' | 'failed';
        progress?: number;
        steps: Array<{
          name: string;
          state: string;
          startedAt?: string;
          endedAt?: string;
          detail?: Record<string, unknown>;
          error?: { message?: string };
        }>;
        error?: { code: string; message: string; details?: Record<string, unknown> };
        result?: Record<string, unknown>;
      };
      return reportComponentJob(vault, p, externalId, body);
    },
  );

  for (const kind of kinds) {
    const path = `/api/${kind}s`;
    const tag = `${kind}s`;
    app.get(
      path,
      {
        schema: {
          tags: [tag],
          summary: `List ${kind}s`,
          querystring: {
            type: 'object',
            properties: { ...pageQuerySchema, q: { type: 'string' }, siteId: { type: 'string' } },
            additionalProperties: false,
          },
          response: responses(pageSchema),
        },
      },
      async (request) => {
        const q = request.query as {
          q?: string;
          siteId?: string;
          limit?: number;
          cursor?: string;
          offset?: number;
        };
        const page = await listPage(
          db,
          {
            table: 'components',
            equals: { kind, siteId: q.siteId },
            search: { column: 'name', q: q.q },
          },
          q,
        );
        return {
          ...page,
          items: page.items.map((c) => componentToApi(c as unknown as ComponentRow, vault)),
        };
      },
    );
    const load = async (id: string): Promise<ComponentRow> => {
      const row = await db
        .selectFrom('components')
        .selectAll()
        .where('id', '=', id)
        .where('kind', '=', kind)
        .executeTakeFirst();
      if (row === undefined) throw notFound(kind, id);
      return row;
    };
    app.get(
      `${path}/:id`,
      { schema: { tags: [tag], summary: `Get a ${kind} with its health`, params: idParams } },
      async (request) => componentToApi(await load((request.params as { id: string }).id), vault),
    );
    app.patch(
      `${path}/:id`,
      {
        config: { access: 'admin' },
        schema: {
          tags: [tag],
          summary: `Rename a ${kind} or move it to a site`,
          params: idParams,
          body: {
            type: 'object',
            properties: {
              name: { type: 'string', minLength: 1, maxLength: 200 },
              siteId: { type: ['string', 'null'], minLength: 1 },
            },
            additionalProperties: false,
            minProperties: 1,
          },
        },
      },
      async (request) => {
        const { id } = request.params as { id: string };
        const before = await load(id);
        const body = request.body as { name?: string; siteId?: string | null };
        await requireRef(db, 'sites', body.siteId, 'body.siteId', 'site');
        const changes = { ...body, updatedAt: nowIso() };
        await db.updateTable('components').set(changes).where('id', '=', id).execute();
        vault.authCache.clear();
        await audit(
          db,
          principalOf(request),
          `${kind}.update`,
          { type: kind, id },
          { before: { name: before.name, siteId: before.siteId }, after: body },
        );
        return componentToApi({ ...before, ...changes }, vault);
      },
    );
    app.delete(
      `${path}/:id`,
      {
        config: { access: 'admin' },
        schema: {
          tags: [tag],
          summary: `Unregister a ${kind} (its token stops working)`,
          params: idParams,
        },
      },
      async (request, reply) => {
        const { id } = request.params as { id: string };
        const before = await load(id);
        if (kind === 'process-server') {
          const used = await db
            .selectFrom('protectedItems')
            .select('id')
            .where('processServerId', '=', id)
            .where('activeKey', 'is not', null)
            .executeTakeFirst();
          if (used !== undefined) {
            throw new LifeboatError(
              'LB_VAULT_IN_USE',
              `The process server "${id}" still replicates protected items; move or disable them first.`,
              {
                details: { usedBy: 'protected item' },
              },
            );
          }
        }
        if (kind === 'agent') {
          const host = await db
            .selectFrom('sourceHosts')
            .select('id')
            .where('agentId', '=', id)
            .executeTakeFirst();
          if (host !== undefined) {
            throw new LifeboatError(
              'LB_VAULT_IN_USE',
              `The agent "${id}" serves source host "${host.id}"; give that host another agent (or none) first.`,
              { details: { usedBy: 'source host', id: host.id } },
            );
          }
        }
        await db.deleteFrom('tokens').where('componentId', '=', id).execute();
        await db.deleteFrom('components').where('id', '=', id).execute();
        vault.authCache.clear();
        await audit(
          db,
          principalOf(request),
          `${kind}.delete`,
          { type: kind, id },
          { before: { name: before.name } },
        );
        return reply.status(204).send();
      },
    );
  }
}
