// Seeds a vault's database directly (through its Kysely handle) with one policy, target store,
// process server and KVM host, then protected machines and, optionally, their recovery points.
// Seeding 10,000 machines through the API would take minutes; the benchmarks measure reads.
import { randomBytes } from 'node:crypto';
import type { Insertable } from 'kysely';
import type { Vault, VaultDatabase } from '@lifeboat/vault';

/** What {@link seedVault} inserts. */
export interface SeedOptions {
  /** Protected machines to insert. */
  items: number;
  /** Recovery points per machine, one every 30 s back from its last point. @default 0 */
  pointsPerItem?: number;
  /** States cycled over the items. @default mostly protected, some initial replication and resync */
  states?: string[];
  /** Called after each batch with the number of items seeded so far. */
  onProgress?: (seeded: number) => void;
}

const BATCH = 500;

/** Inserts the seed and returns the protected items' ids in order. */
export async function seedVault(vault: Vault, options: SeedOptions): Promise<string[]> {
  const { items: count, pointsPerItem = 0, onProgress } = options;
  const states = options.states ?? [
    'protected',
    'protected',
    'protected',
    'initial-replication',
    'resync-needed',
  ];
  const db = vault.context.db;
  const now = Date.now();
  const iso = (ms: number) => new Date(ms).toISOString();
  const id = (prefix: string, i: number) =>
    `${prefix}_${String(i).padStart(8, '0')}${randomBytes(3).toString('hex')}`;
  const t = iso(now);
  await db
    .insertInto('policies')
    .values({
      id: 'pol_bench',
      name: 'bench',
      rpoThresholdSeconds: 300,
      crashConsistentIntervalSeconds: 30,
      appConsistentIntervalSeconds: 3600,
      retention: '{"rules":[{"for":"1d"}]}',
      retentionIntervalSeconds: 86_400,
      createdAt: t,
      updatedAt: t,
    })
    .execute();
  await db
    .insertInto('targetStores')
    .values({
      id: 'ts_bench',
      kind: 'directory',
      name: 'bench',
      siteId: null,
      path: '/nonexistent',
      container: null,
      connectionSealed: null,
      passphraseSealed: vault.context.secrets.seal('x'),
      createdAt: t,
      updatedAt: t,
    })
    .execute();
  await db
    .insertInto('components')
    .values({
      id: 'ps_bench',
      kind: 'process-server',
      name: 'ps-bench',
      siteId: null,
      address: null,
      version: null,
      certificateSerial: null,
      certificateExpiresAt: null,
      lastHeartbeatAt: t,
      health: '{}',
      createdAt: t,
      updatedAt: t,
    })
    .execute();
  await db
    .insertInto('sourceHosts')
    .values({
      id: 'sh_bench',
      kind: 'kvm',
      name: 'kvm-bench',
      siteId: null,
      processServerId: 'ps_bench',
      credentialId: null,
      endpoints: '[]',
      discoveryRequestedAt: null,
      discoveredAt: t,
      createdAt: t,
      updatedAt: t,
    })
    .execute();
  const itemIds: string[] = [];
  for (let start = 0; start < count; start += BATCH) {
    const machines: Insertable<VaultDatabase['machines']>[] = [];
    const items: Insertable<VaultDatabase['protectedItems']>[] = [];
    const points: Insertable<VaultDatabase['recoveryPoints']>[] = [];
    for (let i = start; i < Math.min(count, start + BATCH); i++) {
      const machineId = id('vm', i);
      const itemId = id('pi', i);
      itemIds.push(itemId);
      const last = now - (i % 600) * 1000;
      machines.push({
        id: machineId,
        sourceHostId: 'sh_bench',
        name: `vm-${String(i).padStart(5, '0')}`,
        externalId: `vm-${i}`,
        endpoint: null,
        cpus: 2,
        memoryBytes: 2 ** 31,
        os: 'linux',
        present: 1,
        discoveredAt: t,
        createdAt: t,
        updatedAt: t,
      });
      items.push({
        id: itemId,
        machineId,
        policyId: 'pol_bench',
        processServerId: 'ps_bench',
        targetStoreId: 'ts_bench',
        networkMappingId: null,
        consistencyGroup: null,
        state: states[i % states.length] ?? 'protected',
        stateReason: 'seeded',
        stateChangedAt: t,
        generation: 1,
        appliedGeneration: 1,
        lastPointAt: iso(last),
        rpoSeconds: null,
        backlogBytes: 0,
        throughputBps: 0,
        activeKey: machineId,
        createdAt: t,
        updatedAt: t,
      });
      for (let p = 0; p < pointsPerItem; p++) {
        points.push({
          id: `${itemId}-${p}`,
          targetStoreId: 'ts_bench',
          protectedItemId: itemId,
          machine: machineId,
          disk: 'vda',
          time: iso(last - p * 30_000),
          committedAt: iso(last - p * 30_000 + 500),
          kind: p % 20 === 0 ? 'app' : 'crash',
          size: 2 ** 34,
          cut: null,
          consistencyGroup: null,
          labels: '{}',
          parent: null,
        });
      }
    }
    await db.transaction().execute(async (tx) => {
      await tx.insertInto('machines').values(machines).execute();
      await tx.insertInto('protectedItems').values(items).execute();
      for (let p = 0; p < points.length; p += 1000)
        await tx
          .insertInto('recoveryPoints')
          .values(points.slice(p, p + 1000))
          .execute();
    });
    onProgress?.(Math.min(count, start + BATCH));
  }
  return itemIds;
}
