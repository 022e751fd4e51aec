import { EventEmitter } from 'node:events';
import { access } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { LifeboatError, ReplicationClient } from '@lifeboat/protocol';
import { QmpClient } from '@lifeboat/qmp';
import { Agent } from './agent.js';
import type { AgentStatus, CutReport, SyncProgressReport } from './agent.js';
import type { AgentLogger } from './agent-options.js';
import { discoverDisks } from './disk-discovery.js';

/** One machine the vault assigned to an agent (a protected item), as its process server hands it on. */
export interface MachineAssignment {
  /** The protected item's id. */
  id: string;
  /** The item's generation: it changes when its policy or disks do. */
  generation: number;
  /** The store's machine id of the item's points (the vault's machine id). */
  storeMachine: string;
  machine: { name: string; endpoint: string | null };
  disks: Array<{ name: string }>;
  consistencyGroup?: string | null;
  policy: {
    crashConsistentIntervalSeconds: number;
    appConsistentIntervalSeconds: number | null;
  };
}

/** Where an assigned machine's changes go. */
export interface AssignedMachineTarget {
  /** The process server's host and port, and the name its certificate carries. */
  processServer: { host: string; port: number; servername?: string };
  /** This agent's client certificate and key, and the CA of the process server's (PEM). */
  tls: { ca: string | Buffer; cert: string | Buffer; key: string | Buffer };
  /** Parent of the per-machine state directories (`<stateDir>/<storeMachine>`). */
  stateDir: string;
  /** Grace for a stop that waits for an acknowledgement (process server gone). @default 10000 */
  stopGraceMs?: number;
  logger?: AgentLogger;
}

async function exists(path: string): Promise<boolean> {
  return access(path).then(
    () => true,
    () => false,
  );
}

/** The replication settings of an assignment: equal ones need no restart. */
function settingsOf(a: MachineAssignment): string {
  return JSON.stringify({
    m: a.storeMachine,
    e: a.machine.endpoint,
    d: a.disks.map((d) => d.name),
    g: a.consistencyGroup ?? null,
    c: a.policy.crashConsistentIntervalSeconds,
    a: a.policy.appConsistentIntervalSeconds,
  });
}

/**
 * One assigned machine replicating to its process server: an {@link Agent} on the machine's
 * QMP socket and a {@link ReplicationClient} over mutual TLS. QEMU's sockets are found by the
 * convention QEMU launchers here use: the guest agent at `qga.sock` and an NBD server QEMU
 * already runs (qemu-storage-daemon's `--nbd-server`) at `nbd.sock`, beside the QMP socket.
 * Without a guest agent, points are crash-consistent. Events (forwarded from the agent):
 * `progress`, `cut`, `warning`, `failed`.
 */
export class AssignedMachine extends EventEmitter {
  /** Bytes of initial replication done per disk. */
  readonly initialDone = new Map<string, number>();
  private failure: LifeboatError | undefined;

  private constructor(
    readonly assignment: MachineAssignment,
    private readonly agent: Agent,
    private readonly client: ReplicationClient,
    private readonly stopGraceMs: number,
  ) {
    super();
  }

  /** Starts replicating; resolves once the agent runs (its initial copy goes on in the background). */
  static async start(
    assignment: MachineAssignment,
    target: AssignedMachineTarget,
  ): Promise<AssignedMachine> {
    const qmpSocket = assignment.machine.endpoint;
    if (qmpSocket === null) {
      throw new LifeboatError(
        'LB_AGENT_NO_ENDPOINT',
        `Machine ${assignment.machine.name} has no QMP endpoint, so no agent can protect it. Give its KVM host the machine's QMP socket (lifeboat vault host update <id> --qmp name=path).`,
        { details: { item: assignment.id, machine: assignment.storeMachine } },
      );
    }
    const only = assignment.disks.map((d) => d.name);
    const probe = await QmpClient.connect({ path: qmpSocket });
    const disks = await discoverDisks(probe, only.length > 0 ? only : undefined).finally(() =>
      probe.close(),
    );
    if (disks.length === 0) {
      throw new LifeboatError(
        'LB_AGENT_NO_DISKS',
        `QEMU at ${qmpSocket} has none of the disks ${only.join(', ')} of machine ${assignment.machine.name}. Discover the KVM host again (lifeboat vault host discover).`,
        { details: { qmp: qmpSocket, disks: only } },
      );
    }
    const { processServer: ps, tls } = target;
    const client = new ReplicationClient({
      host: ps.host,
      port: ps.port,
      ...(ps.servername !== undefined ? { servername: ps.servername } : {}),
      ca: tls.ca,
      cert: tls.cert,
      key: tls.key,
      machine: assignment.storeMachine,
      disks: disks.map((d) => ({ name: d.name, size: d.size })),
    });
    const appEvery = assignment.policy.appConsistentIntervalSeconds;
    const beside = dirname(qmpSocket);
    const qga = join(beside, 'qga.sock');
    const nbd = join(beside, 'nbd.sock');
    const hasQga = await exists(qga);
    const stopGraceMs = target.stopGraceMs ?? 10_000;
    const agent = new Agent({
      qmpSocket,
      machine: assignment.storeMachine,
      sink: client,
      stateDir: join(target.stateDir, assignment.storeMachine),
      intervalMs: Math.max(1, assignment.policy.crashConsistentIntervalSeconds) * 1000,
      disks: disks.map((d) => d.name),
      stopGraceMs,
      ...((await exists(nbd)) ? { nbdSocket: nbd } : {}),
      ...(assignment.consistencyGroup ? { consistencyGroup: assignment.consistencyGroup } : {}),
      ...(hasQga && appEvery !== null && appEvery > 0
        ? { appConsistentIntervalMs: appEvery * 1000, guestAgentSocket: qga }
        : {}),
      ...(target.logger !== undefined ? { logger: target.logger } : {}),
    });
    const running = new AssignedMachine(assignment, agent, client, stopGraceMs);
    agent.on('progress', (p: SyncProgressReport) => {
      if (p.kind === 'initial') running.initialDone.set(p.disk, p.doneBytes);
      running.emit('progress', p);
    });
    agent.on('cut', (c: CutReport) => running.emit('cut', c));
    agent.on('warning', (w: unknown) => running.emit('warning', w));
    agent.once('failed', (e: LifeboatError) => {
      running.failure = e;
      running.emit('failed', e);
    });
    client.once('failed', (e: LifeboatError) => {
      running.failure ??= e;
      running.emit('failed', e);
      void agent.stop();
    });
    void client.start().catch(() => undefined);
    try {
      await agent.start();
    } catch (err) {
      await client.close();
      throw err;
    }
    return running;
  }

  /** True when `a` replicates the same way (a new generation with the same settings needs no restart). */
  sameSettings(a: MachineAssignment): boolean {
    return settingsOf(a) === settingsOf(this.assignment);
  }

  /** The failure that stopped replication, if one did. */
  get failed(): LifeboatError | undefined {
    return this.failure;
  }

  /** What the agent does now. */
  status(): AgentStatus {
    return this.agent.status();
  }

  /** Uses a renewed certificate from the next connection on. */
  setTls(tls: { ca: string | Buffer; cert: string | Buffer; key: string | Buffer }): void {
    this.client.setTls(tls);
  }

  /** A planned failover's last cut: the guest is paused and cut at once (see Agent.finalCut). */
  finalCut(): Promise<CutReport> {
    return this.agent.finalCut();
  }

  /** Stops replicating and quits the paused source machine (see Agent.quitSource). */
  async quitSource(): Promise<void> {
    try {
      await this.agent.quitSource();
    } finally {
      await this.client.close();
    }
  }

  /**
   * Stops cleanly (QEMU's bitmaps stay, so a later start continues where this one ended). An
   * agent waiting for an acknowledgement that cannot come (process server gone) gives up after
   * its grace period.
   */
  async stop(): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const grace = new Promise<void>(
      (resolve) => (timer = setTimeout(resolve, this.stopGraceMs * 2)),
    );
    await Promise.race([this.agent.stop().catch(() => undefined), grace]);
    clearTimeout(timer);
    await this.client.close();
  }
}
