import { randomBytes, randomUUID } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { mkdir, mkdtemp, rename, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NbdClient } from '@lifeboat/nbd';
import { LifeboatError, isLifeboatError } from '@lifeboat/protocol';
import { GuestAgentClient, QmpClient, startFleecing } from '@lifeboat/qmp';
import type { FleecingCut } from '@lifeboat/qmp';
import { resolveAgentOptions } from './agent-options.js';
import type { AgentOptions, ResolvedAgentOptions } from './agent-options.js';
import { loadAgentState, saveAgentState } from './agent-state.js';
import type { AgentState, DiskState } from './agent-state.js';
import { AGENT_NODE_PREFIX, discoverDisks } from './disk-discovery.js';
import type { DiscoveredDisk } from './disk-discovery.js';
import { hardwareLabels, readMachineHardware } from './machine-hardware.js';
import type { MachineHardware } from './machine-hardware.js';
import type { ReplicationSink, ResyncBaseline } from './replication-sink.js';

/** Progress of a full read of a disk (initial replication or resync). */
export interface SyncProgressReport {
  disk: string;
  kind: 'initial' | 'resync';
  /** Allocated bytes read so far (of this run and the runs before it). */
  doneBytes: number;
  /** Allocated bytes of the disk. */
  totalBytes: number;
  /** Bytes actually sent (a resync skips chunks equal to the latest point). */
  sentBytes: number;
  /** Read rate of this run, bytes per second. */
  bytesPerSecond: number;
  /** Estimated seconds left, or undefined before a rate is known. */
  etaSeconds: number | undefined;
}

/** What one cycle did. */
export interface CutReport {
  cutId: string;
  kind: 'crash' | 'app';
  /** When the cut was taken (ms since the epoch). */
  time: number;
  /** Data bytes sent for this cut (dirty extents). */
  bytes: number;
  /** Milliseconds from the cycle's start to the acknowledgement. */
  durationMs: number;
  /** Of which: the cut itself (overlays, freeze, transaction, thaw, exports). */
  cutMs: number;
  /** Of which: reading the dirty extents and queueing them to the sink. */
  sendMs: number;
  /** Of which: waiting for the sink to acknowledge the cut. */
  ackMs: number;
  /** How far the cycle ran over the interval (0 when on time). */
  lagMs: number;
  /** Why an app-consistent point fell back to crash-consistent, if it did. */
  warning?: string;
}

/** The agent's status for `lifeboat agent status`. */
export interface AgentStatus {
  machine: string;
  phase: 'starting' | 'initial' | 'resync' | 'continuous' | 'stopped' | 'failed';
  disks: Array<{ name: string; size: number; format: string; persistentBitmaps: boolean }>;
  lastCut: AgentState['lastCut'];
  cycles: number;
  lagMs: number;
  bytesSent: number;
  sync: SyncProgressReport | undefined;
  /** The machine's hardware as last read from QEMU (recorded on every point as `machine.*` labels). */
  hardware: MachineHardware | undefined;
  error: { code: string; message: string } | undefined;
}

/** Thrown inside the agent to unwind on `stop({ crash: true })`. */
class Crashed extends Error {}

/** Thrown inside the agent when a stop gave up waiting for the sink. */
class Stopped extends Error {}

/**
 * The sink as the agent uses it: every call also ends when `abandon` settles, so a stop never
 * waits forever for an acknowledgement that cannot come (process server gone).
 */
function guardSink(sink: ReplicationSink, abandon: Promise<void>): ReplicationSink {
  const guard = <T>(p: Promise<T>): Promise<T> => {
    p.catch(() => undefined); // may settle after we gave up on it
    return Promise.race([
      p,
      abandon.then(() => {
        throw new Stopped('the agent stopped while waiting for its sink');
      }),
    ]);
  };
  const out: ReplicationSink = {
    write: (disk, offset, data) => guard(sink.write(disk, offset, data)),
    writeZeroes: (disk, offset, length) => guard(sink.writeZeroes(disk, offset, length)),
    resize: (disk, size) => guard(sink.resize(disk, size)),
    addDisk: (disk) => sink.addDisk(disk),
    cut: (options) => guard(sink.cut(options)),
    waitForAck: () => guard(sink.waitForAck()),
  };
  if (sink.resyncBaseline) {
    const f = sink.resyncBaseline.bind(sink);
    out.resyncBaseline = (disk) => guard(f(disk));
  }
  if (sink.discardPending) {
    const f = sink.discardPending.bind(sink);
    out.discardPending = (disk) => guard(f(disk));
  }
  if (sink.latestCut) {
    const f = sink.latestCut.bind(sink);
    out.latestCut = () => guard(f());
  }
  return out;
}

const ZEROS = Buffer.alloc(64 * 1024);

function isZero(b: Buffer): boolean {
  // memcmp against zeros, a piece at a time: a byte loop in JS cost the agent 0.8 s per 1.6 GB
  // sent at 20 MB/s (partly written clusters start with zeros, so the loop ran far).
  for (let pos = 0; pos < b.length; pos += ZEROS.length) {
    const n = Math.min(ZEROS.length, b.length - pos);
    if (ZEROS.compare(b, pos, pos + n, 0, n) !== 0) return false;
  }
  return true;
}

/**
 * The agent for one machine on a QEMU/KVM host: finds its disks over QMP, replicates them
 * initially (allocated, non-zero ranges only, resumable), then takes a consistent cut of all
 * disks every interval (one QMP transaction: new bitmap, old one disabled, image fleecing),
 * reads the changed extents from the point-in-time view over NBD and streams them, with a cut
 * marker, into its sink. Events: `progress` (SyncProgressReport), `cut` (CutReport), `warning`
 * ({ code, message }), `failed` (LifeboatError: replication of the machine stopped).
 */
export class Agent extends EventEmitter {
  private readonly opts: ResolvedAgentOptions;
  private readonly sink: ReplicationSink;
  private abandon: () => void = () => undefined;
  private qmp: QmpClient | undefined;
  private state: AgentState | undefined;
  private disks: DiscoveredDisk[] = [];
  private nbdSocket: string | undefined;
  private ownNbdDir: string | undefined;
  private loop: Promise<void> | undefined;
  private stopping = false;
  private crashing = false;
  /** A planned failover's last cut: the guest is paused, cut at once, never freeze it. */
  private finalizing = false;
  private cutNow = false;
  private wake: (() => void) | undefined;
  private phase: AgentStatus['phase'] = 'starting';
  private cycles = 0;
  private lagMs = 0;
  private sentBytes = 0;
  private syncReport: SyncProgressReport | undefined;
  private failure: LifeboatError | undefined;
  private lastAppAt = 0;
  private hardware: MachineHardware | undefined;
  private statusWrittenAt = 0;
  private readonly statePath: string;
  /** Disks whose tracking bitmap was lost while running (QEMU restarted): resync before the next cut. */
  private readonly needResync = new Map<string, string>();

  constructor(options: AgentOptions) {
    super();
    this.opts = resolveAgentOptions(options);
    this.sink = guardSink(this.opts.sink, new Promise<void>((resolve) => (this.abandon = resolve)));
    this.statePath = join(this.opts.stateDir, 'agent-state.json');
  }

  /** Total data bytes sent to the sink by this agent object. */
  get bytesSent(): number {
    return this.sentBytes;
  }

  /**
   * Connects to QEMU, finds the disks, and starts replicating in the background; resolves once
   * started (not when the initial replication is done: watch `progress` and `cut`).
   */
  async start(): Promise<void> {
    if (this.loop) return;
    await mkdir(this.opts.stateDir, { recursive: true });
    this.state = await loadAgentState(this.statePath, this.opts.machine);
    this.qmp = await QmpClient.connect(
      { path: this.opts.qmpSocket },
      { commandTimeoutMs: this.opts.qmpTimeoutMs },
    );
    this.qmp.on('close', () => this.wake?.());
    try {
      await this.cleanupLeftovers();
      await this.ensureNbdServer();
      this.disks = await discoverDisks(this.qmp, this.opts.disks);
      if (this.disks.length === 0) {
        throw new LifeboatError(
          'LB_AGENT_NO_DISKS',
          `QEMU at ${this.opts.qmpSocket} has no disk to protect${this.opts.disks ? ` among ${this.opts.disks.join(', ')}` : ''}. Check the QMP socket and the disk names (query-block).`,
          { details: { qmp: this.opts.qmpSocket, disks: this.opts.disks } },
        );
      }
    } catch (err) {
      await this.qmp.close().catch(() => undefined);
      if (this.ownNbdDir) await rm(this.ownNbdDir, { recursive: true, force: true });
      throw err;
    }
    // A ReplicationClient says when the process server dropped this machine's backlog.
    const events = this.opts.sink as Partial<Pick<EventEmitter, 'on'>>;
    if (typeof events.on === 'function') {
      events.on.call(this.opts.sink, 'resync-required', () =>
        this.requestResync('the process server dropped this machine’s backlog'),
      );
    }
    for (const d of this.disks) this.sink.addDisk({ name: d.name, size: d.size });
    this.loop = this.run();
  }

  /**
   * Stops replicating. A clean stop finishes or abandons the current step and leaves QEMU as
   * it found it (bitmaps stay, so a restart continues); `crash: true` drops everything at the
   * next step without saving or cleaning up, as a killed agent would.
   */
  async stop(options: { crash?: boolean } = {}): Promise<void> {
    this.stopping = true;
    if (options.crash) this.crashing = true;
    this.wake?.();
    // The current step may finish for a while (a cut being acknowledged); then give up on it.
    const giveUp = setTimeout(() => this.abandon(), options.crash ? 0 : this.opts.stopGraceMs);
    await this.loop?.catch(() => undefined);
    clearTimeout(giveUp);
    if (!options.crash && this.qmp && this.ownNbdDir) {
      await this.qmp.execute('nbd-server-stop').catch(() => undefined);
    }
    await this.qmp?.close().catch(() => undefined);
    if (this.ownNbdDir) await rm(this.ownNbdDir, { recursive: true, force: true });
    if (this.phase !== 'failed') this.phase = 'stopped';
    if (!options.crash) await this.writeStatus(true);
  }

  /**
   * Makes the next cycle resync every disk first (read it, send what differs from the latest
   * point), e.g. after the process server dropped frames it had not committed.
   */
  requestResync(reason: string): void {
    for (const d of this.disks) this.needResync.set(d.name, reason);
    this.wake?.();
  }

  /** Resolves when replication ends (after stop or a failure). */
  async done(): Promise<void> {
    await this.loop;
  }

  /**
   * Resolves with the next cut the agent reports; rejects when the agent fails first, or with
   * `LB_AGENT_CUT_TIMEOUT` (naming what the agent is doing) when none comes within `timeoutMs`.
   */
  nextCut(timeoutMs = 180_000): Promise<CutReport> {
    return new Promise((resolve, reject) => {
      const settle = (): void => {
        clearTimeout(timer);
        this.off('cut', onCut);
        this.off('failed', onFailed);
      };
      const onCut = (c: CutReport): void => {
        settle();
        resolve(c);
      };
      const onFailed = (e: unknown): void => {
        settle();
        reject(e);
      };
      const timer = setTimeout(() => {
        settle();
        reject(
          new LifeboatError(
            'LB_AGENT_CUT_TIMEOUT',
            `The agent of ${this.opts.machine} reported no cut within ${timeoutMs} ms; see its status for the phase it is in.`,
            { details: { timeoutMs, status: this.status() } },
          ),
        );
      }, timeoutMs);
      this.on('cut', onCut);
      this.on('failed', onFailed);
    });
  }

  /**
   * The source's side of a planned failover: flushes the guest's file systems through its
   * guest agent when it has one, pauses the guest (QMP `stop`, which also completes the writes
   * it issued), takes a cut at once and waits for its acknowledgement. The returned cut was
   * taken after the pause, so it holds every write the guest made; the guest stays paused
   * (see {@link quitSource}). When the cut fails, the guest runs again and the error is thrown.
   */
  async finalCut(timeoutMs = 180_000): Promise<CutReport> {
    if (this.phase !== 'continuous') {
      throw new LifeboatError(
        'LB_AGENT_NOT_CONTINUOUS',
        `The agent of ${this.opts.machine} is ${this.phase}, not replicating continuously; a planned failover needs its initial replication done. Wait, or run an unplanned failover.`,
        { details: { machine: this.opts.machine, phase: this.phase } },
      );
    }
    if (this.opts.guestAgentSocket) {
      // Freezing writes the guest's dirty page cache to its disks; thaw at once (it is paused
      // next, so it writes nothing more either way). A guest without an answering agent is cut
      // as it is: every write it issued is on its disks once it is paused.
      const qga = new GuestAgentClient(this.opts.guestAgentSocket, 10_000);
      try {
        await qga.freeze();
        await qga.thaw();
      } catch {
        await qga.thaw().catch(() => undefined);
      }
    }
    this.finalizing = true;
    await this.q.execute('stop');
    const paused = Date.now();
    try {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        // The cycle in flight may have started before the pause; the one after it did not.
        const next = this.nextCut(Math.max(1, deadline - Date.now()));
        this.cutNow = true;
        this.wake?.();
        const cut = await next;
        if (cut.time >= paused) return cut;
      }
    } catch (err) {
      this.finalizing = false;
      await this.q.execute('cont').catch(() => undefined);
      throw err;
    }
  }

  /**
   * Ends a planned failover's source side: stops replicating (QEMU keeps its bitmaps) and
   * quits the paused source machine through QMP, so it can never write again.
   */
  async quitSource(): Promise<void> {
    const socket = this.opts.qmpSocket;
    await this.stop();
    const q = await QmpClient.connect({ path: socket }, { commandTimeoutMs: 10_000 });
    try {
      await q.execute('quit').catch(() => undefined);
    } finally {
      await q.close().catch(() => undefined);
    }
  }

  /** A snapshot of what the agent is doing. */
  status(): AgentStatus {
    return {
      machine: this.opts.machine,
      phase: this.phase,
      disks: this.disks.map((d) => ({
        name: d.name,
        size: d.size,
        format: d.format,
        persistentBitmaps: d.persistentBitmaps,
      })),
      lastCut: this.state?.lastCut,
      cycles: this.cycles,
      lagMs: this.lagMs,
      bytesSent: this.sentBytes,
      sync: this.syncReport,
      hardware: this.hardware,
      error: this.failure ? { code: this.failure.code, message: this.failure.message } : undefined,
    };
  }

  /**
   * Writes status() to `<stateDir>/status.json` for `lifeboat agent status` (at most once a
   * second unless `force`); a failure to write is not a replication failure.
   */
  private async writeStatus(force: boolean): Promise<void> {
    const now = Date.now();
    if (!force && now - this.statusWrittenAt < 1000) return;
    this.statusWrittenAt = now;
    const path = join(this.opts.stateDir, 'status.json');
    const tmp = `${path}.${process.pid}.tmp`;
    try {
      await writeFile(
        tmp,
        JSON.stringify({ ...this.status(), updatedAt: new Date(now).toISOString() }, null, 1),
      );
      await rename(tmp, path);
    } catch {
      // The status file is informational only.
    }
  }

  private get q(): QmpClient {
    if (!this.qmp) throw new Error('agent not started');
    return this.qmp;
  }

  private get st(): AgentState {
    if (!this.state) throw new Error('agent not started');
    return this.state;
  }

  private checkCrash(): void {
    if (this.crashing) throw new Crashed('agent killed');
  }

  private async save(): Promise<void> {
    this.checkCrash();
    await saveAgentState(this.statePath, this.st);
  }

  private warn(code: string, message: string, details: Record<string, unknown> = {}): void {
    this.opts.logger.warn({ code, machine: this.opts.machine, ...details }, message);
    this.emit('warning', { code, message, details });
  }

  /** Removes exports, jobs and nodes a killed agent left in QEMU (all named `lb-*`). */
  private async cleanupLeftovers(): Promise<void> {
    const exports = await this.q
      .execute<Array<{ id: string }>>('query-block-exports')
      .catch(() => []);
    for (const e of exports) {
      if (!e.id.startsWith(AGENT_NODE_PREFIX)) continue;
      const gone = this.q.waitForEvent(
        'BLOCK_EXPORT_DELETED',
        (ev) => ev.data['id'] === e.id,
        30_000,
      );
      gone.catch(() => undefined);
      await this.q.execute('block-export-del', { id: e.id, mode: 'hard' }).catch(() => undefined);
      await gone.catch(() => undefined);
    }
    const jobs = await this.q
      .execute<Array<{ device: string }>>('query-block-jobs')
      .catch(() => []);
    for (const j of jobs) {
      if (!j.device.startsWith(AGENT_NODE_PREFIX)) continue;
      const gone = this.q.waitForEvent(
        'JOB_STATUS_CHANGE',
        (ev) => ev.data['id'] === j.device && ev.data['status'] === 'null',
        30_000,
      );
      gone.catch(() => undefined);
      await this.q
        .execute('block-job-cancel', { device: j.device, force: true })
        .catch(() => undefined);
      await gone.catch(() => undefined);
    }
    const nodes = await this.q.execute<Array<{ 'node-name': string }>>('query-named-block-nodes', {
      flat: true,
    });
    for (const n of nodes) {
      if (n['node-name'].startsWith(`${AGENT_NODE_PREFIX}fleece`)) {
        await this.q
          .execute('blockdev-del', { 'node-name': n['node-name'] })
          .catch(() => undefined);
      }
    }
    await rm(join(this.opts.stateDir, 'overlays'), { recursive: true, force: true });
  }

  private async ensureNbdServer(): Promise<void> {
    if (this.opts.nbdSocket) {
      this.nbdSocket = this.opts.nbdSocket;
      return;
    }
    // UNIX socket paths are limited to 107 bytes: keep it short, in the temporary directory.
    this.ownNbdDir = await mkdtemp(join(tmpdir(), 'lb-agent-'));
    this.nbdSocket = join(this.ownNbdDir, 'nbd.sock');
    try {
      await this.q.execute('nbd-server-start', {
        addr: { type: 'unix', data: { path: this.nbdSocket } },
      });
    } catch (cause) {
      throw new LifeboatError(
        'LB_AGENT_NBD_SERVER',
        `Cannot start an NBD server in QEMU (${(cause as Error).message}). If QEMU already runs one (qemu-storage-daemon --nbd-server), pass its socket with --nbd-socket.`,
        { cause },
      );
    }
  }

  private async run(): Promise<void> {
    try {
      await this.prepare();
      this.phase = 'continuous';
      while (!this.stopping) {
        const started = Date.now();
        try {
          await this.cycle(started);
        } catch (err) {
          if (err instanceof Crashed || this.stopping) break;
          if (!isLifeboatError(err) || FATAL.has(err.code)) throw err;
          if (err.code === 'LB_QMP_CONNECTION_LOST' || err.code === 'LB_QMP_CLOSED') {
            throw new LifeboatError(
              'LB_AGENT_QEMU_GONE',
              `QEMU at ${this.opts.qmpSocket} went away; replication of ${this.opts.machine} stopped. Everything acknowledged before stays; start the agent again when QEMU runs (it resyncs what it cannot prove unchanged).`,
              { cause: err },
            );
          }
          this.warn(err.code, `Cycle failed, retrying at the next interval: ${err.message}`);
        }
        const elapsed = Date.now() - started;
        this.lagMs = Math.max(0, elapsed - this.opts.intervalMs);
        if (!this.stopping) await this.sleep(Math.max(0, this.opts.intervalMs - elapsed));
      }
    } catch (err) {
      if (err instanceof Crashed || err instanceof Stopped) return;
      const e = isLifeboatError(err)
        ? err
        : new LifeboatError('LB_AGENT_FAILED', `Replication stopped: ${(err as Error).message}`, {
            cause: err,
          });
      this.failure = e;
      this.phase = 'failed';
      this.opts.logger.error(
        { err: e.toJSON(), machine: this.opts.machine },
        'replication stopped',
      );
      this.emit('failed', e);
      await this.writeStatus(true);
    }
  }

  private sleep(ms: number): Promise<void> {
    return new Promise<void>((resolve) => {
      // A final cut was asked for while a cycle ran: take it now, not an interval later.
      const t = setTimeout(done, this.cutNow ? 0 : ms);
      this.cutNow = false;
      function done(): void {
        clearTimeout(t);
        resolve();
      }
      this.wake = done;
    }).then(() => {
      this.wake = undefined;
    });
  }

  /** Brings every disk to "tracked since the last acknowledged cut", reading disks fully where needed. */
  private async prepare(): Promise<void> {
    const latest = await this.sink.latestCut?.();
    const pending = this.st.pendingCut;
    if (pending && latest?.cutId === pending.id) {
      // The last cut was acknowledged before the agent could record it: its bitmaps track.
      for (const [disk, bitmap] of Object.entries(pending.bitmaps)) {
        const ds = this.st.disks[disk];
        if (ds) ds.tracking = bitmap;
      }
      this.st.lastCut = { id: pending.id, time: pending.time, kind: pending.kind };
    }
    delete this.st.pendingCut;
    // Commits may lag acknowledgements (a process server commits after it journals), so only a
    // committed cut newer than this agent's last one means the bitmaps are stale.
    if (
      latest &&
      latest.cutId !== this.st.lastCut?.id &&
      latest.time > (this.st.lastCut?.time ?? 0)
    ) {
      // The sink holds a newer point than this agent's last cut (state or image restored from
      // a backup, another agent): bitmaps count changes from an older point, so every disk
      // with one is resynced against the latest point.
      for (const d of this.disks) {
        const ds = this.st.disks[d.name];
        if (!ds?.tracking) continue;
        this.warn(
          'LB_AGENT_RESYNC',
          `Disk ${d.name} needs a resync: its bitmap is older than the last committed point (cut ${latest.cutId} of ${new Date(latest.time).toISOString()}; this agent's last cut is ${this.st.lastCut?.id ?? 'none'}). Only chunks that differ from the latest point are sent.`,
          { disk: d.name },
        );
        delete ds.tracking;
        await this.fullRead(d, 'resync', 0);
        if (this.stopping) return;
      }
    }
    for (const d of this.disks) {
      await this.prepareDisk(d);
      if (this.stopping) return;
    }
  }

  private async prepareDisk(d: DiscoveredDisk): Promise<void> {
    const ds = this.st.disks[d.name];
    const own = d.bitmaps.filter((b) => b.name.startsWith(AGENT_NODE_PREFIX));
    if (ds?.sync) {
      const b = own.find((x) => x.name === ds.sync?.bitmap);
      if (b && !b.inconsistent && ds.sync.size === d.size) {
        await this.fullRead(d, ds.sync.kind, ds.sync.offset);
        return;
      }
      this.warn(
        'LB_AGENT_SYNC_RESTARTED',
        `The ${ds.sync.kind} read of disk ${d.name} cannot resume (its bitmap is ${b ? 'inconsistent' : 'gone'} or the size changed); it starts again, comparing with the latest point.`,
        { disk: d.name },
      );
      await this.fullRead(d, ds.sync.kind === 'initial' ? 'initial' : 'resync', 0);
      return;
    }
    if (!ds?.tracking) {
      await this.fullRead(d, ds ? 'resync' : 'initial', 0);
      return;
    }
    const tracking = own.find((b) => b.name === ds.tracking);
    const broken = own.find((b) => b.inconsistent);
    if (!tracking || broken) {
      const reason = !tracking
        ? `its bitmap ${ds.tracking} is missing (QEMU restarted${d.persistentBitmaps ? ' or the image was replaced' : '; bitmaps on raw disks do not survive a restart'})`
        : `bitmap ${broken?.name} is inconsistent (QEMU stopped uncleanly)`;
      this.warn(
        'LB_AGENT_RESYNC',
        `Disk ${d.name} needs a resync: ${reason}. Only chunks that differ from the latest point are sent.`,
        {
          disk: d.name,
        },
      );
      await this.fullRead(d, 'resync', 0);
      return;
    }
    await this.normalizeBitmaps(
      d,
      ds.tracking,
      own.map((b) => b.name),
    );
  }

  /**
   * Makes `tracking` the one recording bitmap of the disk: newer bitmaps left by an interrupted
   * cycle are merged into it (their changes are resent: harmless) and removed, atomically.
   */
  private async normalizeBitmaps(
    d: DiscoveredDisk,
    tracking: string,
    own: string[],
  ): Promise<void> {
    const others = own.filter((n) => n !== tracking);
    const info = d.bitmaps.find((b) => b.name === tracking);
    if (others.length === 0 && info?.recording) return;
    const actions: Record<string, unknown>[] = [];
    if (others.length > 0) {
      actions.push({
        type: 'block-dirty-bitmap-merge',
        data: { node: d.node, target: tracking, bitmaps: others },
      });
    }
    if (!info?.recording) {
      actions.push({ type: 'block-dirty-bitmap-enable', data: { node: d.node, name: tracking } });
    }
    for (const o of others) {
      actions.push({ type: 'block-dirty-bitmap-remove', data: { node: d.node, name: o } });
    }
    await this.q.execute('transaction', { actions });
  }

  private newBitmapName(): string {
    return `${AGENT_NODE_PREFIX}${Date.now().toString(36)}-${randomBytes(3).toString('hex')}`;
  }

  /**
   * Reads a whole disk from the live node and sends it: every allocated non-zero range
   * (`initial`), or only the chunks whose id differs from the latest point (`resync`). A bitmap
   * created first records every write during the read, so the next cut repairs the fuzzy copy.
   * Progress is saved after each acknowledged checkpoint, so a restart resumes.
   */
  private async fullRead(
    d: DiscoveredDisk,
    kind: 'initial' | 'resync',
    resumeAt: number,
  ): Promise<void> {
    this.phase = kind;
    const prev = this.st.disks[d.name];
    let bitmap = prev?.sync?.bitmap;
    if (resumeAt === 0 || !bitmap) {
      // Old bitmaps cannot be trusted any more (or are about to be replaced): remove them, then
      // start a fresh one before the first byte is read.
      for (const b of d.bitmaps.filter((x) => x.name.startsWith(AGENT_NODE_PREFIX))) {
        await this.q.execute('block-dirty-bitmap-remove', { node: d.node, name: b.name });
      }
      bitmap = this.newBitmapName();
      await this.q.execute('block-dirty-bitmap-add', {
        node: d.node,
        name: bitmap,
        persistent: d.persistentBitmaps,
      });
      d.bitmaps = [
        {
          name: bitmap,
          recording: true,
          persistent: d.persistentBitmaps,
          busy: false,
          inconsistent: false,
        },
      ];
      // Frames of this disk the sink holds but has not committed describe a disk state the
      // resync cannot see any more (the lost bitmap knew about them): drop them first.
      await this.sink.discardPending?.(d.name);
      if (prev && prev.size !== d.size) await this.sink.resize(d.name, d.size);
      this.st.disks[d.name] = {
        node: d.node,
        size: d.size,
        sync: { kind, bitmap, offset: 0, size: d.size },
      };
      await this.save();
    }
    const ds = this.st.disks[d.name] as DiskState;
    // Even an "initial" read compares with a point when the sink has one (a lost state file, a
    // machine protected again): only what differs is sent.
    const baseline = await this.sink.resyncBaseline?.(d.name);
    const chunk = baseline?.chunkSize ?? this.opts.chunkSize;
    const exportId = `${AGENT_NODE_PREFIX}live-${d.node}`;
    await this.q.execute('block-export-add', {
      type: 'nbd',
      id: exportId,
      'node-name': d.node,
      name: exportId,
      writable: false,
    });
    let nbd: NbdClient | undefined;
    try {
      nbd = await NbdClient.connect(
        { path: this.nbdSocket as string },
        { exportName: exportId, metaContexts: ['base:allocation'] },
      );
      await this.copyDisk(nbd, d, ds, kind, resumeAt, chunk, baseline);
    } finally {
      await nbd?.close().catch(() => undefined);
      if (!this.crashing) await this.deleteExport(exportId);
    }
    if (this.stopping) return;
    await this.sink.waitForAck();
    ds.tracking = bitmap;
    delete ds.sync;
    ds.size = d.size;
    await this.save();
    this.syncReport = undefined;
  }

  private async copyDisk(
    nbd: NbdClient,
    d: DiscoveredDisk,
    ds: DiskState,
    kind: 'initial' | 'resync',
    resumeAt: number,
    chunk: number,
    baseline: ResyncBaseline | undefined,
  ): Promise<void> {
    const size = nbd.size;
    // Ranges that hold data (not known to read as zeros), aligned out to whole chunks.
    const data: Array<[number, number]> = [];
    let total = 0;
    for await (const e of nbd.extents('base:allocation')) {
      if (e.flags & 2) continue; // NBD_STATE_ZERO
      const s = Math.floor(e.offset / chunk) * chunk;
      const end = Math.min(size, Math.ceil((e.offset + e.length) / chunk) * chunk);
      const last = data[data.length - 1];
      if (last && s <= last[1]) last[1] = Math.max(last[1], end);
      else data.push([s, end]);
    }
    for (const [s, e] of data) total += e - s;
    let done = 0;
    for (const [s, e] of data) done += Math.max(0, Math.min(e, resumeAt) - s);
    const t0 = Date.now();
    const doneAtStart = done;
    let sent = 0;
    let sinceCheckpoint = 0;
    const report = (): void => {
      const secs = (Date.now() - t0) / 1000;
      const rate = secs > 0 ? (done - doneAtStart) / secs : 0;
      this.syncReport = {
        disk: d.name,
        kind,
        doneBytes: done,
        totalBytes: total,
        sentBytes: sent,
        bytesPerSecond: rate,
        etaSeconds: rate > 0 ? (total - done) / rate : undefined,
      };
      this.emit('progress', this.syncReport);
      void this.writeStatus(false);
    };
    const zero = async (from: number, to: number): Promise<void> => {
      if (to <= from) return;
      if (!baseline) {
        await this.sink.writeZeroes(d.name, from, to - from);
        return;
      }
      // Only chunks that are not already zero in the latest point need a zero frame.
      let runStart = -1;
      for (let c = from; c < to; c += chunk) {
        const needs = baseline.idAt(c) !== null || c >= baseline.size;
        if (needs && runStart < 0) runStart = c;
        if (!needs && runStart >= 0) {
          await this.sink.writeZeroes(d.name, runStart, c - runStart);
          runStart = -1;
        }
      }
      if (runStart >= 0) await this.sink.writeZeroes(d.name, runStart, to - runStart);
    };
    const checkpoint = async (offset: number): Promise<void> => {
      await this.sink.waitForAck();
      this.checkCrash();
      if (ds.sync) ds.sync.offset = offset;
      await this.save();
      sinceCheckpoint = 0;
    };

    let pos = Math.floor(resumeAt / chunk) * chunk;
    report();
    for (const [s, e] of data) {
      if (e <= pos) continue;
      const from = Math.max(s, pos);
      await zero(pos, from);
      for (let off = from; off < e; off += this.opts.readBytes) {
        this.checkCrash();
        if (this.stopping) {
          await checkpoint(off);
          return;
        }
        const len = Math.min(this.opts.readBytes, e - off);
        const buf = await nbd.readAt(off, len);
        for (let c = 0; c < len; c += chunk) {
          const piece = buf.subarray(c, Math.min(len, c + chunk));
          const at = off + c;
          if (isZero(piece)) {
            await zero(at, at + piece.length);
            continue;
          }
          if (baseline && piece.length === chunk && baseline.idAt(at) === baseline.idOf(piece)) {
            continue;
          }
          // The sink keeps the buffer until acknowledged: give it its own copy of the piece.
          await this.sink.write(d.name, at, Buffer.from(piece));
          sent += piece.length;
          this.sentBytes += piece.length;
        }
        done += len;
        sinceCheckpoint += len;
        if (sinceCheckpoint >= this.opts.checkpointBytes) await checkpoint(off + len);
        report();
      }
      pos = e;
    }
    await zero(pos, size);
    report();
  }

  private async deleteExport(id: string): Promise<void> {
    const gone = this.q.waitForEvent('BLOCK_EXPORT_DELETED', (ev) => ev.data['id'] === id, 30_000);
    gone.catch(() => undefined);
    try {
      await this.q.execute('block-export-del', { id });
      await gone;
    } catch {
      // Already gone (or QEMU went away): nothing to clean.
    }
  }

  /** One cycle: discover changes to the disk set, cut, read dirty extents, send, acknowledge. */
  private async cycle(started: number): Promise<void> {
    const found = await discoverDisks(this.q, this.opts.disks);
    for (const d of this.disks) {
      if (!found.some((f) => f.name === d.name)) {
        throw new LifeboatError(
          'LB_AGENT_DISK_VANISHED',
          `Disk ${d.name} of machine ${this.opts.machine} is gone from QEMU; replication of the machine stopped. Every point acknowledged before stays in the store. Re-attach the disk and start the agent again (it resyncs), or protect the machine anew.`,
          { details: { machine: this.opts.machine, disk: d.name } },
        );
      }
    }
    for (const f of found) {
      const known = this.disks.find((d) => d.name === f.name);
      if (!known) {
        this.opts.logger.info({ machine: this.opts.machine, disk: f.name }, 'disk added');
        this.sink.addDisk({ name: f.name, size: f.size });
        this.disks.push(f);
        await this.fullRead(f, 'initial', 0);
        this.phase = 'continuous';
        continue;
      }
      known.size = f.size;
      known.bitmaps = f.bitmaps;
      const ds = this.st.disks[f.name];
      if (ds?.tracking && !f.bitmaps.some((b) => b.name === ds.tracking))
        this.needResync.set(f.name, 'its bitmap disappeared while running (QEMU restarted?)');
    }
    for (const [name, reason] of this.needResync) {
      const d = this.disks.find((x) => x.name === name) as DiscoveredDisk;
      this.warn(
        'LB_AGENT_RESYNC',
        `Disk ${name} needs a resync: ${reason}. Only chunks that differ from the latest point are sent.`,
        { disk: name },
      );
      delete (this.st.disks[name] as DiskState).tracking;
      await this.fullRead(d, 'resync', 0);
      this.needResync.delete(name);
      this.phase = 'continuous';
    }
    if (this.stopping) return;
    // The hardware the points record (CPUs and memory can be hot-plugged): read every cycle,
    // a few QMP queries; what this QEMU does not have is left out.
    this.hardware = await readMachineHardware(this.q, this.disks);

    const cutId = randomUUID();
    let kind = 'crash' as 'crash' | 'app';
    let warning: string | undefined;
    const wantApp =
      !this.finalizing &&
      this.opts.appConsistentIntervalMs > 0 &&
      started - this.lastAppAt >= this.opts.appConsistentIntervalMs;
    const qga = this.opts.guestAgentSocket
      ? new GuestAgentClient(this.opts.guestAgentSocket, this.opts.guestAgentTimeoutMs)
      : undefined;
    await this.opts.hooks.beforeCut?.(cutId);
    let frozen = false;
    let freezeTried = false;
    // The guest is frozen for the transaction alone (startFleecing calls these around it): the
    // overlays are created before and the views exported after, while it writes.
    const freeze = async (): Promise<void> => {
      if (!wantApp || !qga) return;
      freezeTried = true;
      try {
        await qga.freeze();
        frozen = true;
        kind = 'app';
      } catch (err) {
        // Try again at the next app-consistent time, not every cycle: each try may cost the
        // guest agent's whole time limit.
        this.lastAppAt = started;
        warning = `App-consistent point not possible, this point is crash-consistent: ${(err as Error).message}`;
        this.warn('LB_AGENT_APP_CONSISTENT_FAILED', warning);
      }
    };
    const thaw = async (): Promise<void> => {
      if (!freezeTried) return;
      freezeTried = false;
      // Thaw even after a failed freeze: a freeze that timed out may still have happened.
      await qga?.thaw().catch((err: unknown) => {
        if (frozen) {
          this.warn(
            'LB_AGENT_THAW_FAILED',
            `Thawing the guest's file systems failed: ${(err as Error).message}`,
          );
        }
      });
    };
    const cutStart = Date.now();
    // The point's time: just before the transaction (after any freeze), so the point holds every
    // write before it.
    let time = cutStart;
    const overlayDir = join(this.opts.stateDir, 'overlays');
    await mkdir(overlayDir, { recursive: true });
    let cut: FleecingCut;
    const tracked = this.disks.map((d) => {
      const ds = this.st.disks[d.name] as DiskState;
      return { d, ds, newBitmap: this.newBitmapName(), old: ds.tracking as string };
    });
    try {
      cut = await startFleecing(this.q, {
        idPrefix: `${AGENT_NODE_PREFIX}fleece`,
        removeOldBitmapOnRelease: false,
        timeoutMs: this.opts.qmpTimeoutMs,
        beforeTransaction: async () => {
          await freeze();
          time = Date.now();
        },
        afterTransaction: thaw,
        disks: tracked.map((t, i) => ({
          node: t.d.node,
          oldBitmap: t.old,
          newBitmap: t.newBitmap,
          persistent: t.d.persistentBitmaps,
          overlayPath: join(overlayDir, `${i}-${cutId}.qcow2`),
          exportName: `${AGENT_NODE_PREFIX}cut-${t.d.name}`,
        })),
      });
    } finally {
      // startFleecing thaws right after its transaction; this is for a cut that failed between.
      await thaw();
      await this.opts.hooks.afterCut?.(cutId);
    }
    // Measured from cycle start to cycle start, so "every N ms" with N = interval means every cut.
    if (kind === 'app') this.lastAppAt = started;
    let bytes = 0;
    let acked = false;
    const cutAt = Date.now();
    let sentAt = cutAt;
    let ackedAt = cutAt;
    try {
      for (const [i, t] of tracked.entries()) {
        const view = cut.disks[i];
        if (!view) continue;
        if (t.d.size !== t.ds.size) {
          await this.sink.resize(t.d.name, t.d.size);
        }
        bytes += await this.sendDirty(t.d.name, view.exportName, view.bitmapContext);
      }
      this.checkCrash();
      // Recorded before the marker goes out: if the agent dies between the sink's ack and the
      // save below, a restart that finds this cut committed adopts its bitmaps (no resync).
      this.st.pendingCut = {
        id: cutId,
        time,
        kind,
        bitmaps: Object.fromEntries(tracked.map((t) => [t.d.name, t.newBitmap])),
      };
      await this.save();
      await this.sink.cut({
        cutId,
        kind,
        time,
        ...(this.opts.consistencyGroup ? { consistencyGroup: this.opts.consistencyGroup } : {}),
        ...(this.hardware ? { labels: hardwareLabels(this.hardware) } : {}),
      });
      sentAt = Date.now();
      await this.sink.waitForAck();
      ackedAt = Date.now();
      acked = true;
      for (const t of tracked) {
        t.ds.tracking = t.newBitmap;
        t.ds.size = t.d.size;
      }
      this.st.lastCut = { id: cutId, time, kind };
      delete this.st.pendingCut;
      await this.save();
    } finally {
      if (!this.crashing) {
        await cut.release();
        // Also when the cycle failed: a failed cycle must leave the old bitmap recording with
        // everything the new one saw, or the next cut would miss those writes.
        for (const t of tracked) {
          if (acked) {
            // The old bitmap's changes are in an acknowledged cut now.
            await this.q.execute('block-dirty-bitmap-remove', { node: t.d.node, name: t.old });
          } else {
            // Not acknowledged: fold the new bitmap back into the old one, which records again,
            // in one transaction so no write falls between them.
            await this.q.execute('transaction', {
              actions: [
                {
                  type: 'block-dirty-bitmap-merge',
                  data: { node: t.d.node, target: t.old, bitmaps: [t.newBitmap] },
                },
                { type: 'block-dirty-bitmap-enable', data: { node: t.d.node, name: t.old } },
                { type: 'block-dirty-bitmap-remove', data: { node: t.d.node, name: t.newBitmap } },
              ],
            });
            // If the marker did reach the sink, the old bitmap (now a superset) is what tracks
            // from that cut: a restart that finds it committed adopts it instead of resyncing.
            const pending = this.st.pendingCut;
            if (pending?.id === cutId) pending.bitmaps[t.d.name] = t.old;
          }
        }
        if (!acked && this.st.pendingCut?.id === cutId) await this.save().catch(() => undefined);
      }
    }
    this.cycles++;
    const report: CutReport = {
      cutId,
      kind,
      time,
      bytes,
      durationMs: Date.now() - started,
      cutMs: cutAt - cutStart,
      sendMs: sentAt - cutAt,
      ackMs: ackedAt - sentAt,
      lagMs: Math.max(0, Date.now() - started - this.opts.intervalMs),
      ...(warning ? { warning } : {}),
    };
    this.emit('cut', report);
    await this.writeStatus(true);
  }

  /** Reads the extents a bitmap marks dirty from a point-in-time export and sends them. */
  private async sendDirty(disk: string, exportName: string, context: string): Promise<number> {
    const nbd = await NbdClient.connect(
      { path: this.nbdSocket as string },
      { exportName, metaContexts: [context] },
    );
    let bytes = 0;
    try {
      const pieces: Array<[number, number]> = [];
      for await (const e of nbd.extents(context)) {
        if (!(e.flags & 1)) continue; // NBD_STATE_DIRTY
        for (let off = e.offset; off < e.offset + e.length; off += this.opts.readBytes) {
          pieces.push([off, Math.min(this.opts.readBytes, e.offset + e.length - off)]);
        }
      }
      // A few reads in flight hide the round trips; the sink still gets the pieces in order.
      const reads: Array<Promise<Buffer>> = [];
      let next = 0;
      for (const [off, len] of pieces) {
        while (reads.length < READ_AHEAD && next < pieces.length) {
          const [o, l] = pieces[next++] as [number, number];
          const read = nbd.readAt(o, l);
          read.catch(() => undefined); // awaited below, in order
          reads.push(read);
        }
        this.checkCrash();
        const buf = await (reads.shift() as Promise<Buffer>);
        if (isZero(buf)) {
          await this.sink.writeZeroes(disk, off, len);
        } else {
          await this.sink.write(disk, off, buf);
          bytes += len;
          this.sentBytes += len;
        }
      }
    } finally {
      await nbd.close().catch(() => undefined);
    }
    return bytes;
  }
}

/** NBD reads kept in flight while sending dirty extents. */
const READ_AHEAD = 4;

/** Errors after which retrying the cycle cannot help. */
const FATAL = new Set(['LB_AGENT_DISK_VANISHED', 'LB_AGENT_STATE_MACHINE', 'LB_PROTO_CLOSED']);
