import { randomBytes } from 'node:crypto';
import { LifeboatError } from '@lifeboat/protocol';
import { isBuiltInNetwork, reportedNetworks } from '@lifeboat/protocol/networks';
import type {
  ComponentRow,
  JobRow,
  NetworkMappingRow,
  ProtectedItemRow,
  RecoveryPointRow,
  RecoveryRunRow,
} from '../db/schema.js';
import { newId, nowIso } from '../ids.js';
import type { VaultContext } from '../vault-context.js';
import { audit } from './audit.js';
import { componentLeaseOwner } from './component-lease.js';
import { invalid, notFound } from './errors.js';
import type { Principal } from './principal.js';
import { transition } from './protection.js';

// Test failovers and failovers: the vault chooses the machines, points and recovery host,
// queues one job per operation for that host (it polls its assignments), and folds what the
// host reports on each job back into the run (docs/architecture.md, "Test failover and
// failover through the vault").

/** A test failover or a failover. */
export type RunKind = 'test-failover' | 'failover';

/** Which point(s) to boot. */
export interface PointChoice {
  pointId?: string;
  /** @default 'latest' */
  pick?: 'latest' | 'latest-app';
  /** Latest at or before this time (ISO 8601). */
  at?: string;
}

/** How the machine boots when its points do not say (firmware, or a kernel file the host allows). */
export interface BootChoice {
  firmware?: 'bios' | 'uefi';
  kernel?: string;
  append?: string;
  initrd?: string;
}

/** A static address handed to the guest through a cloud-init NoCloud seed disk. */
export interface StaticAddressChoice {
  address: string;
  gateway?: string;
  nameservers?: string[];
}

/** How the recovery host verifies a boot. */
export interface VerifyChoice {
  console?: string;
  guestPort?: number;
  expect?: string;
  /** @default true */
  screenshot: boolean;
}

/** The validated request a run was created from. */
export interface RunSpec {
  point: PointChoice;
  network: 'isolated-user' | 'segment';
  verify: VerifyChoice;
  planned: boolean;
  boot?: BootChoice;
  cpus?: number;
  memoryMiB?: number;
}

/** One point of a run's machine, as the run shows it. */
export interface RunPoint {
  id: string;
  disk: string;
  time: string;
  kind: string;
  cut: string | null;
}

/** One machine of a run. */
export interface RunMachine {
  protectedItemId: string;
  machineId: string;
  machineName: string;
  /** Its name on the recovery host (unique there). */
  name: string;
  targetStoreId: string;
  processServerId: string;
  disks: string[];
  points: RunPoint[];
  cpus?: number;
  memoryMiB?: number;
  address: StaticAddressChoice | null;
  /**
   * The recovery host's network it is attached to (its network mapping's target network, or
   * test network in a test failover); null: the run's isolated network.
   */
  network: string | null;
  verification: Record<string, unknown> | null;
  artifacts: { screenshot: string | null; console: string | null };
  localDisks: string[];
}

/** The states a run ends in; every other state has machines on the recovery host. */
const FINAL = ['cleaned-up', 'failed'];

/** The body of `POST /api/test-failovers`. */
export interface TestFailoverRequest {
  protectedItemIds?: string[];
  consistencyGroup?: string;
  point?: PointChoice;
  network?: 'isolated-user' | 'segment';
  verify?: Partial<VerifyChoice>;
  recoveryHostId?: string;
  addresses?: Array<StaticAddressChoice & { protectedItemId: string }>;
  boot?: BootChoice;
  cpus?: number;
  memoryMiB?: number;
}

/** The body of `POST /api/failovers`. */
export interface FailoverRequest {
  protectedItemId: string;
  point?: PointChoice;
  planned?: boolean;
  network?: 'isolated-user' | 'segment';
  verify?: Partial<VerifyChoice>;
  recoveryHostId?: string;
  address?: StaticAddressChoice;
  boot?: BootChoice;
  cpus?: number;
  memoryMiB?: number;
}

/** A run as the API shows it. */
export async function runToApi(
  vault: VaultContext,
  run: RecoveryRunRow,
  jobs?: JobRow[],
): Promise<Record<string, unknown>> {
  const own =
    jobs ??
    (await vault.db
      .selectFrom('jobs')
      .selectAll()
      .where('targetId', '=', run.id)
      .orderBy('id')
      .execute());
  const spec = JSON.parse(run.spec) as RunSpec;
  const machines = (JSON.parse(run.machines) as RunMachine[]).map((m) => {
    const { processServerId: _ps, disks: _d, ...shown } = m;
    return shown;
  });
  return {
    id: run.id,
    kind: run.kind,
    state: run.state,
    recoveryHostId: run.recoveryHostId,
    protectedItemIds: JSON.parse(run.protectedItemIds) as string[],
    consistencyGroup: run.consistencyGroup,
    point: spec.point,
    network: spec.network,
    verify: spec.verify,
    planned: spec.planned,
    ...(spec.boot !== undefined ? { boot: spec.boot } : {}),
    machines,
    jobs: own.map((j) => ({ id: j.id, kind: j.kind, state: j.state })),
    jobId: run.lastJobId,
    error: run.error === null ? null : (JSON.parse(run.error) as unknown),
    createdBy: run.createdBy,
    createdAt: run.createdAt,
    updatedAt: run.updatedAt,
  };
}

/** Runs as the API shows them, with their jobs read in one query. */
export async function runsToApi(
  vault: VaultContext,
  runs: RecoveryRunRow[],
): Promise<Array<Record<string, unknown>>> {
  if (runs.length === 0) return [];
  const jobs = await vault.db
    .selectFrom('jobs')
    .selectAll()
    .where(
      'targetId',
      'in',
      runs.map((r) => r.id),
    )
    .orderBy('id')
    .execute();
  return Promise.all(
    runs.map((r) =>
      runToApi(
        vault,
        r,
        jobs.filter((j) => j.targetId === r.id),
      ),
    ),
  );
}

/** Loads a run of a kind, or 404. */
export async function loadRun(
  vault: VaultContext,
  kind: RunKind,
  id: string,
): Promise<RecoveryRunRow> {
  const run = await vault.db
    .selectFrom('recoveryRuns')
    .selectAll()
    .where('id', '=', id)
    .where('kind', '=', kind)
    .executeTakeFirst();
  if (run === undefined) throw notFound(kind, id);
  return run;
}

function healthy(c: ComponentRow, vault: VaultContext, now = Date.now()): boolean {
  return (
    c.lastHeartbeatAt !== null &&
    now - Date.parse(c.lastHeartbeatAt) <= vault.options.heartbeatTimeoutSeconds * 1000
  );
}

/** A machine's network as its item's mapping decides it, with what to name when it is missing. */
export interface NetworkNeed {
  protectedItemId: string;
  network: string;
  networkMappingId: string;
  /** The mapping's field that names it (what to fix). */
  field: 'networkMapping.targetNetwork' | 'networkMapping.testNetwork';
}

/**
 * The recovery host network a machine boots on, from its item's network mapping: a failover
 * takes the mapping's target network; a test failover its test network when the mapping sets
 * one (a name of the built-in isolated network counts as none), else it stays isolated, so a
 * test never reaches a production network unless the mapping says so. An explicit network in
 * the request wins (isolated); no mapping: isolated, as before mappings were used.
 */
export function mappedNetwork(
  kind: RunKind,
  requested: string | undefined,
  mapping: Pick<NetworkMappingRow, 'id' | 'targetNetwork' | 'testNetwork'> | undefined,
  protectedItemId: string,
): NetworkNeed | null {
  if (requested !== undefined || mapping === undefined) return null;
  const [network, field] =
    kind === 'failover'
      ? [mapping.targetNetwork, 'networkMapping.targetNetwork' as const]
      : [mapping.testNetwork, 'networkMapping.testNetwork' as const];
  if (network === null || isBuiltInNetwork(network)) return null;
  return { protectedItemId, network, networkMappingId: mapping.id, field };
}

async function networkNeeds(
  vault: VaultContext,
  kind: RunKind,
  requested: string | undefined,
  items: ProtectedItemRow[],
): Promise<Map<string, NetworkNeed>> {
  const out = new Map<string, NetworkNeed>();
  for (const item of items) {
    if (item.networkMappingId === null) continue;
    const mapping = await vault.db
      .selectFrom('networkMappings')
      .selectAll()
      .where('id', '=', item.networkMappingId)
      .executeTakeFirst();
    const need = mappedNetwork(kind, requested, mapping, item.id);
    if (need !== null) out.set(item.id, need);
  }
  return out;
}

/** The networks a recovery host reported in its last heartbeat: name -> its bridge exists. */
function hostNetworks(c: ComponentRow): Map<string, boolean> {
  try {
    return reportedNetworks(JSON.parse(c.health));
  } catch {
    return new Map();
  }
}

/** The first need the host cannot meet (undeclared network, or its bridge missing). */
function unmet(c: ComponentRow, needs: readonly NetworkNeed[]): NetworkNeed | undefined {
  const nets = hostNetworks(c);
  return needs.find((n) => nets.get(n.network) !== true);
}

function networkError(c: ComponentRow | undefined, need: NetworkNeed): LifeboatError {
  const has = c !== undefined ? hostNetworks(c) : new Map<string, boolean>();
  const declared = has.has(need.network);
  return new LifeboatError(
    'LB_VAULT_NETWORK_UNAVAILABLE',
    c !== undefined
      ? declared
        ? `Invalid ${need.field}: network ${need.network} of network mapping ${need.networkMappingId} (protected item ${need.protectedItemId}) is declared by recovery host ${c.name}, but its bridge does not exist there. Create the bridge on that host, or choose another recovery host.`
        : `Invalid ${need.field}: network mapping ${need.networkMappingId} (protected item ${need.protectedItemId}) names network ${need.network}, which recovery host ${c.name} does not have (it has ${[...has.keys()].join(', ') || 'none'}). Start it with --network ${need.network}=bridge:<bridge>, fix the mapping, or choose another recovery host.`
      : `Invalid ${need.field}: network mapping ${need.networkMappingId} (protected item ${need.protectedItemId}) names network ${need.network}, which no healthy recovery host has. Start one with --network ${need.network}=bridge:<bridge>, or fix the mapping.`,
    {
      details: {
        field: need.field,
        networkMappingId: need.networkMappingId,
        protectedItemId: need.protectedItemId,
        network: need.network,
        ...(c !== undefined ? { recoveryHostId: c.id } : {}),
      },
    },
  );
}

/**
 * The recovery host named, which must be healthy and have the networks the machines' mappings
 * name, or the healthy one with those networks and the fewest active runs.
 */
async function chooseRecoveryHost(
  vault: VaultContext,
  given: string | undefined,
  needs: readonly NetworkNeed[] = [],
): Promise<string> {
  const { db } = vault;
  if (given !== undefined) {
    const c = await db
      .selectFrom('components')
      .selectAll()
      .where('id', '=', given)
      .where('kind', '=', 'recovery-host')
      .executeTakeFirst();
    if (c === undefined) throw invalid('body.recoveryHostId', `no recovery host "${given}".`);
    if (!healthy(c, vault)) {
      throw new LifeboatError(
        'LB_VAULT_RECOVERY_HOST_DOWN',
        `Recovery host ${c.name} sent no heartbeat ${c.lastHeartbeatAt === null ? 'yet' : `since ${c.lastHeartbeatAt}`}. Start it ("lifeboat recovery-host start --vault ..."), or choose another.`,
        { details: { field: 'body.recoveryHostId', recoveryHostId: c.id } },
      );
    }
    const missing = unmet(c, needs);
    if (missing !== undefined) throw networkError(c, missing);
    return c.id;
  }
  const hosts = (
    await db
      .selectFrom('components')
      .selectAll()
      .where('kind', '=', 'recovery-host')
      .orderBy('id')
      .execute()
  ).filter((c) => healthy(c, vault));
  if (hosts.length === 0) {
    throw new LifeboatError(
      'LB_VAULT_NO_RECOVERY_HOST',
      'No recovery host is registered and sending heartbeats. Register one with a key ("lifeboat recovery-host start --vault <url> --registration-key-file <file>") and retry.',
      { details: { field: 'body.recoveryHostId' } },
    );
  }
  const able = hosts.filter((c) => unmet(c, needs) === undefined);
  if (able.length === 0) {
    // Name the host that declares the network (its bridge is missing), or the only host.
    const need = needs.find((n) => hosts.every((c) => unmet(c, [n]) !== undefined)) ?? needs[0]!;
    const declaring = hosts.find((c) => hostNetworks(c).has(need.network));
    throw networkError(declaring ?? (hosts.length === 1 ? hosts[0] : undefined), need);
  }
  hosts.splice(0, hosts.length, ...able);
  const active = await db
    .selectFrom('recoveryRuns')
    .select(['recoveryHostId', (eb) => eb.fn.countAll().as('n')])
    .where('state', 'not in', FINAL)
    .groupBy('recoveryHostId')
    .execute();
  const load = new Map(active.map((a) => [a.recoveryHostId, Number(a.n)]));
  hosts.sort((a, b) => (load.get(a.id) ?? 0) - (load.get(b.id) ?? 0));
  return hosts[0]!.id;
}

function pointNotFound(field: string, message: string, details: Record<string, unknown> = {}) {
  return new LifeboatError('LB_VAULT_POINT_NOT_FOUND', message, {
    details: { field, ...details },
  });
}

function toRunPoint(p: RecoveryPointRow): RunPoint {
  return { id: p.id, disk: p.disk, time: p.time, kind: p.kind, cut: p.cut };
}

/** Points of an item grouped into consistent sets covering each of its disks, newest first. */
async function completeCuts(
  vault: VaultContext,
  item: ProtectedItemRow,
  disks: string[],
  choice: { pick?: string; at?: string },
): Promise<Array<{ time: string; points: RecoveryPointRow[] }>> {
  let q = vault.db
    .selectFrom('recoveryPoints')
    .selectAll()
    .where('protectedItemId', '=', item.id)
    .where('targetStoreId', '=', item.targetStoreId);
  if (choice.pick === 'latest-app') q = q.where('kind', '=', 'app');
  if (choice.at !== undefined) q = q.where('time', '<=', new Date(choice.at).toISOString());
  const rows = await q.orderBy('time', 'desc').limit(1000).execute();
  const byCut = new Map<string, RecoveryPointRow[]>();
  for (const p of rows) {
    const key = p.cut ?? `point:${p.id}`;
    byCut.set(key, [...(byCut.get(key) ?? []), p]);
  }
  const out: Array<{ time: string; points: RecoveryPointRow[] }> = [];
  for (const points of byCut.values()) {
    const chosen = disks.map((d) => points.find((p) => p.disk === d));
    if (chosen.some((p) => p === undefined)) continue;
    const ps = chosen as RecoveryPointRow[];
    out.push({ time: ps.map((p) => p.time).sort()[0]!, points: ps });
  }
  return out.sort((a, b) => (a.time < b.time ? 1 : a.time > b.time ? -1 : 0));
}

interface ItemWithDisks {
  item: ProtectedItemRow;
  disks: string[];
  machine: { id: string; name: string; cpus: number | null; memoryBytes: number | null };
}

async function loadItemDetails(
  vault: VaultContext,
  items: ProtectedItemRow[],
): Promise<ItemWithDisks[]> {
  const out: ItemWithDisks[] = [];
  for (const item of items) {
    const disks = await vault.db
      .selectFrom('protectedDisks')
      .select('name')
      .where('protectedItemId', '=', item.id)
      .orderBy('name')
      .execute();
    const m = await vault.db
      .selectFrom('machines')
      .select(['id', 'name', 'cpus', 'memoryBytes'])
      .where('id', '=', item.machineId)
      .executeTakeFirst();
    out.push({
      item,
      disks: disks.map((d) => d.name),
      machine: m ?? { id: item.machineId, name: item.machineId, cpus: null, memoryBytes: null },
    });
  }
  return out;
}

/**
 * The points to boot for each item: one per disk, from one cut. For several items (a
 * consistency group) each machine is cut by its own agent, so the vault takes, per machine,
 * its newest complete cut at or before the oldest of the machines' newest cuts (no machine is
 * more than one interval ahead of another), or, for a machine whose points all came later,
 * its earliest.
 */
async function selectRunPoints(
  vault: VaultContext,
  items: ItemWithDisks[],
  choice: PointChoice,
): Promise<RecoveryPointRow[][]> {
  if (choice.pointId !== undefined) {
    if (items.length !== 1) {
      throw invalid(
        'body.point.pointId',
        'a point id names one machine’s point; for several machines or a consistency group choose by pick and at.',
      );
    }
    const { item, disks } = items[0]!;
    const p = await vault.db
      .selectFrom('recoveryPoints')
      .selectAll()
      .where('id', '=', choice.pointId)
      .where('protectedItemId', '=', item.id)
      .executeTakeFirst();
    if (p === undefined) {
      throw pointNotFound(
        'body.point.pointId',
        `Protected item ${item.id} has no recovery point "${choice.pointId}". List its points (GET /api/protected-items/${item.id}/points) and choose one.`,
        { protectedItemId: item.id, pointId: choice.pointId },
      );
    }
    if (disks.length === 1) return [[p]];
    const sameCut =
      p.cut === null
        ? []
        : await vault.db
            .selectFrom('recoveryPoints')
            .selectAll()
            .where('protectedItemId', '=', item.id)
            .where('cut', '=', p.cut)
            .execute();
    const chosen = disks.map((d) => sameCut.find((x) => x.disk === d));
    if (chosen.some((x) => x === undefined)) {
      throw pointNotFound(
        'body.point.pointId',
        `Point ${p.id} is of disk ${p.disk}, and its cut has no point of every other disk of the machine (${disks.join(', ')}). Choose a point of a complete cut, or pick latest.`,
        { protectedItemId: item.id, pointId: p.id },
      );
    }
    return [chosen as RecoveryPointRow[]];
  }
  const what = `${choice.pick === 'latest-app' ? 'app-consistent ' : ''}point${choice.at !== undefined ? ` at or before ${choice.at}` : ''}`;
  const newest = async (i: ItemWithDisks, at: string | undefined) => {
    const cuts = await completeCuts(vault, i.item, i.disks, {
      ...(choice.pick !== undefined ? { pick: choice.pick } : {}),
      ...(at !== undefined ? { at } : {}),
    });
    const first = cuts[0];
    if (first === undefined) {
      throw pointNotFound(
        'body.point',
        `Protected item ${i.item.id} (${i.machine.name}) has no ${what} covering every disk (${i.disks.join(', ')}). Wait for replication, or choose another point.`,
        { protectedItemId: i.item.id },
      );
    }
    return first;
  };
  const firsts = [];
  for (const i of items) firsts.push(await newest(i, choice.at));
  if (items.length === 1) return [firsts[0]!.points];
  // Each machine's newest cut at or before the oldest of the newest cuts; a machine with none
  // that early (replicated later) takes its earliest cut: the closest to the others.
  const common = firsts.map((f) => f.time).sort()[0]!;
  const out: RecoveryPointRow[][] = [];
  for (const i of items) {
    const cuts = await completeCuts(vault, i.item, i.disks, {
      ...(choice.pick !== undefined ? { pick: choice.pick } : {}),
      at: common,
    });
    out.push(
      (
        cuts[0] ??
        (
          await completeCuts(vault, i.item, i.disks, {
            ...(choice.pick !== undefined ? { pick: choice.pick } : {}),
            ...(choice.at !== undefined ? { at: choice.at } : {}),
          })
        ).at(-1)!
      ).points,
    );
  }
  return out;
}

const IPV4 = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/;

function checkAddress(a: StaticAddressChoice, field: string): StaticAddressChoice {
  const [ip, prefix, ...rest] = a.address.split('/');
  const octets = IPV4.exec(ip ?? '');
  if (
    octets === null ||
    octets.slice(1).some((o) => Number(o) > 255) ||
    prefix === undefined ||
    rest.length > 0 ||
    !/^\d{1,2}$/.test(prefix) ||
    Number(prefix) > 32
  ) {
    throw invalid(
      `${field}.address`,
      `"${a.address}" is not an IPv4 address with a prefix (A.B.C.D/N).`,
    );
  }
  for (const [name, v] of [
    ['gateway', a.gateway],
    ...(a.nameservers ?? []).map((n, i) => [`nameservers.${i}`, n] as const),
  ] as const) {
    if (v === undefined) continue;
    const m = IPV4.exec(v);
    if (m === null || m.slice(1).some((o) => Number(o) > 255)) {
      throw invalid(`${field}.${name}`, `"${v}" is not an IPv4 address (A.B.C.D).`);
    }
  }
  return {
    address: a.address,
    ...(a.gateway !== undefined ? { gateway: a.gateway } : {}),
    ...(a.nameservers !== undefined ? { nameservers: a.nameservers } : {}),
  };
}

function checkBoot(boot: BootChoice | undefined): BootChoice | undefined {
  if (boot === undefined) return undefined;
  if ((boot.firmware === undefined) === (boot.kernel === undefined)) {
    throw invalid('body.boot', 'give either firmware (bios or uefi) or a kernel file, not both.');
  }
  if (boot.kernel === undefined && (boot.append !== undefined || boot.initrd !== undefined)) {
    throw invalid('body.boot.append', 'append and initrd go with kernel.');
  }
  return boot;
}

/** A name for the recovered machine: the source's, made safe, plus a part of the run id. */
function recoveredName(machineName: string, runId: string, index: number): string {
  const base =
    machineName
      .toLowerCase()
      .replace(/[^a-z0-9-]+/g, '-')
      .replace(/^-+|-+$/g, '')
      .slice(0, 15) || 'machine';
  return `${base}-${runId.slice(-4)}${index > 0 ? `-${index}` : ''}`.slice(0, 24);
}

function verifyOf(v: Partial<VerifyChoice> | undefined): VerifyChoice {
  const out: VerifyChoice = { screenshot: v?.screenshot ?? true };
  for (const [field, value] of [
    ['console', v?.console],
    ['expect', v?.expect],
  ] as const) {
    if (value === undefined) continue;
    try {
      new RegExp(value);
    } catch (err) {
      throw invalid(`body.verify.${field}`, `not a regular expression: ${(err as Error).message}.`);
    }
    out[field] = value;
  }
  if (v?.guestPort !== undefined) out.guestPort = v.guestPort;
  if (out.expect !== undefined && out.guestPort === undefined) {
    throw invalid('body.verify.expect', 'expect goes with guestPort.');
  }
  return out;
}

/** Inserts a job that a component runs (queued until it reports), assigned to that component. */
export async function createComponentJob(
  vault: VaultContext,
  job: {
    kind: string;
    componentId: string;
    run: { kind: RunKind; id: string };
    spec: Record<string, unknown>;
    extra?: Record<string, unknown>;
  },
  by: Principal,
): Promise<JobRow> {
  const now = nowIso();
  const row: JobRow = {
    id: newId('job'),
    kind: job.kind,
    state: 'queued',
    targetType: job.run.kind,
    targetId: job.run.id,
    params: JSON.stringify({
      runId: job.run.id,
      assignedTo: job.componentId,
      spec: job.spec,
      ...(job.extra ?? {}),
    }),
    result: null,
    error: null,
    progress: 0,
    steps: '[]',
    attempts: 0,
    scheduleKey: null,
    // The vault's own runner never takes a job its lease owner names a component for.
    leaseOwner: componentLeaseOwner(job.componentId),
    leaseUntil: null,
    cancelRequested: 0,
    createdBy: by.name,
    createdAt: now,
    startedAt: null,
    finishedAt: null,
    updatedAt: now,
  };
  await vault.db.insertInto('jobs').values(row).execute();
  await vault.db
    .insertInto('jobLogs')
    .values({
      id: newId('log'),
      jobId: row.id,
      time: now,
      level: 'info',
      message: `Queued by ${by.name} for component ${job.componentId}.`,
    })
    .execute();
  return row;
}

function machineSpec(m: RunMachine, spec: RunSpec): Record<string, unknown> {
  return {
    name: m.name,
    protectedItemId: m.protectedItemId,
    machineId: m.machineId,
    machineName: m.machineName,
    targetStoreId: m.targetStoreId,
    pointIds: m.points.map((p) => p.id),
    ...(m.cpus !== undefined ? { cpus: m.cpus } : {}),
    ...(m.memoryMiB !== undefined ? { memoryMiB: m.memoryMiB } : {}),
    ...(m.address !== null ? { address: m.address } : {}),
    ...(m.network !== undefined && m.network !== null ? { network: m.network } : {}),
    ...(spec.boot !== undefined ? { boot: spec.boot } : {}),
  };
}

async function insertRun(
  vault: VaultContext,
  run: Omit<RecoveryRunRow, 'createdAt' | 'updatedAt' | 'lastJobId' | 'error' | 'hostInstance'>,
): Promise<RecoveryRunRow> {
  const now = nowIso();
  const row: RecoveryRunRow = {
    ...run,
    error: null,
    hostInstance: null,
    lastJobId: null,
    createdAt: now,
    updatedAt: now,
  };
  await vault.db.insertInto('recoveryRuns').values(row).execute();
  return row;
}

async function setLastJob(vault: VaultContext, runId: string, jobId: string): Promise<void> {
  await vault.db
    .updateTable('recoveryRuns')
    .set({ lastJobId: jobId, updatedAt: nowIso() })
    .where('id', '=', runId)
    .execute();
}

function buildMachines(
  runId: string,
  items: ItemWithDisks[],
  points: RecoveryPointRow[][] | undefined,
  req: { cpus?: number; memoryMiB?: number },
  addressOf: (itemId: string) => StaticAddressChoice | null,
  networks: ReadonlyMap<string, NetworkNeed> = new Map(),
): RunMachine[] {
  return items.map((i, n) => {
    const memoryMiB =
      req.memoryMiB ??
      (i.machine.memoryBytes !== null ? Math.round(i.machine.memoryBytes / 1048576) : undefined);
    const cpus = req.cpus ?? i.machine.cpus ?? undefined;
    return {
      protectedItemId: i.item.id,
      machineId: i.item.machineId,
      machineName: i.machine.name,
      name: recoveredName(i.machine.name, runId, n),
      targetStoreId: i.item.targetStoreId,
      processServerId: i.item.processServerId,
      disks: i.disks,
      points: (points?.[n] ?? []).map(toRunPoint),
      ...(cpus !== undefined ? { cpus } : {}),
      ...(memoryMiB !== undefined && memoryMiB > 0 ? { memoryMiB } : {}),
      address: addressOf(i.item.id),
      network: networks.get(i.item.id)?.network ?? null,
      verification: null,
      artifacts: { screenshot: null, console: null },
      localDisks: [],
    };
  });
}

function runId(kind: RunKind): string {
  // newId's random tail ends the id, so the recovered machines' name suffix differs per run.
  return `${newId(kind === 'test-failover' ? 'tf' : 'fo')}${randomBytes(1).toString('hex')}`;
}

/** Starts a test failover: chooses items, points and a recovery host, and queues its job. */
export async function startTestFailover(
  vault: VaultContext,
  by: Principal,
  req: TestFailoverRequest,
): Promise<Record<string, unknown>> {
  const { db } = vault;
  if ((req.protectedItemIds === undefined) === (req.consistencyGroup === undefined)) {
    throw invalid(
      'body.protectedItemIds',
      'give the protected items (protectedItemIds) or a consistencyGroup, not both.',
    );
  }
  let items: ProtectedItemRow[];
  if (req.protectedItemIds !== undefined) {
    items = [];
    for (const [n, id] of req.protectedItemIds.entries()) {
      const item = await db
        .selectFrom('protectedItems')
        .selectAll()
        .where('id', '=', id)
        .executeTakeFirst();
      if (item === undefined)
        throw invalid(`body.protectedItemIds.${n}`, `no protected item "${id}".`);
      items.push(item);
    }
  } else {
    items = await db
      .selectFrom('protectedItems')
      .selectAll()
      .where('consistencyGroup', '=', req.consistencyGroup!)
      .where('state', '!=', 'disabled')
      .orderBy('id')
      .execute();
    if (items.length === 0) {
      throw invalid(
        'body.consistencyGroup',
        `no active protected item is in consistency group "${req.consistencyGroup!}".`,
      );
    }
  }
  for (const item of items) {
    if (item.state === 'enabling' || item.state === 'disabled') {
      throw new LifeboatError(
        'LB_VAULT_INVALID_STATE',
        item.state === 'enabling'
          ? `Protected item ${item.id} is still enabling and has no recovery point yet. Wait for initial replication.`
          : `Protected item ${item.id} is disabled. Its points can still be booted from the store alone ("lifeboat failover test --store ...").`,
        { details: { id: item.id, state: item.state } },
      );
    }
  }
  const details = await loadItemDetails(vault, items);
  const point = req.point ?? { pick: 'latest' as const };
  const points = await selectRunPoints(vault, details, point);
  const addresses = new Map<string, StaticAddressChoice>();
  for (const [n, a] of (req.addresses ?? []).entries()) {
    if (!items.some((i) => i.id === a.protectedItemId)) {
      throw invalid(
        `body.addresses.${n}.protectedItemId`,
        `"${a.protectedItemId}" is not one of this test failover's protected items.`,
      );
    }
    addresses.set(a.protectedItemId, checkAddress(a, `body.addresses.${n}`));
  }
  const spec: RunSpec = {
    point,
    network: req.network ?? (items.length > 1 ? 'segment' : 'isolated-user'),
    verify: verifyOf(req.verify),
    planned: false,
    ...(checkBoot(req.boot) !== undefined ? { boot: req.boot! } : {}),
    ...(req.cpus !== undefined ? { cpus: req.cpus } : {}),
    ...(req.memoryMiB !== undefined ? { memoryMiB: req.memoryMiB } : {}),
  };
  const needs = await networkNeeds(vault, 'test-failover', req.network, items);
  const hostId = await chooseRecoveryHost(vault, req.recoveryHostId, [...needs.values()]);
  const id = runId('test-failover');
  const machines = buildMachines(id, details, points, req, (i) => addresses.get(i) ?? null, needs);
  const run = await insertRun(vault, {
    id,
    kind: 'test-failover',
    state: 'queued',
    recoveryHostId: hostId,
    protectedItemIds: JSON.stringify(items.map((i) => i.id)),
    consistencyGroup: req.consistencyGroup ?? null,
    spec: JSON.stringify(spec),
    machines: JSON.stringify(machines),
    createdBy: by.name,
  });
  const job = await createComponentJob(
    vault,
    {
      kind: 'test-failover',
      componentId: hostId,
      run: { kind: 'test-failover', id },
      spec: {
        machines: machines.map((m) => machineSpec(m, spec)),
        network: spec.network,
        verify: spec.verify,
      },
    },
    by,
  );
  await setLastJob(vault, id, job.id);
  await audit(
    db,
    by,
    'test-failover.start',
    { type: 'test-failover', id },
    {
      after: {
        recoveryHostId: hostId,
        protectedItemIds: items.map((i) => i.id),
        points: machines.map((m) => m.points.map((p) => p.id)),
        jobId: job.id,
      },
    },
  );
  return runToApi(vault, { ...run, lastJobId: job.id }, [job]);
}

/** Queues the cleanup of a test failover (allowed in any state but cleaned-up). */
export async function cleanupTestFailover(
  vault: VaultContext,
  by: Principal,
  id: string,
): Promise<Record<string, unknown>> {
  const run = await loadRun(vault, 'test-failover', id);
  if (run.state === 'cleaned-up') {
    throw new LifeboatError(
      'LB_VAULT_INVALID_STATE',
      `Test failover ${id} is already cleaned up; nothing of it runs.`,
      { details: { id, state: run.state } },
    );
  }
  const pending = await pendingJob(vault, run.id, 'test-failover-cleanup');
  if (pending !== undefined) {
    throw new LifeboatError(
      'LB_VAULT_INVALID_STATE',
      `A cleanup of test failover ${id} is already ${pending.state} (job ${pending.id}).`,
      { details: { id, jobId: pending.id } },
    );
  }
  const machines = JSON.parse(run.machines) as RunMachine[];
  const job = await createComponentJob(
    vault,
    {
      kind: 'test-failover-cleanup',
      componentId: run.recoveryHostId,
      run: { kind: 'test-failover', id },
      spec: { machines: machines.map((m) => m.name) },
    },
    by,
  );
  await setLastJob(vault, id, job.id);
  await audit(
    vault.db,
    by,
    'test-failover.cleanup',
    { type: 'test-failover', id },
    {
      after: { jobId: job.id },
    },
  );
  return runToApi(vault, { ...run, lastJobId: job.id });
}

/**
 * The failover `id` when it is in one of `states` and has no job queued or running, else the
 * refusal (LB_VAULT_INVALID_STATE) saying which: `why` tells what its state allows.
 */
async function idleFailover(
  vault: VaultContext,
  id: string,
  states: readonly string[],
  why: string,
): Promise<Awaited<ReturnType<typeof loadRun>>> {
  const run = await loadRun(vault, 'failover', id);
  if (!states.includes(run.state)) {
    throw new LifeboatError('LB_VAULT_INVALID_STATE', `Failover ${id} is ${run.state}; ${why}.`, {
      details: { id, state: run.state },
    });
  }
  const pending = await pendingJob(vault, run.id);
  if (pending !== undefined) {
    throw new LifeboatError(
      'LB_VAULT_INVALID_STATE',
      `Failover ${id} has job ${pending.id} (${pending.kind}) ${pending.state}; wait for it to end.`,
      { details: { id, jobId: pending.id } },
    );
  }
  return run;
}

async function pendingJob(
  vault: VaultContext,
  runId: string,
  kind?: string,
): Promise<JobRow | undefined> {
  let q = vault.db
    .selectFrom('jobs')
    .selectAll()
    .where('targetId', '=', runId)
    .where('state', 'in', ['queued', 'running']);
  if (kind !== undefined) q = q.where('kind', '=', kind);
  return q.orderBy('id').executeTakeFirst();
}

/** Starts a failover of one protected item (unplanned from a point, or planned). */
export async function startFailover(
  vault: VaultContext,
  by: Principal,
  req: FailoverRequest,
): Promise<Record<string, unknown>> {
  const { db } = vault;
  const item = await db
    .selectFrom('protectedItems')
    .selectAll()
    .where('id', '=', req.protectedItemId)
    .executeTakeFirst();
  if (item === undefined) {
    throw invalid('body.protectedItemId', `no protected item "${req.protectedItemId}".`);
  }
  const runs = await db
    .selectFrom('recoveryRuns')
    .selectAll()
    .where('kind', '=', 'failover')
    .where('protectedItemIds', 'like', `%"${item.id}"%`)
    .orderBy('id', 'desc')
    .execute();
  const active = runs.find((r) => r.state !== 'failed');
  const lastFailed = runs[0] !== undefined && runs[0].state === 'failed';
  const okState =
    item.state === 'protected' ||
    item.state === 'resync-needed' ||
    (item.state === 'failed-over' && lastFailed);
  if (active !== undefined || !okState) {
    throw new LifeboatError(
      'LB_VAULT_INVALID_STATE',
      active !== undefined
        ? `Protected item ${item.id} already has failover ${active.id} (${active.state}). Change its point or commit it instead.`
        : `Protected item ${item.id} is ${item.state}; a failover needs it protected or resync-needed.`,
      { details: { id: item.id, state: item.state, ...(active ? { failoverId: active.id } : {}) } },
    );
  }
  const planned = req.planned === true;
  const [details] = await loadItemDetails(vault, [item]);
  const point = req.point ?? { pick: 'latest' as const };
  // A planned failover boots the points of its last sync, not one chosen now.
  const points = planned ? undefined : await selectRunPoints(vault, [details!], point);
  if (planned) {
    const ps = await db
      .selectFrom('components')
      .selectAll()
      .where('id', '=', item.processServerId)
      .executeTakeFirst();
    if (ps === undefined || !healthy(ps, vault)) {
      throw new LifeboatError(
        'LB_VAULT_PROCESS_SERVER_DOWN',
        `The process server of protected item ${item.id} sends no heartbeats, so it cannot replicate a last cycle and stop the source. Bring it back, or run an unplanned failover from the latest point.`,
        { details: { id: item.id, processServerId: item.processServerId } },
      );
    }
  }
  const spec: RunSpec = {
    point: planned ? { pick: 'latest' } : point,
    network: req.network ?? 'isolated-user',
    verify: verifyOf(req.verify ?? { screenshot: false }),
    planned,
    ...(checkBoot(req.boot) !== undefined ? { boot: req.boot! } : {}),
    ...(req.cpus !== undefined ? { cpus: req.cpus } : {}),
    ...(req.memoryMiB !== undefined ? { memoryMiB: req.memoryMiB } : {}),
  };
  const address = req.address === undefined ? null : checkAddress(req.address, 'body.address');
  const needs = await networkNeeds(vault, 'failover', req.network, [item]);
  const hostId = await chooseRecoveryHost(vault, req.recoveryHostId, [...needs.values()]);
  const id = runId('failover');
  const machines = buildMachines(id, [details!], points, req, () => address, needs);
  const run = await insertRun(vault, {
    id,
    kind: 'failover',
    state: 'queued',
    recoveryHostId: hostId,
    protectedItemIds: JSON.stringify([item.id]),
    consistencyGroup: null,
    spec: JSON.stringify(spec),
    machines: JSON.stringify(machines),
    createdBy: by.name,
  });
  const jobs: JobRow[] = [];
  let finalSyncJobId: string | undefined;
  if (planned) {
    const sync = await createComponentJob(
      vault,
      {
        kind: 'final-sync',
        componentId: item.processServerId,
        run: { kind: 'failover', id },
        spec: {
          protectedItemId: item.id,
          storeMachine: item.machineId,
          disks: details!.disks,
          stopSource: true,
        },
      },
      by,
    );
    jobs.push(sync);
    finalSyncJobId = sync.id;
  }
  const job = await createComponentJob(
    vault,
    {
      kind: 'failover',
      componentId: hostId,
      run: { kind: 'failover', id },
      spec: {
        machine: machineSpec(machines[0]!, spec),
        network: spec.network,
        verify: spec.verify,
        ...(finalSyncJobId !== undefined ? { planned: { finalSyncJobId } } : {}),
      },
    },
    by,
  );
  jobs.push(job);
  await setLastJob(vault, id, job.id);
  await audit(
    db,
    by,
    'failover.start',
    { type: 'failover', id },
    {
      after: {
        protectedItemId: item.id,
        recoveryHostId: hostId,
        planned,
        points: machines[0]!.points.map((p) => p.id),
        jobId: job.id,
      },
    },
  );
  return runToApi(vault, { ...run, lastJobId: job.id }, jobs);
}

/** Queues a change of point of a failover before commit. */
export async function changeFailoverPoint(
  vault: VaultContext,
  by: Principal,
  id: string,
  point: PointChoice,
): Promise<Record<string, unknown>> {
  const run = await idleFailover(
    vault,
    id,
    ['booted', 'failed'],
    'its point can change only once it has booted and before commit',
  );
  const machines = JSON.parse(run.machines) as RunMachine[];
  const m = machines[0]!;
  const item = await vault.db
    .selectFrom('protectedItems')
    .selectAll()
    .where('id', '=', m.protectedItemId)
    .executeTakeFirstOrThrow();
  const [details] = await loadItemDetails(vault, [item]);
  const [points] = await selectRunPoints(vault, [details!], point);
  const job = await createComponentJob(
    vault,
    {
      kind: 'failover-change-point',
      componentId: run.recoveryHostId,
      run: { kind: 'failover', id },
      spec: { machine: m.name, pointIds: points!.map((p) => p.id) },
      extra: { points: points!.map(toRunPoint), point },
    },
    by,
  );
  await setLastJob(vault, id, job.id);
  await audit(
    vault.db,
    by,
    'failover.change-point',
    { type: 'failover', id },
    {
      before: { points: m.points.map((p) => p.id) },
      after: { points: points!.map((p) => p.id), jobId: job.id },
    },
  );
  return runToApi(vault, { ...run, lastJobId: job.id });
}

/** Queues the commit of a failover, and by default the hydration of its disks after it. */
export async function commitFailover(
  vault: VaultContext,
  by: Principal,
  id: string,
  body: { hydrate?: boolean; format?: 'qcow2' | 'raw'; verify?: boolean },
): Promise<Record<string, unknown>> {
  const run = await idleFailover(
    vault,
    id,
    ['booted'],
    'only a booted failover (before commit) can be committed',
  );
  const machines = JSON.parse(run.machines) as RunMachine[];
  const commit = await createComponentJob(
    vault,
    {
      kind: 'failover-commit',
      componentId: run.recoveryHostId,
      run: { kind: 'failover', id },
      spec: { machine: machines[0]!.name },
    },
    by,
  );
  let last = commit;
  if (body.hydrate ?? true) {
    last = await createComponentJob(
      vault,
      {
        kind: 'hydration',
        componentId: run.recoveryHostId,
        run: { kind: 'failover', id },
        spec: {
          machine: machines[0]!.name,
          format: body.format ?? 'qcow2',
          verify: body.verify ?? false,
        },
      },
      by,
    );
  }
  await setLastJob(vault, id, last.id);
  await audit(
    vault.db,
    by,
    'failover.commit',
    { type: 'failover', id },
    {
      after: { commitJobId: commit.id, hydrationJobId: last === commit ? null : last.id },
    },
  );
  return {
    ...(await runToApi(vault, { ...run, lastJobId: last.id })),
    commitJobId: commit.id,
    hydrationJobId: last === commit ? null : last.id,
  };
}

// What each job's outcome makes of its run's state.
const RUN_STATE: Record<string, { running: string; succeeded: string; failed: string }> = {
  'test-failover': { running: 'starting', succeeded: 'running', failed: 'failed' },
  'test-failover-cleanup': { running: 'cleaning-up', succeeded: 'cleaned-up', failed: 'failed' },
  failover: { running: 'starting', succeeded: 'booted', failed: 'failed' },
  'failover-change-point': { running: 'changing-point', succeeded: 'booted', failed: 'failed' },
  'failover-commit': { running: 'committing', succeeded: 'committed', failed: 'booted' },
  hydration: { running: 'hydrating', succeeded: 'hydrated', failed: 'committed' },
  'final-sync': { running: 'syncing', succeeded: 'syncing', failed: 'failed' },
};

/** What a recovery host reports per machine in a job's result. */
interface ReportedMachine {
  name: string;
  verification?: Record<string, unknown>;
  localDisks?: string[];
  pointIds?: string[];
}

/**
 * Folds a job report (or a job's end: the component went silent, the job was cancelled)
 * into its run: the run's state, its machines' verification, artifacts, points and local
 * disks, the host instance holding it, and, for a failover that booted, the item's
 * `failed-over` state.
 */
export async function applyRunJobReport(
  vault: VaultContext,
  job: JobRow,
  report: {
    state: 'running' | 'succeeded' | 'failed';
    result?: Record<string, unknown> | undefined;
    error?: { code: string; message: string; details?: Record<string, unknown> } | undefined;
  },
  actor: Principal,
): Promise<void> {
  const params = JSON.parse(job.params) as {
    runId?: string;
    points?: RunPoint[];
  };
  if (params.runId === undefined) return;
  const run = await vault.db
    .selectFrom('recoveryRuns')
    .selectAll()
    .where('id', '=', params.runId)
    .executeTakeFirst();
  if (run === undefined) return;
  const mapping = RUN_STATE[job.kind];
  if (mapping === undefined) return;
  const spec = JSON.parse(run.spec) as RunSpec;
  let state = mapping[report.state];
  if (job.kind === 'final-sync') {
    // The process server's last sync; the recovery host's failover job waits for it.
    state =
      report.state === 'failed'
        ? 'failed'
        : report.state === 'succeeded'
          ? 'starting'
          : run.state === 'queued'
            ? 'syncing'
            : run.state;
  } else if (job.kind === 'failover' && report.state === 'running' && spec.planned) {
    const sync = await vault.db
      .selectFrom('jobs')
      .select('state')
      .where('targetId', '=', run.id)
      .where('kind', '=', 'final-sync')
      .executeTakeFirst();
    state = sync?.state === 'succeeded' ? 'starting' : 'syncing';
  }
  // A failed or cleaned-up run stays so, except through a cleanup or a change of point.
  if (
    FINAL.includes(run.state) &&
    !['test-failover-cleanup', 'failover-change-point'].includes(job.kind)
  ) {
    state = run.state;
  }
  const machines = JSON.parse(run.machines) as RunMachine[];
  const reported = (report.result?.['machines'] as ReportedMachine[] | undefined) ?? [];
  const artifacts = await vault.db
    .selectFrom('jobArtifacts')
    .select(['name'])
    .where('jobId', '=', job.id)
    .execute();
  for (const m of machines) {
    const r = reported.find((x) => x.name === m.name);
    if (r?.verification !== undefined) m.verification = r.verification;
    if (r?.localDisks !== undefined) m.localDisks = r.localDisks;
    for (const a of artifacts) {
      const url = `/api/jobs/${job.id}/artifacts/${a.name}`;
      if (a.name === `${m.name}-screenshot`) m.artifacts.screenshot = url;
      if (a.name === `${m.name}-console`) m.artifacts.console = url;
    }
    if (report.state === 'succeeded') {
      if (job.kind === 'failover-change-point' && params.points !== undefined) {
        m.points = params.points;
        m.verification = null;
      }
      if (job.kind === 'failover' && r?.pointIds !== undefined && m.points.length === 0) {
        // A planned failover: the points of the last sync, as the catalogue has them.
        const rows = await vault.db
          .selectFrom('recoveryPoints')
          .selectAll()
          .where('id', 'in', r.pointIds)
          .execute();
        m.points = r.pointIds.map((pid) => {
          const row = rows.find((x) => x.id === pid);
          return row !== undefined
            ? toRunPoint(row)
            : { id: pid, disk: '?', time: '', kind: 'crash', cut: null };
        });
      }
    }
  }
  const instance = report.result?.['instanceId'];
  const error =
    report.state === 'failed'
      ? JSON.stringify({
          details: {},
          ...(report.error ?? { code: 'LB_VAULT_JOB_FAILED', message: 'The job failed.' }),
        })
      : report.state === 'succeeded' && job.kind !== 'final-sync'
        ? null
        : run.error;
  await vault.db
    .updateTable('recoveryRuns')
    .set({
      state,
      machines: JSON.stringify(machines),
      error,
      ...(typeof instance === 'string' ? { hostInstance: instance } : {}),
      updatedAt: nowIso(),
    })
    .where('id', '=', run.id)
    .execute();
  if (job.kind === 'failover' && report.state === 'succeeded') {
    for (const m of machines) {
      const item = await vault.db
        .selectFrom('protectedItems')
        .selectAll()
        .where('id', '=', m.protectedItemId)
        .executeTakeFirst();
      if (item === undefined) continue;
      await transition(
        vault,
        item,
        'failed-over',
        `${spec.planned ? 'planned ' : ''}failover ${run.id} booted points ${m.points.map((p) => p.id.slice(0, 12)).join(', ')} on the recovery host`,
        actor,
        { generation: item.generation + 1 },
      ).catch((err: unknown) =>
        vault.log.warn(
          { err, run: run.id, item: item.id },
          'failover booted but the item could not become failed-over',
        ),
      );
    }
  }
}

/**
 * A recovery host's heartbeat names its process instance: runs it held under another instance
 * are gone (a restart stops their machines), so they fail with LB_VAULT_RECOVERY_RUN_LOST.
 */
export async function recoveryHostInstance(
  vault: VaultContext,
  hostId: string,
  instanceId: string,
): Promise<void> {
  const lost = await vault.db
    .selectFrom('recoveryRuns')
    .selectAll()
    .where('recoveryHostId', '=', hostId)
    .where('state', 'not in', FINAL)
    .where('hostInstance', 'is not', null)
    .where('hostInstance', '!=', instanceId)
    .execute();
  for (const run of lost) {
    const error = {
      code: 'LB_VAULT_RECOVERY_RUN_LOST',
      message: `The recovery host restarted, which stopped the machines of ${run.kind} ${run.id}. Start it again; a test failover can still be cleaned up (it removes what is left).`,
      details: { recoveryHostId: hostId, previousInstance: run.hostInstance, instance: instanceId },
    };
    await vault.db
      .updateTable('recoveryRuns')
      .set({ state: 'failed', error: JSON.stringify(error), updatedAt: nowIso() })
      .where('id', '=', run.id)
      .where('state', '=', run.state)
      .execute();
  }
}

/** A recovery host's desired state: the operations queued for it, and the stores they read. */
export async function recoveryHostAssignments(
  vault: VaultContext,
  hostId: string,
): Promise<Record<string, unknown>> {
  const jobs = await vault.db
    .selectFrom('jobs')
    .selectAll()
    .where('leaseOwner', '=', componentLeaseOwner(hostId))
    .where('state', 'in', ['queued', 'running'])
    .orderBy('id')
    .execute();
  const operations = [];
  const storeIds = new Set<string>();
  for (const j of jobs) {
    const params = JSON.parse(j.params) as {
      runId?: string;
      spec?: Record<string, unknown>;
    };
    if (params.runId === undefined) continue;
    const spec = params.spec ?? {};
    const ms = [
      ...((spec['machines'] as Array<{ targetStoreId?: string }> | undefined) ?? []),
      ...(spec['machine'] !== undefined && typeof spec['machine'] === 'object'
        ? [spec['machine'] as { targetStoreId?: string }]
        : []),
    ];
    for (const m of ms) if (m.targetStoreId !== undefined) storeIds.add(m.targetStoreId);
    const planned = spec['planned'] as { finalSyncJobId?: string } | undefined;
    let finalSync: Record<string, unknown> | undefined;
    if (planned?.finalSyncJobId !== undefined) {
      const fs = await vault.db
        .selectFrom('jobs')
        .selectAll()
        .where('id', '=', planned.finalSyncJobId)
        .executeTakeFirst();
      finalSync = {
        jobId: planned.finalSyncJobId,
        state: fs?.state ?? 'failed',
        result: fs?.result === null || fs === undefined ? null : (JSON.parse(fs.result) as unknown),
        error: fs?.error === null || fs === undefined ? null : (JSON.parse(fs.error) as unknown),
      };
    }
    operations.push({
      jobId: j.id,
      kind: j.kind,
      state: j.state,
      runId: params.runId,
      runKind: j.targetType,
      spec,
      ...(finalSync !== undefined ? { finalSync } : {}),
    });
  }
  // Runs whose machines still run on this host need their stores for later operations too.
  const runs = await vault.db
    .selectFrom('recoveryRuns')
    .select(['machines'])
    .where('recoveryHostId', '=', hostId)
    .where('state', 'not in', FINAL)
    .execute();
  for (const r of runs) {
    for (const m of JSON.parse(r.machines) as RunMachine[]) storeIds.add(m.targetStoreId);
  }
  const stores =
    storeIds.size === 0
      ? []
      : await vault.db
          .selectFrom('targetStores')
          .selectAll()
          .where('id', 'in', [...storeIds])
          .execute();
  return {
    operations,
    targetStores: stores.map((s) => ({
      id: s.id,
      kind: s.kind,
      path: s.path,
      container: s.container,
      connectionString: s.connectionSealed === null ? null : vault.secrets.open(s.connectionSealed),
      passphrase: vault.secrets.open(s.passphraseSealed),
    })),
  };
}

/** The operations (final syncs) queued for a process server, for its assignments. */
export async function processServerOperations(
  vault: VaultContext,
  processServerId: string,
): Promise<Array<Record<string, unknown>>> {
  const jobs = await vault.db
    .selectFrom('jobs')
    .selectAll()
    .where('leaseOwner', '=', componentLeaseOwner(processServerId))
    .where('state', 'in', ['queued', 'running'])
    .orderBy('id')
    .execute();
  return jobs
    .map((j) => ({ j, params: JSON.parse(j.params) as { runId?: string; spec?: unknown } }))
    .filter((x) => x.params.runId !== undefined)
    .map(({ j, params }) => ({
      jobId: j.id,
      kind: j.kind,
      state: j.state,
      runId: params.runId,
      spec: params.spec ?? {},
    }));
}

/** Throws unless `id` names a job. */
export async function requireJob(vault: VaultContext, id: string): Promise<JobRow> {
  const job = await vault.db.selectFrom('jobs').selectAll().where('id', '=', id).executeTakeFirst();
  if (job === undefined) throw notFound('job', id);
  return job;
}
