import { EventEmitter } from 'node:events';
import type { IncomingMessage, ServerResponse } from 'node:http';
import { LifeboatError, isLifeboatError } from '@lifeboat/protocol';
import type { VaultClient } from '@lifeboat/protocol';
import type { Logger } from 'pino';
import type { PeerIdentity } from './process-server-options.js';
import type {
  AgentControl,
  AgentItemStatus,
  AssignedItem,
  DiscoveredMachine,
  DiscoveryRequest,
} from './vault-link.js';

/** One item as an agent sees it in `GET /agent/v1/assignments`. */
export interface AgentAssignedItem {
  id: string;
  desired: 'replicate' | 'stop';
  generation: number;
  storeMachine: string;
  machine: { id: string; name: string; endpoint: string | null };
  disks: Array<{ name: string; sizeBytes: number }>;
  consistencyGroup: string | null;
  policy: {
    crashConsistentIntervalSeconds: number;
    appConsistentIntervalSeconds: number | null;
  };
}

/** What `GET /agent/v1/assignments` answers. */
export interface AgentAssignments {
  agentId: string;
  items: AgentAssignedItem[];
  discovery: Array<{
    sourceHostId: string;
    requestId: string;
    endpoints: Array<{ name: string; qmp: string }>;
  }>;
  /**
   * A planned failover's source side, per item: `cut` (pause the source and cut at once),
   * then `quit` (stop replicating it and quit the source). Absent from older process servers.
   */
  finalSyncs?: Array<{ itemId: string; requestId: string; phase: 'cut' | 'quit' }>;
}

/** What an agent reports of one final sync it was asked for. */
export interface AgentFinalSyncReport {
  itemId: string;
  requestId: string;
  /** The last cut's id, once it is acknowledged. */
  cutId?: string;
  /** The source is quit. */
  stopped?: boolean;
  error?: { code: string; message: string };
}

/** What an agent reports of one item in `POST /agent/v1/report`. */
export interface AgentItemReport {
  id: string;
  running: boolean;
  generation?: number;
  phase?: string;
  initial?: Array<{ disk: string; doneBytes: number }>;
  error?: { code: string; message: string };
}

/** The body of `POST /agent/v1/report`. */
export interface AgentReport {
  items: AgentItemReport[];
  inventories?: Array<{ sourceHostId: string; requestId: string; machines: DiscoveredMachine[] }>;
  finalSyncs?: AgentFinalSyncReport[];
  version?: string;
}

/** Options of {@link AgentHub}. */
export interface AgentHubOptions {
  /** The vault (no token): registrations and agents' own calls are relayed to it. */
  vault: VaultClient;
  logger: Logger;
  /** A report older than this says nothing about what an agent runs. @default 60000 */
  reportTtlMs?: number;
  /** How often an agent's heartbeat is relayed to the vault. @default 10000 */
  heartbeatEveryMs?: number;
}

interface AgentState {
  reportedAt: number;
  items: Map<string, AgentItemReport>;
  heartbeatAt: number;
}

const MAX_BODY = 4 * 1024 * 1024;

class HttpError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

function readJson(req: IncomingMessage): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on('data', (c: Buffer) => {
      size += c.length;
      if (size > MAX_BODY) {
        reject(new HttpError(413, 'LB_PS_BAD_REQUEST', 'The request body is too large.'));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on('end', () => {
      const text = Buffer.concat(chunks).toString('utf8');
      if (text === '') return resolve({});
      try {
        resolve(JSON.parse(text));
      } catch {
        reject(new HttpError(400, 'LB_PS_BAD_REQUEST', 'The request body is not JSON.'));
      }
    });
    req.on('error', reject);
  });
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function bad(field: string, why: string): HttpError {
  return new HttpError(400, 'LB_PS_BAD_REQUEST', `Invalid ${field}: ${why}.`);
}

/** Checks the shape of an agent's report (the agent is authenticated, not trusted to be right). */
function parseReport(v: unknown): AgentReport {
  if (!isObject(v) || !Array.isArray(v['items'])) throw bad('body.items', 'give an array');
  const items: AgentItemReport[] = v['items'].map((raw, i) => {
    if (!isObject(raw) || typeof raw['id'] !== 'string' || typeof raw['running'] !== 'boolean')
      throw bad(`body.items.${i}`, 'give { id, running }');
    const initial = Array.isArray(raw['initial'])
      ? raw['initial'].filter(
          (d): d is { disk: string; doneBytes: number } =>
            isObject(d) && typeof d['disk'] === 'string' && typeof d['doneBytes'] === 'number',
        )
      : undefined;
    const err = raw['error'];
    return {
      id: raw['id'],
      running: raw['running'],
      ...(typeof raw['generation'] === 'number' ? { generation: raw['generation'] } : {}),
      ...(typeof raw['phase'] === 'string' ? { phase: raw['phase'] } : {}),
      ...(initial !== undefined ? { initial } : {}),
      ...(isObject(err) && typeof err['code'] === 'string'
        ? { error: { code: err['code'], message: String(err['message'] ?? '') } }
        : {}),
    };
  });
  const inventories = Array.isArray(v['inventories'])
    ? v['inventories'].map((raw, i) => {
        if (
          !isObject(raw) ||
          typeof raw['sourceHostId'] !== 'string' ||
          typeof raw['requestId'] !== 'string' ||
          !Array.isArray(raw['machines'])
        )
          throw bad(`body.inventories.${i}`, 'give { sourceHostId, requestId, machines }');
        return {
          sourceHostId: raw['sourceHostId'],
          requestId: raw['requestId'],
          machines: raw['machines'] as DiscoveredMachine[],
        };
      })
    : undefined;
  const finalSyncs = Array.isArray(v['finalSyncs'])
    ? v['finalSyncs'].map((raw, i): AgentFinalSyncReport => {
        if (
          !isObject(raw) ||
          typeof raw['itemId'] !== 'string' ||
          typeof raw['requestId'] !== 'string'
        )
          throw bad(`body.finalSyncs.${i}`, 'give { itemId, requestId, cutId?, stopped?, error? }');
        const err = raw['error'];
        return {
          itemId: raw['itemId'],
          requestId: raw['requestId'],
          ...(typeof raw['cutId'] === 'string' ? { cutId: raw['cutId'] } : {}),
          ...(raw['stopped'] === true ? { stopped: true } : {}),
          ...(isObject(err) && typeof err['code'] === 'string'
            ? { error: { code: err['code'], message: String(err['message'] ?? '') } }
            : {}),
        };
      })
    : undefined;
  return {
    items,
    ...(inventories !== undefined ? { inventories } : {}),
    ...(finalSyncs !== undefined ? { finalSyncs } : {}),
    ...(typeof v['version'] === 'string' ? { version: v['version'] } : {}),
  };
}

/**
 * The agents on KVM hosts, as a vault-managed process server sees them. Agents talk only to
 * their process server: over its mTLS port they register (the key is relayed to the vault,
 * which signs their certificate), renew their certificate, read their assignments (the items
 * of machines on their host, keyed by the id in their client certificate) and report what they
 * run and the machines they see. The hub turns the vault link's instructions into those
 * assignments and the agents' reports into item status and inventories. Event: `changed`
 * (an agent reported something the vault should learn of soon).
 */
export class AgentHub extends EventEmitter implements AgentControl {
  private readonly desired = new Map<string, AssignedItem>();
  /** Items to stop, with the agent that ran them, until that agent reports them stopped. */
  private readonly stopping = new Map<string, { agentId: string; item: AssignedItem }>();
  private readonly agents = new Map<string, AgentState>();
  private readonly discoveries = new Map<
    string,
    { agentId: string; requestId: string; endpoints: Array<{ name: string; qmp: string }> }
  >();
  private readonly answers = new Map<
    string,
    { requestId: string; machines: DiscoveredMachine[] }
  >();
  /** Final syncs asked of agents, by item, until the source is quit. */
  private readonly finals = new Map<
    string,
    { agentId: string; requestId: string; phase: 'cut' | 'quit'; answer?: AgentFinalSyncReport }
  >();
  private ready = false;
  private nextRequest = 1;

  constructor(private readonly options: AgentHubOptions) {
    super();
  }

  // --- AgentControl (driven by the vault link) ---

  async replicate(item: AssignedItem): Promise<void> {
    const agentId = item.machine.agentId;
    if (agentId === undefined || agentId === null) {
      throw new LifeboatError(
        'LB_PS_NO_AGENT',
        `Machine ${item.machine.name} (item ${item.id}) is on a KVM host without an agent, so nothing can replicate it. Register an agent on that host and set it: lifeboat vault host update ${item.machine.sourceHostId ?? '<host id>'} --agent <agent id>.`,
        { details: { item: item.id, machine: item.machine.id } },
      );
    }
    const before = this.desired.get(item.id);
    if (before?.machine.agentId && before.machine.agentId !== agentId) {
      // The host changed agents: the old one must let the machine go.
      this.stopping.set(item.id, { agentId: before.machine.agentId, item: before });
    }
    this.desired.set(item.id, item);
  }

  async stop(itemId: string): Promise<void> {
    const item = this.desired.get(itemId) ?? this.stopping.get(itemId)?.item;
    this.desired.delete(itemId);
    const agentId = item?.machine.agentId;
    if (
      item !== undefined &&
      agentId !== undefined &&
      agentId !== null &&
      this.runs(agentId, itemId)
    )
      this.stopping.set(itemId, { agentId, item });
    else this.stopping.delete(itemId);
  }

  status(itemId: string): AgentItemStatus | undefined {
    const item = this.desired.get(itemId) ?? this.stopping.get(itemId)?.item;
    const agentId = item?.machine.agentId;
    if (agentId === undefined || agentId === null) return undefined;
    const r = this.fresh(agentId)?.items.get(itemId);
    if (r === undefined) return { running: false };
    return {
      running: r.running,
      ...(r.generation !== undefined ? { appliedGeneration: r.generation } : {}),
      ...(r.initial !== undefined
        ? { initialDone: new Map(r.initial.map((d) => [d.disk, d.doneBytes])) }
        : {}),
    };
  }

  async discover(request: DiscoveryRequest): Promise<DiscoveredMachine[] | undefined> {
    const agentId = request.agentId;
    if (agentId === undefined || agentId === null) {
      throw new LifeboatError(
        'LB_PS_NO_AGENT',
        `KVM host ${request.sourceHostId} has no agent, and its QMP sockets are only reachable on that host. Register an agent there and set it: lifeboat vault host update ${request.sourceHostId} --agent <agent id>.`,
        { details: { sourceHostId: request.sourceHostId } },
      );
    }
    const pending = this.discoveries.get(request.sourceHostId);
    const answer = this.answers.get(request.sourceHostId);
    if (pending !== undefined && answer?.requestId === pending.requestId) {
      this.discoveries.delete(request.sourceHostId);
      this.answers.delete(request.sourceHostId);
      return answer.machines;
    }
    if (
      pending === undefined ||
      pending.agentId !== agentId ||
      JSON.stringify(pending.endpoints) !== JSON.stringify(request.endpoints)
    ) {
      this.discoveries.set(request.sourceHostId, {
        agentId,
        requestId: `d${this.nextRequest++}-${Date.now().toString(36)}`,
        endpoints: request.endpoints,
      });
    }
    return undefined;
  }

  roundComplete(): void {
    this.ready = true;
  }

  /** Asks the item's agent to pause the source and cut at once; resolves with the cut's id. */
  async finalCut(itemId: string): Promise<{ cutId: string }> {
    const agentId = this.desired.get(itemId)?.machine.agentId;
    if (agentId === undefined || agentId === null) {
      throw new LifeboatError(
        'LB_PS_NOT_REPLICATING',
        `No agent replicates item ${itemId} through this process server, so it cannot take its last cut.`,
        { details: { item: itemId } },
      );
    }
    const requestId = `f${this.nextRequest++}-${Date.now().toString(36)}`;
    this.finals.set(itemId, { agentId, requestId, phase: 'cut' });
    const answer = await this.finalAnswer(itemId, (a) => a.cutId !== undefined);
    return { cutId: answer.cutId! };
  }

  /** Asks the item's agent to stop replicating it and quit its paused source. */
  async quitSource(itemId: string): Promise<void> {
    const f = this.finals.get(itemId);
    if (f === undefined) {
      throw new LifeboatError('LB_PS_NOT_REPLICATING', `No last cut was taken of item ${itemId}.`, {
        details: { item: itemId },
      });
    }
    f.phase = 'quit';
    try {
      await this.finalAnswer(itemId, (a) => a.stopped === true);
    } finally {
      this.finals.delete(itemId);
    }
    // Its source is gone: nothing replicates it any more.
    this.desired.delete(itemId);
    this.stopping.delete(itemId);
  }

  private async finalAnswer(
    itemId: string,
    done: (a: AgentFinalSyncReport) => boolean,
    timeoutMs = 600_000,
  ): Promise<AgentFinalSyncReport> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const f = this.finals.get(itemId);
      const a = f?.answer;
      if (a?.error !== undefined) {
        throw new LifeboatError(a.error.code, `The agent of item ${itemId}: ${a.error.message}`, {
          details: { item: itemId },
        });
      }
      if (a !== undefined && done(a)) return a;
      if (f === undefined || Date.now() > deadline) {
        throw new LifeboatError(
          'LB_PS_FINAL_SYNC_TIMEOUT',
          `The agent of item ${itemId} did not answer the planned failover's request in time. Check that it runs and reaches this process server.`,
          { details: { item: itemId } },
        );
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  /** Refuses a replication session from an agent for a machine assigned to another agent. */
  authorizeSession(peer: PeerIdentity, machine: string): LifeboatError | undefined {
    const item = [...this.desired.values()].find((i) => i.storeMachine === machine);
    const owner = item?.machine.agentId;
    if (owner === undefined || owner === null || owner === peer.id) return undefined;
    return new LifeboatError(
      'LB_PS_AGENT_NOT_ASSIGNED',
      `Machine ${machine} is assigned to agent ${owner}, not to ${peer.id ?? 'this client'}; only the agent of its KVM host may replicate it.`,
      { details: { machine, agent: peer.id, assignedTo: owner } },
    );
  }

  /** What one agent must do now. */
  assignmentsOf(agentId: string): AgentAssignments {
    const view = (i: AssignedItem, desired: 'replicate' | 'stop'): AgentAssignedItem => ({
      id: i.id,
      desired,
      generation: i.generation,
      storeMachine: i.storeMachine,
      machine: { id: i.machine.id, name: i.machine.name, endpoint: i.machine.endpoint },
      disks: i.disks,
      consistencyGroup: i.consistencyGroup ?? null,
      policy: {
        crashConsistentIntervalSeconds: i.policy.crashConsistentIntervalSeconds,
        appConsistentIntervalSeconds: i.policy.appConsistentIntervalSeconds,
      },
    });
    return {
      agentId,
      items: [
        ...[...this.desired.values()]
          .filter((i) => i.machine.agentId === agentId)
          .map((i) => view(i, 'replicate')),
        ...[...this.stopping.values()]
          .filter((s) => s.agentId === agentId)
          .map((s) => view(s.item, 'stop')),
      ],
      discovery: [...this.discoveries]
        .filter(([, d]) => d.agentId === agentId)
        .map(([sourceHostId, d]) => ({
          sourceHostId,
          requestId: d.requestId,
          endpoints: d.endpoints,
        })),
      finalSyncs: [...this.finals]
        .filter(([, f]) => f.agentId === agentId)
        .map(([itemId, f]) => ({ itemId, requestId: f.requestId, phase: f.phase })),
    };
  }

  /** Takes an agent's report: what it runs, and inventories it was asked for. */
  report(agentId: string, report: AgentReport): void {
    const state: AgentState = this.agents.get(agentId) ?? {
      reportedAt: 0,
      items: new Map(),
      heartbeatAt: 0,
    };
    const before = new Map(state.items);
    state.reportedAt = Date.now();
    state.items = new Map(report.items.map((i) => [i.id, i]));
    this.agents.set(agentId, state);
    let changed = false;
    for (const i of report.items) {
      const was = before.get(i.id);
      if (was?.running !== i.running || was?.generation !== i.generation) changed = true;
      if (i.error !== undefined && was?.error?.code !== i.error.code) {
        this.options.logger.warn(
          { agent: agentId, item: i.id, err: i.error },
          'agent reports an item failing',
        );
      }
    }
    for (const [id, s] of this.stopping) {
      if (s.agentId !== agentId || state.items.get(id)?.running === true) continue;
      // The agent let it go: the link reports the stop as applied.
      this.stopping.delete(id);
      changed = true;
    }
    for (const fs of report.finalSyncs ?? []) {
      const f = this.finals.get(fs.itemId);
      if (f?.agentId !== agentId || f.requestId !== fs.requestId) continue;
      f.answer = fs;
    }
    for (const inv of report.inventories ?? []) {
      const pending = this.discoveries.get(inv.sourceHostId);
      if (pending?.agentId !== agentId || pending.requestId !== inv.requestId) continue;
      this.answers.set(inv.sourceHostId, { requestId: inv.requestId, machines: inv.machines });
      changed = true;
    }
    if (changed) this.emit('changed');
  }

  /** Serves the agents' routes on the process server's mTLS port. */
  readonly handle = (req: IncomingMessage, res: ServerResponse, peer: PeerIdentity): void => {
    this.route(req, peer).then(
      ({ status, body }) => {
        res.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(body));
      },
      (err: unknown) => {
        const e =
          err instanceof HttpError
            ? err
            : isLifeboatError(err)
              ? new HttpError(
                  typeof err.details['status'] === 'number' ? err.details['status'] : 502,
                  err.code,
                  err.message,
                )
              : new HttpError(500, 'LB_PS_INTERNAL', (err as Error).message);
        if (e.status >= 500)
          this.options.logger.warn({ err: e.message, code: e.code }, 'agent route failed');
        res
          .writeHead(e.status, { 'content-type': 'application/json' })
          .end(JSON.stringify({ code: e.code, message: e.message, details: {} }));
      },
    );
  };

  private async route(
    req: IncomingMessage,
    peer: PeerIdentity,
  ): Promise<{ status: number; body: unknown }> {
    const path = (req.url ?? '/').split('?')[0];
    const route = `${req.method ?? 'GET'} ${path}`;
    const bearer = /^Bearer (\S+)$/.exec(req.headers.authorization ?? '')?.[1];
    if (route === 'POST /agent/v1/register') {
      // The one route without a client certificate: the agent has none yet.
      const body = await readJson(req);
      if (!isObject(body) || typeof body['key'] !== 'string' || typeof body['name'] !== 'string')
        throw bad('body', 'give { key, name, csr? }');
      const r = await this.options.vault.call('POST', '/api/register', {
        key: body['key'],
        kind: 'agent',
        name: body['name'],
        ...(typeof body['csr'] === 'string' ? { csr: body['csr'] } : {}),
        ...(typeof body['address'] === 'string' ? { address: body['address'] } : {}),
        ...(typeof body['version'] === 'string' ? { version: body['version'] } : {}),
      });
      this.options.logger.info(
        { agent: (r['component'] as { id?: string } | undefined)?.id, name: body['name'] },
        'agent registered through this process server',
      );
      return { status: 201, body: r };
    }
    if (!peer.authorized || peer.id === undefined) {
      throw new HttpError(
        401,
        'LB_PS_AGENT_UNAUTHORIZED',
        `This route needs the agent's client certificate from the vault's CA (${peer.reason ?? 'none presented'}). Register the agent first (lifeboat agent start --registration-key-file ...).`,
      );
    }
    const agentId = peer.id;
    switch (route) {
      case 'GET /agent/v1/assignments':
        if (!this.ready) {
          throw new HttpError(
            503,
            'LB_PS_ASSIGNMENTS_UNKNOWN',
            'The process server has not read its assignments from the vault yet; keep replicating what you replicate and ask again.',
          );
        }
        return { status: 200, body: this.assignmentsOf(agentId) };
      case 'POST /agent/v1/report': {
        const report = parseReport(await readJson(req));
        this.report(agentId, report);
        if (bearer !== undefined) this.relayHeartbeat(agentId, bearer, report.version);
        return { status: 200, body: { ok: true } };
      }
      case 'POST /agent/v1/certificate': {
        if (bearer === undefined) throw bad('authorization', "give the agent's token (Bearer)");
        const body = await readJson(req);
        const csr = isObject(body) && typeof body['csr'] === 'string' ? body['csr'] : undefined;
        const r = await this.options.vault
          .as(bearer)
          .call('POST', '/api/components/self/certificate', csr !== undefined ? { csr } : {});
        return { status: 200, body: r };
      }
      default:
        throw new HttpError(404, 'LB_PS_NOT_FOUND', `No route ${route} on the process server.`);
    }
  }

  private relayHeartbeat(agentId: string, token: string, version: string | undefined): void {
    const state = this.agents.get(agentId);
    const every = this.options.heartbeatEveryMs ?? 10_000;
    if (state === undefined || Date.now() - state.heartbeatAt < every) return;
    state.heartbeatAt = Date.now();
    this.options.vault
      .as(token)
      .call('POST', '/api/components/self/heartbeat', {
        ...(version !== undefined ? { version } : {}),
        health: { items: state.items.size },
      })
      .catch((err: unknown) => {
        state.heartbeatAt = 0;
        this.options.logger.warn(
          { agent: agentId, err: (err as Error).message },
          "cannot relay an agent's heartbeat to the vault",
        );
      });
  }

  private fresh(agentId: string): AgentState | undefined {
    const s = this.agents.get(agentId);
    if (s === undefined) return undefined;
    return Date.now() - s.reportedAt > (this.options.reportTtlMs ?? 60_000) ? undefined : s;
  }

  private runs(agentId: string, itemId: string): boolean {
    return this.fresh(agentId)?.items.get(itemId)?.running === true;
  }
}
