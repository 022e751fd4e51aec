import type { FastifyInstance } from 'fastify';
import { LifeboatError } from '@lifeboat/protocol';
import type { UserRow } from '../db/schema.js';
import { hashToken, newId, newSecret, nowIso } from '../ids.js';
import { hashPassword, verifyPassword } from '../passwords.js';
import { audit } from '../services/audit.js';
import { conflict, isUniqueViolation } from '../services/errors.js';
import type { Role } from '../services/principal.js';
import { listPage, pageQuerySchema } from '../services/list-page.js';
import type { VaultContext } from '../vault-context.js';
import { principalOf } from './auth.js';
import { getRow, pageSchema, responses } from './crud-routes.js';

const username = { type: 'string', minLength: 1, maxLength: 100, pattern: '^[A-Za-z0-9._@-]+$' };
const password = { type: 'string', minLength: 8, maxLength: 1024 };
const role = { type: 'string', enum: ['admin', 'operator', 'viewer'] };
const idParams = { type: 'object', properties: { id: { type: 'string' } }, required: ['id'] };

/** A user as the API shows it (never the hash). */
export function userToApi(u: UserRow): Record<string, unknown> {
  return {
    id: u.id,
    username: u.username,
    role: u.role,
    disabled: u.disabled === 1,
    createdAt: u.createdAt,
    updatedAt: u.updatedAt,
    lastLoginAt: u.lastLoginAt,
  };
}

/** Creates a user (used by the routes and by the first start). */
export async function createUser(
  vault: VaultContext,
  input: { username: string; password: string; role: string },
): Promise<UserRow> {
  const now = nowIso();
  const row: UserRow = {
    id: newId('usr'),
    username: input.username,
    passwordHash: await hashPassword(input.password, vault.options.passwordCost),
    role: input.role,
    disabled: 0,
    createdAt: now,
    updatedAt: now,
    lastLoginAt: null,
  };
  try {
    await vault.db.insertInto('users').values(row).execute();
  } catch (err) {
    if (isUniqueViolation(err)) {
      throw conflict('LB_VAULT_CONFLICT', `A user named "${input.username}" already exists.`, {
        field: 'body.username',
      });
    }
    throw err;
  }
  return row;
}

/** Login, sessions, users and API tokens. */
export function registerUserRoutes(app: FastifyInstance, vault: VaultContext): void {
  const { db } = vault;

  app.post(
    '/api/auth/login',
    {
      config: { access: 'public' },
      schema: {
        tags: ['auth'],
        summary: 'Log in with a password; returns a session token',
        body: {
          type: 'object',
          properties: { username, password: { type: 'string', minLength: 1, maxLength: 1024 } },
          required: ['username', 'password'],
          additionalProperties: false,
        },
      },
    },
    async (request) => {
      const body = request.body as { username: string; password: string };
      const user = await db
        .selectFrom('users')
        .selectAll()
        .where('username', '=', body.username)
        .executeTakeFirst();
      // Hash even for unknown users so timing does not tell which usernames exist.
      const ok =
        user !== undefined
          ? await verifyPassword(body.password, user.passwordHash)
          : (await hashPassword(body.password, vault.options.passwordCost), false);
      if (user === undefined || !ok || user.disabled === 1) {
        throw new LifeboatError(
          'LB_VAULT_LOGIN_FAILED',
          'Wrong username or password, or the user is disabled.',
        );
      }
      const token = newSecret('lbs');
      const now = new Date();
      const expiresAt = nowIso(new Date(now.getTime() + vault.options.sessionTtlSeconds * 1000));
      await db
        .insertInto('tokens')
        .values({
          id: newId('tok'),
          kind: 'session',
          name: 'login',
          tokenHash: hashToken(token),
          userId: user.id,
          componentId: null,
          expiresAt,
          lastUsedAt: null,
          createdAt: nowIso(now),
        })
        .execute();
      await db
        .updateTable('users')
        .set({ lastLoginAt: nowIso(now) })
        .where('id', '=', user.id)
        .execute();
      await audit(
        db,
        { type: 'user', id: user.id, name: user.username, role: user.role as Role, tokenId: '' },
        'user.login',
        { type: 'user', id: user.id },
        { after: { ip: request.ip } },
      );
      return { token, expiresAt, user: userToApi(user) };
    },
  );

  app.post(
    '/api/auth/password',
    {
      config: { access: 'viewer' },
      schema: {
        tags: ['auth'],
        summary: 'Change your own password (ends your other sessions)',
        body: {
          type: 'object',
          properties: {
            currentPassword: { type: 'string', minLength: 1, maxLength: 1024 },
            newPassword: password,
          },
          required: ['currentPassword', 'newPassword'],
          additionalProperties: false,
        },
      },
    },
    async (request, reply) => {
      const p = principalOf(request);
      if (p.type !== 'user')
        throw new LifeboatError('LB_VAULT_FORBIDDEN', 'Only users have passwords.');
      const body = request.body as { currentPassword: string; newPassword: string };
      const user = await db
        .selectFrom('users')
        .selectAll()
        .where('id', '=', p.id)
        .executeTakeFirstOrThrow();
      if (!(await verifyPassword(body.currentPassword, user.passwordHash))) {
        throw new LifeboatError(
          'LB_VAULT_INVALID_INPUT',
          'Invalid body.currentPassword: it is not your current password.',
          {
            details: { field: 'body.currentPassword' },
          },
        );
      }
      await db
        .updateTable('users')
        .set({
          passwordHash: await hashPassword(body.newPassword, vault.options.passwordCost),
          updatedAt: nowIso(),
        })
        .where('id', '=', p.id)
        .execute();
      await db
        .deleteFrom('tokens')
        .where('userId', '=', p.id)
        .where('kind', '=', 'session')
        .where('id', '!=', p.tokenId)
        .execute();
      vault.authCache.clear();
      await audit(
        db,
        p,
        'user.password',
        { type: 'user', id: p.id },
        { after: { password: 'changed' } },
      );
      return reply.status(204).send();
    },
  );

  app.post(
    '/api/auth/logout',
    {
      config: { access: ['viewer', 'component'] },
      schema: { tags: ['auth'], summary: 'Revoke the token of this request' },
    },
    async (request, reply) => {
      const p = principalOf(request);
      if (p.type !== 'system') {
        await db.deleteFrom('tokens').where('id', '=', p.tokenId).execute();
        // Recorded like the login (the token's id, never the token).
        await audit(
          db,
          p,
          `${p.type === 'user' ? 'user' : p.kind}.logout`,
          { type: p.type === 'user' ? 'user' : p.kind, id: p.id },
          { before: { tokenId: p.tokenId } },
        );
      }
      vault.authCache.clear();
      return reply.status(204).send();
    },
  );

  app.get(
    '/api/auth/me',
    {
      config: { access: ['viewer', 'component'] },
      schema: { tags: ['auth'], summary: 'Who this token is' },
    },
    (request) => {
      const p = principalOf(request);
      return Promise.resolve({
        type: p.type,
        id: p.id,
        name: p.name,
        ...('role' in p ? { role: p.role } : {}),
        ...('kind' in p ? { kind: p.kind } : {}),
      });
    },
  );

  app.get(
    '/api/users',
    {
      config: { access: 'admin' },
      schema: {
        tags: ['users'],
        summary: 'List users',
        querystring: {
          type: 'object',
          properties: { ...pageQuerySchema, q: { type: 'string' }, role },
          additionalProperties: false,
        },
        response: responses(pageSchema),
      },
    },
    async (request) => {
      const q = request.query as {
        q?: string;
        role?: string;
        limit?: number;
        cursor?: string;
        offset?: number;
      };
      const page = await listPage(
        db,
        { table: 'users', equals: { role: q.role }, search: { column: 'username', q: q.q } },
        q,
      );
      return { ...page, items: page.items.map((u) => userToApi(u as unknown as UserRow)) };
    },
  );

  app.get(
    '/api/users/:id',
    {
      config: { access: 'admin' },
      schema: { tags: ['users'], summary: 'Get a user', params: idParams },
    },
    async (request) =>
      userToApi(
        (await getRow(
          db,
          'users',
          (request.params as { id: string }).id,
          'user',
        )) as unknown as UserRow,
      ),
  );

  app.post(
    '/api/users',
    {
      config: { access: 'admin' },
      schema: {
        tags: ['users'],
        summary: 'Create a user',
        body: {
          type: 'object',
          properties: { username, password, role },
          required: ['username', 'password', 'role'],
          additionalProperties: false,
        },
      },
    },
    async (request, reply) => {
      const user = await createUser(
        vault,
        request.body as { username: string; password: string; role: string },
      );
      await audit(
        db,
        principalOf(request),
        'user.create',
        { type: 'user', id: user.id },
        { after: userToApi(user) },
      );
      return reply.status(201).send(userToApi(user));
    },
  );

  app.patch(
    '/api/users/:id',
    {
      config: { access: 'admin' },
      schema: {
        tags: ['users'],
        summary: 'Change a user (role, password, disabled)',
        params: idParams,
        body: {
          type: 'object',
          properties: { role, password, disabled: { type: 'boolean' } },
          additionalProperties: false,
          minProperties: 1,
        },
      },
    },
    async (request) => {
      const { id } = request.params as { id: string };
      const body = request.body as { role?: string; password?: string; disabled?: boolean };
      const before = (await getRow(db, 'users', id, 'user')) as unknown as UserRow;
      if ((body.role !== undefined && body.role !== 'admin') || body.disabled === true) {
        await refuseLastAdmin(vault, before);
      }
      const changes: Partial<UserRow> = {
        ...(body.role !== undefined ? { role: body.role } : {}),
        ...(body.disabled !== undefined ? { disabled: body.disabled ? 1 : 0 } : {}),
        ...(body.password !== undefined
          ? { passwordHash: await hashPassword(body.password, vault.options.passwordCost) }
          : {}),
        updatedAt: nowIso(),
      };
      await db.updateTable('users').set(changes).where('id', '=', id).execute();
      vault.authCache.clear();
      if (body.password !== undefined || body.disabled === true) {
        // A changed password or a disabled user ends the user's sessions (API tokens stay).
        await db
          .deleteFrom('tokens')
          .where('userId', '=', id)
          .where('kind', '=', 'session')
          .execute();
      }
      const after = { ...before, ...changes };
      await audit(
        db,
        principalOf(request),
        'user.update',
        { type: 'user', id },
        {
          before: userToApi(before),
          after: {
            ...userToApi(after),
            ...(body.password !== undefined ? { password: 'changed' } : {}),
          },
        },
      );
      return userToApi(after);
    },
  );

  app.delete(
    '/api/users/:id',
    {
      config: { access: 'admin' },
      schema: { tags: ['users'], summary: 'Delete a user and their tokens', params: idParams },
    },
    async (request, reply) => {
      const { id } = request.params as { id: string };
      const before = (await getRow(db, 'users', id, 'user')) as unknown as UserRow;
      await refuseLastAdmin(vault, before);
      await db.deleteFrom('tokens').where('userId', '=', id).execute();
      vault.authCache.clear();
      await db.deleteFrom('users').where('id', '=', id).execute();
      await audit(
        db,
        principalOf(request),
        'user.delete',
        { type: 'user', id },
        { before: userToApi(before) },
      );
      return reply.status(204).send();
    },
  );

  app.get(
    '/api/tokens',
    {
      config: { access: 'viewer' },
      schema: {
        tags: ['tokens'],
        summary: "List API tokens (yours; an admin's with ?userId= or all)",
        querystring: {
          type: 'object',
          properties: { ...pageQuerySchema, userId: { type: 'string' }, all: { type: 'boolean' } },
          additionalProperties: false,
        },
        response: responses(pageSchema),
      },
    },
    async (request) => {
      const p = principalOf(request);
      const q = request.query as {
        userId?: string;
        all?: boolean;
        limit?: number;
        cursor?: string;
        offset?: number;
      };
      const isAdmin = p.type === 'user' && p.role === 'admin';
      const userId = isAdmin ? (q.all === true ? undefined : (q.userId ?? p.id)) : p.id;
      const page = await listPage(db, { table: 'tokens', equals: { kind: 'api', userId } }, q);
      return {
        ...page,
        items: page.items.map((t) => ({
          id: t['id'],
          name: t['name'],
          userId: t['userId'],
          expiresAt: t['expiresAt'],
          lastUsedAt: t['lastUsedAt'],
          createdAt: t['createdAt'],
        })),
      };
    },
  );

  app.post(
    '/api/tokens',
    {
      config: { access: 'viewer' },
      schema: {
        tags: ['tokens'],
        summary: 'Create an API token for yourself (shown once)',
        body: {
          type: 'object',
          properties: {
            name: { type: 'string', minLength: 1, maxLength: 100 },
            expiresInDays: { type: 'integer', minimum: 1, maximum: 3650 },
          },
          required: ['name'],
          additionalProperties: false,
        },
      },
    },
    async (request, reply) => {
      const p = principalOf(request);
      const body = request.body as { name: string; expiresInDays?: number };
      const token = newSecret('lbt');
      const now = new Date();
      const row = {
        id: newId('tok'),
        kind: 'api',
        name: body.name,
        tokenHash: hashToken(token),
        userId: p.id,
        componentId: null,
        expiresAt:
          body.expiresInDays === undefined
            ? null
            : nowIso(new Date(now.getTime() + body.expiresInDays * 86_400_000)),
        lastUsedAt: null,
        createdAt: nowIso(now),
      };
      await db.insertInto('tokens').values(row).execute();
      await audit(
        db,
        p,
        'token.create',
        { type: 'token', id: row.id },
        { after: { name: row.name, expiresAt: row.expiresAt } },
      );
      return reply.status(201).send({
        id: row.id,
        name: row.name,
        token,
        expiresAt: row.expiresAt,
        createdAt: row.createdAt,
      });
    },
  );

  app.delete(
    '/api/tokens/:id',
    {
      config: { access: 'viewer' },
      schema: { tags: ['tokens'], summary: 'Revoke an API token', params: idParams },
    },
    async (request, reply) => {
      const p = principalOf(request);
      const { id } = request.params as { id: string };
      const row = await db
        .selectFrom('tokens')
        .selectAll()
        .where('id', '=', id)
        .where('kind', '=', 'api')
        .executeTakeFirst();
      const isAdmin = p.type === 'user' && p.role === 'admin';
      if (row === undefined || (!isAdmin && row.userId !== p.id)) {
        throw new LifeboatError('LB_VAULT_NOT_FOUND', `No API token with id "${id}" of yours.`, {
          details: { what: 'token', id },
        });
      }
      await db.deleteFrom('tokens').where('id', '=', id).execute();
      vault.authCache.clear();
      await audit(db, p, 'token.delete', { type: 'token', id }, { before: { name: row.name } });
      return reply.status(204).send();
    },
  );
}

async function refuseLastAdmin(vault: VaultContext, user: UserRow): Promise<void> {
  if (user.role !== 'admin') return;
  const admins = await vault.db
    .selectFrom('users')
    .select('id')
    .where('role', '=', 'admin')
    .where('disabled', '=', 0)
    .execute();
  if (admins.length <= 1) {
    throw conflict(
      'LB_VAULT_LAST_ADMIN',
      'This is the last active admin; create another admin first.',
      { id: user.id },
    );
  }
}
