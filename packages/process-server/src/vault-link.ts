import { LifeboatError, isLifeboatError } from '@lifeboat/protocol';
import { runFinalSync } from './final-sync.js';
import type { VaultClient, VaultObject } from '@lifeboat/protocol';
import type { CommittedCut } from './machine-replicator.js';
import type { ProcessServer } from './process-server.js';

/** One item of the process server's assignments (`GET /api/components/self/assignments`). */
export interface AssignedItem {
  id: string;
  state: string;
  /** What to do with it; new kinds of instruction are new values here. */
  desired: 'replicate' | 'stop';
  generation: number;
  appliedGeneration: number;
  /** The store's machine id of the item's points (the vault's machine id). */
  storeMachine: string;
  machine: {
    id: string;
    name: string;
    externalId: string;
    /** QMP socket of the machine on its KVM host. */
    endpoint: string | null;
    sourceHostId?: string;
    /** The agent on the machine's KVM host (null: the process server's own agents). */
    agentId?: string | null;
  };
  consistencyGroup?: string | null;
  disks: Array<{ name: string; sizeBytes: number }>;
  policy: {
    crashConsistentIntervalSeconds: number;
    appConsistentIntervalSeconds: number | null;
    rpoThresholdSeconds: number;
  };
  targetStoreId: string;
}

/** A target store as the assignments carry it (secrets unsealed for the process server). */
export interface AssignedStore {
  id: string;
  kind: 'directory' | 'azure';
  path: string | null;
  container: string | null;
  connectionString: string | null;
  passphrase: string;
}

/** A source host whose machines the vault wants discovered. */
export interface DiscoveryRequest {
  sourceHostId: string;
  kind: string;
  /** The agent that reads the host's QMP endpoints (null: the process server's own). */
  agentId?: string | null;
  endpoints: Array<{ name: string; qmp: string }>;
}

/**
 * A job the vault queued for this process server (a planned failover's `final-sync`), reported
 * on its own id (`PUT /api/components/self/jobs/:id`).
 */
export interface AssignedOperation {
  jobId: string;
  kind: string;
  state: 'queued' | 'running';
  runId: string;
  spec: {
    protectedItemId?: string;
    storeMachine?: string;
    disks?: string[];
    stopSource?: boolean;
  };
}

/** The process server's desired state. */
export interface Assignments {
  items: AssignedItem[];
  targetStores: AssignedStore[];
  discovery: DiscoveryRequest[];
  /** Jobs to run (absent from vaults older than planned failover). */
  operations?: AssignedOperation[];
}

/** A machine found on a KVM host's QMP endpoint, for the inventory. */
export interface DiscoveredMachine {
  externalId: string;
  name: string;
  endpoint: string;
  disks: Array<{ name: string; sizeBytes: number }>;
}

/** What an agent does for one item, as the link reports it to the vault. */
export interface AgentItemStatus {
  /** The agent replicates it (initial copy or continuous). */
  running: boolean;
  /** The item generation the agent applies (its policy), when known. */
  appliedGeneration?: number;
  /** Bytes of initial replication done per disk, when known. */
  initialDone?: ReadonlyMap<string, number>;
}

/** The agents a link drives: those `lifeboat up` runs in process, or agents on KVM hosts. */
export interface AgentControl {
  /**
   * Makes the item replicate as assigned: starts it, or restarts it when its policy or disks
   * changed. Called every round for every item to replicate, so it must be idempotent.
   */
  replicate(item: AssignedItem): Promise<void>;
  /** Stops replicating an item (desired `stop`, or no longer assigned). */
  stop(itemId: string): Promise<void>;
  /** What the agent does for the item; undefined when it knows nothing of it. */
  status(itemId: string): AgentItemStatus | undefined;
  /** The machines behind a KVM host's endpoints; undefined while the answer is still on its way. */
  discover(request: DiscoveryRequest): Promise<DiscoveredMachine[] | undefined>;
  /** Called after each round that read the assignments. */
  roundComplete?(): void;
  /**
   * A planned failover's last cut: pause the item's source machine, cut at once, resolve with
   * the cut's id once acknowledged. Agents that cannot leave it out (the job then fails).
   */
  finalCut?(itemId: string): Promise<{ cutId: string }>;
  /** Stop replicating the item and quit its (paused) source machine through QMP. */
  quitSource?(itemId: string): Promise<void>;
}

/** Options of {@link VaultLink}. */
export interface VaultLinkOptions {
  /** The vault API with the process server's component token. */
  api: VaultClient;
  server: ProcessServer;
  agents: AgentControl;
  /** How often it polls the assignments and sends a heartbeat. @default 2000 */
  intervalMs?: number;
  /**
   * The vault's id of the store a machine's points go to, for points of machines not (or no
   * longer) in the assignments, e.g. cuts replayed from the journal right after a restart.
   * Undefined keeps the points until it is known. @default none
   */
  targetStoreOf?: (machine: string) => string | undefined;
  /** Called with the assignments of each round before they are applied (stores, routing). */
  onAssignments?: (assignments: Assignments) => Promise<void>;
  /** Where others reach this process server (`host:port`), sent with each heartbeat. @default none */
  address?: string;
  /** Reports a failed round (the vault unreachable, an agent that cannot start). */
  onError?: (err: unknown) => void;
}

/**
 * The process server's side of the control flow (docs/architecture.md, "Control flow"): polls
 * its assignments, has its agents replicate and stop items, answers discovery requests with
 * an inventory, sends heartbeats with health and item reports, and upserts every committed
 * point into the vault's catalogue. It uses only the vault's component routes.
 */
export class VaultLink {
  private readonly items = new Map<string, AssignedItem>();
  private readonly resync = new Map<string, string>();
  /** Operations started by this instance (job ids). */
  private readonly operations = new Set<string>();
  private readonly running = new Set<Promise<void>>();
  /** Items whose source a final sync stopped: nothing replicates them again here. */
  private readonly finalized = new Set<string>();
  private pending: Array<{
    machine: string;
    targetStoreId: string | undefined;
    point: VaultObject;
  }> = [];
  private timer: NodeJS.Timeout | undefined;
  private round: Promise<void> = Promise.resolve();
  private stopped = false;
  private soon: NodeJS.Timeout | undefined;
  private latest: Assignments | undefined;
  /** The process server it speaks for; undefined while that is down (no heartbeat then). */
  private server: ProcessServer | undefined;
  private readonly onCommitted = (cut: CommittedCut): void => this.committed(cut);
  private readonly onResync = (e: { machine: string; reason: string }): void => {
    this.resync.set(e.machine, e.reason);
  };

  private api: VaultClient;

  constructor(private readonly options: VaultLinkOptions) {
    this.server = options.server;
    this.api = options.api;
  }

  /** Uses another client from now on (a renewed client certificate for an HTTPS vault). */
  setApi(api: VaultClient): void {
    this.api = api;
  }

  /** The assignments of the last successful round, if any. */
  get assignments(): Assignments | undefined {
    return this.latest;
  }

  /**
   * Follows another process server instance (after a restart), or none while it is down: a
   * stopped process server sends no heartbeat, like one whose machine died.
   */
  setServer(server: ProcessServer | undefined): void {
    this.server?.off('committed', this.onCommitted);
    this.server?.off('resync-required', this.onResync);
    this.server = server;
    if (!this.stopped) {
      server?.on('committed', this.onCommitted);
      server?.on('resync-required', this.onResync);
    }
  }

  /** Starts polling (a first round at once). */
  start(): void {
    this.server?.on('committed', this.onCommitted);
    this.server?.on('resync-required', this.onResync);
    this.timer = setInterval(() => this.tick(), this.options.intervalMs ?? 2000);
    this.tick();
  }

  /** Runs a round within `ms` (an agent reported something the vault should learn of soon). */
  syncSoon(ms = 200): void {
    if (this.stopped || this.soon !== undefined) return;
    this.soon = setTimeout(() => {
      this.soon = undefined;
      this.tick();
    }, ms);
  }

  /** Runs one round now and waits for it (tests and the demo use it to avoid waiting). */
  async sync(): Promise<void> {
    this.round = this.round.then(() => this.once());
    await this.round;
  }

  /** Stops polling, sends the points still pending, and stops the agents' items. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    clearInterval(this.timer);
    clearTimeout(this.soon);
    this.server?.off('committed', this.onCommitted);
    this.server?.off('resync-required', this.onResync);
    await this.round.catch(() => undefined);
    await Promise.allSettled([...this.running]);
    await this.flushPoints().catch(() => undefined);
    for (const id of [...this.items.keys()])
      await this.options.agents.stop(id).catch(() => undefined);
    this.items.clear();
  }

  private tick(): void {
    this.round = this.round.then(() => this.once()).catch((err) => this.options.onError?.(err));
  }

  private committed(cut: CommittedCut): void {
    for (const p of cut.points) {
      this.pending.push({
        machine: cut.machine,
        targetStoreId: this.storeOf(cut.machine),
        point: {
          id: p.id,
          machine: p.machine,
          disk: p.disk,
          time: p.time.toISOString(),
          committedAt: p.committedAt.toISOString(),
          kind: p.kind,
          size: p.size,
          ...(p.cut !== undefined ? { cut: p.cut } : {}),
          ...(p.consistencyGroup !== undefined ? { consistencyGroup: p.consistencyGroup } : {}),
          ...(p.parent !== undefined ? { parent: p.parent } : {}),
        },
      });
    }
    // The catalogue is kept in step at once, not at the next round: the RPO the vault shows is
    // the age of the newest point it knows.
    this.round = this.round.then(() => this.flushPoints()).catch((e) => this.options.onError?.(e));
  }

  private storeOf(machine: string): string | undefined {
    const item = [...this.items.values()].find((i) => i.storeMachine === machine);
    return item?.targetStoreId ?? this.options.targetStoreOf?.(machine);
  }

  private async flushPoints(): Promise<void> {
    for (const p of this.pending) p.targetStoreId ??= this.storeOf(p.machine);
    // Points whose store is not known yet wait (a replayed machine before the first round).
    const ready = this.pending.filter((p) => p.targetStoreId !== undefined);
    if (ready.length === 0) return;
    const byStore = new Map<string, VaultObject[]>();
    for (const p of ready) {
      const id = p.targetStoreId as string;
      byStore.set(id, [...(byStore.get(id) ?? []), p.point]);
    }
    const sent = new Set<(typeof ready)[number]>();
    try {
      for (const [targetStoreId, points] of byStore) {
        await this.api.call('PUT', '/api/recovery-points', { targetStoreId, points });
        for (const p of ready) if (p.targetStoreId === targetStoreId) sent.add(p);
      }
    } finally {
      // Only what was sent leaves the queue; a failure keeps the rest for the next round.
      this.pending = this.pending.filter((p) => !sent.has(p));
    }
  }

  private async once(): Promise<void> {
    const server = this.server;
    if (this.stopped || server === undefined) return;
    const { api } = this;
    const { agents } = this.options;
    const a = await api.call<Assignments>('GET', '/api/components/self/assignments');
    this.latest = a;
    await this.options.onAssignments?.(a);
    for (const d of a.discovery) {
      // One host that cannot be read must not stop the others, the items or the heartbeat.
      try {
        const machines = await agents.discover(d);
        if (machines === undefined) continue;
        await api.call('PUT', `/api/source-hosts/${encodeURIComponent(d.sourceHostId)}/inventory`, {
          machines,
        });
      } catch (err) {
        this.options.onError?.(err);
      }
    }
    const assigned = new Set(a.items.map((i) => i.id));
    for (const id of [...this.items.keys()]) {
      if (assigned.has(id)) continue;
      // Moved to another process server or deleted: nothing of it runs here any more.
      this.items.delete(id);
      await agents.stop(id).catch((err: unknown) => this.options.onError?.(err));
    }
    const reports: VaultObject[] = [];
    const health = server.healthReport();
    for (const item of a.items) {
      this.items.set(item.id, item);
      await this.apply(item);
      const st = agents.status(item.id);
      const m = health.machines.find((x) => x.machine === item.storeMachine);
      const reason = this.resync.get(item.storeMachine);
      // The generation counts as applied once the agent runs it (replicate) or has let it go (stop).
      const applied =
        item.desired === 'stop'
          ? st?.running === true
            ? undefined
            : item.generation
          : st?.running === true
            ? (st.appliedGeneration ?? item.generation)
            : undefined;
      reports.push({
        id: item.id,
        ...(applied !== undefined ? { appliedGeneration: applied } : {}),
        ...(item.state === 'enabling' && st?.running === true
          ? { state: 'initial-replication' }
          : {}),
        ...(reason !== undefined && item.state !== 'resync-needed'
          ? { state: 'resync-needed', reason }
          : {}),
        ...(m !== undefined
          ? { backlogBytes: m.backlogBytes, throughputBps: m.bytesPerSecondIn }
          : item.desired === 'stop'
            ? // Stopped and nothing of it in the journal: the vault waits for this before
              // it deletes the item's points.
              { backlogBytes: 0, throughputBps: 0 }
            : {}),
        ...(st?.initialDone !== undefined && st.initialDone.size > 0
          ? {
              disks: [...st.initialDone].map(([name, bytes]) => ({
                name,
                initialDoneBytes: bytes,
              })),
            }
          : {}),
      });
      if (reason !== undefined) this.resync.delete(item.storeMachine);
      if (item.desired === 'stop' && applied !== undefined) this.items.delete(item.id);
    }
    agents.roundComplete?.();
    for (const op of a.operations ?? []) this.operation(op);
    await this.flushPoints();
    await api.call('POST', '/api/components/self/heartbeat', {
      ...(this.options.address !== undefined ? { address: this.options.address } : {}),
      health: {
        journalUsedBytes: health.journal.usedBytes,
        journalCapacityBytes: health.journal.maxBytes,
        storeReachable: health.store.reachable,
        cpuPercent: health.process.cpuPercent,
        memoryBytes: health.process.rssBytes,
      },
      items: reports,
    });
  }

  /** Starts a job the vault queued, once; it runs beside the rounds. */
  private operation(op: AssignedOperation): void {
    if (this.operations.has(op.jobId)) return;
    this.operations.add(op.jobId);
    const p = this.runOperation(op)
      .catch((err: unknown) => this.options.onError?.(err))
      .finally(() => this.running.delete(p));
    this.running.add(p);
  }

  private async runOperation(op: AssignedOperation): Promise<void> {
    const steps: Array<{
      name: string;
      state: 'running' | 'succeeded' | 'failed';
      startedAt: string;
      endedAt?: string;
      durationMs?: number;
      error?: { code: string; message: string };
    }> = [];
    const report = (body: Record<string, unknown>): Promise<unknown> =>
      this.api.call('PUT', `/api/components/self/jobs/${encodeURIComponent(op.jobId)}`, {
        kind: op.kind,
        target: { runId: op.runId, ...op.spec },
        steps,
        ...body,
      });
    const errorOf = (err: unknown): { code: string; message: string } =>
      isLifeboatError(err)
        ? { code: err.code, message: err.message }
        : { code: 'LB_PS_INTERNAL', message: (err as Error).message };
    if (op.state === 'running') {
      // Running, but not in this instance: the process server restarted during it.
      await report({
        state: 'failed',
        error: {
          code: 'LB_PS_RESTARTED',
          message: `The process server restarted during this ${op.kind}; its outcome is unknown (the source may be paused). Check the source machine, then retry.`,
        },
      });
      return;
    }
    const step = async <T>(name: string, fn: () => Promise<T>): Promise<T> => {
      const started = Date.now();
      const s: (typeof steps)[number] = {
        name,
        state: 'running',
        startedAt: new Date(started).toISOString(),
      };
      steps.push(s);
      await report({ state: 'running' }).catch((err: unknown) => this.options.onError?.(err));
      try {
        const v = await fn();
        s.state = 'succeeded';
        return v;
      } catch (err) {
        s.state = 'failed';
        s.error = errorOf(err);
        throw err;
      } finally {
        s.endedAt = new Date().toISOString();
        s.durationMs = Date.now() - started;
      }
    };
    try {
      if (op.kind !== 'final-sync') {
        throw new LifeboatError(
          'LB_PS_UNKNOWN_INSTRUCTION',
          `The vault asks for a ${op.kind}, which this process server does not know; upgrade it.`,
          { details: { kind: op.kind } },
        );
      }
      const result = await this.finalSync(op, step);
      await report({ state: 'succeeded', result });
    } catch (err) {
      await report({ state: 'failed', error: errorOf(err) });
    }
  }

  /** A planned failover's last sync of one item (see runFinalSync). */
  private async finalSync(
    op: AssignedOperation,
    step: <T>(name: string, fn: () => Promise<T>) => Promise<T>,
  ): Promise<Record<string, unknown>> {
    const { agents } = this.options;
    const itemId = op.spec.protectedItemId ?? '';
    const item = this.items.get(itemId);
    const server = this.server;
    if (item === undefined || server === undefined) {
      throw new LifeboatError(
        'LB_PS_NOT_REPLICATING',
        `Protected item ${itemId} is not replicated by this process server now, so it cannot take its last cut.`,
        { details: { item: itemId } },
      );
    }
    const { finalCut, quitSource } = agents;
    if (finalCut === undefined || quitSource === undefined) {
      throw new LifeboatError(
        'LB_PS_UNKNOWN_INSTRUCTION',
        'The agents of this process server cannot take a last cut; upgrade them.',
      );
    }
    const result = await runFinalSync({
      server,
      machine: op.spec.storeMachine ?? item.storeMachine,
      agent: {
        finalCut: () => finalCut.call(agents, itemId),
        quitSource: async () => {
          // From now on nothing replicates the item here (its source is gone).
          this.finalized.add(itemId);
          await quitSource.call(agents, itemId);
        },
      },
      stopSource: op.spec.stopSource ?? true,
      step,
    });
    // The last cut's points reach the catalogue before the vault boots them.
    await this.flushPoints();
    return { ...result };
  }

  /** Carries out one item's instruction. */
  private async apply(item: AssignedItem): Promise<void> {
    const { agents } = this.options;
    try {
      switch (item.desired) {
        case 'replicate':
          if (this.finalized.has(item.id)) break;
          await agents.replicate(item);
          break;
        case 'stop':
          await agents.stop(item.id);
          break;
        default:
          throw new LifeboatError(
            'LB_PS_UNKNOWN_INSTRUCTION',
            `The vault asks item ${item.id} for "${String(item.desired)}", which this process server does not know; upgrade it.`,
            { details: { item: item.id, desired: item.desired } },
          );
      }
    } catch (err) {
      // One machine that cannot be protected (its QEMU is gone) must not stop the heartbeat
      // and the other items: it is reported and tried again next round.
      this.options.onError?.(err);
    }
  }
}
