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
});
