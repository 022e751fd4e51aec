import { LifeboatError } from '@lifeboat/protocol';
import type { ProtectedItemRow } from '../db/schema.js';
import { nowIso } from '../ids.js';
import type { VaultContext } from '../vault-context.js';
import { audit } from './audit.js';
import type { Principal } from './principal.js';

/** States of a protected item (see docs/architecture.md for the diagram). */
export type ItemState =
  'enabling' | 'initial-replication' | 'protected' | 'resync-needed' | 'failed-over' | 'disabled';

/** Every allowed transition; anything else is LB_VAULT_INVALID_STATE (409). */
export const ITEM_TRANSITIONS: Record<ItemState, readonly ItemState[]> = {
  enabling: ['initial-replication', 'disabled'],
  'initial-replication': ['protected', 'resync-needed', 'disabled'],
  protected: ['resync-needed', 'failed-over', 'disabled'],
  'resync-needed': ['protected', 'failed-over', 'disabled'],
  'failed-over': ['enabling', 'disabled'],
  disabled: [],
};

/** Moves an item to `to` if allowed (conditional on its current state, so racing writers are safe). */
export async function transition(
  vault: VaultContext,
  item: ProtectedItemRow,
  to: ItemState,
  reason: string,
  actor: Principal,
  extra: Partial<ProtectedItemRow> = {},
): Promise<ProtectedItemRow> {
  const from = item.state as ItemState;
  if (from === to) return item;
  if (!ITEM_TRANSITIONS[from].includes(to)) {
    throw new LifeboatError(
      'LB_VAULT_INVALID_STATE',
      `Protected item ${item.id} is ${from}; it cannot become ${to}. Allowed from ${from}: ${ITEM_TRANSITIONS[from].join(', ') || 'none'}.`,
      { details: { id: item.id, state: from, wanted: to } },
    );
  }
  const now = nowIso();
  const changes: Partial<ProtectedItemRow> = {
    state: to,
    stateReason: reason,
    stateChangedAt: now,
    updatedAt: now,
    ...extra,
  };
  const r = await vault.db
    .updateTable('protectedItems')
    .set(changes)
    .where('id', '=', item.id)
    .where('state', '=', from)
    .executeTakeFirst();
  if (Number(r.numUpdatedRows) !== 1) {
    throw new LifeboatError(
      'LB_VAULT_INVALID_STATE',
      `Protected item ${item.id} changed state meanwhile; reload it and retry.`,
      { details: { id: item.id } },
    );
  }
  await audit(
    vault.db,
    actor,
    'protected-item.state',
    { type: 'protected-item', id: item.id },
    {
      before: { state: from },
      after: { state: to, reason },
    },
  );
  return { ...item, ...changes };
}

/** What a process server reports per item in its heartbeat. */
export interface ItemReport {
  id: string;
  state?: 'initial-replication' | 'protected' | 'resync-needed';
  reason?: string;
  appliedGeneration?: number;
  backlogBytes?: number;
  throughputBps?: number;
  disks?: Array<{
    name: string;
    backlogBytes?: number;
    throughputBps?: number;
    initialDoneBytes?: number;
  }>;
}

/**
 * Applies a process server's per-item reports: figures, the generation it has applied, and
 * the state changes only it can see. Returns the ids it may not report on (not its items, or
 * a transition the state machine refuses), so the process server can log them.
 */
export async function applyItemReports(
  vault: VaultContext,
  ps: Principal,
  reports: ItemReport[],
): Promise<Array<{ id: string; code: string; message: string }>> {
  const rejected: Array<{ id: string; code: string; message: string }> = [];
  for (const report of reports) {
    const item = await vault.db
      .selectFrom('protectedItems')
      .selectAll()
      .where('id', '=', report.id)
      .executeTakeFirst();
    if (item === undefined || item.processServerId !== ps.id) {
      rejected.push({
        id: report.id,
        code: 'LB_VAULT_NOT_FOUND',
        message: 'Not an item of this process server.',
      });
      continue;
    }
    const figures: Partial<ProtectedItemRow> = {
      ...(report.appliedGeneration !== undefined
        ? { appliedGeneration: report.appliedGeneration }
        : {}),
      ...(report.backlogBytes !== undefined ? { backlogBytes: report.backlogBytes } : {}),
      ...(report.throughputBps !== undefined ? { throughputBps: report.throughputBps } : {}),
    };
    if (Object.keys(figures).length > 0) {
      await vault.db.updateTable('protectedItems').set(figures).where('id', '=', item.id).execute();
    }
    vault.history.record(item.id, report.throughputBps, report.backlogBytes);
    for (const disk of report.disks ?? []) {
      const { name, ...diskFigures } = disk;
      if (Object.keys(diskFigures).length === 0) continue;
      await vault.db
        .updateTable('protectedDisks')
        .set(diskFigures)
        .where('protectedItemId', '=', item.id)
        .where('name', '=', name)
        .execute();
    }
    if (report.state !== undefined && report.state !== item.state) {
      // Reaching `protected` needs a committed point of every disk: the catalogue decides that.
      const to = report.state === 'protected' ? undefined : report.state;
      if (to === undefined) continue;
      try {
        await transition(
          vault,
          item,
          to,
          report.reason ?? `reported by process server ${ps.name}`,
          ps,
        );
      } catch (err) {
        const e = err as LifeboatError;
        rejected.push({ id: report.id, code: e.code, message: e.message });
      }
    }
  }
  return rejected;
}

/** A process server's desired state. */
export async function assignmentsFor(
  vault: VaultContext,
  processServerId: string,
): Promise<unknown> {
  const items = await vault.db
    .selectFrom('protectedItems')
    .innerJoin('machines', 'machines.id', 'protectedItems.machineId')
    .innerJoin('policies', 'policies.id', 'protectedItems.policyId')
    .leftJoin('sourceHosts', 'sourceHosts.id', 'machines.sourceHostId')
    .select([
      'protectedItems.id as id',
      'protectedItems.state as state',
      'protectedItems.generation as generation',
      'protectedItems.appliedGeneration as appliedGeneration',
      'protectedItems.consistencyGroup as consistencyGroup',
      'protectedItems.targetStoreId as targetStoreId',
      'machines.id as machineId',
      'machines.name as machineName',
      'machines.externalId as externalId',
      'machines.endpoint as endpoint',
      'machines.sourceHostId as sourceHostId',
      'sourceHosts.agentId as agentId',
      'policies.id as policyId',
      'policies.crashConsistentIntervalSeconds as crashConsistentIntervalSeconds',
      'policies.appConsistentIntervalSeconds as appConsistentIntervalSeconds',
      'policies.rpoThresholdSeconds as rpoThresholdSeconds',
    ])
    .where('protectedItems.processServerId', '=', processServerId)
    .where((eb) =>
      eb.or([
        eb('protectedItems.state', '!=', 'disabled'),
        eb('protectedItems.appliedGeneration', '<', eb.ref('protectedItems.generation')),
      ]),
    )
    .orderBy('protectedItems.id')
    .execute();
  const storeIds = [...new Set(items.map((i) => i.targetStoreId))];
  const stores =
    storeIds.length === 0
      ? []
      : await vault.db.selectFrom('targetStores').selectAll().where('id', 'in', storeIds).execute();
  const itemIds = items.map((i) => i.id);
  const disks =
    itemIds.length === 0
      ? []
      : await vault.db
          .selectFrom('protectedDisks')
          .selectAll()
          .where('protectedItemId', 'in', itemIds)
          .execute();
  const hosts = await vault.db
    .selectFrom('sourceHosts')
    .select(['id', 'name', 'kind', 'agentId', 'endpoints', 'discoveryRequestedAt', 'discoveredAt'])
    .where('processServerId', '=', processServerId)
    .execute();
  return {
    items: items.map((i) => ({
      id: i.id,
      state: i.state,
      // What the process server must do: replicate (and tell the agent), or stop and forget.
      desired: i.state === 'disabled' || i.state === 'failed-over' ? 'stop' : 'replicate',
      generation: i.generation,
      appliedGeneration: i.appliedGeneration,
      // The store's `machine` field for this item's points is the vault's machine id.
      storeMachine: i.machineId,
      machine: {
        id: i.machineId,
        name: i.machineName,
        externalId: i.externalId,
        endpoint: i.endpoint,
        sourceHostId: i.sourceHostId,
        // The agent on the machine's KVM host that replicates it (null: the process server's own).
        agentId: i.agentId ?? null,
      },
      consistencyGroup: i.consistencyGroup,
      disks: disks
        .filter((d) => d.protectedItemId === i.id)
        .map((d) => ({ name: d.name, sizeBytes: d.sizeBytes })),
      policy: {
        id: i.policyId,
        crashConsistentIntervalSeconds: i.crashConsistentIntervalSeconds,
        appConsistentIntervalSeconds: i.appConsistentIntervalSeconds,
        rpoThresholdSeconds: i.rpoThresholdSeconds,
      },
      targetStoreId: i.targetStoreId,
    })),
    targetStores: stores.map((s) => ({
      id: s.id,
      kind: s.kind,
      path: s.path,
      container: s.container,
      connectionString: s.connectionSealed === null ? null : vault.secrets.open(s.connectionSealed),
      passphrase: vault.secrets.open(s.passphraseSealed),
    })),
    discovery: hosts
      .filter(
        (h) =>
          h.discoveryRequestedAt !== null &&
          (h.discoveredAt === null || h.discoveredAt < h.discoveryRequestedAt),
      )
      .map((h) => ({
        sourceHostId: h.id,
        kind: h.kind,
        // Who reads the host's QMP endpoints: its agent, or (null) the process server itself.
        agentId: h.agentId,
        endpoints: JSON.parse(h.endpoints) as unknown,
      })),
  };
}
