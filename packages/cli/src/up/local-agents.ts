import { EventEmitter } from 'node:events';
import { access } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { Agent, discoverDisks } from '@lifeboat/agent';
import type { CutReport, SyncProgressReport } from '@lifeboat/agent';
import { LifeboatError, ReplicationClient } from '@lifeboat/protocol';
import { QmpClient } from '@lifeboat/qmp';
import type { ComponentCredentials } from './component-credentials.js';
import type { AgentControl, AssignedItem, DiscoveredMachine } from './process-server-link.js';

interface Running {
  agent: Agent;
  client: ReplicationClient;
  initial: Map<string, number>;
}

/** Options of {@link LocalAgents}. */
export interface LocalAgentsOptions {
  /** Where the process server listens (loopback). */
  processServer: { host: string; port: number; name: string };
  /** The agent's credentials from the vault (client certificate, vault CA). */
  credentials: ComponentCredentials;
  /** Parent of the agents' state directories (one per machine). */
  stateDir: string;
}

/**
 * The agent role inside `lifeboat up`: one agent per protected machine of this host, started
 * and stopped when the vault's assignments say so, streaming over mutual TLS to the process
 * server like a separately installed agent. Events: `cut` (item id, CutReport), `progress`
 * (item id, SyncProgressReport), `warning` (item id, { code, message }), `failed` (item id,
 * LifeboatError).
 */
export class LocalAgents extends EventEmitter implements AgentControl {
  private readonly agents = new Map<string, Running>();

  constructor(private readonly options: LocalAgentsOptions) {
    super();
  }

  async discover(endpoints: Array<{ name: string; qmp: string }>): Promise<DiscoveredMachine[]> {
    const machines: DiscoveredMachine[] = [];
    for (const e of endpoints) {
      const qmp = await QmpClient.connect({ path: e.qmp });
      try {
        const disks = await discoverDisks(qmp);
        machines.push({
          externalId: e.name,
          name: e.name,
          endpoint: e.qmp,
          disks: disks.map((d) => ({ name: d.name, sizeBytes: d.size })),
        });
      } finally {
        await qmp.close();
      }
    }
    return machines;
  }

  async replicate(item: AssignedItem): Promise<void> {
    if (this.agents.has(item.id)) return;
    const qmpSocket = item.machine.endpoint;
    if (qmpSocket === null) {
      throw new LifeboatError(
        'LB_UP_NO_ENDPOINT',
        `Machine ${item.machine.name} has no QMP endpoint, so no agent can protect it here. Add it to a KVM host with its QMP socket.`,
        { details: { machine: item.machine.id } },
      );
    }
    const only = item.disks.map((d) => d.name);
    const probe = await QmpClient.connect({ path: qmpSocket });
    const disks = await discoverDisks(probe, only).finally(() => probe.close());
    const { processServer: ps, credentials } = this.options;
    const client = new ReplicationClient({
      host: ps.host,
      port: ps.port,
      servername: ps.name,
      ca: credentials.ca,
      cert: credentials.cert,
      key: credentials.key,
      machine: item.storeMachine,
      disks: disks.map((d) => ({ name: d.name, size: d.size })),
    });
    const appEvery = item.policy.appConsistentIntervalSeconds;
    // A KVM host's endpoint names only the QMP socket; the guest agent's socket is found beside
    // it (`qga.sock`, as QEMU launchers here name it). Without one, points are crash-consistent.
    const qga = join(dirname(qmpSocket), 'qga.sock');
    const hasQga = await access(qga).then(
      () => true,
      () => false,
    );
    const agent = new Agent({
      qmpSocket,
      machine: item.storeMachine,
      sink: client,
      stateDir: join(this.options.stateDir, item.storeMachine),
      intervalMs: Math.max(1, item.policy.crashConsistentIntervalSeconds) * 1000,
      disks: only,
      ...(hasQga && appEvery !== null && appEvery > 0
        ? { appConsistentIntervalMs: appEvery * 1000, guestAgentSocket: qga }
        : {}),
    });
    const running: Running = { agent, client, initial: new Map() };
    agent.on('progress', (p: SyncProgressReport) => {
      if (p.kind === 'initial') running.initial.set(p.disk, p.doneBytes);
      this.emit('progress', item.id, p);
    });
    agent.on('cut', (c: CutReport) => this.emit('cut', item.id, c));
    agent.on('warning', (w: { code: string; message: string }) => this.emit('warning', item.id, w));
    agent.once('failed', (e: LifeboatError) => this.emit('failed', item.id, e));
    client.once('failed', (e: LifeboatError) => {
      this.emit('failed', item.id, e);
      void agent.stop();
    });
    this.agents.set(item.id, running);
    void client.start().catch(() => undefined);
    try {
      await agent.start();
    } catch (err) {
      this.agents.delete(item.id);
      await client.close();
      throw err;
    }
  }

  async stop(itemId: string): Promise<void> {
    const r = this.agents.get(itemId);
    if (r === undefined) return;
    this.agents.delete(itemId);
    // An agent waiting for an acknowledgement that cannot come (process server gone) would
    // wait forever: closing the client after a grace period ends the wait.
    let timer: NodeJS.Timeout | undefined;
    const grace = new Promise<void>((resolve) => (timer = setTimeout(resolve, 10_000)));
    await Promise.race([r.agent.stop().catch(() => undefined), grace]);
    clearTimeout(timer);
    await r.client.close();
  }

  initialDone(itemId: string): Map<string, number> | undefined {
    return this.agents.get(itemId)?.initial;
  }

  /** Stops every agent. */
  async close(): Promise<void> {
    for (const id of [...this.agents.keys()]) await this.stop(id);
  }
}
