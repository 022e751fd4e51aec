import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DirectoryBackend, Store } from '@lifeboat/store';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { JobHandler } from './jobs/job-handler.js';
import {
  DIALECTS,
  dialectFixture,
  startTestVault,
  type DialectFixture,
  type TestVault,
} from './test-harness.js';

// A job that holds until its vault stops: stands for long work that cannot resume safely.
const holdJob: JobHandler = {
  kind: 'hold',
  resumable: false,
  steps: ['hold'],
  run: (job) =>
    job.step(
      'hold',
      () =>
        new Promise((_resolve, reject) =>
          job.signal.addEventListener('abort', () => reject(job.signal.reason as Error)),
        ),
    ),
};

function countingJob(runs: Map<string, number>): JobHandler {
  return {
    kind: 'count',
    resumable: true,
    steps: ['count'],
    run: async (job) => {
      runs.set(job.id, (runs.get(job.id) ?? 0) + 1);
      await new Promise((r) => setTimeout(r, 5));
    },
  };
}

async function waitFor(check: () => Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error('condition not reached in time');
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Registers a process server, a KVM host with one machine, a policy and a directory store. */
async function protect(t: TestVault, storePath: string, retention: unknown, tag: string) {
  const key = await t.call('POST', '/api/registration-keys', { kind: 'process-server' });
  const reg = await t.call(
    'POST',
    '/api/register',
    { key: key.body['key'], kind: 'process-server', name: `ps-${tag}` },
    null,
  );
  const psToken = reg.body['token'] as string;
  const psId = (reg.body['component'] as { id: string }).id;
  const host = await t.call('POST', '/api/source-hosts', {
    name: `kvm-${tag}`,
    kind: 'kvm',
    processServerId: psId,
    endpoints: [],
  });
  await t.call(
    'PUT',
    `/api/source-hosts/${host.body['id'] as string}/inventory`,
    {
      machines: [
        { externalId: 'vm', name: `vm-${tag}`, disks: [{ name: 'vda', sizeBytes: 1 << 20 }] },
      ],
    },
    psToken,
  );
  const machineId =
    (
      (await t.call('GET', `/api/machines?sourceHostId=${host.body['id'] as string}`)).body[
        'items'
      ] as Array<{ id: string }>
    )[0]?.id ?? '';
  const policy = await t.call('POST', '/api/policies', {
    name: `pol-${tag}`,
    rpoThresholdSeconds: 600,
    retention,
    // A week-long retention slot, so that no test's ticks straddle a slot's end.
    retentionIntervalSeconds: 7 * 86_400,
  });
  const store = await t.call('POST', '/api/target-stores', {
    name: `st-${tag}`,
    kind: 'directory',
    path: storePath,
    passphrase: 'store-passphrase',
  });
  const item = await t.call('POST', '/api/protected-items', {
    machineId,
    policyId: policy.body['id'],
    processServerId: psId,
    targetStoreId: store.body['id'],
  });
  expect(item.status).toBe(201);
  return {
    psToken,
    psId,
    machineId,
    policyId: policy.body['id'] as string,
    storeId: store.body['id'] as string,
    itemId: item.body['id'] as string,
    jobId: item.body['jobId'] as string,
  };
}

describe.each(DIALECTS)('jobs and scheduler on %s', (dialect) => {
  let fx: DialectFixture;
  const open: TestVault[] = [];
  const dirs: string[] = [];
  beforeAll(async () => {
    fx = await dialectFixture(dialect);
  });
  afterAll(async () => {
    for (const v of open) await v.close();
    for (const d of dirs) await rm(d, { recursive: true, force: true });
    await fx?.stop();
  });
  const start = async (
    where: { dataDir: string; databaseUrl?: string },
    extra: Parameters<typeof startTestVault>[1] = {},
  ) => {
    const v = await startTestVault(where, { jobHandlers: [holdJob], jobLeaseMs: 500, ...extra });
    open.push(v);
    return v;
  };

  it('after a vault restart, a resumable job resumes and one that cannot resume fails visibly', async () => {
    const where = await fx.fresh();
    const a = await start(where);
    const s = await protect(a, `${where.dataDir}/store`, { rules: [{ for: '1d' }] }, 'restart');
    const hold = await a.vault.context.jobs.create(
      { kind: 'hold', target: { type: 'test', id: 'x' } },
      { type: 'system', id: 'system', name: 'test' },
    );
    const holdId = hold?.id ?? '';
    await waitFor(
      async () => (await a.call('GET', `/api/jobs/${holdId}`)).body['state'] === 'running',
    );
    await waitFor(
      async () => (await a.call('GET', `/api/jobs/${s.jobId}`)).body['state'] === 'running',
    );
    await a.close();

    const b = await start(where, { schedulerIntervalMs: 100 });
    await waitFor(
      async () => (await b.call('GET', `/api/jobs/${holdId}`)).body['state'] === 'failed',
    );
    const failed = await b.call('GET', `/api/jobs/${holdId}`);
    expect((failed.body['error'] as { code: string }).code).toBe('LB_VAULT_JOB_INTERRUPTED');
    // Its log, filtered by level: the error says why it failed.
    const errors = await b.call('GET', `/api/jobs/${holdId}/logs?level=error`);
    expect((errors.body['items'] as Array<{ level: string }>).map((l) => l.level)).toEqual([
      'error',
    ]);
    expect(
      (await b.call('GET', `/api/jobs/${holdId}/logs?level=loud`)).body.details?.['field'],
    ).toBe('querystring.level');
    const alerts = await b.call('GET', '/api/alerts?kind=job-failed&state=active');
    expect(
      (alerts.body['items'] as Array<{ details: { jobId: string } }>).map((x) => x.details.jobId),
    ).toContain(holdId);

    await waitFor(async () => {
      const j = await b.call('GET', `/api/jobs/${s.jobId}`);
      return j.body['state'] === 'running' && j.body['attempts'] === 2;
    });
    // The log line is written just after the claim: wait for it rather than race it.
    await waitFor(async () =>
      (
        (await b.call('GET', `/api/jobs/${s.jobId}/logs`)).body['items'] as Array<{
          message: string;
        }>
      ).some((l) => l.message.includes('Resuming after a vault restart (attempt 2)')),
    );
    await b.call(
      'POST',
      '/api/components/self/heartbeat',
      { items: [{ id: s.itemId, state: 'initial-replication' }] },
      s.psToken,
    );
    await b.call(
      'PUT',
      '/api/recovery-points',
      {
        targetStoreId: s.storeId,
        points: [
          {
            id: 'pt-1',
            machine: s.machineId,
            disk: 'vda',
            time: new Date().toISOString(),
            committedAt: new Date().toISOString(),
            kind: 'crash',
            size: 1 << 20,
          },
        ],
      },
      s.psToken,
    );
    await waitFor(
      async () => (await b.call('GET', `/api/jobs/${s.jobId}`)).body['state'] === 'succeeded',
    );
    await b.close();
  });

  it('cancels a queued or running job, and refuses to cancel one that ended', async () => {
    const t = await start(await fx.fresh(), { jobConcurrency: 1 });
    const system = { type: 'system', id: 'system', name: 'test' } as const;
    const first = await t.vault.context.jobs.create({ kind: 'hold' }, system);
    const second = await t.vault.context.jobs.create({ kind: 'hold' }, system);
    await waitFor(
      async () => (await t.call('GET', `/api/jobs/${first?.id ?? ''}`)).body['state'] === 'running',
    );
    const queued = await t.call('POST', `/api/jobs/${second?.id ?? ''}/cancel`);
    expect(queued.body['state']).toBe('cancelled');
    const running = await t.call('POST', `/api/jobs/${first?.id ?? ''}/cancel`);
    expect(running.body['cancelRequested']).toBe(true);
    await waitFor(
      async () =>
        (await t.call('GET', `/api/jobs/${first?.id ?? ''}`)).body['state'] === 'cancelled',
    );
    const again = await t.call('POST', `/api/jobs/${first?.id ?? ''}/cancel`);
    expect(again.status).toBe(409);
    expect(again.body.code).toBe('LB_VAULT_INVALID_STATE');
    // A cancelled job is no failure: no alert.
    expect((await t.call('GET', '/api/alerts?kind=job-failed&state=active')).body['total']).toBe(0);
  });

  it('raises one job-failed alert per kind and target, and clears it when a later job succeeds', async () => {
    let failing = true;
    const flaky: JobHandler = {
      kind: 'flaky',
      resumable: false,
      steps: ['work'],
      run: async () => {
        if (failing) throw new Error('the work failed');
        await new Promise((r) => setTimeout(r, 1));
      },
    };
    const t = await start(await fx.fresh(), { jobHandlers: [flaky] });
    const system = { type: 'system', id: 'system', name: 'test' } as const;
    const run = async () => {
      const job = await t.vault.context.jobs.create(
        { kind: 'flaky', target: { type: 'test', id: 't1' } },
        system,
      );
      await waitFor(async () =>
        ['succeeded', 'failed'].includes(
          (await t.call('GET', `/api/jobs/${job?.id ?? ''}`)).body['state'] as string,
        ),
      );
    };
    const alerts = async (state: string) =>
      (await t.call('GET', `/api/alerts?kind=job-failed&subjectId=flaky:t1&state=${state}`)).body[
        'items'
      ] as Array<{ id: string; message: string }>;
    await run();
    await run();
    const active = await alerts('active');
    expect(active).toHaveLength(1);
    expect(active[0]?.message).toContain('the work failed');
    failing = false;
    await run();
    expect(await alerts('active')).toEqual([]);
    expect((await alerts('cleared')).map((a) => a.id)).toEqual([active[0]?.id]);
  });

  it('runs retention as a scheduled job that prunes the store and the catalogue', async () => {
    const storeDir = await mkdtemp(join(tmpdir(), 'lifeboat-vault-store-'));
    dirs.push(storeDir);
    const t = await start(await fx.fresh());
    const s = await protect(t, storeDir, { rules: [{ for: '1d' }] }, 'retention');
    const store = await Store.init({
      backend: new DirectoryBackend({ path: storeDir }),
      passphrase: 'store-passphrase',
      kdfCost: 1024,
    });
    const now = Date.now();
    const points = [];
    try {
      for (const [i, ageDays] of [3, 2, 0.5, 0].entries()) {
        const w = await store.beginWrite({ machine: s.machineId, disk: 'vda', size: 1 << 20 });
        await w.write(0, Buffer.alloc(65_536, i + 1));
        points.push(await w.commit({ time: new Date(now - ageDays * 86_400_000) }));
      }
    } finally {
      await store.close();
    }
    await t.call(
      'POST',
      '/api/components/self/heartbeat',
      { items: [{ id: s.itemId, state: 'initial-replication' }] },
      s.psToken,
    );
    const up = await t.call(
      'PUT',
      '/api/recovery-points',
      {
        targetStoreId: s.storeId,
        points: points.map((p) => ({
          id: p.id,
          machine: p.machine,
          disk: p.disk,
          time: p.time.toISOString(),
          committedAt: p.committedAt.toISOString(),
          kind: p.kind,
          size: p.size,
        })),
      },
      s.psToken,
    );
    expect(up.body['matched']).toBe(4);
    await t.vault.scheduler.tick();
    const jobs = await t.call('GET', `/api/jobs?kind=retention&targetId=${s.policyId}`);
    expect(jobs.body['total']).toBe(1);
    const jobId = (jobs.body['items'] as Array<{ id: string }>)[0]?.id ?? '';
    await waitFor(async () =>
      ['succeeded', 'failed'].includes(
        (await t.call('GET', `/api/jobs/${jobId}`)).body['state'] as string,
      ),
    );
    const job = await t.call('GET', `/api/jobs/${jobId}`);
    expect(job.body['error']).toBeNull();
    expect(job.body['result']).toEqual({ removed: 2, kept: 2, machines: 1 });
    const reopened = await Store.open({
      backend: new DirectoryBackend({ path: storeDir }),
      passphrase: 'store-passphrase',
    });
    try {
      expect((await reopened.listPoints({ machine: s.machineId })).map((p) => p.id)).toEqual([
        points[2]?.id,
        points[3]?.id,
      ]);
    } finally {
      await reopened.close();
    }
    const catalogue = await t.call('GET', `/api/protected-items/${s.itemId}/points`);
    expect((catalogue.body['items'] as Array<{ id: string }>).map((p) => p.id)).toEqual([
      points[3]?.id,
      points[2]?.id,
    ]);
    // The catalogue is rebuilt from the store alone (a vault that lost its database).
    await t.vault.context.db.deleteFrom('recoveryPoints').execute();
    const sync = await t.call('POST', `/api/target-stores/${s.storeId}/sync`);
    expect(sync.status).toBe(202);
    await waitFor(
      async () =>
        (await t.call('GET', `/api/jobs/${sync.body['jobId'] as string}`)).body['state'] ===
        'succeeded',
    );
    expect(
      (await t.call('GET', `/api/jobs/${sync.body['jobId'] as string}`)).body['result'],
    ).toEqual({ points: 2, matched: 2, removed: 0 });
    const rebuilt = await t.call('GET', `/api/protected-items/${s.itemId}/points`);
    expect((rebuilt.body['items'] as Array<{ id: string }>).map((p) => p.id)).toEqual([
      points[3]?.id,
      points[2]?.id,
    ]);
    // The same slot is never scheduled twice.
    await t.vault.scheduler.tick();
    expect(
      (await t.call('GET', `/api/jobs?kind=retention&targetId=${s.policyId}`)).body['total'],
    ).toBe(1);
  });

  it('deletes the points of a disabled item only after the process server has committed its last cuts', async () => {
    const storeDir = await mkdtemp(join(tmpdir(), 'lifeboat-vault-store-'));
    dirs.push(storeDir);
    const t = await start(await fx.fresh());
    const s = await protect(t, storeDir, { rules: [{ for: '1d' }] }, 'disable');
    const store = await Store.init({
      backend: new DirectoryBackend({ path: storeDir }),
      passphrase: 'store-passphrase',
      kdfCost: 1024,
    });
    const commit = async (fill: number) => {
      const w = await store.beginWrite({ machine: s.machineId, disk: 'vda', size: 1 << 20 });
      await w.write(0, Buffer.alloc(65_536, fill));
      return w.commit({ time: new Date() });
    };
    try {
      await commit(1);
      await t.call(
        'POST',
        '/api/components/self/heartbeat',
        { items: [{ id: s.itemId, state: 'initial-replication', backlogBytes: 4096 }] },
        s.psToken,
      );
      const off = await t.call('POST', `/api/protected-items/${s.itemId}/disable`, {
        deletePoints: true,
      });
      expect(off.body['state']).toBe('disabled');
      const jobId = off.body['jobId'] as string;
      // The process server has not applied the stop yet: nothing is deleted.
      await new Promise((r) => setTimeout(r, 1500));
      const waiting = await t.call('GET', `/api/jobs/${jobId}`);
      expect(waiting.body['state']).toBe('running');
      expect((await store.listPoints({ machine: s.machineId })).length).toBe(1);
      // A cut still in its journal becomes a point meanwhile, then it reports the stop applied
      // with an empty backlog.
      await commit(2);
      const assigned = await t.call(
        'GET',
        '/api/components/self/assignments',
        undefined,
        s.psToken,
      );
      const mine = (
        assigned.body['items'] as Array<{ id: string; generation: number; desired: string }>
      ).find((i) => i.id === s.itemId);
      expect(mine?.desired).toBe('stop');
      await t.call(
        'POST',
        '/api/components/self/heartbeat',
        { items: [{ id: s.itemId, appliedGeneration: mine?.generation, backlogBytes: 0 }] },
        s.psToken,
      );
      await waitFor(
        async () => (await t.call('GET', `/api/jobs/${jobId}`)).body['state'] !== 'running',
      );
      const done = await t.call('GET', `/api/jobs/${jobId}`);
      expect(done.body['state']).toBe('succeeded');
      expect(done.body['result']).toEqual({ deletedPoints: 2 });
    } finally {
      await store.close();
    }
    const reopened = await Store.open({
      backend: new DirectoryBackend({ path: storeDir }),
      passphrase: 'store-passphrase',
    });
    try {
      expect(await reopened.listPoints({ machine: s.machineId })).toEqual([]);
    } finally {
      await reopened.close();
    }
  });

  it('checks a store, runs a policy retention on request, and bumps items on a new interval', async () => {
    const storeDir = await mkdtemp(join(tmpdir(), 'lifeboat-vault-store-'));
    dirs.push(storeDir);
    const t = await start(await fx.fresh());
    const s = await protect(t, storeDir, { rules: [{ for: '1h' }] }, 'now');
    // Before the store exists the check says why it cannot open it.
    const missing = await t.call('POST', `/api/target-stores/${s.storeId}/check`);
    expect(missing.status).toBe(200);
    expect(missing.body['ok']).toBe(false);
    expect((missing.body['error'] as { code: string }).code).toMatch(/^LB_STORE_/);
    const store = await Store.init({
      backend: new DirectoryBackend({ path: storeDir }),
      passphrase: 'store-passphrase',
      kdfCost: 1024,
    });
    const now = Date.now();
    try {
      for (const age of [3, 2, 0]) {
        const w = await store.beginWrite({ machine: s.machineId, disk: 'vda', size: 1 << 20 });
        await w.write(0, Buffer.alloc(65_536, age + 1));
        await w.commit({ time: new Date(now - age * 3_600_000) });
      }
    } finally {
      await store.close();
    }
    const check = await t.call('POST', `/api/target-stores/${s.storeId}/check`);
    expect(check.body).toMatchObject({ ok: true, points: 3, machines: 1 });
    const wrong = await t.call('POST', '/api/target-stores', {
      name: 'wrong-pass',
      kind: 'directory',
      path: storeDir,
      passphrase: 'not-the-passphrase',
    });
    const refused = await t.call('POST', `/api/target-stores/${wrong.body['id'] as string}/check`);
    expect(refused.body).toMatchObject({ ok: false, error: { code: 'LB_STORE_WRONG_PASSPHRASE' } });

    const run = await t.call('POST', `/api/policies/${s.policyId}/retention`);
    expect(run.status).toBe(202);
    const jobId = run.body['jobId'] as string;
    await waitFor(async () =>
      ['succeeded', 'failed'].includes(
        (await t.call('GET', `/api/jobs/${jobId}`)).body['state'] as string,
      ),
    );
    expect((await t.call('GET', `/api/jobs/${jobId}`)).body['result']).toEqual({
      removed: 2,
      kept: 1,
      machines: 1,
    });
    expect((await t.call('POST', '/api/policies/nope/retention')).status).toBe(404);

    // A new interval is a new generation for the policy's items (their agents restart with it).
    const before = (await t.call('GET', `/api/protected-items/${s.itemId}`)).body['generation'];
    await t.call('PATCH', `/api/policies/${s.policyId}`, { crashConsistentIntervalSeconds: 30 });
    const after = (await t.call('GET', `/api/protected-items/${s.itemId}`)).body['generation'];
    expect(after).toBe((before as number) + 1);
    await t.call('PATCH', `/api/policies/${s.policyId}`, { rpoThresholdSeconds: 900 });
    expect((await t.call('GET', `/api/protected-items/${s.itemId}`)).body['generation']).toBe(
      after,
    );
  });

  it("names a KVM host's agent in the assignments, and keeps an agent that serves a host", async () => {
    const t = await start(await fx.fresh());
    const s = await protect(t, '/nonexistent/store', { rules: [{ for: '1h' }] }, 'agent');
    const key = await t.call('POST', '/api/registration-keys', { kind: 'agent' });
    const reg = await t.call(
      'POST',
      '/api/register',
      { key: key.body['key'], kind: 'agent', name: 'kvm-agent' },
      null,
    );
    const agentId = (reg.body['component'] as { id: string }).id;
    const hosts = await t.call('GET', `/api/source-hosts?processServerId=${s.psId}`);
    const hostId = (hosts.body['items'] as Array<{ id: string }>)[0]?.id ?? '';
    // Only an agent may be a host's agent.
    const notAgent = await t.call('PATCH', `/api/source-hosts/${hostId}`, { agentId: s.psId });
    expect(notAgent.status).toBe(400);
    expect(notAgent.body.details?.['field']).toBe('body.agentId');
    expect(
      (await t.call('PATCH', `/api/source-hosts/${hostId}`, { agentId })).body['agentId'],
    ).toBe(agentId);
    expect((await t.call('GET', `/api/source-hosts?agentId=${agentId}`)).body['total']).toBe(1);
    await t.call('POST', `/api/source-hosts/${hostId}/discover`);
    const a = await t.call('GET', '/api/components/self/assignments', undefined, s.psToken);
    const items = a.body['items'] as Array<{ id: string; machine: { agentId: string } }>;
    expect(items.find((i) => i.id === s.itemId)?.machine.agentId).toBe(agentId);
    expect(a.body['discovery']).toEqual([
      expect.objectContaining({ sourceHostId: hostId, agentId }),
    ]);
    const inUse = await t.call('DELETE', `/api/agents/${agentId}`);
    expect(inUse.status).toBe(409);
    expect(inUse.body.code).toBe('LB_VAULT_IN_USE');
    await t.call('PATCH', `/api/source-hosts/${hostId}`, { agentId: null });
    expect((await t.call('DELETE', `/api/agents/${agentId}`)).status).toBe(204);
  });

  it.runIf(dialect === 'postgres')(
    'two vault instances on one database: one scheduler, each job run exactly once',
    async () => {
      const where = await fx.fresh();
      const runs = new Map<string, number>();
      // A retention slot a week long: with the default hour, a run across a full hour made
      // a second, rightful slot per policy and failed the count below.
      const WEEK = 7 * 86_400;
      const a = await start(
        { ...where, dataDir: `${where.dataDir}-a` },
        { schedulerIntervalMs: 100, jobHandlers: [countingJob(runs)] },
      );
      // Both instances must share the secret key file to read each other's sealed secrets.
      const b = await start(
        { ...where, dataDir: `${where.dataDir}-b` },
        {
          schedulerIntervalMs: 100,
          jobHandlers: [countingJob(runs)],
          secretKeyFile: `${where.dataDir}-a/secret.key`,
        },
      );
      await a.call('POST', '/api/policies', {
        name: 'ha-1',
        rpoThresholdSeconds: 600,
        retention: { rules: [{ for: '1d' }] },
        retentionIntervalSeconds: WEEK,
      });
      await a.call('POST', '/api/policies', {
        name: 'ha-2',
        rpoThresholdSeconds: 600,
        retention: { rules: [{ for: '1d' }] },
        retentionIntervalSeconds: WEEK,
      });
      await waitFor(
        async () =>
          (await a.call('GET', '/api/jobs?kind=retention&state=succeeded')).body['total'] === 2,
      );
      // Many ticks later still one job per policy and slot, all created by one instance.
      await new Promise((r) => setTimeout(r, 1000));
      expect([a.vault.scheduler.isLeader, b.vault.scheduler.isLeader].filter(Boolean)).toHaveLength(
        1,
      );
      const leader = a.vault.scheduler.isLeader ? a : b;
      const follower = leader === a ? b : a;
      expect(leader.vault.scheduler.created).toHaveLength(2);
      expect(follower.vault.scheduler.created).toHaveLength(0);
      expect((await a.call('GET', '/api/jobs?kind=retention')).body['total']).toBe(2);

      // Jobs created on both instances are each run once, whichever instance claims them.
      const system = { type: 'system', id: 'system', name: 'test' } as const;
      const ids: string[] = [];
      for (let i = 0; i < 20; i++) {
        const job = await (i % 2 === 0 ? a : b).vault.context.jobs.create(
          { kind: 'count' },
          system,
        );
        ids.push(job?.id ?? '');
      }
      await waitFor(
        async () =>
          (await a.call('GET', '/api/jobs?kind=count&state=succeeded')).body['total'] === 20,
      );
      expect(ids.map((id) => runs.get(id))).toEqual(ids.map(() => 1));
      const startedBy = async (v: TestVault) =>
        (await v.vault.context.metrics.jobsStarted.get()).values.find(
          (x) => x.labels.kind === 'count',
        )?.value ?? 0;
      expect((await startedBy(a)) + (await startedBy(b))).toBe(20);

      // The leader stops: the other takes over the scheduler.
      await leader.close();
      await waitFor(() => Promise.resolve(follower.vault.scheduler.isLeader));
      await new Promise((r) => setTimeout(r, 300));
      expect((await follower.call('GET', '/api/jobs?kind=retention')).body['total']).toBe(2);
      await follower.close();
    },
  );
});
