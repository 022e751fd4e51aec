import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DIALECTS,
  dialectFixture,
  startTestVault,
  type DialectFixture,
  type TestVault,
} from './test-harness.js';

// The lists of protected items and of recovery points are rendered as JSON by the database
// (list-page.ts, listPageJson); the single-item routes build it in JavaScript. Both must give
// the same objects, key order included, for awkward values too.
describe.each(DIALECTS)('lists rendered by the database on %s', (dialect) => {
  let fx: DialectFixture;
  let t: TestVault;
  const now = Date.now();
  const iso = (ms: number) => new Date(ms).toISOString();
  const itemIds = ['pi_a', 'pi_b', 'pi_c', 'pi_d', 'pi_e'];

  beforeAll(async () => {
    fx = await dialectFixture(dialect);
    t = await startTestVault(await fx.fresh());
    const db = t.vault.context.db;
    const at = iso(now);
    await db
      .insertInto('policies')
      .values({
        id: 'pol_x',
        name: 'x',
        rpoThresholdSeconds: 300,
        crashConsistentIntervalSeconds: 30,
        appConsistentIntervalSeconds: 3600,
        retention: '{"rules":[{"for":"1d"}]}',
        retentionIntervalSeconds: 86_400,
        createdAt: at,
        updatedAt: at,
      })
      .execute();
    await db
      .insertInto('components')
      .values({
        id: 'ps_x',
        kind: 'process-server',
        name: 'ps-x',
        siteId: null,
        address: null,
        version: null,
        certificateSerial: null,
        certificateExpiresAt: null,
        lastHeartbeatAt: at,
        health: '{}',
        createdAt: at,
        updatedAt: at,
      })
      .execute();
    // Last points: none yet, 1.5 s ago, in the future (RPO 0), odd milliseconds, an hour ago.
    const lastPoints = [null, now - 1500, now + 60_000, now - 12_345, now - 3_600_000];
    for (const [i, id] of itemIds.entries()) {
      await db
        .insertInto('protectedItems')
        .values({
          id,
          machineId: `vm_${i}`,
          policyId: 'pol_x',
          processServerId: 'ps_x',
          targetStoreId: 'ts_x',
          networkMappingId: i === 1 ? 'nm_x' : null,
          consistencyGroup: i === 2 ? 'grüppe "1"\n\t\\' : null,
          state: i % 2 === 0 ? 'protected' : 'resync-needed',
          stateReason: `reason ${i} \u0001 ✓`,
          stateChangedAt: iso(now - i * 1000),
          generation: i + 1,
          appliedGeneration: i,
          lastPointAt: lastPoints[i] === null ? null : iso(lastPoints[i] ?? 0),
          rpoSeconds: 17.25,
          backlogBytes: 2 ** 40 + i,
          throughputBps: i === 3 ? 0.1 + 0.2 : i * 1.5,
          activeKey: `vm_${i}`,
          createdAt: at,
          updatedAt: at,
        })
        .execute();
    }
    for (let p = 0; p < 4; p++) {
      await db
        .insertInto('recoveryPoints')
        .values({
          id: `pt-${p}`,
          targetStoreId: 'ts_x',
          protectedItemId: 'pi_b',
          machine: 'vm_1',
          disk: p % 2 === 0 ? 'vda' : 'vdb',
          time: iso(now - p * 30_000),
          committedAt: iso(now - p * 30_000 + 5),
          kind: p === 0 ? 'app' : 'crash',
          size: 2 ** 41 + p,
          cut: p === 1 ? null : `cut-${p}`,
          consistencyGroup: null,
          labels: p === 2 ? '{"b":1,"a":{"x":[1,2.5,null]},"é":"\\u0002"}' : '{}',
          parent: p === 0 ? null : `pt-${p - 1}`,
        })
        .execute();
    }
  });
  afterAll(async () => {
    await t?.close();
    await fx?.stop();
  });

  const withoutRpo = (o: Record<string, unknown>) => ({ ...o, rpoSeconds: 'checked apart' });

  it('lists protected items exactly as GET /api/protected-items/:id shows them', async () => {
    for (const query of ['', '?sort=lastPointAt', '?sort=lastPointAt&order=desc&state=protected']) {
      const list = await t.call('GET', `/api/protected-items${query}`);
      expect(list.status).toBe(200);
      const items = list.body['items'] as Array<Record<string, unknown>>;
      for (const item of items) {
        const one = await t.call('GET', `/api/protected-items/${String(item['id'])}`);
        const { disks: _d, ...single } = one.body;
        expect(Object.keys(item)).toEqual(Object.keys(single));
        expect(withoutRpo(item)).toEqual(withoutRpo(single));
        if (single['rpoSeconds'] === null) expect(item['rpoSeconds']).toBeNull();
        else
          expect(Math.abs(Number(item['rpoSeconds']) - Number(single['rpoSeconds']))).toBeLessThan(
            5,
          );
      }
    }
    const sorted = await t.call('GET', '/api/protected-items?sort=lastPointAt');
    const ids = (sorted.body['items'] as Array<{ id: string }>).map((i) => i.id);
    expect(ids).toEqual(['pi_a', 'pi_e', 'pi_d', 'pi_b', 'pi_c']); // no point first
    const rpo = Object.fromEntries(
      (sorted.body['items'] as Array<{ id: string; rpoSeconds: number | null }>).map((i) => [
        i.id,
        i.rpoSeconds,
      ]),
    );
    expect(rpo['pi_c']).toBe(0);
    expect(rpo['pi_e']).toBeGreaterThanOrEqual(3600);
    expect((rpo['pi_d'] ?? 0) * 1000 - 12_345).toBeGreaterThanOrEqual(0);
  });

  it('lists recovery points exactly as GET /api/recovery-points/:store/:id shows them', async () => {
    for (const url of ['/api/protected-items/pi_b/points', '/api/recovery-points?disk=vda']) {
      const list = await t.call('GET', url);
      expect(list.status).toBe(200);
      const items = list.body['items'] as Array<Record<string, unknown>>;
      expect(items.length).toBeGreaterThan(0);
      for (const p of items) {
        const one = await t.call('GET', `/api/recovery-points/ts_x/${String(p['id'])}`);
        expect(Object.keys(p)).toEqual(Object.keys(one.body));
        expect(p).toEqual(one.body);
      }
    }
  });

  it('pages with a cursor, counts over all pages and sees new rows at once', async () => {
    const seen: string[] = [];
    let cursor: string | null = null;
    do {
      const page: { body: Record<string, unknown> } = await t.call(
        'GET',
        `/api/protected-items?sort=lastPointAt&order=desc&limit=2${cursor === null ? '' : `&cursor=${cursor}`}`,
      );
      expect(page.body['total']).toBe(5);
      seen.push(...(page.body['items'] as Array<{ id: string }>).map((i) => i.id));
      cursor = page.body['nextCursor'] as string | null;
    } while (cursor !== null);
    expect(seen).toEqual(['pi_c', 'pi_b', 'pi_d', 'pi_e', 'pi_a']); // no point last
    const ascending: string[] = [];
    cursor = null;
    do {
      const page: { body: Record<string, unknown> } = await t.call(
        'GET',
        `/api/protected-items?sort=lastPointAt&limit=1${cursor === null ? '' : `&cursor=${cursor}`}`,
      );
      ascending.push(...(page.body['items'] as Array<{ id: string }>).map((i) => i.id));
      cursor = page.body['nextCursor'] as string | null;
    } while (cursor !== null);
    expect(ascending).toEqual(['pi_a', 'pi_e', 'pi_d', 'pi_b', 'pi_c']); // from a null cursor on
    const offset = await t.call('GET', '/api/protected-items?limit=2&offset=4');
    expect((offset.body['items'] as unknown[]).length).toBe(1);
    expect(offset.body['nextCursor']).toBeNull();
    const empty = await t.call('GET', '/api/protected-items?state=failed-over');
    expect(empty.body).toEqual({ items: [], nextCursor: null, total: 0 });

    // The total is cached, but a write through the vault's database handle invalidates it.
    await t.vault.context.db
      .updateTable('protectedItems')
      .set({ state: 'failed-over' })
      .where('id', '=', 'pi_e')
      .execute();
    const after = await t.call('GET', '/api/protected-items?state=failed-over');
    expect(after.body['total']).toBe(1);
    expect((await t.call('GET', '/api/protected-items/nope/points')).status).toBe(404);
  });

  // Pages are cached (listCacheMs) until a write through the vault touches a table they read.
  const reasonOf = async (url: string, id: string) => {
    const list = await t.call('GET', url);
    expect(list.status).toBe(200);
    const items = list.body['items'] as Array<Record<string, unknown>>;
    return items.find((i) => i['id'] === id)?.['stateReason'];
  };

  it('serves a list page from its cache only until a write changes what it shows', async () => {
    const db = t.vault.context.db;
    const url = '/api/protected-items?sort=lastPointAt';
    const before = await reasonOf(url, 'pi_a');
    expect(await reasonOf(url, 'pi_a')).toBe(before); // now from the cache
    await db
      .updateTable('protectedItems')
      .set({ stateReason: 'r1' })
      .where('id', '=', 'pi_a')
      .execute();
    expect(await reasonOf(url, 'pi_a')).toBe('r1');

    // In a transaction: on PostgreSQL a list read meanwhile sees the old row (and may keep
    // it); once committed, the list shows the change.
    await db.transaction().execute(async (tx) => {
      await tx
        .updateTable('protectedItems')
        .set({ stateReason: 'r2' })
        .where('id', '=', 'pi_a')
        .execute();
      if (dialect === 'postgres') expect(await reasonOf(url, 'pi_a')).toBe('r1');
    });
    expect(await reasonOf(url, 'pi_a')).toBe('r2');

    // A filter over other tables (the machine's host's site): writes to those clear it too.
    const atSite = async () => (await t.call('GET', '/api/protected-items?siteId=site_x')).body;
    expect((await atSite())['total']).toBe(0);
    expect((await atSite())['total']).toBe(0);
    const at = new Date(now).toISOString();
    await db
      .insertInto('sourceHosts')
      .values({
        id: 'sh_x',
        kind: 'kvm',
        name: 'h',
        siteId: 'site_x',
        processServerId: null,
        agentId: null,
        credentialId: null,
        endpoints: '[]',
        discoveryRequestedAt: null,
        discoveredAt: null,
        createdAt: at,
        updatedAt: at,
      })
      .execute();
    expect((await atSite())['total']).toBe(0);
    await db
      .insertInto('machines')
      .values({
        id: 'vm_0',
        sourceHostId: 'sh_x',
        name: 'vm-0',
        externalId: 'vm-0',
        endpoint: null,
        cpus: null,
        memoryBytes: null,
        os: null,
        present: 1,
        discoveredAt: at,
        createdAt: at,
        updatedAt: at,
      })
      .execute();
    expect((await atSite())['total']).toBe(1);
    expect(((await atSite())['items'] as Array<{ id: string }>)[0]?.id).toBe('pi_a');

    // Points of one item: a new point and the parent's deletion show at once.
    const points = '/api/protected-items/pi_b/points';
    const count = async () => (await t.call('GET', points)).body['total'];
    expect(await count()).toBe(4);
    await db
      .insertInto('recoveryPoints')
      .values({
        id: 'pt-new',
        targetStoreId: 'ts_x',
        protectedItemId: 'pi_b',
        machine: 'vm_1',
        disk: 'vda',
        time: new Date(now + 1000).toISOString(),
        committedAt: new Date(now + 1000).toISOString(),
        kind: 'crash',
        size: 1,
        cut: null,
        consistencyGroup: null,
        labels: '{}',
        parent: null,
      })
      .execute();
    const page = await t.call('GET', points);
    expect(page.body['total']).toBe(5);
    expect((page.body['items'] as Array<{ id: string }>)[0]?.id).toBe('pt-new');
    await db.deleteFrom('protectedItems').where('id', '=', 'pi_b').execute();
    expect((await t.call('GET', points)).status).toBe(404);
  });

  it.runIf(dialect === 'postgres')(
    'does not keep a page read while a write was under way, and sees other writers within listCacheMs',
    async () => {
      const db = t.vault.context.db;
      const url = '/api/protected-items?state=protected';
      const other = new pg.Client({ connectionString: t.databaseUrl });
      await other.connect();
      try {
        // Another connection holds pi_c's row: the vault's update of it waits (already built,
        // not yet done) while a list reads the old row.
        await other.query('begin');
        await other.query(`select 1 from "protectedItems" where id = 'pi_c' for update`);
        const update = db
          .updateTable('protectedItems')
          .set({ stateReason: 'after the lock' })
          .where('id', '=', 'pi_c')
          .execute();
        await new Promise((r) => setTimeout(r, 200));
        expect(await reasonOf(url, 'pi_c')).not.toBe('after the lock');
        await other.query('rollback');
        await update;
        expect(await reasonOf(url, 'pi_c')).toBe('after the lock');

        // A write the vault does not see (another instance's): shown after listCacheMs (1 s).
        await other.query(
          `update "protectedItems" set "stateReason" = 'elsewhere' where id = 'pi_c'`,
        );
        const deadline = Date.now() + 1500;
        let seen: unknown;
        while (Date.now() < deadline && seen !== 'elsewhere') {
          seen = await reasonOf(url, 'pi_c');
          await new Promise((r) => setTimeout(r, 50));
        }
        expect(seen).toBe('elsewhere');
      } finally {
        await other.end();
      }
    },
  );
});
