import type { FastifyInstance } from 'fastify';
import type { Kysely } from 'kysely';
import type { VaultDatabase } from '../db/schema.js';
import { newId, nowIso } from '../ids.js';
import { audit } from '../services/audit.js';
import { conflict, invalid, isUniqueViolation, notFound } from '../services/errors.js';
import { listPage, pageQuerySchema } from '../services/list-page.js';
import type { Principal } from '../services/principal.js';
import type { VaultContext } from '../vault-context.js';
import { principalOf, type Access } from './auth.js';

type Row = Record<string, unknown>;

/** Describes a resource with plain create/read/update/delete routes. */
export interface CrudSpec {
  /** Singular noun for messages and audit actions (`site`, `policy`). */
  noun: string;
  /** Route prefix, e.g. `/api/sites`. */
  path: string;
  table: keyof VaultDatabase;
  idPrefix: string;
  /** OpenAPI tag. */
  tag: string;
  /** JSON schema properties of the create body (all are accepted in a PATCH). */
  properties: Record<string, unknown>;
  required: string[];
  /** Query parameters that filter by equality on the column of the same name. */
  filters?: string[];
  /** Column `q` searches in. @default 'name' */
  search?: string;
  /** Who may create, change and delete. */
  writeAccess: Access;
  /** Who may read. @default 'viewer' */
  readAccess?: Access;
  /** Row → API object (parse JSON, drop sealed secrets). */
  toApi(row: Row): Row;
  /** Validated body → columns (seal secrets, check references); `existing` on PATCH. */
  toColumns(input: Row, vault: VaultContext, existing?: Row): Promise<Row>;
  /** Runs after a PATCH is stored (e.g. a policy change tells its items' process servers). */
  afterUpdate?(id: string, input: Row, vault: VaultContext): Promise<void>;
  /** Refuses a delete that would leave dangling references (409). */
  beforeDelete?(id: string, vault: VaultContext): Promise<void>;
}

const idParams = {
  type: 'object',
  properties: { id: { type: 'string', minLength: 1, maxLength: 100 } },
  required: ['id'],
} as const;

/** The error body schema, for the OpenAPI document. */
export const errorSchema = {
  type: 'object',
  properties: {
    code: { type: 'string' },
    message: { type: 'string' },
    details: { type: 'object', additionalProperties: true },
  },
} as const;

/** Response schemas shared by routes (any 4xx has the error body). */
export function responses(ok: unknown, status = 200): Record<string, unknown> {
  return { [status]: ok, '4xx': errorSchema };
}

const anyObject = { type: 'object', additionalProperties: true } as const;

/** Schema of a list page. */
export const pageSchema = {
  type: 'object',
  properties: {
    items: { type: 'array', items: anyObject },
    nextCursor: { type: ['string', 'null'] },
    total: { type: 'integer' },
  },
} as const;

/** 400 naming the field when a referenced id does not exist. */
export async function requireRef(
  db: Kysely<VaultDatabase>,
  table: keyof VaultDatabase,
  id: unknown,
  field: string,
  noun: string,
): Promise<void> {
  if (id === undefined || id === null) return;
  const row = await db
    .selectFrom(table)
    .select('id' as never)
    .where('id' as never, '=', id as never)
    .executeTakeFirst();
  if (row === undefined) throw invalid(field, `no ${noun} with id "${String(id)}".`);
}

/** Loads a row by id or throws 404. */
export async function getRow(
  db: Kysely<VaultDatabase>,
  table: keyof VaultDatabase,
  id: string,
  noun: string,
): Promise<Row> {
  const row = (await db
    .selectFrom(table)
    .selectAll()
    .where('id' as never, '=', id as never)
    .executeTakeFirst()) as Row | undefined;
  if (row === undefined) throw notFound(noun, id);
  return row;
}

async function insertOrConflict(
  noun: string,
  fn: () => Promise<unknown>,
  input: Row,
): Promise<void> {
  try {
    await fn();
  } catch (err) {
    if (isUniqueViolation(err)) {
      throw conflict(
        'LB_VAULT_CONFLICT',
        `A ${noun} named "${String(input['name'] ?? '')}" already exists. Choose another name.`,
        { field: 'body.name' },
      );
    }
    throw err;
  }
}

/** Registers list, get, create, update and delete routes for one resource. */
export function registerCrud(app: FastifyInstance, vault: VaultContext, spec: CrudSpec): void {
  const { db } = vault;
  const readAccess = spec.readAccess ?? 'viewer';
  const filterProps = Object.fromEntries(
    (spec.filters ?? []).map((f) => [f, { type: 'string', minLength: 1, maxLength: 200 }]),
  );
  const createBody = {
    type: 'object',
    properties: spec.properties,
    required: spec.required,
    additionalProperties: false,
  };
  const patchBody = {
    type: 'object',
    properties: spec.properties,
    additionalProperties: false,
    minProperties: 1,
  };
  const actor = (p: Principal): Principal => p;

  app.get(
    spec.path,
    {
      config: { access: readAccess },
      schema: {
        tags: [spec.tag],
        summary: `List ${spec.noun}s`,
        querystring: {
          type: 'object',
          properties: { ...pageQuerySchema, q: { type: 'string', maxLength: 200 }, ...filterProps },
          additionalProperties: false,
        },
        response: responses(pageSchema),
      },
    },
    async (request) => {
      const q = request.query as Row & {
        q?: string;
        limit?: number;
        cursor?: string;
        offset?: number;
      };
      const page = await listPage(
        db,
        {
          table: spec.table,
          equals: Object.fromEntries(
            (spec.filters ?? []).map((f) => [f, q[f] as string | undefined]),
          ),
          search: { column: spec.search ?? 'name', q: q.q },
        },
        q,
      );
      return { ...page, items: page.items.map((r) => spec.toApi(r)) };
    },
  );

  app.get(
    `${spec.path}/:id`,
    {
      config: { access: readAccess },
      schema: {
        tags: [spec.tag],
        summary: `Get a ${spec.noun}`,
        params: idParams,
        response: responses(anyObject),
      },
    },
    async (request) =>
      spec.toApi(await getRow(db, spec.table, (request.params as { id: string }).id, spec.noun)),
  );

  app.post(
    spec.path,
    {
      config: { access: spec.writeAccess },
      schema: {
        tags: [spec.tag],
        summary: `Create a ${spec.noun}`,
        body: createBody,
        response: responses(anyObject, 201),
      },
    },
    async (request, reply) => {
      const input = request.body as Row;
      const now = nowIso();
      const row = {
        id: newId(spec.idPrefix),
        ...(await spec.toColumns(input, vault)),
        createdAt: now,
        updatedAt: now,
      };
      await insertOrConflict(
        spec.noun,
        () =>
          db
            .insertInto(spec.table)
            .values(row as never)
            .execute(),
        input,
      );
      const api = spec.toApi(row);
      await audit(
        db,
        actor(principalOf(request)),
        `${spec.noun}.create`,
        { type: spec.noun, id: row.id },
        { after: api },
      );
      return reply.status(201).send(api);
    },
  );

  app.patch(
    `${spec.path}/:id`,
    {
      config: { access: spec.writeAccess },
      schema: {
        tags: [spec.tag],
        summary: `Change a ${spec.noun}`,
        params: idParams,
        body: patchBody,
        response: responses(anyObject),
      },
    },
    async (request) => {
      const { id } = request.params as { id: string };
      const existing = await getRow(db, spec.table, id, spec.noun);
      const input = request.body as Row;
      const changes = { ...(await spec.toColumns(input, vault, existing)), updatedAt: nowIso() };
      await insertOrConflict(
        spec.noun,
        () =>
          db
            .updateTable(spec.table)
            .set(changes as never)
            .where('id' as never, '=', id as never)
            .execute(),
        input,
      );
      await spec.afterUpdate?.(id, input, vault);
      const after = spec.toApi({ ...existing, ...changes });
      await audit(
        db,
        actor(principalOf(request)),
        `${spec.noun}.update`,
        { type: spec.noun, id },
        {
          before: spec.toApi(existing),
          after,
        },
      );
      return after;
    },
  );

  app.delete(
    `${spec.path}/:id`,
    {
      config: { access: spec.writeAccess },
      schema: { tags: [spec.tag], summary: `Delete a ${spec.noun}`, params: idParams },
    },
    async (request, reply) => {
      const { id } = request.params as { id: string };
      const existing = await getRow(db, spec.table, id, spec.noun);
      await spec.beforeDelete?.(id, vault);
      await db
        .deleteFrom(spec.table)
        .where('id' as never, '=', id as never)
        .execute();
      await audit(
        db,
        actor(principalOf(request)),
        `${spec.noun}.delete`,
        { type: spec.noun, id },
        {
          before: spec.toApi(existing),
        },
      );
      return reply.status(204).send();
    },
  );
}

/** 409 when any row of `table` has `column` = id. */
export async function refuseIfReferenced(
  db: Kysely<VaultDatabase>,
  id: string,
  noun: string,
  refs: Array<{ table: keyof VaultDatabase; column: string; noun: string }>,
): Promise<void> {
  for (const ref of refs) {
    const row = await db
      .selectFrom(ref.table)
      .select('id' as never)
      .where(ref.column as never, '=', id as never)
      .executeTakeFirst();
    if (row !== undefined) {
      throw conflict(
        'LB_VAULT_IN_USE',
        `The ${noun} "${id}" is used by a ${ref.noun}. Remove or change that first.`,
        { usedBy: ref.noun },
      );
    }
  }
}
