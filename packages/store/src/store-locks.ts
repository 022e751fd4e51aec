import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { BroadcastChannel, threadId } from 'node:worker_threads';
import { isLifeboatError } from '@lifeboat/protocol/errors';
import type { ObjectBackend } from './object-backend.js';
import { listKeys } from './object-backend.js';
import { mapLimit } from './map-limit.js';
import { storeError } from './store-error.js';

/** Lock timings. */
export interface LockOptions {
  /** How often a held lock's object is rewritten with a fresh time. @default 60000 */
  refreshMs: number;
  /** A lock not refreshed for this long is stale: its holder is presumed dead. @default 600000 */
  staleMs: number;
  /** How long a writer waits for a running gc to finish before giving up. @default 30000 */
  sharedWaitMs: number;
  /** How long gc waits for running writers to finish (new ones wait for gc). @default 300000 */
  exclusiveWaitMs: number;
}

/** The parts of a lock object that never change while it exists. */
export interface LockFacts {
  exclusive: boolean;
  machine?: string;
  disk?: string;
}

/** The content of a lock object (`locks/<id>`). */
export interface LockRecord {
  version: 1;
  exclusive: boolean;
  host: string;
  pid: number;
  purpose: string;
  created: string;
  /** Last heartbeat. */
  time: string;
  /** An exclusive lock whose holder still waits for writers to finish (it deletes nothing yet). */
  waiting?: boolean;
  /** A writer's lock: the disk it writes. Only one writer of a disk holds one at a time. */
  machine?: string;
  disk?: string;
  /** The holder's thread in its process (worker_threads.threadId; 0 is the main thread). */
  thread?: number;
}

// Lock objects held by this thread (by any store of it), so that another thread of this
// process can ask whether their holder still lives: a process id says nothing about a thread,
// and a store worker thread that died (the process server restarts it) left its lock behind.
const heldHere = new Set<string>();
let channel: BroadcastChannel | undefined;
const collectors = new Map<string, (keys: string[]) => void>();
/** How long a thread waits for another thread of its process to say it holds a lock. */
const THREAD_ANSWER_MS = 2000;

function lockChannel(): BroadcastChannel {
  if (channel !== undefined) return channel;
  const ch = new BroadcastChannel('lifeboat/store-locks/v1');
  ch.onmessage = (event: unknown) => {
    const m = (event as { data: { t: string; nonce: string; keys: string[] } }).data;
    if (m.t === 'ping') {
      const mine = m.keys.filter((k) => heldHere.has(k));
      if (mine.length > 0) ch.postMessage({ t: 'pong', nonce: m.nonce, keys: mine });
    } else if (m.t === 'pong') {
      collectors.get(m.nonce)?.(m.keys);
    }
  };
  // Answering is a service, not work of its own: it never keeps the process alive.
  ch.unref();
  channel = ch;
  return ch;
}

/** Which of `keys` (locks of other threads of this process) a live thread still holds. */
async function heldByLiveThreads(keys: string[]): Promise<Set<string>> {
  const ch = lockChannel();
  const nonce = randomBytes(8).toString('hex');
  const alive = new Set<string>();
  await new Promise<void>((resolve) => {
    const timer = setTimeout(resolve, THREAD_ANSWER_MS);
    collectors.set(nonce, (got) => {
      for (const k of got) alive.add(k);
      if (keys.every((k) => alive.has(k))) {
        clearTimeout(timer);
        resolve();
      }
    });
    ch.postMessage({ t: 'ping', nonce, keys });
  });
  collectors.delete(nonce);
  return alive;
}

/** Lock objects read at once by {@link StoreLocks.others}. */
const LOCK_READS = 8;

/** How long a writer that sees a newer lock on its disk waits for that writer to back off. */
const DISK_RACE_MS = 5000;

/** Orders two locks by creation (then key), the same way for every process that sees both. */
function lockOrder(ka: string, a: LockRecord, kb: string, b: LockRecord): number {
  const ta = Date.parse(a.created);
  const tb = Date.parse(b.created);
  if (ta !== tb) return (Number.isFinite(ta) ? ta : 0) - (Number.isFinite(tb) ? tb : 0);
  return ka < kb ? -1 : ka > kb ? 1 : 0;
}

/** A lock this process holds; keeps it fresh until released. */
export class HeldLock {
  private timer: NodeJS.Timeout | undefined;
  private lastRefresh = Date.now();
  private lost: unknown;
  private refreshing: Promise<void> | undefined;

  constructor(
    private readonly owner: StoreLocks,
    readonly key: string,
    private readonly record: LockRecord,
  ) {
    this.timer = setInterval(() => {
      this.refreshing ??= this.refresh().finally(() => {
        this.refreshing = undefined;
      });
    }, owner.options.refreshMs);
    // The heartbeat must not keep a process alive on its own; release() clears it.
    this.timer.unref();
  }

  private async refresh(): Promise<void> {
    const now = new Date();
    if (this.lost !== undefined) return;
    if (now.getTime() - this.lastRefresh > this.owner.options.staleMs) {
      // Others may already have judged this lock dead (the process stalled): never revive it.
      this.lost = new Error(`lock not refreshed for ${now.getTime() - this.lastRefresh} ms`);
      return;
    }
    try {
      if ((await this.owner.backend.stat(this.key)) === undefined)
        throw new Error('lock object was removed');
      await this.owner.backend.put(
        this.key,
        Buffer.from(JSON.stringify({ ...this.record, time: now.toISOString() })),
        // A lock means nothing once its holder's machine stopped: no fsync needed.
        { overwrite: true, durable: false },
      );
      this.lastRefresh = now.getTime();
    } catch (err) {
      this.lost ??= err;
    }
  }

  /** Throws LB_STORE_LOCK_LOST when the lock may have been taken over (so committing is unsafe). */
  async check(): Promise<void> {
    await this.refreshing;
    const age = Date.now() - this.lastRefresh;
    let exists = false;
    try {
      exists = (await this.owner.backend.stat(this.key)) !== undefined;
    } catch (err) {
      this.lost ??= err;
    }
    if (this.lost !== undefined || !exists || age > this.owner.options.staleMs) {
      throw storeError(
        'LB_STORE_LOCK_LOST',
        `The store lock ${this.key} was lost (not refreshed for ${age} ms or removed), so a gc may have run meanwhile. Nothing was committed; start the write again.`,
        { object: this.key, ageMs: age },
        this.lost,
      );
    }
    // Refresh now, unless done lately, so the point is written well inside the lock's
    // lifetime (three quarters of it are left at the very least; its heartbeat comes every
    // refreshMs, a tenth of it by default). A rewrite per commit was five file operations of
    // every 4 MiB cut of a process server.
    if (age >= Math.min(this.owner.options.refreshMs, this.owner.options.staleMs / 4)) {
      await this.refresh();
    }
    // A live exclusive lock means a gc runs: it can only have started by taking this one for dead.
    if (this.record.exclusive === false) {
      for (const other of await this.owner.others(this.key, (f) => f.exclusive)) {
        if (!other.stale && other.record.exclusive && other.record.waiting !== true) {
          this.lost ??= new Error(`gc lock ${other.key} is held`);
        }
      }
    }
    if (this.lost !== undefined) {
      throw storeError(
        'LB_STORE_LOCK_LOST',
        `The store lock ${this.key} could not be refreshed, so a gc may run meanwhile. Nothing was committed; start the write again.`,
        { object: this.key },
        this.lost,
      );
    }
  }

  /** Stops the heartbeat and deletes the lock object. */
  async release(): Promise<void> {
    if (this.timer === undefined) return;
    clearInterval(this.timer);
    this.timer = undefined;
    await this.refreshing;
    this.owner.forget(this);
    heldHere.delete(this.key);
    await this.owner.backend.delete(this.key).catch(() => undefined);
  }
}

/**
 * restic-style locks on a dumb object store: each holder writes its own lock object, then lists
 * the others. Writers hold shared locks, gc an exclusive one; whoever sees a conflict removes
 * its own object and backs off, so two conflicting holders can never both proceed.
 */
export class StoreLocks {
  readonly options: LockOptions;
  private readonly held = new Set<HeldLock>();
  /**
   * What never changes in a lock object, by key, as read before: whether it is exclusive and
   * the disk it names. Lock keys are random and never reused, and a holder rewrites only its
   * object's time (and, for gc, `waiting`), so a writer that asks only about gc's locks, or
   * about its own disk's, need not read every other writer's object again at each begin and
   * commit (a process server holds one per disk it writes: that was three reads of each per
   * 4 MiB cut). Keys no longer listed are forgotten.
   */
  private readonly facts = new Map<string, LockFacts>();

  constructor(
    readonly backend: ObjectBackend,
    options: Partial<LockOptions>,
  ) {
    this.options = Object.freeze({
      refreshMs: options.refreshMs ?? 60_000,
      staleMs: options.staleMs ?? 600_000,
      sharedWaitMs: options.sharedWaitMs ?? 30_000,
      exclusiveWaitMs: options.exclusiveWaitMs ?? 300_000,
    });
  }

  /**
   * Takes a lock; rejects with LB_STORE_LOCKED when a conflicting live lock exists. A writer's
   * lock names its disk: it rejects with LB_STORE_DISK_BUSY when another live writer holds that
   * disk (in this process or any other, on any host sharing the store).
   */
  async acquire(
    exclusive: boolean,
    purpose: string,
    disk?: { machine: string; disk: string },
  ): Promise<HeldLock> {
    const deadline = Date.now() + (exclusive ? 0 : this.options.sharedWaitMs);
    for (let delay = 100; ; delay = Math.min(delay * 2, 2000)) {
      try {
        return await this.tryAcquire(exclusive, purpose, disk);
      } catch (err) {
        if (!isLifeboatError(err, 'LB_STORE_LOCKED') || Date.now() + delay > deadline) throw err;
        await new Promise((r) => setTimeout(r, delay));
      }
    }
  }

  private async tryAcquire(
    exclusive: boolean,
    purpose: string,
    disk?: { machine: string; disk: string },
  ): Promise<HeldLock> {
    const now = new Date().toISOString();
    const record: LockRecord = {
      version: 1,
      exclusive,
      host: hostname(),
      pid: process.pid,
      purpose,
      created: now,
      time: now,
      ...(exclusive ? { waiting: true } : {}),
      ...(disk === undefined ? {} : { machine: disk.machine, disk: disk.disk }),
      thread: threadId,
    };
    const key = `locks/${randomBytes(16).toString('hex')}`;
    await this.backend.put(key, Buffer.from(JSON.stringify(record)), { durable: false });
    heldHere.add(key);
    if (disk !== undefined) lockChannel();
    let conflict: { key: string; record: LockRecord } | undefined;
    // gc keeps its lock object while it waits for running writers to finish: new writers see
    // it and wait, so a store that is written continuously still gets its gc.
    const drainUntil = exclusive ? Date.now() + this.options.exclusiveWaitMs : 0;
    try {
      for (let delay = 100; ; delay = Math.min(delay * 2, 2000)) {
        conflict = undefined;
        let writers = false;
        // A writer conflicts only with gc's exclusive locks; gc with every live lock.
        const others = await this.others(key, exclusive ? undefined : (f) => f.exclusive);
        for (const other of others) {
          if (other.stale) continue;
          if (other.record.exclusive) {
            conflict = other;
            break;
          }
          if (exclusive) {
            conflict = other;
            writers = true;
          }
        }
        if (conflict === undefined || !writers || Date.now() + delay > drainUntil) break;
        await new Promise((r) => setTimeout(r, delay));
        // Keep the waiting lock fresh, so it is never taken for a dead holder's.
        await this.backend.put(
          key,
          Buffer.from(JSON.stringify({ ...record, time: new Date().toISOString() })),
          { overwrite: true, durable: false },
        );
      }
    } catch (err) {
      heldHere.delete(key);
      await this.backend.delete(key).catch(() => undefined);
      throw err;
    }
    if (conflict !== undefined) {
      heldHere.delete(key);
      await this.backend.delete(key).catch(() => undefined);
      const r = conflict.record;
      throw storeError(
        'LB_STORE_LOCKED',
        `The store is locked ${r.exclusive ? 'exclusively' : 'by a writer'} (${r.purpose}, host ${r.host}, pid ${r.pid}, since ${r.created}). Retry when it is done; a lock whose holder died expires ${Math.round(this.options.staleMs / 1000)} s after its last heartbeat.`,
        { object: conflict.key, holder: r },
      );
    }
    if (disk !== undefined) {
      try {
        await this.claimDisk(key, record, disk);
      } catch (err) {
        heldHere.delete(key);
        await this.backend.delete(key).catch(() => undefined);
        throw err;
      }
    }
    if (exclusive) {
      // From here on gc may delete: say so, so writers that outlived their lock notice.
      delete record.waiting;
      record.time = new Date().toISOString();
      try {
        await this.backend.put(key, Buffer.from(JSON.stringify(record)), {
          overwrite: true,
          durable: false,
        });
      } catch (err) {
        heldHere.delete(key);
        await this.backend.delete(key).catch(() => undefined);
        throw err;
      }
    }
    const lock = new HeldLock(this, key, record);
    this.held.add(lock);
    return lock;
  }

  /**
   * Makes sure no other live writer holds `disk`. Every writer writes its lock object before it
   * lists the others, so of two racing writers at least one sees the other. One that sees an
   * older lock on its disk gives up at once; one that sees only newer ones waits for them to
   * give up (they see its lock: it is older), and gives up itself if they do not (then they
   * did not see it, and went ahead). So at most one writer of a disk proceeds.
   */
  private async claimDisk(
    key: string,
    record: LockRecord,
    disk: { machine: string; disk: string },
  ): Promise<void> {
    const deadline = Date.now() + Math.min(DISK_RACE_MS, this.options.sharedWaitMs);
    // Writers of this disk: only their lock objects are read (again).
    const sameDisk = (f: LockFacts): boolean =>
      !f.exclusive && f.machine === disk.machine && f.disk === disk.disk;
    for (let delay = 50; ; delay = Math.min(delay * 2, 500)) {
      let rivals = (await this.others(key, sameDisk)).filter((o) => !o.stale);
      // A rival of this process but another thread: alive only if that thread says so.
      const sameProcess = rivals.filter(
        (o) =>
          o.record.host === hostname() &&
          o.record.pid === process.pid &&
          o.record.thread !== threadId,
      );
      if (sameProcess.length > 0) {
        const alive = await heldByLiveThreads(sameProcess.map((o) => o.key));
        rivals = rivals.filter((o) => !sameProcess.includes(o) || alive.has(o.key));
      }
      if (rivals.length === 0) return;
      const older = rivals.find((o) => lockOrder(o.key, o.record, key, record) < 0);
      if (older !== undefined || Date.now() + delay > deadline) {
        const r = (older ?? rivals[0]) as { key: string; record: LockRecord };
        throw storeError(
          'LB_STORE_DISK_BUSY',
          `Disk ${disk.disk} of machine ${disk.machine} is being written by another session (${r.record.purpose}, host ${r.record.host}, pid ${r.record.pid}, since ${r.record.created}); two writers of one disk would fork its history. Retry when that write is done; a lock whose holder died expires ${Math.round(this.options.staleMs / 1000)} s after its last heartbeat.`,
          { object: r.key, holder: r.record, machine: disk.machine, disk: disk.disk },
        );
      }
      await new Promise((r) => setTimeout(r, delay));
    }
  }

  /**
   * Every lock object except `own`, with whether it is stale. With `want`, only the objects
   * whose fixed facts it accepts (or whose facts this instance has not read yet): the others
   * are listed but not read again.
   */
  async others(
    own?: string,
    want?: (facts: LockFacts) => boolean,
  ): Promise<Array<{ key: string; record: LockRecord; stale: boolean }>> {
    const out: Array<{ key: string; record: LockRecord; stale: boolean }> = [];
    const listed = new Set<string>();
    const toRead: string[] = [];
    for await (const key of listKeys(this.backend, 'locks/')) {
      listed.add(key);
      if (key === own) continue;
      const known = this.facts.get(key);
      if (known === undefined || want === undefined || want(known)) toRead.push(key);
    }
    for (const key of this.facts.keys()) if (!listed.has(key)) this.facts.delete(key);
    // Several at once, not one after another: a process server holds a lock per disk it writes.
    const read = await mapLimit(toRead, LOCK_READS, (key) => this.readLock(key));
    for (const got of read) {
      if (got === undefined) continue;
      const { key, record } = got;
      const facts: LockFacts = { exclusive: Boolean(record.exclusive) };
      if (record.machine !== undefined) facts.machine = record.machine;
      if (record.disk !== undefined) facts.disk = record.disk;
      this.facts.set(key, facts);
      if (want !== undefined && !want(facts)) continue;
      out.push({ key, record, stale: this.isStale(record) });
    }
    return out;
  }

  /** One lock object's record; undefined when it is gone or not JSON. */
  private async readLock(key: string): Promise<{ key: string; record: LockRecord } | undefined> {
    try {
      return {
        key,
        record: JSON.parse((await this.backend.get(key)).toString('utf8')) as LockRecord,
      };
    } catch (err) {
      if (isLifeboatError(err, 'LB_BACKEND_NOT_FOUND')) return undefined;
      // An unreadable lock object counts as a live exclusive lock until it expires... but we
      // cannot read its time, so treat it as stale only when it is unparsable JSON.
      if (err instanceof SyntaxError) return undefined;
      throw err;
    }
  }

  /** True when a lock's holder is presumed dead. */
  isStale(r: LockRecord): boolean {
    const t = Date.parse(r.time);
    if (!Number.isFinite(t) || Date.now() - t > this.options.staleMs) return true;
    if (r.host === hostname() && r.pid !== process.pid) {
      try {
        process.kill(r.pid, 0);
      } catch (err) {
        return (err as NodeJS.ErrnoException).code === 'ESRCH';
      }
    }
    return false;
  }

  /** @internal */
  forget(lock: HeldLock): void {
    this.held.delete(lock);
  }

  /** Releases every lock this process holds (on close). */
  async releaseAll(): Promise<void> {
    for (const lock of [...this.held]) await lock.release();
  }
}
