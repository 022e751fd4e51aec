import { EventEmitter } from 'node:events';
import { mkdir, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import {
  LifeboatError,
  certificateNeedsRenewal,
  createKeyAndCsr,
  isLifeboatError,
  loadComponentIdentity,
  saveComponentIdentity,
} from '@lifeboat/protocol';
import type { ComponentIdentity, IssuedIdentity } from '@lifeboat/protocol';
import type { AgentStatus, CutReport, SyncProgressReport } from './agent.js';
import type { AgentLogger } from './agent-options.js';
import { AssignedMachine } from './assigned-machine.js';
import type { MachineAssignment } from './assigned-machine.js';
import { discoverMachines } from './discover-machines.js';
import type { InventoryMachine } from './discover-machines.js';
import { ProcessServerApi } from './process-server-api.js';

/** Where a managed agent's process server is. */
export interface ProcessServerAddress {
  host: string;
  /** @default 9443 */
  port?: number;
  /** Name its certificate carries. @default host */
  servername?: string;
}

/** What the process server hands an agent (`GET /agent/v1/assignments`). */
interface Assignments {
  agentId: string;
  items: Array<MachineAssignment & { desired: 'replicate' | 'stop' }>;
  discovery: Array<{
    sourceHostId: string;
    requestId: string;
    endpoints: Array<{ name: string; qmp: string }>;
  }>;
  /** A planned failover's source side: `cut` (pause, cut at once), then `quit`. */
  finalSyncs?: Array<{ itemId: string; requestId: string; phase: 'cut' | 'quit' }>;
}

/** A final sync this agent was asked for, and how far it got. */
interface FinalSync {
  itemId: string;
  requestId: string;
  cutStarted: boolean;
  quitStarted: boolean;
  cutId?: string;
  stopped?: boolean;
  error?: { code: string; message: string };
}

/** Options of {@link ManagedAgent.start}. */
export interface ManagedAgentOptions {
  processServer: ProcessServerAddress;
  /** Keeps the identity (0600), `status.json` and each machine's state (`machines/<id>`). */
  stateDir: string;
  /** Its identity from registration ({@link registerAgent}). */
  identity: ComponentIdentity;
  /** How often it asks for its assignments and reports. @default 2000 */
  pollIntervalMs?: number;
  /** A machine whose replication failed (QEMU gone) is started again after this long. @default 15000 */
  retryFailedMs?: number;
  /** How often it checks whether its certificate needs renewing. @default 3600000 */
  renewalCheckMs?: number;
  /** Renew when less than this fraction of the certificate's lifetime is left. @default 1/3 */
  renewFraction?: number;
  /** Sent with reports (shown by the vault). @default none */
  version?: string;
  logger?: AgentLogger;
}

/** What a managed agent does, for `lifeboat agent status`. */
export interface ManagedAgentStatus {
  mode: 'managed';
  agent: { id: string; name: string };
  processServer: string;
  /** The last poll reached the process server. */
  connected: boolean;
  lastPollAt: string | null;
  lastError: { code: string; message: string } | null;
  items: Array<{
    id: string;
    machine: string;
    storeMachine: string;
    generation: number;
    running: boolean;
    status: AgentStatus | null;
    error: { code: string; message: string } | null;
  }>;
}

interface Item {
  assignment: MachineAssignment;
  running: AssignedMachine | undefined;
  error: LifeboatError | undefined;
  failedAt: number;
}

const silent: AgentLogger = { info() {}, warn() {}, error() {} };

function asError(err: unknown): LifeboatError {
  return isLifeboatError(err)
    ? err
    : new LifeboatError('LB_AGENT_FAILED', (err as Error).message, { cause: err });
}

/** Options of {@link registerAgent}. */
export interface RegisterAgentOptions {
  processServer: ProcessServerAddress;
  /** The vault CA's certificate (PEM): the process server's certificate must chain to it. */
  ca: string | Buffer;
  /** The one-time registration key (kind agent). */
  key: string;
  /** The agent's name in the vault (the KVM host's name, say). */
  name: string;
  stateDir: string;
}

/**
 * Registers an agent through its process server (agents talk only to it): makes a key pair
 * here, sends the one-time key and a CSR, which the process server relays to the vault, and
 * keeps the answer (id, token, certificate) with the key in `stateDir`, mode 0600.
 */
export async function registerAgent(o: RegisterAgentOptions): Promise<ComponentIdentity> {
  const pair = await createKeyAndCsr(o.name);
  const api = new ProcessServerApi({
    host: o.processServer.host,
    port: o.processServer.port ?? 9443,
    ...(o.processServer.servername !== undefined ? { servername: o.processServer.servername } : {}),
    ca: o.ca,
  });
  const r = await api.call<IssuedIdentity & { token: string; component: { id: string } }>(
    'POST',
    '/agent/v1/register',
    { key: o.key, name: o.name, ...(pair !== undefined ? { csr: pair.csr } : {}) },
  );
  const key = pair?.key ?? r.privateKey;
  if (key === undefined) {
    throw new LifeboatError('LB_AGENT_NOT_REGISTERED', 'The vault returned no private key.', {});
  }
  const identity: ComponentIdentity = {
    id: r.component.id,
    name: o.name,
    kind: 'agent',
    token: r.token,
    cert: r.certificate,
    key,
    ca: r.caCertificate,
  };
  await saveComponentIdentity(o.stateDir, identity);
  return identity;
}

/** The identity kept in `stateDir`, or a new registration with `key` when there is none. */
export async function agentIdentity(
  o: Omit<RegisterAgentOptions, 'key' | 'ca'> & { key?: string; ca?: string | Buffer },
): Promise<{ identity: ComponentIdentity; registered: boolean }> {
  const known = await loadComponentIdentity(o.stateDir);
  if (known !== undefined) {
    if (known.kind !== 'agent') {
      throw new LifeboatError(
        'LB_AGENT_NOT_REGISTERED',
        `${o.stateDir} holds the identity of a ${known.kind} (${known.id}), not of an agent. Give the agent a state directory of its own.`,
        { details: { stateDir: o.stateDir } },
      );
    }
    return { identity: known, registered: false };
  }
  if (o.key === undefined || o.ca === undefined) {
    throw new LifeboatError(
      'LB_AGENT_NOT_REGISTERED',
      `This agent is not registered yet (no identity in ${o.stateDir}). Ask an admin for a key (lifeboat vault key create --kind agent) and start it with --registration-key-file and --ca (the vault's CA certificate, lifeboat vault ca).`,
      { details: { stateDir: o.stateDir } },
    );
  }
  return { identity: await registerAgent({ ...o, key: o.key, ca: o.ca }), registered: true };
}

/**
 * The agent of a KVM host managed by the vault, through its process server (the design's "the
 * agent asks its process server, which asks the vault"): it polls its assignments over the
 * process server's mTLS port, replicates exactly the machines assigned to it (started on
 * assignment, stopped on `stop` or when no longer assigned, restarted when the policy's
 * intervals change), answers discovery requests with the machines and disks behind the KVM
 * host's QMP endpoints, reports what it runs, and renews its certificate before it expires.
 * When the process server cannot be reached it keeps replicating what it replicates.
 * Events: `started` (item id, MachineAssignment), `stopped` (item id), `cut` (item id,
 * CutReport), `progress` (item id, SyncProgressReport), `warning` (item id, warning),
 * `failed` (item id, LifeboatError), `inventory` (source host id, machines), `poll-error` (err).
 */
export class ManagedAgent extends EventEmitter {
  private readonly items = new Map<string, Item>();
  private readonly finals = new Map<string, FinalSync>();
  private api: ProcessServerApi;
  private identity: ComponentIdentity;
  private timer: NodeJS.Timeout | undefined;
  private round: Promise<void> = Promise.resolve();
  private stopped = false;
  private connected = false;
  private lastPollAt: Date | undefined;
  private lastError: LifeboatError | undefined;
  private lastRenewalCheck = 0;
  private readonly logger: AgentLogger;

  private constructor(private readonly options: ManagedAgentOptions) {
    super();
    this.identity = options.identity;
    this.api = this.apiFor(options.identity);
    this.logger = options.logger ?? silent;
  }

  /** Starts polling its process server (a first round at once). */
  static start(options: ManagedAgentOptions): ManagedAgent {
    const a = new ManagedAgent(options);
    a.timer = setInterval(() => a.tick(), options.pollIntervalMs ?? 2000);
    a.tick();
    return a;
  }

  /** The agent's vault id. */
  get id(): string {
    return this.identity.id;
  }

  /** Runs one round now and waits for it. */
  async sync(): Promise<void> {
    this.round = this.round.then(() => this.pollOnce());
    await this.round;
  }

  /** Stops polling and stops every machine cleanly (QEMU keeps its bitmaps). */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    clearInterval(this.timer);
    await this.round.catch(() => undefined);
    await Promise.all([...this.items.keys()].map((id) => this.stopItem(id).catch(() => undefined)));
    await this.writeStatus();
  }

  /** A snapshot for `lifeboat agent status`. */
  status(): ManagedAgentStatus {
    return {
      mode: 'managed',
      agent: { id: this.identity.id, name: this.identity.name },
      processServer: this.api.address,
      connected: this.connected,
      lastPollAt: this.lastPollAt?.toISOString() ?? null,
      lastError: this.lastError
        ? { code: this.lastError.code, message: this.lastError.message }
        : null,
      items: [...this.items.entries()].map(([id, i]) => ({
        id,
        machine: i.assignment.machine.name,
        storeMachine: i.assignment.storeMachine,
        generation: i.assignment.generation,
        running: i.running !== undefined && i.running.failed === undefined,
        status: i.running?.status() ?? null,
        error: i.error ? { code: i.error.code, message: i.error.message } : null,
      })),
    };
  }

  private apiFor(identity: ComponentIdentity): ProcessServerApi {
    const ps = this.options.processServer;
    return new ProcessServerApi({
      host: ps.host,
      port: ps.port ?? 9443,
      ...(ps.servername !== undefined ? { servername: ps.servername } : {}),
      ca: identity.ca,
      cert: identity.cert,
      key: identity.key,
      token: identity.token,
    });
  }

  private tick(): void {
    this.round = this.round
      .then(() => this.pollOnce())
      .catch((err: unknown) => {
        this.lastError = asError(err);
        this.emit('poll-error', this.lastError);
      });
  }

  private async pollOnce(): Promise<void> {
    if (this.stopped) return;
    await this.maybeRenew().catch((err: unknown) => {
      // Retried in a minute; the certificate is renewed long before it expires.
      this.lastRenewalCheck = Date.now() - (this.options.renewalCheckMs ?? 3_600_000) + 60_000;
      this.logger.warn({ err: (err as Error).message }, 'cannot renew the certificate');
    });
    let a: Assignments;
    try {
      a = await this.api.call<Assignments>('GET', '/agent/v1/assignments');
      this.connected = true;
      this.lastPollAt = new Date();
      this.lastError = undefined;
    } catch (err) {
      // The process server is down or has not heard from the vault yet: keep replicating.
      this.connected = isLifeboatError(err) && err.details['status'] !== undefined;
      throw err;
    } finally {
      await this.writeStatus();
    }
    this.finalSyncs(a.finalSyncs ?? []);
    const wanted = new Map(a.items.filter((i) => i.desired === 'replicate').map((i) => [i.id, i]));
    for (const id of [...this.items.keys()]) if (!wanted.has(id)) await this.stopItem(id);
    for (const assignment of wanted.values()) {
      // A source a planned failover quit is never started again.
      if ([...this.finals.values()].some((f) => f.itemId === assignment.id && f.quitStarted))
        continue;
      await this.apply(assignment);
    }
    const inventories: Array<{
      sourceHostId: string;
      requestId: string;
      machines: InventoryMachine[];
    }> = [];
    for (const d of a.discovery) {
      const known = new Map<string, InventoryMachine>();
      for (const i of this.items.values()) {
        const s = i.running?.status();
        if (i.running === undefined || s === undefined || i.assignment.machine.endpoint === null)
          continue;
        known.set(i.assignment.machine.endpoint, {
          externalId: i.assignment.machine.name,
          name: i.assignment.machine.name,
          endpoint: i.assignment.machine.endpoint,
          disks: s.disks.map((x) => ({ name: x.name, sizeBytes: x.size })),
        });
      }
      const machines = await discoverMachines(d.endpoints, {
        known,
        onError: (e, err) =>
          this.logger.warn(
            { endpoint: e.qmp, err: (err as Error).message },
            'cannot read a QMP endpoint of this host; it is left out of the inventory',
          ),
      });
      inventories.push({ sourceHostId: d.sourceHostId, requestId: d.requestId, machines });
      this.emit('inventory', d.sourceHostId, machines);
    }
    const stopping = a.items.filter((i) => i.desired === 'stop' && !this.items.has(i.id));
    await this.api.call('POST', '/agent/v1/report', {
      items: [
        ...[...this.items.entries()].map(([id, i]) => this.report(id, i)),
        ...stopping.map((i) => ({ id: i.id, running: false, generation: i.generation })),
      ],
      inventories,
      finalSyncs: [...this.finals.values()].map((f) => ({
        itemId: f.itemId,
        requestId: f.requestId,
        ...(f.cutId !== undefined ? { cutId: f.cutId } : {}),
        ...(f.stopped === true ? { stopped: true } : {}),
        ...(f.error !== undefined ? { error: f.error } : {}),
      })),
      ...(this.options.version !== undefined ? { version: this.options.version } : {}),
    });
    await this.writeStatus();
  }

  /**
   * A planned failover's source side, as its process server asks: pause the source and cut at
   * once (Agent.finalCut), then, once the process server committed that cut, quit the source
   * (Agent.quitSource). Each step runs once per request, beside the polls; its outcome goes
   * out with the next reports.
   */
  private finalSyncs(asked: NonNullable<Assignments['finalSyncs']>): void {
    const live = new Set(asked.map((f) => f.requestId));
    for (const id of [...this.finals.keys()]) if (!live.has(id)) this.finals.delete(id);
    for (const req of asked) {
      let f = this.finals.get(req.requestId);
      if (f === undefined) {
        f = { itemId: req.itemId, requestId: req.requestId, cutStarted: false, quitStarted: false };
        this.finals.set(req.requestId, f);
      }
      const state = f;
      const item = this.items.get(req.itemId);
      const fail = (err: unknown): void => {
        state.error = { code: asError(err).code, message: asError(err).message };
        this.syncSoon();
      };
      if (!state.cutStarted) {
        state.cutStarted = true;
        if (item?.running === undefined) {
          fail(
            new LifeboatError(
              'LB_AGENT_NOT_CONTINUOUS',
              `This agent does not replicate item ${req.itemId}, so it cannot take its last cut.`,
            ),
          );
          continue;
        }
        item.running.finalCut().then((c) => {
          state.cutId = c.cutId;
          this.syncSoon();
        }, fail);
      }
      if (req.phase === 'quit' && !state.quitStarted && state.cutId !== undefined) {
        state.quitStarted = true;
        const running = item?.running;
        // From now on the item is not this agent's: its source is gone.
        this.items.delete(req.itemId);
        (running?.quitSource() ?? Promise.resolve()).then(() => {
          state.stopped = true;
          this.emit('stopped', req.itemId);
          this.syncSoon();
        }, fail);
      }
    }
  }

  /** A poll soon (an answer the process server waits for). */
  private syncSoon(): void {
    if (this.stopped) return;
    setTimeout(() => this.tick(), 50).unref();
  }

  private report(id: string, i: Item): Record<string, unknown> {
    const running = i.running !== undefined && i.running.failed === undefined;
    const s = running ? i.running?.status() : undefined;
    return {
      id,
      running,
      generation: i.assignment.generation,
      ...(s !== undefined ? { phase: s.phase } : {}),
      ...(i.running !== undefined && i.running.initialDone.size > 0
        ? {
            initial: [...i.running.initialDone].map(([disk, doneBytes]) => ({ disk, doneBytes })),
          }
        : {}),
      ...(i.error !== undefined ? { error: { code: i.error.code, message: i.error.message } } : {}),
    };
  }

  /** Starts an assigned machine, restarts it on changed settings or after a failure. */
  private async apply(assignment: MachineAssignment): Promise<void> {
    const item = this.items.get(assignment.id);
    if (item?.running !== undefined) {
      const failed = item.running.failed;
      if (failed === undefined && item.running.sameSettings(assignment)) {
        item.assignment = assignment;
        return;
      }
      if (failed !== undefined) {
        item.error = failed;
        if (item.failedAt === 0) item.failedAt = Date.now();
        if (Date.now() - item.failedAt < (this.options.retryFailedMs ?? 15_000)) return;
      } else {
        this.logger.info(
          { item: assignment.id, generation: assignment.generation },
          'assignment changed (policy or disks): restarting the machine',
        );
      }
      await this.stopItem(assignment.id);
    } else if (
      item !== undefined &&
      item.error !== undefined &&
      Date.now() - item.failedAt < (this.options.retryFailedMs ?? 15_000)
    ) {
      return;
    }
    const entry: Item = item ?? { assignment, running: undefined, error: undefined, failedAt: 0 };
    entry.assignment = assignment;
    this.items.set(assignment.id, entry);
    try {
      const running = await AssignedMachine.start(assignment, {
        processServer: {
          host: this.options.processServer.host,
          port: this.options.processServer.port ?? 9443,
          ...(this.options.processServer.servername !== undefined
            ? { servername: this.options.processServer.servername }
            : {}),
        },
        tls: { ca: this.identity.ca, cert: this.identity.cert, key: this.identity.key },
        stateDir: join(this.options.stateDir, 'machines'),
        logger: this.logger,
      });
      entry.running = running;
      entry.error = undefined;
      entry.failedAt = 0;
      running.on('cut', (c: CutReport) => this.emit('cut', assignment.id, c));
      running.on('progress', (p: SyncProgressReport) => this.emit('progress', assignment.id, p));
      running.on('warning', (w: unknown) => this.emit('warning', assignment.id, w));
      running.on('failed', (e: LifeboatError) => {
        entry.error = e;
        entry.failedAt = Date.now();
        this.emit('failed', assignment.id, e);
      });
      this.emit('started', assignment.id, assignment);
    } catch (err) {
      entry.error = asError(err);
      entry.failedAt = Date.now();
      this.emit('failed', assignment.id, entry.error);
    }
  }

  private async stopItem(id: string): Promise<void> {
    const item = this.items.get(id);
    this.items.delete(id);
    if (item?.running === undefined) return;
    await item.running.stop();
    this.emit('stopped', id);
  }

  private async maybeRenew(): Promise<void> {
    const now = Date.now();
    if (now - this.lastRenewalCheck < (this.options.renewalCheckMs ?? 3_600_000)) return;
    this.lastRenewalCheck = now;
    if (!certificateNeedsRenewal(this.identity.cert, new Date(now), this.options.renewFraction))
      return;
    const pair = await createKeyAndCsr(this.identity.id);
    const r = await this.api.call<IssuedIdentity>(
      'POST',
      '/agent/v1/certificate',
      pair !== undefined ? { csr: pair.csr } : {},
    );
    const key = pair?.key ?? r.privateKey;
    if (key === undefined) return;
    this.identity = { ...this.identity, cert: r.certificate, key, ca: r.caCertificate };
    await saveComponentIdentity(this.options.stateDir, this.identity);
    this.api = this.apiFor(this.identity);
    for (const i of this.items.values())
      i.running?.setTls({ ca: this.identity.ca, cert: this.identity.cert, key: this.identity.key });
    this.logger.info(
      { id: this.identity.id, expiresAt: r.certificateExpiresAt },
      'certificate renewed',
    );
    this.emit('renewed', r.certificateExpiresAt);
  }

  private async writeStatus(): Promise<void> {
    const path = join(this.options.stateDir, 'status.json');
    const tmp = `${path}.${process.pid}.tmp`;
    try {
      await mkdir(this.options.stateDir, { recursive: true, mode: 0o700 });
      await writeFile(
        tmp,
        JSON.stringify({ ...this.status(), updatedAt: new Date().toISOString() }, null, 1),
      );
      await rename(tmp, path);
    } catch {
      // The status file is informational only.
    }
  }
}
