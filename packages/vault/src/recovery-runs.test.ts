import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DIALECTS,
  dialectFixture,
  startTestVault,
  type DialectFixture,
  type TestVault,
} from './test-harness.js';

// The vault's side of test failovers and failovers: choosing items, points and a recovery
// host, queueing jobs the recovery host finds in its assignments, and folding its reports
// into the run. The recovery host's part is played here over its component routes (as the
// real one calls them; packages/integration-tests boots real machines through this API).

type Body = Record<string, unknown>;

interface Item {
  itemId: string;
  machineId: string;
  psToken: string;
  psId: string;
  /** Point ids by cut: c1 crash, c2 app, c3 crash complete; c4 has only disk vda. */
  cuts: Record<'c1' | 'c2' | 'c3' | 'c4', string[]>;
  times: Record<'c1' | 'c2' | 'c3' | 'c4', string>;
}

describe.each(DIALECTS)('test failovers and failovers through the vault on %s', (dialect) => {
  let fx: DialectFixture;
  let t: TestVault;
  let storeId: string;
  let rhToken = '';
  let rhId = '';
  let n = 0;

  beforeAll(async () => {
    fx = await dialectFixture(dialect);
    t = await startTestVault(await fx.fresh(), { heartbeatTimeoutSeconds: 30 });
    const store = await t.call('POST', '/api/target-stores', {
      name: 'store',
      kind: 'directory',
      path: '/nonexistent/lifeboat-store',
      passphrase: 'store-passphrase',
    });
    storeId = store.body['id'] as string;
  });
  afterAll(async () => {
    await t?.close();
    await fx?.stop();
  });

  const ok = async (method: string, url: string, body?: unknown, token?: string) => {
    const r = await t.call(method, url, body, token);
    if (r.status >= 300) throw new Error(`${method} ${url}: ${r.status} ${JSON.stringify(r.body)}`);
    return r.body;
  };

  /** A protected machine with two disks and four cuts of points (c4 incomplete). */
  const protectedItem = async (group?: string): Promise<Item> => {
    n++;
    const key = await ok('POST', '/api/registration-keys', { kind: 'process-server' });
    const reg = await ok('POST', '/api/register', {
      key: key['key'],
      kind: 'process-server',
      name: `ps-${n}`,
    });
    const psToken = reg['token'] as string;
    const psId = (reg['component'] as { id: string }).id;
    await ok('POST', '/api/components/self/heartbeat', {}, psToken);
    const host = await ok('POST', '/api/source-hosts', {
      name: `kvm-${n}`,
      kind: 'kvm',
      processServerId: psId,
      endpoints: [],
    });
    await ok(
      'PUT',
      `/api/source-hosts/${String(host['id'])}/inventory`,
      {
        machines: [
          {
            externalId: 'vm',
            name: `Web_${n}`,
            cpus: 2,
            memoryBytes: 256 * 1048576,
            disks: [
              { name: 'vda', sizeBytes: 1 << 30 },
              { name: 'vdb', sizeBytes: 1 << 20 },
            ],
          },
        ],
      },
      psToken,
    );
    const machines = await ok('GET', `/api/machines?sourceHostId=${String(host['id'])}`);
    const machineId = (machines['items'] as Array<{ id: string }>)[0]!.id;
    const policy = await ok('POST', '/api/policies', {
      name: `pol-${n}`,
      rpoThresholdSeconds: 3600,
      crashConsistentIntervalSeconds: 15,
      retention: { rules: [{ for: '1d' }] },
    });
    const item = await ok('POST', '/api/protected-items', {
      machineId,
      policyId: policy['id'],
      processServerId: psId,
      targetStoreId: storeId,
      ...(group !== undefined ? { consistencyGroup: group } : {}),
    });
    const itemId = item['id'] as string;
    await ok(
      'POST',
      '/api/components/self/heartbeat',
      { items: [{ id: itemId, state: 'initial-replication' }] },
      psToken,
    );
    const base = Date.now() - 3_600_000;
    const times = {
      c1: new Date(base).toISOString(),
      c2: new Date(base + 60_000).toISOString(),
      c3: new Date(base + 120_000).toISOString(),
      c4: new Date(base + 180_000).toISOString(),
    };
    const cuts = { c1: [] as string[], c2: [] as string[], c3: [] as string[], c4: [] as string[] };
    const points = [];
    for (const c of ['c1', 'c2', 'c3', 'c4'] as const) {
      for (const disk of c === 'c4' ? ['vda'] : ['vda', 'vdb']) {
        const id = `p${n}-${c}-${disk}`;
        cuts[c].push(id);
        points.push({
          id,
          machine: machineId,
          disk,
          time: times[c],
          committedAt: times[c],
          kind: c === 'c2' ? 'app' : 'crash',
          size: disk === 'vda' ? 1 << 30 : 1 << 20,
          cut: `${n}-${c}`,
        });
      }
    }
    await ok('PUT', '/api/recovery-points', { targetStoreId: storeId, points }, psToken);
    const shown = await ok('GET', `/api/protected-items/${itemId}`);
    expect(shown['state']).toBe('protected');
    return { itemId, machineId, psToken, psId, cuts, times };
  };

  const registerHost = async (name: string): Promise<{ token: string; id: string }> => {
    const key = await ok('POST', '/api/registration-keys', { kind: 'recovery-host' });
    const reg = await ok('POST', '/api/register', { key: key['key'], kind: 'recovery-host', name });
    return { token: reg['token'] as string, id: (reg['component'] as { id: string }).id };
  };

  interface Operation {
    jobId: string;
    kind: string;
    state: string;
    runId: string;
    spec: Body;
    finalSync?: { state: string; result: Body | null };
  }
  const operations = async (token = rhToken) =>
    (await ok('GET', '/api/components/self/assignments', undefined, token)) as {
      operations: Operation[];
      targetStores: Array<{ id: string; passphrase: string }>;
    };
  const report = (jobId: string, body: Body, token = rhToken) =>
    ok('PUT', `/api/components/self/jobs/${jobId}`, { steps: [], ...body }, token);

  it('refuses with a stable code when no recovery host can run it, a point is unknown, or an item is not ready', async () => {
    const a = await protectedItem();
    const none = await t.call('POST', '/api/test-failovers', { protectedItemIds: [a.itemId] });
    expect(none.status).toBe(409);
    expect(none.body.code).toBe('LB_VAULT_NO_RECOVERY_HOST');
    // Registered but never heard from is not healthy either.
    const silent = await registerHost('rh-silent');
    expect(
      (await t.call('POST', '/api/test-failovers', { protectedItemIds: [a.itemId] })).body.code,
    ).toBe('LB_VAULT_NO_RECOVERY_HOST');
    const named = await t.call('POST', '/api/test-failovers', {
      protectedItemIds: [a.itemId],
      recoveryHostId: silent.id,
    });
    expect(named.status).toBe(409);
    expect(named.body.code).toBe('LB_VAULT_RECOVERY_HOST_DOWN');

    const rh = await registerHost('rh-1');
    rhToken = rh.token;
    rhId = rh.id;
    await ok('POST', '/api/components/self/heartbeat', { health: { instanceId: 'i1' } }, rhToken);

    const unknown = await t.call('POST', '/api/test-failovers', {
      protectedItemIds: [a.itemId],
      point: { pointId: 'no-such-point' },
    });
    expect(unknown.status).toBe(404);
    expect(unknown.body.code).toBe('LB_VAULT_POINT_NOT_FOUND');
    expect(unknown.body.details?.['field']).toBe('body.point.pointId');
    const tooEarly = await t.call('POST', '/api/test-failovers', {
      protectedItemIds: [a.itemId],
      point: { at: new Date(Date.parse(a.times.c1) - 1000).toISOString() },
    });
    expect(tooEarly.body.code).toBe('LB_VAULT_POINT_NOT_FOUND');
    const both = await t.call('POST', '/api/test-failovers', {
      protectedItemIds: [a.itemId],
      consistencyGroup: 'g',
    });
    expect(both.status).toBe(400);
    expect(both.body.details?.['field']).toBe('body.protectedItemIds');
    const badRegex = await t.call('POST', '/api/test-failovers', {
      protectedItemIds: [a.itemId],
      verify: { console: '(' },
    });
    expect(badRegex.body.details?.['field']).toBe('body.verify.console');
    const badAddress = await t.call('POST', '/api/test-failovers', {
      protectedItemIds: [a.itemId],
      addresses: [{ protectedItemId: a.itemId, address: '10.0.0.300/24' }],
    });
    expect(badAddress.body.details?.['field']).toBe('body.addresses.0.address');

    // A disabled item is not tested or failed over through the vault.
    const b = await protectedItem();
    await ok('POST', `/api/protected-items/${b.itemId}/disable`, {});
    const disabled = await t.call('POST', '/api/test-failovers', { protectedItemIds: [b.itemId] });
    expect(disabled.status).toBe(409);
    expect(disabled.body.code).toBe('LB_VAULT_INVALID_STATE');
    const fo = await t.call('POST', '/api/failovers', { protectedItemId: b.itemId });
    expect(fo.body.code).toBe('LB_VAULT_INVALID_STATE');
  });

  it('chooses the newest complete cut, the newest app-consistent one, one at a time, or the cut of a point id', async () => {
    const a = await protectedItem();
    const pick = async (point: Body | undefined) => {
      const r = await ok('POST', '/api/test-failovers', {
        protectedItemIds: [a.itemId],
        ...(point !== undefined ? { point } : {}),
      });
      const m = (r['machines'] as Array<{ points: Array<{ id: string }> }>)[0]!;
      await ok('POST', `/api/test-failovers/${String(r['id'])}/cleanup`);
      return m.points.map((p) => p.id);
    };
    expect(await pick(undefined)).toEqual(a.cuts.c3); // c4 lacks vdb
    expect(await pick({ pick: 'latest-app' })).toEqual(a.cuts.c2);
    expect(await pick({ at: new Date(Date.parse(a.times.c2) + 1000).toISOString() })).toEqual(
      a.cuts.c2,
    );
    expect(await pick({ pointId: a.cuts.c1[1] })).toEqual(a.cuts.c1);
    const incomplete = await t.call('POST', '/api/test-failovers', {
      protectedItemIds: [a.itemId],
      point: { pointId: a.cuts.c4[0] },
    });
    expect(incomplete.body.code).toBe('LB_VAULT_POINT_NOT_FOUND');
  });

  it('runs a test failover on the recovery host through its assignments: steps, verification, the screenshot, cleanup; the item stays protected', async () => {
    const a = await protectedItem();
    const started = await ok('POST', '/api/test-failovers', {
      protectedItemIds: [a.itemId],
      verify: { console: 'LIFEBOAT-BOOT-OK', guestPort: 22 },
      boot: { kernel: '/srv/kernels/vmlinuz', append: 'console=ttyS0' },
    });
    expect(started['state']).toBe('queued');
    expect(started['recoveryHostId']).toBe(rhId);
    expect(started['network']).toBe('isolated-user');
    const id = started['id'] as string;
    const jobId = started['jobId'] as string;
    const m = (started['machines'] as Array<Body>)[0]!;
    expect(m['name']).toMatch(/^web-\d+-[a-z0-9]{4}$/);
    expect(m).toMatchObject({ cpus: 2, memoryMiB: 256, protectedItemId: a.itemId });

    // The vault's runner leaves it to the recovery host.
    await new Promise((r) => setTimeout(r, 300));
    expect((await ok('GET', `/api/jobs/${jobId}`))['state']).toBe('queued');
    const work = await operations();
    const op = work.operations.find((o) => o.jobId === jobId)!;
    expect(op).toMatchObject({ kind: 'test-failover', state: 'queued', runId: id });
    expect(op.spec['network']).toBe('isolated-user');
    const specMachine = (op.spec['machines'] as Body[])[0]!;
    expect(specMachine).toMatchObject({
      name: m['name'],
      pointIds: a.cuts.c3,
      targetStoreId: storeId,
      boot: { kernel: '/srv/kernels/vmlinuz', append: 'console=ttyS0' },
    });
    expect(work.targetStores).toEqual([
      expect.objectContaining({ id: storeId, passphrase: 'store-passphrase' }),
    ]);

    await report(jobId, {
      kind: 'test-failover',
      state: 'running',
      steps: [{ name: 'select points', state: 'succeeded', startedAt: new Date().toISOString() }],
      result: { instanceId: 'i1' },
    });
    expect((await ok('GET', `/api/test-failovers/${id}`))['state']).toBe('starting');
    const png = Buffer.from('89504e470d0a1a0a0000000d49484452', 'hex');
    const up = await ok(
      'PUT',
      `/api/components/self/jobs/${jobId}/artifacts/${String(m['name'])}-screenshot`,
      { contentType: 'image/png', data: png.toString('base64') },
      rhToken,
    );
    expect(up['size']).toBe(png.length);
    await ok(
      'PUT',
      `/api/components/self/jobs/${jobId}/artifacts/${String(m['name'])}-console`,
      { contentType: 'text/plain', data: Buffer.from('LIFEBOAT-BOOT-OK\n').toString('base64') },
      rhToken,
    );
    await report(jobId, {
      kind: 'test-failover',
      state: 'succeeded',
      steps: [
        { name: 'select points', state: 'succeeded' },
        { name: `boot ${String(m['name'])}`, state: 'succeeded' },
      ],
      result: {
        instanceId: 'i1',
        machines: [
          {
            name: m['name'],
            verification: {
              console: 'LIFEBOAT-BOOT-OK web',
              screenshot: { width: 720, height: 400 },
            },
          },
        ],
      },
    });
    const run = await ok('GET', `/api/test-failovers/${id}`);
    expect(run['state']).toBe('running');
    const shown = (run['machines'] as Array<Body>)[0]!;
    expect(shown['verification']).toEqual({
      console: 'LIFEBOAT-BOOT-OK web',
      screenshot: { width: 720, height: 400 },
    });
    const artifacts = shown['artifacts'] as { screenshot: string; console: string };
    expect(artifacts.screenshot).toBe(
      `/api/jobs/${jobId}/artifacts/${String(m['name'])}-screenshot`,
    );
    const res = await t.vault.app.inject({
      method: 'GET',
      url: artifacts.screenshot,
      headers: { authorization: `Bearer ${t.adminToken}` },
    });
    expect(res.statusCode).toBe(200);
    expect(res.headers['content-type']).toBe('image/png');
    expect(res.rawPayload.equals(png)).toBe(true);
    const list = await ok('GET', `/api/jobs/${jobId}/artifacts`);
    expect((list['items'] as Array<{ name: string }>).map((x) => x.name)).toEqual([
      `${String(m['name'])}-console`,
      `${String(m['name'])}-screenshot`,
    ]);
    // Paged like every list.
    const first = await ok('GET', `/api/jobs/${jobId}/artifacts?limit=1`);
    expect([(first['items'] as unknown[]).length, first['total']]).toEqual([1, 2]);
    const second = await ok(
      'GET',
      `/api/jobs/${jobId}/artifacts?limit=1&cursor=${String(first['nextCursor'])}`,
    );
    expect((second['items'] as Array<{ name: string }>).map((x) => x.name)).toEqual([
      `${String(m['name'])}-screenshot`,
    ]);
    expect(second['nextCursor']).toBeNull();
    expect((await ok('GET', `/api/jobs/${jobId}`))['state']).toBe('succeeded');
    expect((await ok('GET', `/api/protected-items/${a.itemId}`))['state']).toBe('protected');
    const byItem = await ok('GET', `/api/test-failovers?protectedItemId=${a.itemId}`);
    expect((byItem['items'] as Body[]).map((r) => r['id'])).toEqual([id]);

    const cleanup = await ok('POST', `/api/test-failovers/${id}/cleanup`);
    const cleanupJob = cleanup['jobId'] as string;
    expect(cleanupJob).not.toBe(jobId);
    const again = await t.call('POST', `/api/test-failovers/${id}/cleanup`);
    expect(again.body.code).toBe('LB_VAULT_INVALID_STATE');
    const cop = (await operations()).operations.find((o) => o.jobId === cleanupJob)!;
    expect(cop).toMatchObject({ kind: 'test-failover-cleanup', spec: { machines: [m['name']] } });
    await report(cleanupJob, { kind: 'test-failover-cleanup', state: 'succeeded' });
    const done = await ok('GET', `/api/test-failovers/${id}`);
    expect(done['state']).toBe('cleaned-up');
    expect((done['jobs'] as Body[]).map((j) => j['kind'])).toEqual([
      'test-failover',
      'test-failover-cleanup',
    ]);
    expect((await t.call('POST', `/api/test-failovers/${id}/cleanup`)).body.code).toBe(
      'LB_VAULT_INVALID_STATE',
    );
    const audit = await ok('GET', `/api/audit?targetId=${id}`);
    expect((audit['items'] as Body[]).map((x) => x['action']).sort()).toEqual([
      'test-failover.cleanup',
      'test-failover.start',
    ]);
  });

  it('tests a consistency group together on one segment, no machine ahead of another', async () => {
    const a = await protectedItem('billing');
    const b = await protectedItem('billing');
    const r = await ok('POST', '/api/test-failovers', { consistencyGroup: 'billing' });
    expect(r['network']).toBe('segment');
    const ms = r['machines'] as Array<{ protectedItemId: string; points: Array<{ id: string }> }>;
    expect(ms.map((m) => m.protectedItemId)).toEqual([a.itemId, b.itemId]);
    // b's points are newer than a's (made later): both take their newest cut at or before a's.
    expect(ms[0]!.points.map((p) => p.id)).toEqual(a.cuts.c3);
    expect(ms[1]!.points.map((p) => p.id)).toEqual(b.cuts.c2);
    await ok('POST', `/api/test-failovers/${String(r['id'])}/cleanup`);
  });

  it('fails over, changes the point, commits and hydrates; the item becomes failed-over once the machine booted', async () => {
    const a = await protectedItem();
    const started = await ok('POST', '/api/failovers', {
      protectedItemId: a.itemId,
      point: { pick: 'latest-app' },
      verify: { guestPort: 22 },
    });
    const id = started['id'] as string;
    expect(
      (started['machines'] as Array<{ points: Array<{ id: string }> }>)[0]!.points.map((p) => p.id),
    ).toEqual(a.cuts.c2);
    const again = await t.call('POST', '/api/failovers', { protectedItemId: a.itemId });
    expect(again.status).toBe(409);
    expect(again.body.details?.['failoverId']).toBe(id);
    const early = await t.call('POST', `/api/failovers/${id}/commit`, {});
    expect(early.body.code).toBe('LB_VAULT_INVALID_STATE');
    const op = (await operations()).operations.find((o) => o.jobId === started['jobId'])!;
    expect(op.kind).toBe('failover');
    expect((op.spec['machine'] as Body)['pointIds']).toEqual(a.cuts.c2);
    await report(op.jobId, { kind: 'failover', state: 'running', result: { instanceId: 'i1' } });
    expect((await ok('GET', `/api/protected-items/${a.itemId}`))['state']).toBe('protected');
    await report(op.jobId, { kind: 'failover', state: 'succeeded', result: { instanceId: 'i1' } });
    expect((await ok('GET', `/api/failovers/${id}`))['state']).toBe('booted');
    const item = await ok('GET', `/api/protected-items/${a.itemId}`);
    expect(item['state']).toBe('failed-over');
    // The process server stops replicating it.
    const psWork = await ok('GET', '/api/components/self/assignments', undefined, a.psToken);
    expect((psWork['items'] as Array<{ id: string; desired: string }>)[0]!.desired).toBe('stop');

    const changed = await ok('POST', `/api/failovers/${id}/change-point`, {
      point: { pointId: a.cuts.c1[0] },
    });
    const cop = (await operations()).operations.find((o) => o.jobId === changed['jobId'])!;
    expect(cop).toMatchObject({ kind: 'failover-change-point', spec: { pointIds: a.cuts.c1 } });
    const busy = await t.call('POST', `/api/failovers/${id}/commit`, {});
    expect(busy.body.code).toBe('LB_VAULT_INVALID_STATE');
    await report(cop.jobId, { kind: 'failover-change-point', state: 'succeeded' });
    const after = await ok('GET', `/api/failovers/${id}`);
    expect(after['state']).toBe('booted');
    expect(
      (after['machines'] as Array<{ points: Array<{ id: string }> }>)[0]!.points.map((p) => p.id),
    ).toEqual(a.cuts.c1);

    const commit = await ok('POST', `/api/failovers/${id}/commit`, { format: 'raw' });
    const jobs = (await operations()).operations.filter((o) => o.runId === id);
    expect(jobs.map((o) => o.kind)).toEqual(['failover-commit', 'hydration']);
    expect(jobs[1]!.spec).toMatchObject({ format: 'raw', verify: false });
    expect(commit['hydrationJobId']).toBe(jobs[1]!.jobId);
    await report(jobs[0]!.jobId, { kind: 'failover-commit', state: 'succeeded' });
    expect((await ok('GET', `/api/failovers/${id}`))['state']).toBe('committed');
    await report(jobs[1]!.jobId, { kind: 'hydration', state: 'running' });
    expect((await ok('GET', `/api/failovers/${id}`))['state']).toBe('hydrating');
    const name = (after['machines'] as Array<{ name: string }>)[0]!.name;
    await report(jobs[1]!.jobId, {
      kind: 'hydration',
      state: 'succeeded',
      result: {
        machines: [{ name, localDisks: ['/var/lib/rh/disks/d0.raw', '/var/lib/rh/disks/d1.raw'] }],
      },
    });
    const hydrated = await ok('GET', `/api/failovers/${id}`);
    expect(hydrated['state']).toBe('hydrated');
    expect((hydrated['machines'] as Array<{ localDisks: string[] }>)[0]!.localDisks).toHaveLength(
      2,
    );
    const late = await t.call('POST', `/api/failovers/${id}/change-point`, {});
    expect(late.body.code).toBe('LB_VAULT_INVALID_STATE');
  });

  it('a planned failover asks the process server for a last sync, then boots the points it reports', async () => {
    const a = await protectedItem();
    const started = await ok('POST', '/api/failovers', {
      protectedItemId: a.itemId,
      planned: true,
    });
    const id = started['id'] as string;
    expect(started['planned']).toBe(true);
    expect((started['jobs'] as Body[]).map((j) => j['kind'])).toEqual(['final-sync', 'failover']);
    const ps = await ok('GET', '/api/components/self/assignments', undefined, a.psToken);
    const sync = (ps['operations'] as Operation[])[0]!;
    expect(sync).toMatchObject({
      kind: 'final-sync',
      runId: id,
      spec: { protectedItemId: a.itemId, storeMachine: a.machineId, stopSource: true },
    });
    const rhOp = (await operations()).operations.find((o) => o.runId === id)!;
    expect(rhOp.finalSync?.state).toBe('queued');
    await report(rhOp.jobId, { kind: 'failover', state: 'running', result: { instanceId: 'i1' } });
    await report(sync.jobId, { kind: 'final-sync', state: 'running' }, a.psToken);
    expect((await ok('GET', `/api/failovers/${id}`))['state']).toBe('syncing');
    // The recovery host may not report on the process server's job, and the reverse.
    expect(
      (
        await t.call(
          'PUT',
          `/api/components/self/jobs/${sync.jobId}`,
          { kind: 'x', state: 'running', steps: [] },
          rhToken,
        )
      ).status,
    ).toBe(403);
    await report(
      sync.jobId,
      {
        kind: 'final-sync',
        state: 'succeeded',
        result: { pointIds: a.cuts.c3, sourceStopped: true },
      },
      a.psToken,
    );
    const seen = (await operations()).operations.find((o) => o.runId === id)!;
    expect(seen.finalSync).toMatchObject({
      state: 'succeeded',
      result: { pointIds: a.cuts.c3, sourceStopped: true },
    });
    expect((await ok('GET', `/api/failovers/${id}`))['state']).toBe('starting');
    const name = (started['machines'] as Array<{ name: string }>)[0]!.name;
    await report(rhOp.jobId, {
      kind: 'failover',
      state: 'succeeded',
      result: { instanceId: 'i1', machines: [{ name, pointIds: a.cuts.c3 }] },
    });
    const run = await ok('GET', `/api/failovers/${id}`);
    expect(run['state']).toBe('booted');
    expect(
      (run['machines'] as Array<{ points: Array<{ id: string; disk: string }> }>)[0]!.points,
    ).toEqual([
      expect.objectContaining({ id: a.cuts.c3[0], disk: 'vda' }),
      expect.objectContaining({ id: a.cuts.c3[1], disk: 'vdb' }),
    ]);
    expect((await ok('GET', `/api/protected-items/${a.itemId}`))['state']).toBe('failed-over');
  });

  it('fails the job and the run visibly when the recovery host goes silent, restarts, or the job is cancelled', async () => {
    const a = await protectedItem();
    const one = await ok('POST', '/api/test-failovers', { protectedItemIds: [a.itemId] });
    await report(one['jobId'] as string, {
      kind: 'test-failover',
      state: 'running',
      result: { instanceId: 'i1' },
    });
    const queued = await ok('POST', '/api/test-failovers', { protectedItemIds: [a.itemId] });
    const cancelled = await ok('POST', `/api/jobs/${String(queued['jobId'])}/cancel`);
    expect(cancelled['state']).toBe('cancelled');
    const q = await ok('GET', `/api/test-failovers/${String(queued['id'])}`);
    expect(q['state']).toBe('failed');
    expect((q['error'] as { code: string }).code).toBe('LB_VAULT_JOB_CANCELLED');
    const running = await t.call('POST', `/api/jobs/${String(one['jobId'])}/cancel`);
    expect(running.body.code).toBe('LB_VAULT_INVALID_STATE');

    // A restart: the heartbeat names a new instance, so what the old one held is gone.
    await report(one['jobId'] as string, {
      kind: 'test-failover',
      state: 'succeeded',
      result: { instanceId: 'i1' },
    });
    await ok('POST', '/api/components/self/heartbeat', { health: { instanceId: 'i2' } }, rhToken);
    const lost = await ok('GET', `/api/test-failovers/${String(one['id'])}`);
    expect(lost['state']).toBe('failed');
    expect((lost['error'] as { code: string }).code).toBe('LB_VAULT_RECOVERY_RUN_LOST');
    // Cleanup still runs (it removes whatever is left).
    const c = await ok('POST', `/api/test-failovers/${String(one['id'])}/cleanup`);
    await report(c['jobId'] as string, { kind: 'test-failover-cleanup', state: 'succeeded' });
    expect((await ok('GET', `/api/test-failovers/${String(one['id'])}`))['state']).toBe(
      'cleaned-up',
    );

    // Silent mid-job: the scheduler (here: its clock moved on) fails the running and queued jobs.
    const two = await ok('POST', '/api/test-failovers', { protectedItemIds: [a.itemId] });
    await report(two['jobId'] as string, {
      kind: 'test-failover',
      state: 'running',
      result: { instanceId: 'i2' },
    });
    const three = await ok('POST', '/api/test-failovers', { protectedItemIds: [a.itemId] });
    await t.vault.scheduler.evaluateAlerts(new Date(Date.now() + 60_000));
    for (const r of [two, three]) {
      const job = await ok('GET', `/api/jobs/${String(r['jobId'])}`);
      expect(job['state']).toBe('failed');
      expect((job['error'] as { code: string }).code).toBe('LB_VAULT_JOB_INTERRUPTED');
      const run = await ok('GET', `/api/test-failovers/${String(r['id'])}`);
      expect(run['state']).toBe('failed');
      expect((run['error'] as { code: string }).code).toBe('LB_VAULT_JOB_INTERRUPTED');
    }
    const alerts = await ok('GET', `/api/alerts?kind=recovery-host-no-heartbeat&state=active`);
    expect((alerts['items'] as Body[]).map((x) => x['subjectId'])).toContain(rhId);
    // Reports on a job that was failed are refused: the host learns it ended.
    const refused = await t.call(
      'PUT',
      `/api/components/self/jobs/${String(two['jobId'])}`,
      { kind: 'test-failover', state: 'succeeded', steps: [] },
      rhToken,
    );
    expect(refused.body.code).toBe('LB_VAULT_INVALID_STATE');
  });

  it("puts each machine on its item's network mapping: the target network on failover, the test network (else isolated) in tests; an explicit network wins; a host without the network is a 400 naming the field", async () => {
    const mapping = async (name: string, testNetwork?: string) =>
      (await ok('POST', '/api/network-mappings', {
        name,
        sourceNetwork: 'lan',
        targetNetwork: 'dr-lan',
        ...(testNetwork !== undefined ? { testNetwork } : {}),
      })) as Body;
    const withTest = await mapping(`map-test-${dialect}`, 'dr-test');
    const targetOnly = await mapping(`map-target-${dialect}`);
    const a = await protectedItem();
    const b = await protectedItem();
    await ok('PATCH', `/api/protected-items/${a.itemId}`, { networkMappingId: withTest['id'] });
    await ok('PATCH', `/api/protected-items/${b.itemId}`, { networkMappingId: targetOnly['id'] });
    await ok('POST', '/api/components/self/heartbeat', { health: { instanceId: 'i2' } }, rhToken);

    // No recovery host has network dr-lan yet.
    const missing = await t.call('POST', '/api/failovers', { protectedItemId: a.itemId });
    expect(missing.status).toBe(400);
    expect(missing.body.code).toBe('LB_VAULT_NETWORK_UNAVAILABLE');
    expect(missing.body.details).toMatchObject({
      field: 'networkMapping.targetNetwork',
      networkMappingId: withTest['id'],
      network: 'dr-lan',
    });

    const net = await registerHost(`rh-net-${dialect}`);
    const beat = (testPresent: boolean) =>
      ok(
        'POST',
        '/api/components/self/heartbeat',
        {
          health: {
            instanceId: 'n1',
            networks: [
              { name: 'dr-lan', kind: 'bridge', bridge: 'br0', present: true },
              { name: 'dr-test', kind: 'bridge', bridge: 'br-test', present: testPresent },
            ],
          },
        },
        net.token,
      );
    await beat(false);
    const specOf = async (jobId: string, token = net.token) =>
      (await operations(token)).operations.find((o) => o.jobId === jobId)!.spec;

    // Test failover: a mapping without a test network stays isolated, on any host.
    const tb = await ok('POST', '/api/test-failovers', { protectedItemIds: [b.itemId] });
    expect((tb['machines'] as Body[])[0]!['network']).toBeNull();
    const tbSpec = await specOf(
      tb['jobId'] as string,
      tb['recoveryHostId'] === net.id ? net.token : rhToken,
    );
    expect((tbSpec['machines'] as Body[])[0]!['network']).toBeUndefined();
    expect(tbSpec['network']).toBe('isolated-user');

    // Its test network: declared, but the bridge is missing on the host.
    const noBridge = await t.call('POST', '/api/test-failovers', { protectedItemIds: [a.itemId] });
    expect(noBridge.status).toBe(400);
    expect(noBridge.body.details).toMatchObject({
      field: 'networkMapping.testNetwork',
      network: 'dr-test',
      recoveryHostId: net.id,
    });
    expect(noBridge.body.message).toMatch(/bridge does not exist/);
    await beat(true);
    const ta = await ok('POST', '/api/test-failovers', { protectedItemIds: [a.itemId] });
    expect(ta['recoveryHostId']).toBe(net.id);
    expect((ta['machines'] as Body[])[0]!['network']).toBe('dr-test');
    expect(((await specOf(ta['jobId'] as string))['machines'] as Body[])[0]).toMatchObject({
      network: 'dr-test',
    });
    // An explicit isolated network wins over the mapping.
    const explicit = await ok('POST', '/api/test-failovers', {
      protectedItemIds: [a.itemId],
      network: 'isolated-user',
    });
    expect((explicit['machines'] as Body[])[0]!['network']).toBeNull();

    // A named host without the network: refused, naming the mapping's field and the host.
    const wrongHost = await t.call('POST', '/api/failovers', {
      protectedItemId: b.itemId,
      recoveryHostId: rhId,
    });
    expect(wrongHost.status).toBe(400);
    expect(wrongHost.body.details).toMatchObject({
      field: 'networkMapping.targetNetwork',
      recoveryHostId: rhId,
    });
    expect(wrongHost.body.message).toMatch(/--network dr-lan=bridge:/);

    // Failover: the target network, on the host that has it.
    const fa = await ok('POST', '/api/failovers', { protectedItemId: a.itemId, planned: false });
    expect(fa['recoveryHostId']).toBe(net.id);
    expect((fa['machines'] as Body[])[0]!['network']).toBe('dr-lan');
    const faSpec = await specOf(fa['jobId'] as string);
    expect(faSpec['machine']).toMatchObject({ network: 'dr-lan', protectedItemId: a.itemId });
    // Explicitly isolated: no mapping applies.
    const fb = await ok('POST', '/api/failovers', {
      protectedItemId: b.itemId,
      network: 'isolated-user',
    });
    expect((fb['machines'] as Body[])[0]!['network']).toBeNull();
  });
});
