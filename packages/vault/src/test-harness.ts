import { randomBytes } from 'node:crypto';
import { startPostgres, makeTempDir, type PostgresServer, type TempDir } from '@lifeboat/testing';
import { startVault, type Vault } from './vault.js';
import type { VaultOptions } from './vault-options.js';

/** The two databases every vault test runs on. */
export const DIALECTS = ['sqlite', 'postgres'] as const;

/** What one test file shares: a data dir root and, for PostgreSQL, one server. */
export interface DialectFixture {
  readonly dialect: (typeof DIALECTS)[number];
  /** A fresh database (URL for PostgreSQL, undefined for SQLite) and data dir. */
  fresh(): Promise<{ dataDir: string; databaseUrl?: string }>;
  stop(): Promise<void>;
}

/** Starts what a dialect needs (a PostgreSQL server once per file). */
export async function dialectFixture(dialect: (typeof DIALECTS)[number]): Promise<DialectFixture> {
  const root: TempDir = await makeTempDir('lifeboat-vault-test-');
  const pg: PostgresServer | undefined = dialect === 'postgres' ? await startPostgres() : undefined;
  let n = 0;
  return {
    dialect,
    fresh: async () => {
      n++;
      const dataDir = `${root.path}/vault-${n}`;
      if (pg === undefined) return { dataDir };
      return {
        dataDir,
        databaseUrl: await pg.createDatabase(`vault_${n}_${randomBytes(3).toString('hex')}`),
      };
    },
    stop: async () => {
      await pg?.stop();
      await root.remove();
    },
  };
}

/** A response of {@link TestVault.call}. */
export interface CallResult {
  status: number;
  body: Record<string, unknown> & { code?: string; details?: Record<string, unknown> };
}

/** A running vault with an admin token and a JSON call helper over app.inject. */
export interface TestVault {
  vault: Vault;
  adminToken: string;
  dataDir: string;
  databaseUrl?: string;
  call(method: string, url: string, body?: unknown, token?: string | null): Promise<CallResult>;
  /** Creates a user with a role and returns a session token. */
  userToken(role: 'admin' | 'operator' | 'viewer'): Promise<string>;
  close(): Promise<void>;
}

/** Starts a vault for tests (silent logs, cheap password hashing, fast timers). */
export async function startTestVault(
  where: { dataDir: string; databaseUrl?: string },
  overrides: Partial<VaultOptions> = {},
): Promise<TestVault> {
  const vault = await startVault({
    dataDir: where.dataDir,
    ...(where.databaseUrl !== undefined ? { databaseUrl: where.databaseUrl } : {}),
    port: 0,
    logLevel: 'silent',
    passwordCost: 1024,
    initialAdmin: { username: 'admin', password: 'admin-password' },
    schedulerIntervalMs: 3_600_000,
    jobPollIntervalMs: 50,
    summaryCacheMs: 0,
    ...overrides,
  });
  const call = async (
    method: string,
    url: string,
    body?: unknown,
    token?: string | null,
  ): Promise<CallResult> => {
    const res = await vault.app.inject({
      method: method as 'GET',
      url,
      ...(body !== undefined ? { payload: body as Record<string, unknown> } : {}),
      headers: token === null ? {} : { authorization: `Bearer ${token ?? adminToken}` },
    });
    const text = res.body;
    return {
      status: res.statusCode,
      body: text === '' ? {} : (JSON.parse(text) as CallResult['body']),
    };
  };
  let adminToken = '';
  const login = await call(
    'POST',
    '/api/auth/login',
    { username: 'admin', password: 'admin-password' },
    null,
  );
  adminToken = login.body['token'] as string;
  let users = 0;
  return {
    vault,
    adminToken,
    dataDir: where.dataDir,
    ...(where.databaseUrl !== undefined ? { databaseUrl: where.databaseUrl } : {}),
    call,
    userToken: async (role) => {
      users++;
      const username = `${role}-${users}`;
      const created = await call('POST', '/api/users', {
        username,
        password: 'password-123',
        role,
      });
      if (created.status !== 201)
        throw new Error(`user create failed: ${JSON.stringify(created.body)}`);
      const r = await call('POST', '/api/auth/login', { username, password: 'password-123' }, null);
      return r.body['token'] as string;
    },
    close: () => vault.close(),
  };
}
