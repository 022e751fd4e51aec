import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LifeboatError } from '@lifeboat/protocol';
import { RecoveryJob, vaultJobReporter } from '@lifeboat/recovery';
import { startVault, type Vault } from '@lifeboat/vault';

// The recovery host's jobs, as the operator sees them in the vault: reported over the vault's
// HTTP API with the recovery host's component token, steps and timings included.

let dir: string;
let vault: Vault;
let admin: string;

async function call(
  method: string,
  path: string,
  body: unknown,
  token: string,
): Promise<Record<string, unknown>> {
  const res = await fetch(`${vault.url}${path}`, {
    method,
    headers: {
      authorization: `Bearer ${token}`,
      ...(body ? { 'content-type': 'application/json' } : {}),
    },
    ...(body ? { body: JSON.stringify(body) } : {}),
  });
  return (await res.json()) as Record<string, unknown>;
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lb-rvj-'));
  vault = await startVault({
    dataDir: dir,
    port: 0,
    logLevel: 'silent',
    passwordCost: 1024,
    initialAdmin: { username: 'admin', password: 'admin-password' },
  });
  const res = await fetch(`${vault.url}/api/auth/login`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ username: 'admin', password: 'admin-password' }),
  });
  admin = ((await res.json()) as { token: string }).token;
});
afterAll(async () => {
  await vault?.close();
  await rm(dir, { recursive: true, force: true });
});

describe('recovery jobs in the vault', () => {
  it("shows a recovery host's test failover with its steps, and its failure with the code", async () => {
    const key = await call('POST', '/api/registration-keys', { kind: 'recovery-host' }, admin);
    const reg = await fetch(`${vault.url}/api/register`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ key: key['key'], kind: 'recovery-host', name: 'rh-1' }),
    });
    const token = ((await reg.json()) as { token: string }).token;
    const errors: unknown[] = [];
    const reporter = vaultJobReporter({ url: vault.url, token, onError: (e) => errors.push(e) });

    const ok = new RecoveryJob(
      'test-failover',
      { machines: ['web'] },
      join(dir, 'jobs'),
      reporter.listener,
    );
    await ok.step('select points', async (d) => {
      d['web'] = ['p1'];
    });
    await ok.step('boot web', async () => undefined);
    await ok.finish();
    const bad = new RecoveryJob(
      'test-failover',
      { machines: ['db'] },
      join(dir, 'jobs'),
      reporter.listener,
    );
    const err = new LifeboatError('LB_RECOVERY_BOOT_TIMEOUT', 'db did not show its marker');
    await bad.step('boot db', () => Promise.reject(err)).catch(() => undefined);
    await bad.finish(err);
    await reporter.flush();
    expect(errors).toEqual([]);

    const list = await call('GET', '/api/jobs?kind=test-failover', undefined, admin);
    const items = list['items'] as Array<{
      id: string;
      state: string;
      target?: Record<string, unknown>;
    }>;
    expect(items.map((j) => j.state).sort()).toEqual(['failed', 'succeeded']);
    const okJob = items.find((j) => j.state === 'succeeded')!;
    const shown = await call('GET', `/api/jobs/${okJob.id}`, undefined, admin);
    expect((shown['steps'] as Array<{ name: string }>).map((s) => s.name)).toEqual([
      'select points',
      'boot web',
    ]);
    const failed = items.find((j) => j.state === 'failed')!;
    const shownBad = await call('GET', `/api/jobs/${failed.id}`, undefined, admin);
    expect((shownBad['error'] as { code: string }).code).toBe('LB_RECOVERY_BOOT_TIMEOUT');
  });

  it('a vault that cannot be reached never fails the job', async () => {
    const errors: unknown[] = [];
    const reporter = vaultJobReporter({
      url: 'http://127.0.0.1:1',
      token: 'x',
      onError: (e) => errors.push(e),
    });
    const job = new RecoveryJob(
      'failover',
      { machine: 'web' },
      join(dir, 'jobs'),
      reporter.listener,
    );
    await job.step('boot web', async () => undefined);
    expect((await job.finish()).state).toBe('succeeded');
    await reporter.flush();
    expect(errors.length).toBeGreaterThan(0);
  });
});
