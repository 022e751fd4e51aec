import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DIALECTS,
  dialectFixture,
  startTestVault,
  type DialectFixture,
  type TestVault,
} from './test-harness.js';

describe.each(DIALECTS)('vault API on %s', (dialect) => {
  let fx: DialectFixture;
  let t: TestVault;
  beforeAll(async () => {
    fx = await dialectFixture(dialect);
    t = await startTestVault(await fx.fresh());
  });
  afterAll(async () => {
    await t?.close();
    await fx?.stop();
  });

  it('serves health and OpenAPI without a token, everything else only with one', async () => {
    expect((await t.call('GET', '/api/health', undefined, null)).body['database']).toBe(dialect);
    const openapi = await t.call('GET', '/api/openapi.json', undefined, null);
    expect(openapi.status).toBe(200);
    expect(Object.keys(openapi.body['paths'] as object)).toContain('/api/protected-items');
    const docs = await t.vault.app.inject({ method: 'GET', url: '/api/docs/' });
    expect(docs.statusCode).toBe(200);
    // The browsable page loads without a token: its script, and the document it shows.
    expect(docs.body).toContain('swagger-ui-bundle.js');
    const bundle = await t.vault.app.inject({
      method: 'GET',
      url: '/api/docs/static/swagger-ui-bundle.js',
    });
    expect([bundle.statusCode, bundle.headers['content-type']]).toEqual([
      200,
      'application/javascript; charset=utf-8',
    ]);
    const shown = await t.vault.app.inject({ method: 'GET', url: '/api/docs/json' });
    expect(Object.keys((JSON.parse(shown.body) as { paths: object }).paths)).toEqual(
      Object.keys(openapi.body['paths'] as object),
    );
    const none = await t.call('GET', '/api/sites', undefined, null);
    expect(none.status).toBe(401);
    expect(none.body.code).toBe('LB_VAULT_UNAUTHENTICATED');
    const wrong = await t.call('GET', '/api/sites', undefined, 'lbs_not-a-token');
    expect(wrong.status).toBe(401);
    const metricsNoToken = await t.vault.app.inject({ method: 'GET', url: '/metrics' });
    expect(metricsNoToken.statusCode).toBe(401);
    const metrics = await t.vault.app.inject({
      method: 'GET',
      url: '/metrics',
      headers: { authorization: `Bearer ${t.adminToken}` },
    });
    expect(metrics.body).toContain('lifeboat_vault_http_request_seconds');
  });

  it.runIf(dialect === 'sqlite')(
    'refuses a second vault on the same SQLite data directory',
    async () => {
      await expect(startTestVault({ dataDir: t.dataDir })).rejects.toMatchObject({
        code: 'LB_VAULT_DATA_DIR_IN_USE',
      });
      // The first one still serves.
      expect((await t.call('GET', '/api/health', undefined, null)).status).toBe(200);
    },
  );

  it('refuses a wrong password and a disabled user; logout revokes the session', async () => {
    const bad = await t.call(
      'POST',
      '/api/auth/login',
      { username: 'admin', password: 'nope' },
      null,
    );
    expect(bad.status).toBe(401);
    expect(bad.body.code).toBe('LB_VAULT_LOGIN_FAILED');
    const token = await t.userToken('viewer');
    expect((await t.call('GET', '/api/auth/me', undefined, token)).body['role']).toBe('viewer');
    const me = (await t.call('GET', '/api/auth/me', undefined, token)).body['id'] as string;
    await t.call('POST', '/api/auth/logout', undefined, token);
    expect((await t.call('GET', '/api/auth/me', undefined, token)).status).toBe(401);
    // Audited with who and when, like the login.
    const audit = await t.call('GET', `/api/audit?targetId=${me}`);
    const entries = audit.body['items'] as Array<{ action: string; actorId: string; time: string }>;
    expect(entries.map((a) => a.action).slice(0, 2)).toEqual(['user.logout', 'user.login']);
    expect(entries[0]?.actorId).toBe(me);
    expect(Date.parse(entries[0]?.time ?? '')).toBeGreaterThan(Date.now() - 60_000);
  });

  it('enforces roles: viewer reads only, operator manages protection, admin manages users and stores', async () => {
    const viewer = await t.userToken('viewer');
    const operator = await t.userToken('operator');
    const denied = await t.call('POST', '/api/sites', { name: 'v-site', kind: 'source' }, viewer);
    expect(denied.status).toBe(403);
    expect(denied.body.code).toBe('LB_VAULT_FORBIDDEN');
    expect((await t.call('GET', '/api/sites', undefined, viewer)).status).toBe(200);
    expect(
      (await t.call('POST', '/api/sites', { name: 'op-site', kind: 'source' }, operator)).status,
    ).toBe(201);
    expect(
      (
        await t.call(
          'POST',
          '/api/users',
          { username: 'x1', password: 'password-1', role: 'viewer' },
          operator,
        )
      ).status,
    ).toBe(403);
    expect((await t.call('GET', '/api/users', undefined, operator)).status).toBe(403);
    expect(
      (await t.call('POST', '/api/registration-keys', { kind: 'process-server' }, operator)).status,
    ).toBe(403);
    expect(
      (
        await t.call(
          'POST',
          '/api/target-stores',
          { name: 'ts-op', kind: 'directory', path: '/tmp/x', passphrase: 'passphrase-1' },
          operator,
        )
      ).status,
    ).toBe(403);
    expect((await t.call('GET', '/api/audit', undefined, viewer)).status).toBe(403);
  });

  it('gives 400 naming the field, 404 for unknown ids and 409 for duplicates', async () => {
    const missing = await t.call('POST', '/api/sites', { kind: 'source' });
    expect(missing.status).toBe(400);
    expect(missing.body.code).toBe('LB_VAULT_INVALID_INPUT');
    expect(missing.body.details?.['field']).toBe('body.name');
    const wrongType = await t.call('POST', '/api/policies', {
      name: 'p',
      rpoThresholdSeconds: 'soon',
      retention: { rules: [{ for: '1d' }] },
    });
    expect(wrongType.status).toBe(400);
    expect(wrongType.body.details?.['field']).toBe('body.rpoThresholdSeconds');
    const extra = await t.call('POST', '/api/sites', {
      name: 's-extra',
      kind: 'source',
      colour: 'red',
    });
    expect(extra.body.details?.['field']).toBe('body.colour');
    const badEnum = await t.call('POST', '/api/sites', { name: 's-enum', kind: 'moon' });
    expect(badEnum.body.details?.['field']).toBe('body.kind');
    const nested = await t.call('POST', '/api/policies', {
      name: 'p2',
      rpoThresholdSeconds: 60,
      retention: { rules: [{ for: 'forever' }] },
    });
    expect(nested.body.details?.['field']).toBe('body.retention.rules.0.for');
    const badQuery = await t.call('GET', '/api/sites?limit=0');
    expect(badQuery.body.details?.['field']).toBe('querystring.limit');
    const unknownFilter = await t.call('GET', '/api/sites?colour=red');
    expect(unknownFilter.body.details?.['field']).toBe('querystring.colour');
    const badCursor = await t.call('GET', '/api/sites?cursor=zzz');
    expect(badCursor.body.details?.['field']).toBe('query.cursor');
    const ref = await t.call('POST', '/api/target-stores', {
      name: 'ts-ref',
      kind: 'directory',
      path: '/tmp/y',
      passphrase: 'passphrase-1',
      siteId: 'site_nope',
    });
    expect(ref.status).toBe(400);
    expect(ref.body.details?.['field']).toBe('body.siteId');
    const notJson = await t.vault.app.inject({
      method: 'POST',
      url: '/api/sites',
      payload: '{"name":',
      headers: { authorization: `Bearer ${t.adminToken}`, 'content-type': 'application/json' },
    });
    expect(notJson.statusCode).toBe(400);
    expect(JSON.parse(notJson.body).code).toBe('LB_VAULT_INVALID_INPUT');
    for (const path of [
      'sites',
      'policies',
      'target-stores',
      'credentials',
      'network-mappings',
      'source-hosts',
      'machines',
      'protected-items',
      'jobs',
      'process-servers',
      'recovery-hosts',
      'agents',
      'users',
    ]) {
      const r = await t.call('GET', `/api/${path}/nope`);
      expect(r.status, path).toBe(404);
      expect(r.body.code, path).toBe('LB_VAULT_NOT_FOUND');
    }
    expect((await t.call('PATCH', '/api/sites/nope', { description: 'x' })).status).toBe(404);
    expect((await t.call('DELETE', '/api/policies/nope')).status).toBe(404);
    expect((await t.call('POST', '/api/alerts/nope/acknowledge')).status).toBe(404);
    expect((await t.call('GET', '/api/no-such-route')).body.code).toBe('LB_VAULT_ROUTE_NOT_FOUND');
    expect((await t.call('POST', '/api/sites', { name: 'dup', kind: 'source' })).status).toBe(201);
    const dup = await t.call('POST', '/api/sites', { name: 'dup', kind: 'recovery' });
    expect(dup.status).toBe(409);
    expect(dup.body.code).toBe('LB_VAULT_CONFLICT');
  });

  it('creates, pages, filters, changes and deletes resources, and audits every change', async () => {
    for (let i = 0; i < 7; i++) {
      expect(
        (
          await t.call('POST', '/api/sites', {
            name: `page-${i}`,
            kind: i % 2 === 0 ? 'source' : 'recovery',
          })
        ).status,
      ).toBe(201);
    }
    const seen: string[] = [];
    let cursor: string | null = null;
    do {
      const r: Awaited<ReturnType<TestVault['call']>> = await t.call(
        'GET',
        `/api/sites?q=page-&limit=3${cursor !== null ? `&cursor=${cursor}` : ''}`,
      );
      expect(r.body['total']).toBe(7);
      seen.push(...(r.body['items'] as Array<{ name: string }>).map((s) => s.name));
      cursor = r.body['nextCursor'] as string | null;
    } while (cursor !== null);
    expect(seen).toEqual(['page-0', 'page-1', 'page-2', 'page-3', 'page-4', 'page-5', 'page-6']);
    const offset = await t.call('GET', '/api/sites?q=page-&offset=5&limit=10');
    expect((offset.body['items'] as Array<{ name: string }>).map((s) => s.name)).toEqual([
      'page-5',
      'page-6',
    ]);
    const filtered = await t.call('GET', '/api/sites?q=page-&kind=recovery');
    expect(filtered.body['total']).toBe(3);

    const policy = await t.call('POST', '/api/policies', {
      name: 'gold',
      rpoThresholdSeconds: 120,
      crashConsistentIntervalSeconds: 10,
      retention: { rules: [{ for: '24h' }, { for: '7d', every: '1h' }] },
    });
    expect(policy.status).toBe(201);
    const pid = policy.body['id'] as string;
    expect(policy.body['retention']).toEqual({
      rules: [{ for: '24h' }, { for: '7d', every: '1h' }],
    });
    const tooSlow = await t.call('PATCH', `/api/policies/${pid}`, {
      crashConsistentIntervalSeconds: 600,
    });
    expect(tooSlow.body.details?.['field']).toBe('body.crashConsistentIntervalSeconds');
    const patched = await t.call('PATCH', `/api/policies/${pid}`, { rpoThresholdSeconds: 300 });
    expect(patched.body['rpoThresholdSeconds']).toBe(300);

    const cred = await t.call('POST', '/api/credentials', {
      name: 'kvm-root',
      kind: 'ssh-password',
      username: 'root',
      secret: 'hunter2-secret',
    });
    expect(cred.status).toBe(201);
    expect(JSON.stringify(cred.body)).not.toContain('hunter2');
    const store = await t.call('POST', '/api/target-stores', {
      name: 'blob',
      kind: 'azure',
      container: 'points',
      connectionString: 'AccountName=x;AccountKey=secretkey',
      passphrase: 'passphrase-1',
    });
    expect(store.status).toBe(201);
    expect(store.body['hasConnectionString']).toBe(true);
    expect(JSON.stringify(store.body)).not.toContain('secretkey');
    const noConn = await t.call('POST', '/api/target-stores', {
      name: 'blob2',
      kind: 'azure',
      container: 'points',
      passphrase: 'passphrase-1',
    });
    expect(noConn.body.details?.['field']).toBe('body.connectionString');

    // Secrets are sealed in the database, not stored in clear.
    const rows = await t.vault.context.db.selectFrom('credentials').selectAll().execute();
    expect(JSON.stringify(rows)).not.toContain('hunter2');
    const audit = await t.call('GET', `/api/audit?targetId=${pid}`);
    expect((audit.body['items'] as Array<{ action: string }>).map((a) => a.action)).toEqual([
      'policy.update',
      'policy.create',
    ]);
    const credAudit = await t.call('GET', `/api/audit?targetId=${cred.body['id'] as string}`);
    expect(JSON.stringify(credAudit.body)).not.toContain('hunter2');
    expect((await t.call('DELETE', `/api/policies/${pid}`)).status).toBe(204);
    expect((await t.call('GET', `/api/policies/${pid}`)).status).toBe(404);
  });

  it('pages a list sorted by a column with NULLs the same way on both databases', async () => {
    const db = t.vault.context.db;
    const now = Date.now();
    const at = new Date(now).toISOString();
    // Seven items, three without a point yet (lastPointAt NULL), two sharing a time.
    const times = [
      null,
      '2026-01-01T00:00:02.000Z',
      null,
      '2026-01-01T00:00:01.000Z',
      '2026-01-01T00:00:02.000Z',
      null,
      '2026-01-01T00:00:03.000Z',
    ];
    for (const [i, lastPointAt] of times.entries()) {
      await db
        .insertInto('protectedItems')
        .values({
          id: `pi_sort_${i}`,
          machineId: `vm_sort_${i}`,
          policyId: 'p',
          processServerId: 'ps',
          targetStoreId: 'ts',
          networkMappingId: null,
          consistencyGroup: 'sorting',
          state: 'protected',
          stateReason: '',
          stateChangedAt: at,
          generation: 1,
          appliedGeneration: 1,
          lastPointAt,
          rpoSeconds: null,
          backlogBytes: 0,
          throughputBps: 0,
          activeKey: `vm_sort_${i}`,
          createdAt: at,
          updatedAt: at,
        })
        .execute();
    }
    const all = async (order: 'asc' | 'desc') => {
      const ids: string[] = [];
      let cursor: string | null = null;
      do {
        const r: Awaited<ReturnType<TestVault['call']>> = await t.call(
          'GET',
          `/api/protected-items?sort=lastPointAt&order=${order}&limit=2${cursor !== null ? `&cursor=${cursor}` : ''}`,
        );
        ids.push(
          ...(r.body['items'] as Array<{ id: string; consistencyGroup: string }>)
            .filter((x) => x.consistencyGroup === 'sorting')
            .map((x) => x.id.replace('pi_sort_', '')),
        );
        cursor = r.body['nextCursor'] as string | null;
      } while (cursor !== null);
      return ids.join(',');
    };
    expect(await all('asc')).toBe('0,2,5,3,1,4,6');
    expect(await all('desc')).toBe('6,4,1,3,5,2,0');
    await db.deleteFrom('protectedItems').where('consistencyGroup', '=', 'sorting').execute();
  });

  it('manages users and API tokens; an API token works like a login and can be revoked', async () => {
    const user = await t.call('POST', '/api/users', {
      username: 'scripter',
      password: 'password-xyz',
      role: 'operator',
    });
    expect(user.status).toBe(201);
    expect(JSON.stringify(user.body)).not.toContain('scrypt');
    const short = await t.call('POST', '/api/users', {
      username: 'shorty',
      password: 'short',
      role: 'viewer',
    });
    expect(short.body.details?.['field']).toBe('body.password');
    const login = await t.call(
      'POST',
      '/api/auth/login',
      { username: 'scripter', password: 'password-xyz' },
      null,
    );
    const created = await t.call(
      'POST',
      '/api/tokens',
      { name: 'ci' },
      login.body['token'] as string,
    );
    expect(created.status).toBe(201);
    const apiToken = created.body['token'] as string;
    expect(apiToken.startsWith('lbt_')).toBe(true);
    expect((await t.call('GET', '/api/auth/me', undefined, apiToken)).body['name']).toBe(
      'scripter',
    );
    expect(
      (await t.call('DELETE', `/api/tokens/${created.body['id'] as string}`, undefined, apiToken))
        .status,
    ).toBe(204);
    expect((await t.call('GET', '/api/auth/me', undefined, apiToken)).status).toBe(401);
    const disabled = await t.call('PATCH', `/api/users/${user.body['id'] as string}`, {
      disabled: true,
    });
    expect(disabled.body['disabled']).toBe(true);
    expect(
      (
        await t.call(
          'POST',
          '/api/auth/login',
          { username: 'scripter', password: 'password-xyz' },
          null,
        )
      ).status,
    ).toBe(401);
    // Users change their own password; a wrong current one is refused naming the field.
    const self = await t.userToken('operator');
    const wrongCurrent = await t.call(
      'POST',
      '/api/auth/password',
      { currentPassword: 'nope', newPassword: 'new-password-1' },
      self,
    );
    expect(wrongCurrent.body.details?.['field']).toBe('body.currentPassword');
    expect(
      (
        await t.call(
          'POST',
          '/api/auth/password',
          { currentPassword: 'password-123', newPassword: 'new-password-1' },
          self,
        )
      ).status,
    ).toBe(204);
    const who = (await t.call('GET', '/api/auth/me', undefined, self)).body['name'] as string;
    expect(
      (await t.call('POST', '/api/auth/login', { username: who, password: 'new-password-1' }, null))
        .status,
    ).toBe(200);
    const logins = await t.call('GET', '/api/audit?action=user.login&limit=100');
    expect(
      (logins.body['items'] as Array<{ actorName: string }>).map((a) => a.actorName),
    ).toContain(who);
    const me = await t.call('GET', '/api/auth/me');
    const last = await t.call('DELETE', `/api/users/${me.body['id'] as string}`);
    expect(last.status).toBe(409);
    expect(last.body.code).toBe('LB_VAULT_LAST_ADMIN');
  });
});
