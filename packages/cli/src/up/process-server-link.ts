import type { CommittedCut, ProcessServer } from '@lifeboat/process-server';
import type { ApiObject, VaultApi } from './vault-api.js';

/** One item of the process server's assignments (`GET /api/components/self/assignments`). */
export interface AssignedItem {
  id: string;
  state: string;
  desired: 'replicate' | 'stop';
  generation: number;
  appliedGeneration: number;
  /** The store's machine id of the item's points (the vault's machine id). */
  storeMachine: string;
  machine: { id: string; name: string; externalId: string; endpoint: string | null };
  disks: Array<{ name: string; sizeBytes: number }>;
  policy: {
    crashConsistentIntervalSeconds: number;
    appConsistentIntervalSeconds: number | null;
    rpoThresholdSeconds: number;
  };
  targetStoreId: string;
}

/** A machine found on a KVM host's QMP endpoint, for the inventory. */
export interface DiscoveredMachine {
  externalId: string;
  name: string;
  endpoint: string;
  disks: Array<{ name: string; sizeBytes: number }>;
}

/** What the link asks of the agents `up` runs. */
export interface AgentControl {
  /** Starts replicating an item (an agent on its QMP endpoint, to this process server). */
  replicate(item: AssignedItem): Promise<void>;
  /** Stops replicating an item. */
  stop(itemId: string): Promise<void>;
  /** Bytes of initial replication done per disk, when known. */
  initialDone(itemId: string): Map<string, number> | undefined;
  /** Reads the machines behind QMP endpoints. */
  discover(endpoints: Array<{ name: string; qmp: string }>): Promise<DiscoveredMachine[]>;
}

/** Options of {@link ProcessServerLink}. */
export interface ProcessServerLinkOptions {
  /** The vault API with the process server's component token. */
  api: VaultApi;
  server: ProcessServer;
  agents: AgentControl;
  /** How often it polls the assignments and sends a heartbeat. @default 2000 */
  intervalMs?: number;
  /**
   * The vault's id of the store this process server writes to, for points of machines not yet
   * in its assignments (cuts replayed from the journal right after a restart).
   */
  targetStoreId: string;
  /** Reports a failed round (the vault unreachable, an agent that cannot start). */
  onError?: (err: unknown) => void;
}

/**
 * The process server's side of the control flow (docs/architecture.md, "Control flow"): polls
 * its assignments, starts and stops agents for them, answers discovery requests with an
 * inventory, sends heartbeats with health and item reports, and upserts every committed point
 * into the vault's catalogue. The process server package does not call the vault yet, so
 * `lifeboat up` runs this beside it; it uses only the vault's component routes.
 */
export class ProcessServerLink {
  private readonly items = new Map<string, AssignedItem>();
  private readonly running = new Set<string>();
  private readonly resync = new Map<string, string>();
  private pending: Array<{ targetStoreId: string; point: ApiObject }> = [];
  private timer: NodeJS.Timeout | undefined;
  private round: Promise<void> = Promise.resolve();
  private stopped = false;
  /** The process server it speaks for; undefined while that is down (no heartbeat then). */
  private server: ProcessServer | undefined;
  private readonly onCommitted = (cut: CommittedCut): void => this.committed(cut);
  private readonly onResync = (e: { machine: string; reason: string }): void => {
    this.resync.set(e.machine, e.reason);
  };

  constructor(private readonly options: ProcessServerLinkOptions) {
    this.server = options.server;
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
    const tick = (): void => {
      this.round = this.round.then(() => this.once()).catch((err) => this.options.onError?.(err));
    };
    this.timer = setInterval(tick, this.options.intervalMs ?? 2000);
    tick();
  }

  /** Runs one round now and waits for it (tests and the demo use it to avoid waiting). */
  async sync(): Promise<void> {
    this.round = this.round.then(() => this.once());
    await this.round;
  }

  /** Stops polling, sends the points still pending, and stops the agents it started. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    clearInterval(this.timer);
    this.server?.off('committed', this.onCommitted);
    this.server?.off('resync-required', this.onResync);
    await this.round.catch(() => undefined);
    await this.flushPoints().catch(() => undefined);
    for (const id of [...this.running]) await this.options.agents.stop(id).catch(() => undefined);
    this.running.clear();
  }

  private committed(cut: CommittedCut): void {
    const item = [...this.items.values()].find((i) => i.storeMachine === cut.machine);
    for (const p of cut.points) {
      this.pending.push({
        targetStoreId: item?.targetStoreId ?? this.options.targetStoreId,
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

  private async flushPoints(): Promise<void> {
    while (this.pending.length > 0) {
      const batch = this.pending;
      const byStore = new Map<string, ApiObject[]>();
      for (const p of batch)
        byStore.set(p.targetStoreId, [...(byStore.get(p.targetStoreId) ?? []), p.point]);
      for (const [targetStoreId, points] of byStore) {
        await this.options.api.call('PUT', '/api/recovery-points', { targetStoreId, points });
      }
      // Only what was sent leaves the queue; a failure keeps it for the next round.
      this.pending = this.pending.slice(batch.length);
    }
  }

  private async once(): Promise<void> {
    const server = this.server;
    if (this.stopped || server === undefined) return;
    const { api, agents } = this.options;
    const a = await api.call<{
      items: AssignedItem[];
      discovery: Array<{ sourceHostId: string; endpoints: Array<{ name: string; qmp: string }> }>;
    }>('GET', '/api/components/self/assignments');
    for (const d of a.discovery) {
      const machines = await agents.discover(d.endpoints);
      await api.call('PUT', `/api/source-hosts/${encodeURIComponent(d.sourceHostId)}/inventory`, {
        machines,
      });
    }
    const reports: ApiObject[] = [];
    const health = server.healthReport();
    for (const item of a.items) {
      this.items.set(item.id, item);
      if (item.desired === 'replicate' && !this.running.has(item.id)) {
        // One machine that cannot be protected (its QEMU is gone) must not stop the heartbeat
        // and the other items: it is reported and tried again next round.
        try {
          await agents.replicate(item);
          this.running.add(item.id);
        } catch (err) {
          this.options.onError?.(err);
        }
      } else if (item.desired === 'stop' && this.running.has(item.id)) {
        await agents.stop(item.id);
        this.running.delete(item.id);
      }
      const m = health.machines.find((x) => x.machine === item.storeMachine);
      const done = agents.initialDone(item.id);
      const reason = this.resync.get(item.storeMachine);
      reports.push({
        id: item.id,
        appliedGeneration: item.generation,
        ...(item.state === 'enabling' && this.running.has(item.id)
          ? { state: 'initial-replication' }
          : {}),
        ...(reason !== undefined && item.state !== 'resync-needed'
          ? { state: 'resync-needed', reason }
          : {}),
        ...(m !== undefined
          ? { backlogBytes: m.backlogBytes, throughputBps: m.bytesPerSecondIn }
          : {}),
        ...(done !== undefined
          ? { disks: [...done].map(([name, bytes]) => ({ name, initialDoneBytes: bytes })) }
          : {}),
      });
      if (reason !== undefined) this.resync.delete(item.storeMachine);
      if (item.desired === 'stop') this.items.delete(item.id);
    }
    await this.flushPoints();
    await api.call('POST', '/api/components/self/heartbeat', {
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
}
