import { setTimeout as sleep } from 'node:timers/promises';
import { LifeboatError, isLifeboatError } from '@lifeboat/protocol';
import type { PointInfo, WriteSession } from '@lifeboat/store';
import type { Logger } from 'pino';
import type { Journal, JournalRecord } from './journal.js';
import type { MachineState } from './machine-state-store.js';
import type { Semaphore } from './semaphore.js';
import type { ReplicatorStore } from './store-worker-pool.js';

/** A cut committed to the store: one point per disk. */
export interface CommittedCut {
  machine: string;
  cutId: string;
  seq: number;
  time: Date;
  kind: 'crash' | 'app';
  points: PointInfo[];
  /** Milliseconds from the cut's arrival in the journal to its commit. */
  latencyMs: number;
}

/** What a {@link MachineReplicator} needs from the server. */
export interface MachineReplicatorDeps {
  store: ReplicatorStore;
  journal: Journal;
  storeLimit: Semaphore;
  /** Machines applying a cut at once (bounds memory: each holds open write sessions). */
  applySlots: Semaphore;
  logger: Logger;
  saveState: (state: MachineState) => Promise<void>;
  onCommitted: (cut: CommittedCut) => void;
  /**
   * A record read back from the journal failed its check (LB_PS_JOURNAL_CORRUPT), or the point
   * a disk's changes go on was deleted from the store (LB_PS_BASE_POINT_MISSING): the server
   * marks the machine for resync, which drops its backlog. Called once per damaged backlog.
   */
  onJournalDamage?: (err: LifeboatError) => void;
  retryInitialMs: number;
  retryMaxMs: number;
}

/** How often a replicator that started a cut early checks whether others wait for its slot. */
const EARLY_RECHECK_MS = 250;
/** Records received and not applied yet, at most, for a machine to count as keeping up. */
const KEEPING_UP_RECORDS = 16;
/**
 * Journal bytes read ahead of the record being applied, at most, per machine applying (so at
 * most this times the apply slots in all). A backlog's bodies come from the disk (the journal
 * writes with direct I/O, so they are not in the page cache); read one at a time, between the
 * store's writes and commits, they took a third of one machine's drain time.
 */
const READ_AHEAD_BYTES = 4 * 1024 * 1024;
/** Records read ahead at most, whatever their size. */
const READ_AHEAD_RECORDS = 32;

/** Metadata of a cut as journaled. */
interface CutMeta {
  cutId: string;
  kind: 'crash' | 'app';
  time: number;
  consistencyGroup?: string;
  labels?: Record<string, string>;
}

/**
 * Drains one machine's durable journal records into the store, oldest first: extents go into
 * one write session per disk, and each cut commits a point of every disk of the machine. Only
 * then is the journal released up to the cut. A store failure aborts the open sessions and
 * retries from the first uncommitted record with backoff, so an outage only delays points.
 */
export class MachineReplicator {
  private records: JournalRecord[] = [];
  private cursor = 0;
  private backlog = 0;
  private readonly sessions = new Map<string, WriteSession>();
  private wake: (() => void) | undefined;
  private stopped = false;
  private generation = 0;
  /** After a restart or failure a cut may already be in the store; check before committing it again. */
  private mayHaveCommitted = true;
  private failures = 0;
  /** Cuts received and not yet committed: work starts only when a whole cut is in the journal. */
  private cutsQueued = 0;
  private readonly arrivals = new Map<number, number>();
  private loop: Promise<void> | undefined;
  private inSlot = false;
  /** The generation whose damaged journal record was reported (once per backlog). */
  private damagedGeneration = -1;
  /** Bodies being read ahead of the cursor, by record. */
  private ahead = new Map<JournalRecord, Promise<Buffer>>();
  private aheadBytes = 0;
  /**
   * The state save and journal release of the last committed cut, still in flight: the next
   * cut's records are applied meanwhile, and its commit waits for it. So at most one committed
   * cut is ever missing from the saved state, which `mayHaveCommitted` covers after a crash.
   */
  private pendingSave: Promise<void> | undefined;
  /** The last store error, cleared by the next commit. */
  lastError: LifeboatError | undefined;
  /** Bytes of data applied to the store. */
  bytesOut = 0;
  /** Bytes of data applied to the store, per disk. */
  readonly diskBytesOut = new Map<string, number>();

  constructor(
    readonly state: MachineState,
    private readonly deps: MachineReplicatorDeps,
  ) {}

  /**
   * True while this machine holds an apply slot and has applied nearly all it received: its
   * next records are applied as soon as they are durable, so the journal may keep their bytes
   * in memory for it instead of a read back (a machine with a backlog would only pin them).
   */
  get keepingUp(): boolean {
    return this.inSlot && this.records.length - this.cursor <= KEEPING_UP_RECORDS;
  }

  /** Journal bytes of records not yet committed. */
  get backlogBytes(): number {
    return this.backlog;
  }

  /** Records not yet committed. */
  get backlogRecords(): number {
    return this.records.length;
  }

  /** Starts the drain loop. */
  start(): void {
    this.loop ??= this.run();
  }

  /** Adds a durable record (in sequence order). */
  push(r: JournalRecord): void {
    this.records.push(r);
    this.backlog += r.recordBytes;
    if (r.kind === 'cut') {
      this.arrivals.set(r.seq, performance.now());
      this.cutsQueued++;
    }
    this.wake?.();
  }

  /** Drops every uncommitted record (the machine is marked for resync); returns bytes dropped. */
  async dropBacklog(): Promise<number> {
    this.generation++;
    const dropped = this.backlog;
    this.records = [];
    this.cursor = 0;
    this.backlog = 0;
    this.cutsQueued = 0;
    this.arrivals.clear();
    await this.abortSessions();
    this.wake?.();
    return dropped;
  }

  /** Stops after the current store operation; open sessions are aborted (records stay in the journal). */
  async stop(): Promise<void> {
    this.stopped = true;
    this.wake?.();
    await this.loop;
    await this.abortSessions();
    // The last commit's state goes to disk before the server closes (a failure here only
    // means the cut is found in the store again after the restart).
    await this.pendingSave?.catch(() => undefined);
  }

  private async run(): Promise<void> {
    while (!this.stopped) {
      // A cut's records are applied once the whole cut is in the journal; or, when a slot is
      // idle (no other machine waits for one), as soon as its first records are: the store
      // work then overlaps the agent's sending, and the point commits soon after its cut.
      const early =
        this.cutsQueued === 0 && this.records.length > this.cursor && this.deps.applySlots.idle;
      if (this.cutsQueued === 0 && !early) {
        await new Promise<void>((resolve) => (this.wake = resolve));
        this.wake = undefined;
        continue;
      }
      const gen = this.generation;
      try {
        // A cut's records are applied and committed in one go while holding a slot: memory
        // (open sessions, partial packs) is bounded by the slots, not by the number of machines.
        await this.deps.applySlots.run(async () => {
          this.inSlot = true;
          try {
            await this.applyInSlot(gen);
          } finally {
            this.inSlot = false;
            // Bodies read ahead are held only while applying: a machine waiting for a slot
            // pins no memory (with 100 machines that was 4 MiB each). Every way out of the
            // slot (a cut, a failure, a dropped backlog, the slot given back) passes here.
            this.dropReadAhead();
          }
        });
        this.failures = 0;
      } catch (err) {
        if (this.stopped) break;
        // The backlog was dropped while this attempt ran (overflow, resync): its sessions were
        // aborted under it, so its failure says nothing of the store. Reporting it showed the
        // store as unreachable until the machine's next commit.
        if (gen !== this.generation) continue;
        if (
          (isLifeboatError(err, 'LB_PS_JOURNAL_CORRUPT') ||
            isLifeboatError(err, 'LB_PS_BASE_POINT_MISSING')) &&
          this.deps.onJournalDamage !== undefined &&
          this.damagedGeneration !== gen
        ) {
          // Retrying cannot help: the bytes on disk are not what was acknowledged (or the point
          // they change is gone). Nothing of it reaches a point; the machine resyncs (its
          // backlog is dropped, the agent told).
          this.damagedGeneration = gen;
          this.lastError = err;
          this.deps.logger.error(
            { err: err.toJSON(), machine: this.state.machine },
            err.code === 'LB_PS_JOURNAL_CORRUPT'
              ? 'journal record damaged on disk; the machine must resync'
              : 'the base point of a disk is gone; the machine must resync',
          );
          await this.abortSessions();
          this.cursor = 0;
          this.deps.onJournalDamage(err);
          continue;
        }
        this.lastError =
          err instanceof LifeboatError
            ? err
            : new LifeboatError(
                'LB_PS_STORE_FAILED',
                `Writing machine ${this.state.machine} to the store failed (${(err as Error).message}); retrying.`,
                { cause: err },
              );
        const delay = Math.min(
          this.deps.retryMaxMs,
          this.deps.retryInitialMs * 2 ** Math.min(this.failures++, 16),
        );
        this.deps.logger.warn(
          {
            err: this.lastError.toJSON(),
            machine: this.state.machine,
            retryInMs: delay,
            backlogBytes: this.backlog,
          },
          'store write failed; backlog kept in the journal',
        );
        await this.abortSessions();
        this.cursor = 0;
        this.mayHaveCommitted = true;
        await sleep(delay * (0.75 + Math.random() * 0.5));
      }
    }
  }

  /** Applies records while holding a slot, up to and including the next cut. */
  private async applyInSlot(gen: number): Promise<void> {
    while (!this.stopped && gen === this.generation) {
      const r = this.records[this.cursor];
      if (!r) {
        // Started early: the rest of the cut is still on its way from the agent. When
        // another machine waits for the slot meanwhile, give it back: the sessions are
        // aborted and the records applied again with the cut.
        if (this.cutsQueued === 0 && this.deps.applySlots.waiting > 0) {
          await this.abortSessions();
          this.cursor = 0;
          return;
        }
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, EARLY_RECHECK_MS);
          this.wake = () => {
            clearTimeout(timer);
            resolve();
          };
        });
        this.wake = undefined;
        continue;
      }
      await this.apply(r, gen);
      if (gen !== this.generation) return;
      this.cursor++;
      if (r.kind === 'cut') return;
    }
  }

  private async session(disk: string): Promise<WriteSession> {
    let s = this.sessions.get(disk);
    if (!s) {
      const size = this.state.disks[disk]?.size ?? 0;
      // On top of the point this server committed last for the disk: the agent's extents are
      // changes since that cut (and a resync baseline is that point's digests), whatever else
      // was written to the disk meanwhile. Naming it also spares the store a listing of every
      // point, which grows with the retention. Unknown (a machine new to this server): latest.
      const known = this.state.points[disk]?.id;
      const base = known ?? 'latest';
      try {
        s = await this.deps.storeLimit.run(() =>
          this.deps.store.beginWrite({ machine: this.state.machine, disk, size, base }),
        );
      } catch (err) {
        if (known === undefined || !isLifeboatError(err, 'LB_STORE_POINT_NOT_FOUND')) throw err;
        // Deleted from the store (by hand: retention keeps a disk's latest point). Changes
        // since it cannot go on top of another point; the whole disk is sent again.
        delete this.state.points[disk];
        throw new LifeboatError(
          'LB_PS_BASE_POINT_MISSING',
          `Recovery point ${known}, the last one of disk ${disk} of machine ${this.state.machine}, is no longer in the store, so the changes since it have nothing to go on; the machine must resync.`,
          { cause: err, details: { machine: this.state.machine, disk, point: known } },
        );
      }
      this.sessions.set(disk, s);
      // The rest of this cut's extents of the disk, as far as they are here: the session reads
      // the base's leaves for them at once (a worker that did not write this disk's last point,
      // or a restart, has none of them in memory).
      const ranges: Array<{ offset: number; length: number }> = [];
      for (let i = Math.max(0, this.cursor); i < this.records.length; i++) {
        const r = this.records[i]!;
        if (r.kind === 'cut') break;
        if (r.disk !== disk) continue;
        if (r.kind === 'data') ranges.push({ offset: r.a, length: r.bodyLength });
        else if (r.kind === 'zero' || r.kind === 'trim') ranges.push({ offset: r.a, length: r.b });
      }
      if (ranges.length > 0) void s.prefetch?.(ranges);
    }
    return s;
  }

  private async apply(r: JournalRecord, gen: number): Promise<void> {
    const limit = this.deps.storeLimit;
    switch (r.kind) {
      case 'data': {
        const body = await this.body(r);
        const s = await this.session(r.disk);
        const n = body.length; // the bytes may be transferred to a worker thread (detached)
        await limit.run(() => s.write(r.a, body));
        this.bytesOut += n;
        this.diskBytesOut.set(r.disk, (this.diskBytesOut.get(r.disk) ?? 0) + n);
        return;
      }
      case 'zero': {
        const s = await this.session(r.disk);
        await limit.run(() => s.writeZeroes(r.a, r.b));
        return;
      }
      case 'trim': {
        const s = await this.session(r.disk);
        await limit.run(() => s.trim(r.a, r.b));
        return;
      }
      case 'resize': {
        const s = await this.session(r.disk);
        await limit.run(() => s.resize(r.a));
        return;
      }
      case 'cut':
        await this.commitCut(r, gen);
        return;
      case 'discard': {
        // The agent lost track of this disk's changes since the last cut: start it over from its base.
        const s = this.sessions.get(r.disk);
        this.sessions.delete(r.disk);
        if (s) await limit.run(() => s.abort());
        return;
      }
    }
  }

  private async commitCut(r: JournalRecord, gen: number): Promise<void> {
    const meta = JSON.parse((await this.deps.journal.readBody(r)).toString('utf8')) as CutMeta;
    const disks = new Set([...Object.keys(this.state.disks), ...this.sessions.keys()]);
    const points: PointInfo[] = [];
    const sizes: Record<string, { size: number }> = {};
    // The previous cut's state first: never two committed cuts missing from the saved state.
    await this.settlePendingSave();
    for (const disk of [...disks].sort()) {
      const s = await this.session(disk);
      sizes[disk] = { size: s.size };
      if (this.mayHaveCommitted) {
        // A crash between this disk's commit and the state save: the point exists, do not
        // repeat it. One read of the object the cut names, however many points the store has.
        const existing = await limit(this.deps, () =>
          this.deps.store.findCutPoint(this.state.machine, disk, meta.cutId),
        );
        if (existing) {
          await s.abort();
          this.sessions.delete(disk);
          points.push(existing);
          continue;
        }
      }
      const opts: {
        time: Date;
        kind: 'crash' | 'app';
        cut: string;
        consistencyGroup?: string;
        labels?: Record<string, string>;
      } = {
        time: new Date(meta.time),
        kind: meta.kind,
        cut: meta.cutId,
      };
      if (meta.consistencyGroup !== undefined) opts.consistencyGroup = meta.consistencyGroup;
      if (meta.labels !== undefined) opts.labels = meta.labels;
      let info: PointInfo;
      try {
        info = await this.deps.storeLimit.run(() => s.commit(opts));
      } catch (err) {
        // Committed already, by an attempt whose answer was lost (a store timeout that did
        // go through): the store refused a second point of the cut; take the first.
        const first = isLifeboatError(err, 'LB_STORE_POINT_EXISTS')
          ? await this.deps.store.findCutPoint(this.state.machine, disk, meta.cutId)
          : undefined;
        if (first === undefined) throw err;
        info = first;
      }
      this.sessions.delete(disk);
      points.push(info);
    }
    if (gen !== this.generation) return;
    const st = this.state;
    st.releasedSeq = Math.max(st.releasedSeq, r.seq);
    st.disks = { ...st.disks, ...sizes };
    for (const p of points) st.points[p.disk] = { id: p.id, time: meta.time };
    st.lastCut = {
      cutId: meta.cutId,
      seq: r.seq,
      time: meta.time,
      kind: meta.kind,
      committedAt: Date.now(),
    };
    if (meta.consistencyGroup !== undefined) st.consistencyGroup = meta.consistencyGroup;
    if (st.resync && r.seq > st.resync.atSeq) delete st.resync;
    // Saved (a snapshot, taken now) and released while the next cut's records are applied.
    const machine = st.machine;
    const save = this.deps.saveState(st).then(() => this.deps.journal.release(machine, r.seq));
    save.catch(() => undefined); // surfaced by settlePendingSave
    this.pendingSave = save;
    if (gen !== this.generation) return;
    const n = this.cursor + 1;
    for (let i = 0; i < n; i++) this.backlog -= this.records[i]!.recordBytes;
    this.records.splice(0, n);
    this.cursor = -1; // the caller's increment makes it 0
    this.cutsQueued--;
    this.mayHaveCommitted = false;
    this.lastError = undefined;
    const arrived = this.arrivals.get(r.seq);
    this.arrivals.delete(r.seq);
    this.deps.onCommitted({
      machine: st.machine,
      cutId: meta.cutId,
      seq: r.seq,
      time: new Date(meta.time),
      kind: meta.kind,
      points,
      latencyMs: arrived === undefined ? 0 : performance.now() - arrived,
    });
  }

  /**
   * Waits for the last cut's state save. A failed save is reported as a store failure (the
   * drain retries); the cut itself is committed, and the next save records it.
   */
  private async settlePendingSave(): Promise<void> {
    const p = this.pendingSave;
    if (p === undefined) return;
    try {
      await p;
    } catch (cause) {
      if (this.pendingSave === p) this.pendingSave = undefined;
      throw new LifeboatError(
        'LB_PS_STORE_FAILED',
        `Saving the replication state of machine ${this.state.machine} failed (${(cause as Error).message}); retrying. Check the journal's disk.`,
        { cause },
      );
    }
    if (this.pendingSave === p) this.pendingSave = undefined;
  }

  /** The body of a data record, read ahead or now; starts reading the next ones. */
  private body(r: JournalRecord): Promise<Buffer> {
    let p = this.ahead.get(r);
    if (p !== undefined) {
      this.ahead.delete(r);
      this.aheadBytes -= r.bodyLength;
    } else {
      p = this.deps.journal.readBody(r);
    }
    this.readAhead();
    return p;
  }

  /**
   * Starts reading the bodies of the data records after the cursor, within the budget, up to
   * the next cut (the slot is given up there).
   */
  private readAhead(): void {
    const end = Math.min(this.records.length, this.cursor + 1 + READ_AHEAD_RECORDS);
    for (let i = this.cursor + 1; i < end && this.aheadBytes < READ_AHEAD_BYTES; i++) {
      const r = this.records[i]!;
      if (r.kind === 'cut') break;
      if (r.kind !== 'data' || this.ahead.has(r)) continue;
      const p = this.deps.journal.readBody(r);
      p.catch(() => undefined); // a damaged record is reported when it is applied
      this.ahead.set(r, p);
      this.aheadBytes += r.bodyLength;
    }
  }

  /** Forgets the bodies read ahead (their buffers go to the garbage collector). */
  private dropReadAhead(): void {
    this.ahead.clear();
    this.aheadBytes = 0;
  }

  private async abortSessions(): Promise<void> {
    const all = [...this.sessions.values()];
    this.sessions.clear();
    await Promise.all(all.map((s) => s.abort().catch(() => undefined)));
  }
}

function limit<T>(deps: MachineReplicatorDeps, fn: () => Promise<T>): Promise<T> {
  return deps.storeLimit.run(fn);
}
