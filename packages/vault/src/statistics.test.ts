import { randomBytes } from 'node:crypto';
import { mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DirectoryBackend, Store } from '@lifeboat/store';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ItemHistory } from './services/item-history.js';
import {
  DIALECTS,
  dialectFixture,
  startTestVault,
  type DialectFixture,
  type TestVault,
} from './test-harness.js';

/** Bytes of every file under `dir`. */
async function dirSize(dir: string): Promise<number> {
  let total = 0;
  for (const e of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile()) total += (await stat(join(e.parentPath, e.name))).size;
  }
  return total;
}

async function waitFor(check: () => Promise<boolean>, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error('condition not reached in time');
    await new Promise((r) => setTimeout(r, 50));
  }
}

interface Bucket {
  time: string;
  rpoSeconds: number | null;
  throughputBps: number | null;
  throughputMaxBps: number | null;
  backlogBytes: number | null;
}

// The figures the portal charts and the dashboard shows that the vault derives itself: store
// size and deduplication (a store-stats job over a real directory store), per-item throughput
// history from heartbeats (bounded by a retention), the RPO history from the catalogue, and
// the site filter of the machine and item lists.
describe.each(DIALECTS)('store stats, replication history and site filter on %s', (dialect) => {
  let fx: DialectFixture;
  let t: TestVault;
  const dirs: string[] = [];
  let n = 0;
  beforeAll(async () => {
    fx = await dialectFixture(dialect);
    t = await startTestVault(await fx.fresh(), { historyBucketSeconds: 1 });
  });
  afterAll(async () => {
    await t?.close();
    for (const d of dirs) await rm(d, { recursive: true, force: true });
    await fx?.stop();
  });

  /** A new store in `dir`, under the passphrase `setup` registers it with. */
  const initStore = (dir: string): Promise<Store> =>
    Store.init({
      backend: new DirectoryBackend({ path: dir }),
      passphrase: 'store-passphrase',
      kdfCost: 1024,
    });

  /** One point of a 1 MiB disk `vda` of `machine` per buffer, written at offset 0; their ids. */
  const writePoints = async (store: Store, machine: string, datas: Buffer[]): Promise<string[]> => {
    const ids: string[] = [];
    for (const data of datas) {
      const w = await store.beginWrite({ machine, disk: 'vda', size: 1 << 20 });
      await w.write(0, data);
      ids.push((await w.commit()).id);
    }
    return ids;
  };

  /** A process server, a site with a KVM host and machines, a policy, a store, and protection. */
  const setup = async (machines: string[], storePath = '/nonexistent/store') => {
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
    const site = await t.call('POST', '/api/sites', { name: `site-${n}`, kind: 'source' });
    expect(site.status).toBe(201);
    const siteId = site.body['id'] as string;
    const host = await t.call('POST', '/api/source-hosts', {
      name: `kvm-${n}`,
      kind: 'kvm',
      siteId,
      processServerId: psId,
      endpoints: [],
    });
    const hostId = host.body['id'] as string;
    await t.call(
      'PUT',
      `/api/source-hosts/${hostId}/inventory`,
      {
        machines: machines.map((name) => ({
          externalId: name,
          name,
          disks: [
            { name: 'vda', sizeBytes: 1 << 20 },
            { name: 'vdb', sizeBytes: 1 << 20 },
          ],
        })),
      },
      psToken,
    );
    const listed = await t.call('GET', `/api/machines?sourceHostId=${hostId}`);
    const machineIds = (listed.body['items'] as Array<{ id: string }>).map((m) => m.id);
    const policy = await t.call('POST', '/api/policies', {
      name: `pol-${n}`,
      rpoThresholdSeconds: 600,
      retention: { rules: [{ for: '1d' }] },
    });
    const store = await t.call('POST', '/api/target-stores', {
      name: `store-${n}`,
      kind: 'directory',
      path: storePath,
      passphrase: 'store-passphrase',
    });
    const storeId = store.body['id'] as string;
    const itemIds: string[] = [];
    for (const machineId of machineIds) {
      const item = await t.call('POST', '/api/protected-items', {
        machineId,
        policyId: policy.body['id'],
        processServerId: psId,
        targetStoreId: storeId,
      });
      expect(item.status).toBe(201);
      itemIds.push(item.body['id'] as string);
    }
    return { psToken, psId, siteId, hostId, machineIds, storeId, itemIds };
  };

  it('measures a target store in a store-stats job and shows it on the dashboard', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'lifeboat-stats-store-'));
    dirs.push(dir);
    const s = await setup(['stats-vm'], dir);
    const store = await initStore(dir);
    const data = Buffer.alloc(4 * 65_536);
    for (let i = 0; i < data.length; i += 4096) data[i] = (i / 4096) % 251;
    try {
      // Three points of one 1 MiB disk with the same data: 3 MiB logical over one copy.
      await writePoints(store, s.machineIds[0] ?? '', [data, data, data]);
    } finally {
      await store.close();
    }
    const before = await t.call('GET', `/api/target-stores/${s.storeId}/stats`);
    expect(before.status).toBe(200);
    expect(before.body['stats']).toBeNull();

    const viewer = await t.userToken('viewer');
    expect(
      (await t.call('POST', `/api/target-stores/${s.storeId}/stats`, undefined, viewer)).status,
    ).toBe(403);
    const started = await t.call('POST', `/api/target-stores/${s.storeId}/stats`);
    expect(started.status).toBe(202);
    const jobId = started.body['jobId'] as string;
    await waitFor(async () =>
      ['succeeded', 'failed'].includes(
        (await t.call('GET', `/api/jobs/${jobId}`)).body['state'] as string,
      ),
    );
    expect((await t.call('GET', `/api/jobs/${jobId}`)).body['error']).toBeNull();
    const after = await t.call('GET', `/api/target-stores/${s.storeId}/stats`, undefined, viewer);
    const stats = after.body['stats'] as Record<string, number | string>;
    expect(stats['points']).toBe(3);
    expect(stats['machines']).toBe(1);
    expect(stats['logicalBytes']).toBe(3 << 20);
    // Stored bytes are the directory's objects: one copy of 4 chunks, compressed, plus
    // trees, indexes, points and the config; less than one logical copy.
    expect(stats['storedBytes']).toBeGreaterThan(0);
    expect(stats['storedBytes']).toBeLessThan(1 << 20);
    expect(stats['dedupRatio']).toBeCloseTo((3 << 20) / (stats['storedBytes'] as number), 6);
    expect(stats['dedupRatio']).toBeGreaterThan(3);
    expect(stats['jobId']).toBe(jobId);
    expect(after.body['job']).toEqual({ id: jobId, state: 'succeeded' });

    const summary = await t.call('GET', '/api/summary', undefined, viewer);
    const stores = summary.body['stores'] as {
      logicalBytes: number;
      storedBytes: number;
      items: Array<{ id: string; points: number | null; dedupRatio: number | null }>;
    };
    const mine = stores.items.find((x) => x.id === s.storeId);
    expect(mine?.points).toBe(3);
    expect(mine?.dedupRatio).toBeCloseTo(stats['dedupRatio'] as number, 6);
    expect(stores.logicalBytes).toBeGreaterThanOrEqual(3 << 20);

    // The scheduler measures every store once per interval: one job per store and slot.
    await t.vault.scheduler.tick();
    await t.vault.scheduler.tick();
    const scheduled = await t.call('GET', `/api/jobs?kind=store-stats&targetId=${s.storeId}`);
    expect(scheduled.body['total']).toBe(2);
  });

  it('garbage-collects a target store in a store-gc job: the data of deleted points is freed, the rest reads back', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'lifeboat-gc-store-'));
    dirs.push(dir);
    const s = await setup(['gc-vm'], dir);
    const store = await initStore(dir);
    // Incompressible: what gc frees is about what the deleted points wrote.
    const datas = [0, 1, 2].map(() => randomBytes(8 * 65_536));
    const disk = (k: number): Buffer => datas[k] as Buffer;
    let ids: string[];
    try {
      // Three points of wholly different data; the first two go (as retention would do).
      ids = await writePoints(store, s.machineIds[0] ?? '', datas);
      await store.deletePoints(ids.slice(0, 2));
    } finally {
      await store.close();
    }
    const sizeBefore = await dirSize(dir);
    const viewer = await t.userToken('viewer');
    expect(
      (await t.call('POST', `/api/target-stores/${s.storeId}/gc`, undefined, viewer)).status,
    ).toBe(403);
    expect((await t.call('POST', '/api/target-stores/nope/gc')).status).toBe(404);
    const started = await t.call('POST', `/api/target-stores/${s.storeId}/gc`);
    expect(started.status).toBe(202);
    const jobId = started.body['jobId'] as string;
    await waitFor(async () =>
      ['succeeded', 'failed'].includes(
        (await t.call('GET', `/api/jobs/${jobId}`)).body['state'] as string,
      ),
    );
    const job = (await t.call('GET', `/api/jobs/${jobId}`)).body;
    expect(job['error']).toBeNull();
    const result = job['result'] as Record<string, number>;
    expect(result['bytesFreed']).toBeGreaterThan(2 * 8 * 65_536 * 0.5);
    expect(await dirSize(dir)).toBeLessThan(sizeBefore - (result['bytesFreed'] ?? 0) + 4096);
    // The point that is left reads back byte-exact.
    const again = await Store.open({
      backend: new DirectoryBackend({ path: dir }),
      passphrase: 'store-passphrase',
    });
    try {
      expect((await again.listPoints()).map((p) => p.id)).toEqual([ids[2]]);
      const reader = await again.openPoint(ids[2] ?? '');
      expect(Buffer.from(await reader.readAt(0, 8 * 65_536)).equals(disk(2))).toBe(true);
    } finally {
      await again.close();
    }
    // The scheduler collects every store once per interval: one job per store and slot.
    await t.vault.scheduler.tick();
    await t.vault.scheduler.tick();
    const scheduled = await t.call('GET', `/api/jobs?kind=store-gc&targetId=${s.storeId}`);
    expect(scheduled.body['total']).toBe(2);
  });

  it('keeps per-item throughput and backlog from heartbeats in buckets, and charts the RPO from the points', async () => {
    const s = await setup(['hist-vm']);
    const itemId = s.itemIds[0] ?? '';
    const machineId = s.machineIds[0] ?? '';
    const beat = (throughputBps: number, backlogBytes: number) =>
      t.call(
        'POST',
        '/api/components/self/heartbeat',
        { items: [{ id: itemId, throughputBps, backlogBytes }] },
        s.psToken,
      );
    // Two reports in one 1-second bucket (as close together as heartbeats are), then the
    // bucket ends and is written.
    const aligned = Math.ceil(Date.now() / 1000) * 1000 + 50;
    await new Promise((r) => setTimeout(r, aligned - Date.now()));
    await beat(1000, 10);
    await beat(3000, 30);
    await new Promise((r) => setTimeout(r, 1100));
    await t.vault.context.history.flushEnded();
    const rows = await t.vault.context.db
      .selectFrom('itemSamples')
      .selectAll()
      .where('protectedItemId', '=', itemId)
      .execute();
    expect(rows).toEqual([
      {
        protectedItemId: itemId,
        bucket: new Date(aligned - 50).toISOString(),
        reports: 2,
        throughputSumBps: 4000,
        throughputMaxBps: 3000,
        backlogMaxBytes: 30,
      },
    ]);
    // A second vault instance's share of the same bucket adds up (several vaults on one DB).
    const other = new ItemHistory(t.vault.context.db, 1, t.vault.context.log);
    try {
      other.record(itemId, 5000, 5, aligned);
      await other.flushEnded();
    } finally {
      await other.close();
    }
    const merged = await t.vault.context.db
      .selectFrom('itemSamples')
      .selectAll()
      .where('protectedItemId', '=', itemId)
      .executeTakeFirst();
    expect(merged).toMatchObject({ reports: 3, throughputSumBps: 9000, throughputMaxBps: 5000 });
    expect(merged?.backlogMaxBytes).toBe(30);
    // An idle report (nothing moved) writes no row.
    await beat(0, 0);
    await new Promise((r) => setTimeout(r, 1100));
    await t.vault.context.history.flushEnded();
    expect(
      (
        await t.vault.context.db
          .selectFrom('itemSamples')
          .select('bucket')
          .where('protectedItemId', '=', itemId)
          .execute()
      ).length,
    ).toBe(1);

    const h = await t.call(
      'GET',
      `/api/protected-items/${itemId}/history?hours=0.1&bucketSeconds=1`,
    );
    expect(h.status).toBe(200);
    const buckets = h.body['buckets'] as Bucket[];
    expect(buckets.length).toBeGreaterThanOrEqual(360);
    const filled = buckets.filter((b) => b.throughputBps !== null);
    expect(filled).toHaveLength(1);
    expect(filled[0]).toMatchObject({
      time: new Date(aligned - 50).toISOString(),
      throughputBps: 3000,
      throughputMaxBps: 5000,
      backlogBytes: 30,
    });
    // No point yet: no RPO.
    expect(buckets.every((b) => b.rpoSeconds === null)).toBe(true);

    // Points: both disks at T0 (committed 2 s later), then only vda at T1, then vdb at T2.
    // The item's RPO follows its stalest disk, counted from each point's commit.
    const now = Date.now();
    const T0 = now - 300_000;
    const T1 = now - 200_000;
    const T2 = now - 100_000;
    const pt = (disk: string, time: number, commit: number, k: number) => ({
      id: `hist-${k}-${disk}`,
      machine: machineId,
      disk,
      time: new Date(time).toISOString(),
      committedAt: new Date(commit).toISOString(),
      kind: 'crash',
      size: 1 << 20,
    });
    const up = await t.call(
      'PUT',
      '/api/recovery-points',
      {
        targetStoreId: s.storeId,
        points: [
          pt('vda', T0, T0 + 2000, 0),
          pt('vdb', T0, T0 + 2000, 0),
          pt('vda', T1, T1 + 2000, 1),
          pt('vdb', T2, T2 + 5000, 2),
        ],
      },
      s.psToken,
    );
    expect(up.body['matched']).toBe(4);
    const r = await t.call(
      'GET',
      `/api/protected-items/${itemId}/history?hours=0.1&bucketSeconds=10`,
    );
    const rb = r.body['buckets'] as Bucket[];
    expect(r.body['bucketSeconds']).toBe(10);
    const at = (ms: number) =>
      rb.find((b) => Date.parse(b.time) <= ms && ms < Date.parse(b.time) + 10_000);
    // Before the first commit there is no RPO.
    expect(at(T0 - 10_000)?.rpoSeconds ?? null).toBeNull();
    // vda's newer point does not help while vdb is still at T0: the peak just before vdb's
    // commit at T2 + 5 s is T2 + 5 s - T0 = 205 s.
    expect(at(T2 + 5000)?.rpoSeconds).toBeCloseTo(205, 0);
    // Just after T1's commit, vdb still holds the item at T0.
    expect(at(T1 + 12_000)?.rpoSeconds).toBeGreaterThan(110);
    // At the end, the stalest disk's point is vda's T1 (vdb is at T2 now): RPO = now - T1.
    const last = rb[rb.length - 1];
    expect(last?.rpoSeconds).toBeGreaterThanOrEqual(199);
    expect(last?.rpoSeconds).toBeLessThan(215);

    // Retention: samples older than historyRetentionHours go on the scheduler's round.
    await t.vault.context.db
      .insertInto('itemSamples')
      .values({
        protectedItemId: itemId,
        bucket: new Date(now - 25 * 3_600_000).toISOString(),
        reports: 1,
        throughputSumBps: 1,
        throughputMaxBps: 1,
        backlogMaxBytes: 0,
      })
      .execute();
    await t.vault.scheduler.tick(new Date(now + 120_000));
    const kept = await t.vault.context.db
      .selectFrom('itemSamples')
      .select('bucket')
      .where('protectedItemId', '=', itemId)
      .execute();
    expect(kept.map((k) => k.bucket)).toEqual([new Date(aligned - 50).toISOString()]);

    // Bad input names its field.
    const bad = await t.call(
      'GET',
      `/api/protected-items/${itemId}/history?hours=48&bucketSeconds=1`,
    );
    expect(bad.status).toBe(400);
    expect(bad.body.details?.['field']).toBe('query.bucketSeconds');
    expect((await t.call('GET', '/api/protected-items/nope/history')).status).toBe(404);
  });

  it('filters machines and protected items by site and consistency group', async () => {
    const a = await setup(['east-1', 'east-2']);
    const b = await setup(['west-1']);
    const items = async (siteId: string) =>
      (
        (await t.call('GET', `/api/protected-items?siteId=${siteId}`)).body['items'] as Array<{
          id: string;
        }>
      )
        .map((i) => i.id)
        .sort();
    expect(await items(a.siteId)).toEqual([...a.itemIds].sort());
    expect(await items(b.siteId)).toEqual(b.itemIds);
    const combined = await t.call(
      'GET',
      `/api/protected-items?siteId=${a.siteId}&q=east-2&state=enabling`,
    );
    expect(combined.body['total']).toBe(1);
    const machines = await t.call('GET', `/api/machines?siteId=${b.siteId}`);
    expect((machines.body['items'] as Array<{ name: string }>).map((m) => m.name)).toEqual([
      'west-1',
    ]);
    expect(machines.body['total']).toBe(1);
    // By ids, as the portal names a page of rows in one request; unknown ids are left out.
    const byIds = await t.call(
      'GET',
      `/api/machines?ids=${[b.machineIds[0], 'no-such-machine', a.machineIds[1]].join(',')}`,
    );
    expect((byIds.body['items'] as Array<{ name: string }>).map((m) => m.name).sort()).toEqual([
      'east-2',
      'west-1',
    ]);
    const tooMany = Array.from({ length: 101 }, (_, i) => `m${i}`).join(',');
    const refused = await t.call('GET', `/api/machines?ids=${tooMany}`);
    expect(refused.status).toBe(400);
    expect(refused.body.details?.['field']).toBe('query.ids');
    expect((await t.call('GET', '/api/machines?ids=a,,b')).status).toBe(400);
    expect((await t.call('GET', '/api/protected-items?siteId=no-such-site')).body['total']).toBe(0);
    // And by consistency group (the test-failover wizard lists a group's members).
    await t.call('PATCH', `/api/protected-items/${a.itemIds[0] ?? ''}`, {
      consistencyGroup: 'billing',
    });
    const group = await t.call('GET', '/api/protected-items?consistencyGroup=billing');
    expect((group.body['items'] as Array<{ id: string }>).map((i) => i.id)).toEqual([a.itemIds[0]]);
  });
});
