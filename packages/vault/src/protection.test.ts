import { createServer, type Server } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DIALECTS,
  dialectFixture,
  startTestVault,
  type DialectFixture,
  type TestVault,
} from './test-harness.js';

interface Setup {
  psToken: string;
  psId: string;
  hostId: string;
  machineId: string;
  policyId: string;
  storeId: string;
}

describe.each(DIALECTS)('protection, catalogue and alerts on %s', (dialect) => {
  let fx: DialectFixture;
  let t: TestVault;
  let hook: Server;
  const delivered: Array<{ event: string; alert: { kind: string; subjectId: string } }> = [];
  beforeAll(async () => {
    fx = await dialectFixture(dialect);
    hook = createServer((req, res) => {
      let body = '';
      req.on('data', (c: Buffer) => (body += c.toString()));
      req.on('end', () => {
        delivered.push(JSON.parse(body) as (typeof delivered)[number]);
        res.end();
      });
    });
    await new Promise<void>((resolve) => hook.listen(0, '127.0.0.1', resolve));
    const port = (hook.address() as { port: number }).port;
    t = await startTestVault(await fx.fresh(), {
      webhookUrl: `http://127.0.0.1:${port}/alerts`,
      heartbeatTimeoutSeconds: 30,
    });
  });
  afterAll(async () => {
    await t?.close();
    await new Promise((resolve) => hook?.close(resolve));
    await fx?.stop();
  });

  let n = 0;
  const setup = async (): Promise<Setup> => {
    n++;
    const key = await t.call('POST', '/api/registration-keys', { kind: 'process-server' });
    const reg = await t.call(
      'POST',
      '/api/register',
      { key: key.body['key'], kind: 'process-server', name: `ps-${n}` },
      null,
    );
    const psToken = reg.body['token'] as string;
    const psId = (reg.body['component'] as { id: string }).id;
    const host = await t.call('POST', '/api/source-hosts', {
      name: `kvm-${n}`,
      kind: 'kvm',
      processServerId: psId,
      endpoints: [{ name: 'vm1', qmp: '/run/vm1.qmp' }],
    });
    expect(host.status).toBe(201);
    const hostId = host.body['id'] as string;
    const disc = await t.call('POST', `/api/source-hosts/${hostId}/discover`, undefined);
    expect(disc.status).toBe(202);
    const assigned = await t.call('GET', '/api/components/self/assignments', undefined, psToken);
    expect(
      (assigned.body['discovery'] as Array<{ sourceHostId: string }>).map((d) => d.sourceHostId),
    ).toEqual([hostId]);
    const inv = await t.call(
      'PUT',
      `/api/source-hosts/${hostId}/inventory`,
      {
        machines: [
          {
            externalId: 'vm1',
            name: `web-${n}`,
            endpoint: '/run/vm1.qmp',
            disks: [
              { name: 'vda', sizeBytes: 1 << 30 },
              { name: 'vdb', sizeBytes: 1 << 20 },
            ],
          },
        ],
      },
      psToken,
    );
    expect(inv.status).toBe(200);
    expect(
      (await t.call('GET', '/api/components/self/assignments', undefined, psToken)).body[
        'discovery'
      ],
    ).toEqual([]);
    const machines = await t.call('GET', `/api/machines?sourceHostId=${hostId}`);
    const machineId = (machines.body['items'] as Array<{ id: string }>)[0]?.id ?? '';
    const policy = await t.call('POST', '/api/policies', {
      name: `pol-${n}`,
      rpoThresholdSeconds: 60,
      crashConsistentIntervalSeconds: 15,
      retention: { rules: [{ for: '1d' }] },
    });
    const store = await t.call('POST', '/api/target-stores', {
      name: `store-${n}`,
      kind: 'directory',
      path: `/nonexistent/lifeboat-store-${n}`,
      passphrase: 'store-passphrase',
    });
    return {
      psToken,
      psId,
      hostId,
      machineId,
      policyId: policy.body['id'] as string,
      storeId: store.body['id'] as string,
    };
  };

  const point = (s: Setup, disk: string, time: Date, id: string) => ({
    id,
    machine: s.machineId,
    disk,
    time: time.toISOString(),
    committedAt: new Date().toISOString(),
    kind: 'crash',
    size: 1 << 20,
  });

  it('enables replication: desired state to the process server, initial replication, first points, protected; then RPO alerts raise once and clear', async () => {
    const s = await setup();
    const created = await t.call('POST', '/api/protected-items', {
      machineId: s.machineId,
      policyId: s.policyId,
      processServerId: s.psId,
      targetStoreId: s.storeId,
    });
    expect(created.status).toBe(201);
    expect(created.body['state']).toBe('enabling');
    const itemId = created.body['id'] as string;
    const jobId = created.body['jobId'] as string;
    const again = await t.call('POST', '/api/protected-items', {
      machineId: s.machineId,
      policyId: s.policyId,
      processServerId: s.psId,
      targetStoreId: s.storeId,
    });
    expect(again.status).toBe(409);

    // The process server finds the item, with its disks, policy and the store's secrets.
    const a = await t.call('GET', '/api/components/self/assignments', undefined, s.psToken);
    const items = a.body['items'] as Array<{
      id: string;
      desired: string;
      disks: Array<{ name: string }>;
      storeMachine: string;
    }>;
    expect(items.map((i) => [i.id, i.desired])).toEqual([[itemId, 'replicate']]);
    expect(items[0]?.disks.map((d) => d.name)).toEqual(['vda', 'vdb']);
    expect(items[0]?.storeMachine).toBe(s.machineId);
    expect((a.body['targetStores'] as Array<{ passphrase: string }>)[0]?.passphrase).toBe(
      'store-passphrase',
    );

    // It takes the item.
    const hb = await t.call(
      'POST',
      '/api/components/self/heartbeat',
      {
        health: { journalUsedBytes: 10, journalCapacityBytes: 100, storeReachable: true },
        items: [
          {
            id: itemId,
            state: 'initial-replication',
            appliedGeneration: 1,
            disks: [{ name: 'vda', initialDoneBytes: 1 << 29 }],
          },
        ],
      },
      s.psToken,
    );
    expect(hb.body['rejected']).toEqual([]);
    await waitFor(
      async () => ((await t.call('GET', `/api/jobs/${jobId}`)).body['progress'] as number) > 0.1,
    );
    // A point of one disk is not enough; both disks make it protected.
    const now = Date.now();
    await t.call(
      'PUT',
      '/api/recovery-points',
      {
        targetStoreId: s.storeId,
        points: [point(s, 'vda', new Date(now - 5000), `p-${s.machineId}-1`)],
      },
      s.psToken,
    );
    expect((await t.call('GET', `/api/protected-items/${itemId}`)).body['state']).toBe(
      'initial-replication',
    );
    const up = await t.call(
      'PUT',
      '/api/recovery-points',
      {
        targetStoreId: s.storeId,
        points: [point(s, 'vdb', new Date(now - 4000), `p-${s.machineId}-2`)],
      },
      s.psToken,
    );
    expect(up.body).toEqual({ upserted: 1, matched: 1 });
    const item = await t.call('GET', `/api/protected-items/${itemId}`);
    expect(item.body['state']).toBe('protected');
    expect(item.body['lastPointAt']).toBe(new Date(now - 5000).toISOString());
    await waitFor(
      async () => (await t.call('GET', `/api/jobs/${jobId}`)).body['state'] === 'succeeded',
    );
    const job = await t.call('GET', `/api/jobs/${jobId}`);
    expect((job.body['steps'] as Array<{ state: string }>).map((x) => x.state)).toEqual([
      'done',
      'done',
      'done',
    ]);
    const logs = await t.call('GET', `/api/jobs/${jobId}/logs`);
    expect((logs.body['items'] as Array<{ message: string }>).at(-1)?.message).toBe('Succeeded.');

    // The catalogue lists points newest first, per item, filtered.
    const pts = await t.call('GET', `/api/protected-items/${itemId}/points`);
    expect((pts.body['items'] as Array<{ disk: string }>).map((p) => p.disk)).toEqual([
      'vdb',
      'vda',
    ]);
    expect(
      (await t.call('GET', `/api/recovery-points?protectedItemId=${itemId}&disk=vda`)).body[
        'total'
      ],
    ).toBe(1);
    // Upserting the same point again changes nothing but its fields.
    await t.call(
      'PUT',
      '/api/recovery-points',
      {
        targetStoreId: s.storeId,
        points: [point(s, 'vda', new Date(now - 5000), `p-${s.machineId}-1`)],
      },
      s.psToken,
    );
    expect(
      (await t.call('GET', `/api/recovery-points?protectedItemId=${itemId}`)).body['total'],
    ).toBe(2);

    // RPO: 10 minutes later with no new point the alert is raised, once.
    const later = new Date(now + 600_000);
    await t.call('POST', '/api/components/self/heartbeat', {}, s.psToken);
    await t.vault.scheduler.evaluateAlerts(later);
    await t.vault.scheduler.evaluateAlerts(later);
    const active = await t.call(
      'GET',
      `/api/alerts?kind=rpo-exceeded&subjectId=${itemId}&state=active`,
    );
    expect(active.body['total']).toBe(1);
    // New points arrive: it clears.
    const fresh = new Date(later.getTime() - 1000);
    await t.call(
      'PUT',
      '/api/recovery-points',
      {
        targetStoreId: s.storeId,
        points: [
          point(s, 'vda', fresh, `p-${s.machineId}-3`),
          point(s, 'vdb', fresh, `p-${s.machineId}-4`),
        ],
      },
      s.psToken,
    );
    await t.vault.scheduler.evaluateAlerts(later);
    expect(
      (await t.call('GET', `/api/alerts?kind=rpo-exceeded&subjectId=${itemId}&state=active`)).body[
        'total'
      ],
    ).toBe(0);
    const cleared = await t.call('GET', `/api/alerts?kind=rpo-exceeded&subjectId=${itemId}`);
    expect((cleared.body['items'] as Array<{ state: string }>).map((x) => x.state)).toEqual([
      'cleared',
    ]);
    await t.vault.context.alerts.flush();
    expect(delivered.filter((d) => d.alert.subjectId === itemId).map((d) => d.event)).toEqual([
      'alert.raised',
      'alert.cleared',
    ]);
  });

  it('raises process-server alerts for a missing heartbeat, a nearly full journal and an unreachable store, and clears them', async () => {
    const s = await setup();
    const kinds = async () =>
      (
        (await t.call('GET', `/api/alerts?subjectId=${s.psId}&state=active`)).body[
          'items'
        ] as Array<{ kind: string }>
      )
        .map((a) => a.kind)
        .sort();
    await t.vault.scheduler.evaluateAlerts(new Date());
    expect(await kinds()).toEqual(['process-server-no-heartbeat']);
    await t.call(
      'POST',
      '/api/components/self/heartbeat',
      { health: { journalUsedBytes: 95, journalCapacityBytes: 100, storeReachable: false } },
      s.psToken,
    );
    await t.vault.scheduler.evaluateAlerts(new Date());
    expect(await kinds()).toEqual([
      'process-server-journal-full',
      'process-server-store-unreachable',
    ]);
    const summary = await t.call('GET', '/api/summary');
    expect(
      (summary.body['components'] as Array<{ id: string; status: string }>).find(
        (c) => c.id === s.psId,
      )?.status,
    ).toBe('healthy');
    // Acknowledge one; it stays active until resolved.
    const alert = (
      await t.call('GET', `/api/alerts?subjectId=${s.psId}&kind=process-server-journal-full`)
    ).body['items'] as Array<{ id: string }>;
    const operator = await t.userToken('operator');
    const ack = await t.call(
      'POST',
      `/api/alerts/${alert[0]?.id ?? ''}/acknowledge`,
      undefined,
      operator,
    );
    expect(ack.body['acknowledgedBy']).toBe('operator-1');
    expect(ack.body['state']).toBe('active');
    await t.call(
      'POST',
      '/api/components/self/heartbeat',
      { health: { journalUsedBytes: 5, journalCapacityBytes: 100, storeReachable: true } },
      s.psToken,
    );
    await t.vault.scheduler.evaluateAlerts(new Date());
    expect(await kinds()).toEqual([]);
    await t.vault.scheduler.evaluateAlerts(new Date(Date.now() + 120_000));
    expect(await kinds()).toEqual(['process-server-no-heartbeat']);
  });

  it("shows a recovery host's own jobs with their steps, and fails them when the host goes silent", async () => {
    const key = await t.call('POST', '/api/registration-keys', { kind: 'recovery-host' });
    const reg = await t.call(
      'POST',
      '/api/register',
      { key: key.body['key'], kind: 'recovery-host', name: 'rh-jobs' },
      null,
    );
    const rh = reg.body['token'] as string;
    const started = new Date().toISOString();
    const running = await t.call(
      'PUT',
      '/api/components/self/jobs/tf-1',
      {
        kind: 'test-failover',
        target: { machine: 'web' },
        state: 'running',
        steps: [
          {
            name: 'export',
            state: 'succeeded',
            startedAt: started,
            endedAt: started,
            detail: { removed: ['export web-d0 of point p1'] },
          },
          { name: 'boot', state: 'running', startedAt: started },
        ],
      },
      rh,
    );
    expect(running.status).toBe(200);
    const jobId = running.body['id'] as string;
    const shown = await t.call('GET', `/api/jobs/${jobId}`);
    expect(shown.body['state']).toBe('running');
    expect(
      (shown.body['steps'] as Array<{ name: string; state: string }>).map(
        (x) => `${x.name}:${x.state}`,
      ),
    ).toEqual(['export:done', 'boot:running']);
    // What a step did (a cleanup's removed overlays and exports) reaches the user.
    expect((shown.body['steps'] as Array<{ detail?: unknown }>)[0]!.detail).toEqual({
      removed: ['export web-d0 of point p1'],
    });
    expect(shown.body['progress']).toBe(0.5);
    const failedReport = {
      kind: 'test-failover',
      target: { machine: 'web' },
      state: 'failed',
      steps: [
        { name: 'export', state: 'succeeded' },
        {
          name: 'boot',
          state: 'failed',
          error: { code: 'LB_RECOVERY_BOOT', message: 'no console marker' },
        },
      ],
      error: { code: 'LB_RECOVERY_BOOT', message: 'no console marker' },
    };
    const failed = await t.call('PUT', '/api/components/self/jobs/tf-1', failedReport, rh);
    expect(failed.status).toBe(200);
    expect((await t.call('GET', `/api/jobs/${jobId}`)).body['state']).toBe('failed');
    const logs = await t.call('GET', `/api/jobs/${jobId}/logs`);
    expect((logs.body['items'] as Array<{ message: string }>).map((l) => l.message)).toContain(
      'Step boot failed: no console marker',
    );
    expect(
      (await t.call('GET', '/api/alerts?kind=job-failed&subjectId=test-failover:web&state=active'))
        .body['total'],
    ).toBe(1);
    // The same end again (a retry whose answer was lost, or the artifacts that came after):
    // taken, with no second log line or alert.
    const again = await t.call(
      'PUT',
      '/api/components/self/jobs/tf-1',
      { ...failedReport, result: { artifacts: { 'web-console': '/run/web/console.log' } } },
      rh,
    );
    expect(again.status).toBe(200);
    const after = await t.call('GET', `/api/jobs/${jobId}`);
    expect(after.body['state']).toBe('failed');
    expect(after.body['result']).toEqual({ artifacts: { 'web-console': '/run/web/console.log' } });
    const logsAfter = await t.call('GET', `/api/jobs/${jobId}/logs`);
    expect(
      (logsAfter.body['items'] as Array<{ message: string }>).filter(
        (l) => l.message === 'Step boot failed: no console marker',
      ),
    ).toHaveLength(1);
    const reopen = await t.call(
      'PUT',
      '/api/components/self/jobs/tf-1',
      { kind: 'test-failover', state: 'running', steps: [] },
      rh,
    );
    expect(reopen.status).toBe(409);
    // A different end is refused too: an ended job's outcome does not change.
    const flipped = await t.call(
      'PUT',
      '/api/components/self/jobs/tf-1',
      { kind: 'test-failover', state: 'succeeded', steps: [] },
      rh,
    );
    expect(flipped.status).toBe(409);
    const users = await t.call('PUT', '/api/components/self/jobs/tf-9', {
      kind: 'x',
      state: 'running',
      steps: [],
    });
    expect(users.status).toBe(403);
    // A host that stops reporting leaves no job running forever.
    const second = await t.call(
      'PUT',
      '/api/components/self/jobs/tf-2',
      { kind: 'test-failover', target: { machine: 'db' }, state: 'running', steps: [] },
      rh,
    );
    await t.vault.scheduler.evaluateAlerts(new Date(Date.now() + 120_000));
    const orphan = await t.call('GET', `/api/jobs/${second.body['id'] as string}`);
    expect(orphan.body['state']).toBe('failed');
    expect((orphan.body['error'] as { code: string }).code).toBe('LB_VAULT_JOB_INTERRUPTED');
  });

  it('streams changes as server-sent events', async () => {
    const controller = new AbortController();
    const res = await fetch(`${t.vault.url}/api/events`, {
      headers: { authorization: `Bearer ${t.adminToken}` },
      signal: controller.signal,
    });
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toBe('text/event-stream');
    const reader = (res.body as ReadableStream<Uint8Array>).getReader();
    const decoder = new TextDecoder();
    let text = '';
    const until = async (pattern: RegExp): Promise<void> => {
      while (!pattern.test(text)) {
        const { value, done } = await reader.read();
        if (done) throw new Error(`stream ended before ${String(pattern)}: ${text}`);
        text += decoder.decode(value);
      }
    };
    try {
      await until(/event: ready/);
      const s = await setup();
      const created = await t.call('POST', '/api/protected-items', {
        machineId: s.machineId,
        policyId: s.policyId,
        processServerId: s.psId,
        targetStoreId: s.storeId,
      });
      await until(
        new RegExp(`event: protected-item\ndata: [^\n]*"id":"${created.body['id'] as string}"`),
      );
      await until(new RegExp(`event: job\ndata: [^\n]*"id":"${created.body['jobId'] as string}"`));
      await until(new RegExp(`event: component\ndata: [^\n]*"id":"${s.psId}"`));
    } finally {
      controller.abort();
      await reader.cancel().catch(() => undefined);
    }
    // Without a token: refused like every route.
    expect((await fetch(`${t.vault.url}/api/events`)).status).toBe(401);
  });

  it('follows the state machine: resync, failover, reprotect, disable; refuses what it does not allow', async () => {
    const s = await setup();
    const created = await t.call('POST', '/api/protected-items', {
      machineId: s.machineId,
      policyId: s.policyId,
      processServerId: s.psId,
      targetStoreId: s.storeId,
      disks: ['vda'],
    });
    const id = created.body['id'] as string;
    const early = await t.call('POST', `/api/protected-items/${id}/failover`, {});
    expect(early.status).toBe(409);
    expect(early.body.code).toBe('LB_VAULT_INVALID_STATE');
    const badDisk = await t.call('POST', '/api/protected-items', {
      machineId: s.machineId,
      policyId: s.policyId,
      processServerId: s.psId,
      targetStoreId: s.storeId,
      disks: ['sdz'],
    });
    expect(badDisk.body.details?.['field']).toBe('body.disks');
    await t.call(
      'POST',
      '/api/components/self/heartbeat',
      { items: [{ id, state: 'initial-replication' }] },
      s.psToken,
    );
    await t.call(
      'PUT',
      '/api/recovery-points',
      { targetStoreId: s.storeId, points: [point(s, 'vda', new Date(), `q-${id}`)] },
      s.psToken,
    );
    expect((await t.call('GET', `/api/protected-items/${id}`)).body['state']).toBe('protected');
    // The process server reports lost change tracking: resync-needed, alert raised.
    await t.call(
      'POST',
      '/api/components/self/heartbeat',
      { items: [{ id, state: 'resync-needed', reason: 'bitmap lost' }] },
      s.psToken,
    );
    await t.vault.scheduler.evaluateAlerts(new Date());
    expect(
      (await t.call('GET', `/api/alerts?kind=resync-needed&subjectId=${id}&state=active`)).body[
        'total'
      ],
    ).toBe(1);
    // A process server cannot report on another's item.
    const other = await setup();
    const foreign = await t.call(
      'POST',
      '/api/components/self/heartbeat',
      { items: [{ id, state: 'protected' }] },
      other.psToken,
    );
    expect((foreign.body['rejected'] as Array<{ code: string }>)[0]?.code).toBe(
      'LB_VAULT_NOT_FOUND',
    );
    const viewer = await t.userToken('viewer');
    expect((await t.call('POST', `/api/protected-items/${id}/failover`, {}, viewer)).status).toBe(
      403,
    );
    const badPoint = await t.call('POST', `/api/protected-items/${id}/failover`, {
      pointId: 'nope',
    });
    expect(badPoint.body.details?.['field']).toBe('body.pointId');
    const fo = await t.call('POST', `/api/protected-items/${id}/failover`, { pointId: `q-${id}` });
    expect(fo.body['state']).toBe('failed-over');
    await t.vault.scheduler.evaluateAlerts(new Date());
    expect(
      (await t.call('GET', `/api/alerts?kind=resync-needed&subjectId=${id}&state=active`)).body[
        'total'
      ],
    ).toBe(0);
    const assigned = await t.call('GET', '/api/components/self/assignments', undefined, s.psToken);
    expect(
      (assigned.body['items'] as Array<{ id: string; desired: string }>).find((i) => i.id === id)
        ?.desired,
    ).toBe('stop');
    const re = await t.call('POST', `/api/protected-items/${id}/reprotect`);
    expect(re.body['state']).toBe('enabling');
    expect((await t.call('DELETE', `/api/protected-items/${id}`)).status).toBe(409);
    const off = await t.call('POST', `/api/protected-items/${id}/disable`, { deletePoints: false });
    expect(off.body['state']).toBe('disabled');
    await waitFor(
      async () =>
        (await t.call('GET', `/api/jobs/${off.body['jobId'] as string}`)).body['state'] ===
        'succeeded',
    );
    // The enable job notices the item was disabled and ends cancelled, not running forever.
    await waitFor(
      async () =>
        (await t.call('GET', `/api/jobs/${re.body['jobId'] as string}`)).body['state'] ===
        'cancelled',
    );
    expect((await t.call('POST', `/api/protected-items/${id}/resync`)).status).toBe(409);
    // Disabled, the machine can be protected again.
    const again = await t.call('POST', '/api/protected-items', {
      machineId: s.machineId,
      policyId: s.policyId,
      processServerId: s.psId,
      targetStoreId: s.storeId,
    });
    expect(again.status).toBe(201);
    expect((await t.call('DELETE', `/api/protected-items/${id}`)).status).toBe(204);
    // In use: the policy cannot go while an item uses it.
    const inUse = await t.call('DELETE', `/api/policies/${s.policyId}`);
    expect(inUse.status).toBe(409);
    expect(inUse.body.code).toBe('LB_VAULT_IN_USE');
    const list = await t.call('GET', `/api/protected-items?state=enabling&policyId=${s.policyId}`);
    expect(list.body['total']).toBe(1);
    const audit = await t.call('GET', `/api/audit?targetId=${id}&action=protected-item.state`);
    expect((audit.body['items'] as unknown[]).length).toBeGreaterThanOrEqual(5);
  });
});

async function waitFor(check: () => Promise<boolean>, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error('condition not reached in time');
    await new Promise((r) => setTimeout(r, 50));
  }
}
