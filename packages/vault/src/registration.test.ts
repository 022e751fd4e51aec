import { X509Certificate } from 'node:crypto';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { request as httpsRequest } from 'node:https';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DIALECTS,
  dialectFixture,
  startTestVault,
  type DialectFixture,
  type TestVault,
} from './test-harness.js';

const execFileAsync = promisify(execFile);

describe.each(DIALECTS)('registration and certificates on %s', (dialect) => {
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

  const newKey = async (
    kind: string,
    expiresInSeconds = 3600,
  ): Promise<{ id: string; key: string }> => {
    const r = await t.call('POST', '/api/registration-keys', { kind, expiresInSeconds });
    expect(r.status).toBe(201);
    return { id: r.body['id'] as string, key: r.body['key'] as string };
  };

  it('registers a process server with a one-time key and issues a certificate signed by the vault CA', async () => {
    const ca = await t.vault.app.inject({ method: 'GET', url: '/api/ca.pem' });
    const caCert = new X509Certificate(ca.body);
    expect(caCert.ca).toBe(true);
    const { key } = await newKey('process-server');
    const r = await t.call(
      'POST',
      '/api/register',
      { key, kind: 'process-server', name: 'ps-1', address: '10.0.0.5:9443' },
      null,
    );
    expect(r.status).toBe(201);
    const cert = new X509Certificate(r.body['certificate'] as string);
    expect(cert.verify(caCert.publicKey)).toBe(true);
    const component = r.body['component'] as { id: string; kind: string };
    expect(cert.subject).toContain(`CN=${component.id}`);
    expect(cert.subjectAltName).toContain('IP Address:10.0.0.5');
    expect(
      cert.checkPrivateKey(
        (await import('node:crypto')).createPrivateKey(r.body['privateKey'] as string),
      ),
    ).toBe(true);
    // Its token works for component routes, and not for user ones.
    const token = r.body['token'] as string;
    expect(
      (
        await t.call(
          'POST',
          '/api/components/self/heartbeat',
          { health: { storeReachable: true } },
          token,
        )
      ).status,
    ).toBe(200);
    expect(
      (await t.call('POST', '/api/sites', { name: 'ps-made', kind: 'source' }, token)).status,
    ).toBe(403);
    const list = await t.call('GET', '/api/process-servers');
    expect(
      (list.body['items'] as Array<{ id: string; status: string }>).find(
        (c) => c.id === component.id,
      )?.status,
    ).toBe('healthy');

    // The key is one-time.
    const again = await t.call(
      'POST',
      '/api/register',
      { key, kind: 'process-server', name: 'ps-2' },
      null,
    );
    expect(again.status).toBe(401);
    expect(again.body.code).toBe('LB_VAULT_REGISTRATION_KEY_USED');

    // Renewal before expiry gives a new certificate with a new serial.
    const renewed = await t.call('POST', '/api/components/self/certificate', {}, token);
    expect(renewed.status).toBe(200);
    const cert2 = new X509Certificate(renewed.body['certificate'] as string);
    expect(cert2.serialNumber).not.toBe(cert.serialNumber);
    expect(cert2.verify(caCert.publicKey)).toBe(true);
    const audit = await t.call('GET', `/api/audit?targetId=${component.id}`);
    expect((audit.body['items'] as Array<{ action: string }>).map((a) => a.action)).toEqual([
      'process-server.renew-certificate',
      'process-server.register',
    ]);
  });

  it('signs a CSR without ever seeing the private key, and refuses a malformed CSR', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'lifeboat-csr-'));
    try {
      await execFileAsync('openssl', [
        'req',
        '-new',
        '-newkey',
        'ec',
        '-pkeyopt',
        'ec_paramgen_curve:prime256v1',
        '-nodes',
        '-keyout',
        join(dir, 'k.pem'),
        '-out',
        join(dir, 'c.csr'),
        '-subj',
        '/CN=someone-else',
      ]);
      const csr = await readFile(join(dir, 'c.csr'), 'utf8');
      const bad = await t.call(
        'POST',
        '/api/register',
        { key: (await newKey('agent')).key, kind: 'agent', name: 'agent-bad', csr: 'not a csr' },
        null,
      );
      expect(bad.status).toBe(400);
      expect(bad.body.details?.['field']).toBe('body.csr');
      const r = await t.call(
        'POST',
        '/api/register',
        { key: (await newKey('agent')).key, kind: 'agent', name: 'agent-1', csr },
        null,
      );
      expect(r.status).toBe(201);
      expect(r.body['privateKey']).toBeUndefined();
      const cert = new X509Certificate(r.body['certificate'] as string);
      // The subject is the vault's id for the agent, not what the CSR claimed.
      expect(cert.subject).not.toContain('someone-else');
      const { createPrivateKey } = await import('node:crypto');
      expect(cert.checkPrivateKey(createPrivateKey(await readFile(join(dir, 'k.pem'))))).toBe(true);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('refuses an expired key, an unknown key, and a key of another kind', async () => {
    const { id, key } = await newKey('recovery-host', 60);
    await t.vault.context.db
      .updateTable('registrationKeys')
      .set({ expiresAt: new Date(Date.now() - 1000).toISOString() })
      .where('id', '=', id)
      .execute();
    const expired = await t.call(
      'POST',
      '/api/register',
      { key, kind: 'recovery-host', name: 'rh-1' },
      null,
    );
    expect(expired.status).toBe(401);
    expect(expired.body.code).toBe('LB_VAULT_REGISTRATION_KEY_EXPIRED');
    const listed = await t.call('GET', '/api/registration-keys?state=expired');
    expect(
      (listed.body['items'] as Array<{ id: string; key?: string }>).map((k) => k.id),
    ).toContain(id);
    expect(JSON.stringify(listed.body)).not.toContain(key);
    const unknown = await t.call(
      'POST',
      '/api/register',
      { key: 'lbk_made-up', kind: 'recovery-host', name: 'rh-1' },
      null,
    );
    expect(unknown.body.code).toBe('LB_VAULT_REGISTRATION_KEY_UNKNOWN');
    const other = await t.call(
      'POST',
      '/api/register',
      { key: (await newKey('agent')).key, kind: 'recovery-host', name: 'rh-1' },
      null,
    );
    expect(other.status).toBe(400);
    expect(other.body.details?.['field']).toBe('body.kind');
    const tooShort = await t.call('POST', '/api/registration-keys', {
      kind: 'agent',
      expiresInSeconds: 5,
    });
    expect(tooShort.body.details?.['field']).toBe('body.expiresInSeconds');
    const noName = await t.call('POST', '/api/register', { key: 'x', kind: 'agent' }, null);
    expect(noName.body.details?.['field']).toBe('body.name');
  });

  it('lets two registrations race for one key and only one win', async () => {
    const { key } = await newKey('agent');
    const results = await Promise.all(
      [1, 2, 3].map((i) =>
        t.call('POST', '/api/register', { key, kind: 'agent', name: `racer-${i}` }, null),
      ),
    );
    expect(results.filter((r) => r.status === 201)).toHaveLength(1);
    expect(results.filter((r) => r.body.code === 'LB_VAULT_REGISTRATION_KEY_USED')).toHaveLength(2);
  });

  it('serves HTTPS with a certificate from its own CA and checks components’ client certificates', async () => {
    const v = await startTestVault(await fx.fresh(), {
      tls: 'internal',
      requireComponentCertificates: true,
    });
    try {
      expect(v.vault.url).toMatch(/^https:/);
      const ca = (await v.vault.app.inject({ method: 'GET', url: '/api/ca.pem' })).body;
      const call = (
        path: string,
        options: {
          method?: string;
          token?: string;
          cert?: string;
          key?: string;
          body?: unknown;
        } = {},
      ) =>
        new Promise<{ status: number; body: Record<string, unknown> }>((resolve, reject) => {
          const req = httpsRequest(
            `${v.vault.url}${path}`,
            {
              method: options.method ?? 'GET',
              ca,
              ...(options.cert !== undefined ? { cert: options.cert, key: options.key } : {}),
              headers: {
                ...(options.token !== undefined
                  ? { authorization: `Bearer ${options.token}` }
                  : {}),
                ...(options.body !== undefined ? { 'content-type': 'application/json' } : {}),
              },
            },
            (res) => {
              let text = '';
              res.on('data', (c: Buffer) => (text += c.toString()));
              res.on('end', () =>
                resolve({
                  status: res.statusCode ?? 0,
                  body: text === '' ? {} : (JSON.parse(text) as Record<string, unknown>),
                }),
              );
            },
          );
          req.on('error', reject);
          req.end(options.body === undefined ? undefined : JSON.stringify(options.body));
        });
      // The server certificate verifies against the vault's CA (no insecure flag anywhere).
      expect((await call('/api/health')).status).toBe(200);
      const register = async (name: string) => {
        const key = await v.call('POST', '/api/registration-keys', { kind: 'process-server' });
        const r = await call('/api/register', {
          method: 'POST',
          body: { key: key.body['key'], kind: 'process-server', name },
        });
        expect(r.status).toBe(201);
        return {
          token: r.body['token'] as string,
          cert: r.body['certificate'] as string,
          key: r.body['privateKey'] as string,
        };
      };
      const a = await register('tls-a');
      const b = await register('tls-b');
      const own = await call('/api/components/self/heartbeat', {
        method: 'POST',
        token: a.token,
        cert: a.cert,
        key: a.key,
        body: {},
      });
      expect(own.status).toBe(200);
      const none = await call('/api/components/self/heartbeat', {
        method: 'POST',
        token: a.token,
        body: {},
      });
      expect(none.status).toBe(401);
      expect(none.body['code']).toBe('LB_VAULT_CLIENT_CERTIFICATE');
      const other = await call('/api/components/self/heartbeat', {
        method: 'POST',
        token: a.token,
        cert: b.cert,
        key: b.key,
        body: {},
      });
      expect(other.status).toBe(401);
      expect(other.body['code']).toBe('LB_VAULT_CLIENT_CERTIFICATE');
      // An agent's calls come relayed by its process server, with the process server's
      // certificate: accepted from the one serving the agent's host, refused from another.
      const agentKey = await v.call('POST', '/api/registration-keys', { kind: 'agent' });
      const agent = await call('/api/register', {
        method: 'POST',
        body: { key: agentKey.body['key'], kind: 'agent', name: 'tls-agent' },
      });
      expect(agent.status).toBe(201);
      const agentToken = agent.body['token'] as string;
      const agentId = (agent.body['component'] as { id: string }).id;
      const aId = (
        (await v.call('GET', '/api/process-servers?limit=100')).body['items'] as Array<{
          id: string;
          name: string;
        }>
      ).find((c) => c.name === 'tls-a')?.id;
      const host = await v.call('POST', '/api/source-hosts', {
        name: 'tls-host',
        kind: 'kvm',
        processServerId: aId,
        agentId,
        endpoints: [],
      });
      expect(host.status).toBe(201);
      const relayed = (via: { cert: string; key: string }) =>
        call('/api/components/self/heartbeat', {
          method: 'POST',
          token: agentToken,
          cert: via.cert,
          key: via.key,
          body: {},
        });
      expect((await relayed(a)).status).toBe(200);
      const wrongRelay = await relayed(b);
      expect(wrongRelay.status).toBe(401);
      expect(wrongRelay.body['code']).toBe('LB_VAULT_CLIENT_CERTIFICATE');
      // A process server's own token never passes with another's certificate.
      expect(
        (
          await call('/api/components/self/heartbeat', {
            method: 'POST',
            token: b.token,
            cert: a.cert,
            key: a.key,
            body: {},
          })
        ).status,
      ).toBe(401);
      // Users need no client certificate.
      expect((await call('/api/sites', { token: v.adminToken })).status).toBe(200);
    } finally {
      await v.close();
    }
  });

  it('unregistering a component revokes its token', async () => {
    const r = await t.call(
      'POST',
      '/api/register',
      { key: (await newKey('recovery-host')).key, kind: 'recovery-host', name: 'rh-gone' },
      null,
    );
    const id = (r.body['component'] as { id: string }).id;
    expect((await t.call('DELETE', `/api/recovery-hosts/${id}`)).status).toBe(204);
    expect(
      (await t.call('POST', '/api/components/self/heartbeat', {}, r.body['token'] as string))
        .status,
    ).toBe(401);
    expect((await t.call('GET', `/api/recovery-hosts/${id}`)).status).toBe(404);
  });
});
