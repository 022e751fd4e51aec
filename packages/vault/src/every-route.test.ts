import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DIALECTS,
  dialectFixture,
  startTestVault,
  type DialectFixture,
  type TestVault,
} from './test-harness.js';

// Every route of the API, taken from the running vault, gets the same bad-input checks: so a
// route added later is covered without anyone remembering to.
describe.each(DIALECTS)('every route on %s', (dialect) => {
  let fx: DialectFixture;
  let t: TestVault;
  let viewer: string;
  let component: string;
  beforeAll(async () => {
    fx = await dialectFixture(dialect);
    t = await startTestVault(await fx.fresh());
    viewer = await t.userToken('viewer');
    const key = await t.call('POST', '/api/registration-keys', { kind: 'agent' });
    const reg = await t.call(
      'POST',
      '/api/register',
      { key: key.body['key'], kind: 'agent', name: 'agent-x' },
      null,
    );
    component = reg.body['token'] as string;
  });
  afterAll(async () => {
    await t?.close();
    await fx?.stop();
  });

  const concrete = (url: string) => url.replace(/:[A-Za-z]+/g, 'nope');

  it('has the routes the portal and CLI rely on, each with an OpenAPI entry', async () => {
    const doc = (await t.call('GET', '/api/openapi.json', undefined, null)).body as {
      paths: Record<string, Record<string, unknown>>;
    };
    const documented = new Set(
      Object.entries(doc.paths).flatMap(([path, ops]) =>
        Object.keys(ops).map((m) => `${m.toUpperCase()} ${path.replace(/\{(\w+)\}/g, ':$1')}`),
      ),
    );
    const missing = t.vault.routes
      .filter((r) => r.url !== '/api/openapi.json')
      .map((r) => `${r.method} ${r.url}`)
      .filter((r) => !documented.has(r));
    expect(missing).toEqual([]);
    expect(t.vault.routes.length).toBeGreaterThan(60);
  });

  it('answers 401 on every non-public route without a token', async () => {
    for (const r of t.vault.routes.filter((x) => x.access !== 'public')) {
      const res = await t.call(
        r.method,
        concrete(r.url),
        r.method === 'GET' || r.method === 'DELETE' ? undefined : {},
        null,
      );
      expect(res.status, `${r.method} ${r.url}`).toBe(401);
      expect(res.body.code, `${r.method} ${r.url}`).toBe('LB_VAULT_UNAUTHENTICATED');
    }
  });

  it('answers 403 on every route a viewer or a component may not use', async () => {
    for (const r of t.vault.routes) {
      const access = Array.isArray(r.access) ? r.access : [r.access];
      const body = r.method === 'GET' || r.method === 'DELETE' ? undefined : {};
      if (
        !access.includes('viewer') &&
        !access.includes('public') &&
        !access.includes('component')
      ) {
        const res = await t.call(r.method, concrete(r.url), body, viewer);
        expect(res.status, `viewer ${r.method} ${r.url}`).toBe(403);
        expect(res.body.code).toBe('LB_VAULT_FORBIDDEN');
      }
      if (!access.includes('component') && !access.includes('public')) {
        const res = await t.call(r.method, concrete(r.url), body, component);
        expect(res.status, `component ${r.method} ${r.url}`).toBe(403);
      }
    }
  });

  it('answers 400 naming a field for an unknown body field on every route that takes a body', async () => {
    // Not logout: it would end the admin session the other checks use.
    for (const r of t.vault.routes.filter(
      (x) => ['POST', 'PUT', 'PATCH'].includes(x.method) && x.url !== '/api/auth/logout',
    )) {
      const res = await t.call(r.method, concrete(r.url), { notAField: 1 }, t.adminToken);
      if (res.status === 400) {
        expect(res.body.code, `${r.method} ${r.url}`).toBe('LB_VAULT_INVALID_INPUT');
        expect(String(res.body.details?.['field']), `${r.method} ${r.url}`).toMatch(/^body/);
      } else {
        // Routes without a body schema (actions on an id) look up the id first.
        expect([403, 404], `${r.method} ${r.url} gave ${res.status}`).toContain(res.status);
      }
    }
  });

  it('answers 404 for an unknown id on every route with one', async () => {
    for (const r of t.vault.routes.filter(
      (x) => x.url.includes('/:') && !x.url.includes('/self/'),
    )) {
      const access = Array.isArray(r.access) ? r.access : [r.access];
      if (access.length === 1 && access[0] === 'component') continue;
      const res = await t.call(
        r.method,
        concrete(r.url),
        r.method === 'GET' || r.method === 'DELETE' ? undefined : validBody(r.url),
        t.adminToken,
      );
      expect(res.status, `${r.method} ${r.url}`).toBe(404);
      expect(res.body.code).toBe('LB_VAULT_NOT_FOUND');
    }
  });

  it('answers 400 naming the field for bad paging on every list', async () => {
    const lists = t.vault.routes.filter(
      (r) =>
        r.method === 'GET' &&
        !r.url.includes(':') &&
        ![
          '/api/summary',
          '/api/health',
          '/api/auth/me',
          '/api/ca.pem',
          '/api/openapi.json',
          '/metrics',
          '/api/components/self/assignments',
          '/api/events',
        ].includes(r.url),
    );
    expect(lists.length).toBeGreaterThan(15);
    for (const r of lists) {
      const res = await t.call('GET', `${r.url}?limit=5000`);
      expect(res.body.details?.['field'], r.url).toBe('querystring.limit');
      const ok = await t.call('GET', `${r.url}?limit=2`);
      expect(ok.status, r.url).toBe(200);
      expect(Object.keys(ok.body).sort(), r.url).toEqual(['items', 'nextCursor', 'total']);
    }
    // The lists under an id: the paging is checked before the id is looked up.
    for (const url of [
      '/api/protected-items/:id/points',
      '/api/jobs/:id/logs',
      '/api/jobs/:id/artifacts',
    ]) {
      expect(t.vault.routes.some((r) => r.method === 'GET' && r.url === url)).toBe(true);
      const res = await t.call('GET', `${concrete(url)}?limit=5000`);
      expect([res.status, res.body.details?.['field']], url).toEqual([400, 'querystring.limit']);
      expect((await t.call('GET', `${concrete(url)}?limit=2`)).status, url).toBe(404);
    }
  });
});

// A body that passes each route's schema, so the handler reaches its id lookup.
function validBody(url: string): Record<string, unknown> {
  if (url === '/api/sites/:id') return { description: 'x' };
  if (url === '/api/policies/:id') return { rpoThresholdSeconds: 600 };
  if (url === '/api/target-stores/:id') return { name: 'x-store' };
  if (url === '/api/credentials/:id') return { username: 'x' };
  if (url === '/api/network-mappings/:id') return { targetNetwork: 'x' };
  if (url === '/api/source-hosts/:id') return { name: 'x-host' };
  if (url === '/api/source-hosts/:id/inventory') return { machines: [] };
  if (url === '/api/protected-items/:id') return { consistencyGroup: 'g' };
  if (url === '/api/users/:id') return { role: 'viewer' };
  if (/^\/api\/(process-servers|recovery-hosts|agents)\/:id$/.test(url)) return { name: 'x' };
  return {};
}
