import { EventEmitter } from 'node:events';
import { AssignedMachine, discoverMachines } from '@lifeboat/agent';
import type { CutReport, InventoryMachine, SyncProgressReport } from '@lifeboat/agent';
import type {
  AgentControl,
  AgentItemStatus,
  AssignedItem,
  DiscoveryRequest,
} from '@lifeboat/process-server';
import { LifeboatError } from '@lifeboat/protocol';
import type { ComponentCredentials } from './component-credentials.js';

interface Running {
  machine: AssignedMachine;
  generation: number;
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
 * The agent role inside `lifeboat up`: one {@link AssignedMachine} per protected machine of this
 * host, started, restarted (policy changed) and stopped when the vault's assignments say so,
 * streaming over mutual TLS to the process server like a separately installed agent. The
 * process server's link drives it directly (one process), where a separate installation's
 * agent polls its process server (`ManagedAgent`). Events: `cut` (item id, CutReport),
 * `progress` (item id, SyncProgressReport), `warning` (item id, { code, message }), `failed`
 * (item id, LifeboatError).
 */
export class LocalAgents extends EventEmitter implements AgentControl {
  private readonly agents = new Map<string, Running>();

  constructor(private readonly options: LocalAgentsOptions) {
    super();
  }

  async discover(request: DiscoveryRequest): Promise<InventoryMachine[]> {
    const known = new Map<string, InventoryMachine>();
    for (const r of this.agents.values()) {
      const a = r.machine.assignment;
      if (a.machine.endpoint === null) continue;
      known.set(a.machine.endpoint, {
        externalId: a.machine.name,
        name: a.machine.name,
        endpoint: a.machine.endpoint,
        disks: r.machine.status().disks.map((d) => ({ name: d.name, sizeBytes: d.size })),
      });
    }
    return discoverMachines(request.endpoints, { known });
  }

  async replicate(item: AssignedItem): Promise<void> {
    const running = this.agents.get(item.id);
    if (running !== undefined) {
      if (running.machine.failed === undefined && running.machine.sameSettings(item)) {
        running.generation = item.generation;
        return;
      }
      // New intervals (policy changed) or a failed agent: start it again.
      await this.stop(item.id);
    }
    const { processServer: ps, credentials } = this.options;
    const machine = await AssignedMachine.start(item, {
      processServer: { host: ps.host, port: ps.port, servername: ps.name },
      tls: { ca: credentials.ca, cert: credentials.cert, key: credentials.key },
      stateDir: this.options.stateDir,
    });
    machine.on('progress', (p: SyncProgressReport) => this.emit('progress', item.id, p));
    machine.on('cut', (c: CutReport) => this.emit('cut', item.id, c));
    machine.on('warning', (w: unknown) => this.emit('warning', item.id, w));
    machine.once('failed', (e: LifeboatError) => this.emit('failed', item.id, e));
    this.agents.set(item.id, { machine, generation: item.generation });
  }

  async stop(itemId: string): Promise<void> {
    const r = this.agents.get(itemId);
    if (r === undefined) return;
    this.agents.delete(itemId);
    await r.machine.stop();
  }

  status(itemId: string): AgentItemStatus | undefined {
    const r = this.agents.get(itemId);
    if (r === undefined) return undefined;
    return {
      running: r.machine.failed === undefined,
      appliedGeneration: r.generation,
      initialDone: r.machine.initialDone,
    };
  }

  async finalCut(itemId: string): Promise<{ cutId: string }> {
    return this.running(itemId).machine.finalCut();
  }

  async quitSource(itemId: string): Promise<void> {
    const r = this.running(itemId);
    this.agents.delete(itemId);
    await r.machine.quitSource();
  }

  private running(itemId: string): Running {
    const r = this.agents.get(itemId);
    if (r === undefined) {
      throw new LifeboatError(
        'LB_UP_NOT_REPLICATING',
        `No agent of lifeboat up replicates item ${itemId}, so it cannot take the last cut of a planned failover.`,
        { details: { item: itemId } },
      );
    }
    return r;
  }

  /** Stops every agent. */
  async close(): Promise<void> {
    for (const id of [...this.agents.keys()]) await this.stop(id);
  }
}
