import { sql, type Kysely } from 'kysely';
import type { Logger } from 'pino';
import type { ItemSampleRow, VaultDatabase } from '../db/schema.js';
import { invalid } from './errors.js';

/** Reports of one item within the bucket still open in this vault instance. */
interface OpenBucket {
  bucket: number;
  reports: number;
  sum: number;
  max: number;
  backlog: number;
}

/** One bucket of an item's history as the API shows it. */
export interface HistoryBucket {
  /** Start of the bucket (ISO). */
  time: string;
  /** Worst RPO within the bucket (null while some disk had no point yet). */
  rpoSeconds: number | null;
  /** Mean throughput over the heartbeat reports in the bucket (null: no report moved data). */
  throughputBps: number | null;
  throughputMaxBps: number | null;
  backlogBytes: number | null;
}

/**
 * Per-item throughput and backlog history from the process servers' heartbeat reports.
 * Reports are aggregated in memory per item and time bucket, and a bucket is written once it
 * ends (one row per busy item and bucket, not per heartbeat). Several vault instances each
 * write their share of a bucket; the upsert adds them up. Buckets in which no report moved
 * data (no throughput, no backlog) are not written, so idle items cost nothing.
 */
export class ItemHistory {
  private readonly open = new Map<string, OpenBucket>();
  private readonly timer: NodeJS.Timeout;
  private writing: Promise<void> = Promise.resolve();

  constructor(
    private readonly db: Kysely<VaultDatabase>,
    private readonly bucketSeconds: number,
    private readonly log: Logger,
  ) {
    this.timer = setInterval(() => void this.flushEnded(), Math.min(bucketSeconds * 1000, 10_000));
    this.timer.unref();
  }

  private bucketOf(ms: number): number {
    const w = this.bucketSeconds * 1000;
    return Math.floor(ms / w) * w;
  }

  /** Adds one heartbeat report of an item (figures absent from the report are not counted). */
  record(
    itemId: string,
    throughputBps: number | undefined,
    backlogBytes: number | undefined,
    now = Date.now(),
  ): void {
    if (throughputBps === undefined && backlogBytes === undefined) return;
    const bucket = this.bucketOf(now);
    let b = this.open.get(itemId);
    if (b !== undefined && b.bucket !== bucket) {
      this.queue([[itemId, b]]);
      b = undefined;
    }
    if (b === undefined) {
      b = { bucket, reports: 0, sum: 0, max: 0, backlog: 0 };
      this.open.set(itemId, b);
    }
    b.reports++;
    b.sum += throughputBps ?? 0;
    b.max = Math.max(b.max, throughputBps ?? 0);
    b.backlog = Math.max(b.backlog, backlogBytes ?? 0);
  }

  private queue(done: Array<[string, OpenBucket]>): void {
    const rows: ItemSampleRow[] = done
      .filter(([, b]) => b.sum > 0 || b.backlog > 0)
      .map(([id, b]) => ({
        protectedItemId: id,
        bucket: new Date(b.bucket).toISOString(),
        reports: b.reports,
        throughputSumBps: b.sum,
        throughputMaxBps: b.max,
        backlogMaxBytes: b.backlog,
      }));
    for (const [id, b] of done) if (this.open.get(id) === b) this.open.delete(id);
    if (rows.length === 0) return;
    this.writing = this.writing
      .then(() => this.write(rows))
      .catch((err: unknown) => this.log.warn({ err }, 'could not write replication history'));
  }

  private async write(rows: ItemSampleRow[]): Promise<void> {
    for (let i = 0; i < rows.length; i += 200) {
      await this.db
        .insertInto('itemSamples')
        .values(rows.slice(i, i + 200))
        .onConflict((oc) =>
          oc.columns(['protectedItemId', 'bucket']).doUpdateSet({
            reports: sql`"itemSamples"."reports" + excluded."reports"`,
            throughputSumBps: sql`"itemSamples"."throughputSumBps" + excluded."throughputSumBps"`,
            throughputMaxBps: sql`case when "itemSamples"."throughputMaxBps" > excluded."throughputMaxBps" then "itemSamples"."throughputMaxBps" else excluded."throughputMaxBps" end`,
            backlogMaxBytes: sql`case when "itemSamples"."backlogMaxBytes" > excluded."backlogMaxBytes" then "itemSamples"."backlogMaxBytes" else excluded."backlogMaxBytes" end`,
          }),
        )
        .execute();
    }
  }

  /** Writes the buckets that have ended (on a timer, so an item that stops reporting is kept). */
  async flushEnded(now = Date.now()): Promise<void> {
    const current = this.bucketOf(now);
    this.queue([...this.open].filter(([, b]) => b.bucket < current));
    await this.writing;
  }

  /** Writes every bucket, ended or not (at shutdown), and stops the timer. */
  async close(): Promise<void> {
    clearInterval(this.timer);
    this.queue([...this.open]);
    await this.writing;
  }

  /** Deletes samples older than `before`; returns how many. */
  async prune(before: Date): Promise<number> {
    const r = await this.db
      .deleteFrom('itemSamples')
      .where('bucket', '<', before.toISOString())
      .executeTakeFirst();
    return Number(r.numDeletedRows);
  }

  /**
   * The item's history from `since` to `until` in buckets of `bucketSeconds` (aligned to
   * multiples of it): throughput and backlog from the samples (and this instance's bucket
   * still open), the RPO from the catalogue's points.
   */
  async history(
    itemId: string,
    since: number,
    until: number,
    bucketSeconds: number,
  ): Promise<HistoryBucket[]> {
    const w = bucketSeconds * 1000;
    const first = Math.floor(since / w) * w;
    const count = Math.ceil((until - first) / w);
    if (count > 5000) {
      throw invalid(
        'query.bucketSeconds',
        `${count} buckets is more than 5000; ask for wider buckets or fewer hours.`,
      );
    }
    const buckets = Array.from({ length: Math.max(0, count) }, (_, i) => ({
      start: first + i * w,
      reports: 0,
      sum: 0,
      max: null as number | null,
      backlog: null as number | null,
      rpo: null as number | null,
    }));
    const at = (ms: number) => buckets[Math.floor((ms - first) / w)];
    const add = (ms: number, s: { reports: number; sum: number; max: number; backlog: number }) => {
      const b = at(ms);
      if (b === undefined) return;
      b.reports += s.reports;
      b.sum += s.sum;
      b.max = Math.max(b.max ?? 0, s.max);
      b.backlog = Math.max(b.backlog ?? 0, s.backlog);
    };
    const samples = await this.db
      .selectFrom('itemSamples')
      .selectAll()
      .where('protectedItemId', '=', itemId)
      .where('bucket', '>=', new Date(first).toISOString())
      .where('bucket', '<', new Date(until).toISOString())
      .execute();
    for (const s of samples) {
      add(Date.parse(s.bucket), {
        reports: s.reports,
        sum: s.throughputSumBps,
        max: s.throughputMaxBps,
        backlog: s.backlogMaxBytes,
      });
    }
    const open = this.open.get(itemId);
    if (open !== undefined && (open.sum > 0 || open.backlog > 0)) {
      add(open.bucket, {
        reports: open.reports,
        sum: open.sum,
        max: open.max,
        backlog: open.backlog,
      });
    }
    const peaks = await this.rpo(
      itemId,
      since,
      until,
      buckets.map((b) => Math.min(b.start + w, until)),
    );
    peaks.forEach((rpo, i) => {
      const b = buckets[i];
      if (b !== undefined) b.rpo = rpo;
    });
    return buckets.map((b) => ({
      time: new Date(b.start).toISOString(),
      rpoSeconds: b.rpo,
      throughputBps: b.reports === 0 ? null : b.sum / b.reports,
      throughputMaxBps: b.max,
      backlogBytes: b.backlog,
    }));
  }

  /**
   * The item's worst RPO in each bucket, given the buckets' ends. The item's RPO at a moment
   * is the age of the newest point of its stalest disk known then; a point counts from its
   * commit, as the vault's RPO does. Between commits the RPO grows, so a bucket's worst is
   * just before one of its commits or at its end. Points cut more than an hour before `since`
   * are taken as known at `since`.
   */
  private async rpo(
    itemId: string,
    since: number,
    until: number,
    ends: number[],
  ): Promise<Array<number | null>> {
    const disks = await this.db
      .selectFrom('protectedDisks')
      .select('name')
      .where('protectedItemId', '=', itemId)
      .execute();
    if (disks.length === 0) return ends.map(() => null);
    const lookback = new Date(since - 3_600_000).toISOString();
    const latest = new Map<string, number>();
    for (const d of disks) {
      const before = await this.db
        .selectFrom('recoveryPoints')
        .select('time')
        .where('protectedItemId', '=', itemId)
        .where('disk', '=', d.name)
        .where('time', '<', lookback)
        .orderBy('time', 'desc')
        .limit(1)
        .executeTakeFirst();
      if (before !== undefined) latest.set(d.name, Date.parse(before.time));
    }
    const points = await this.db
      .selectFrom('recoveryPoints')
      .select(['disk', 'time', 'committedAt'])
      .where('protectedItemId', '=', itemId)
      .where('time', '>=', lookback)
      .where('time', '<=', new Date(until).toISOString())
      .execute();
    const events: Array<{ at: number; disk: string; time: number }> = [];
    for (const p of points) {
      const time = Date.parse(p.time);
      const at = Math.max(time, Date.parse(p.committedAt));
      if (at <= since) latest.set(p.disk, Math.max(latest.get(p.disk) ?? 0, time));
      else if (at <= until) events.push({ at, disk: p.disk, time });
    }
    events.sort((a, b) => a.at - b.at);
    const rpoAt = (ms: number): number | null => {
      let oldest = Infinity;
      for (const d of disks) {
        const t = latest.get(d.name);
        if (t === undefined) return null;
        oldest = Math.min(oldest, t);
      }
      return Math.max(0, (ms - oldest) / 1000);
    };
    const worst = (a: number | null, b: number | null) =>
      a === null ? b : b === null ? a : Math.max(a, b);
    let j = 0;
    return ends.map((end) => {
      let max: number | null = null;
      for (; j < events.length && (events[j]?.at ?? Infinity) < end; j++) {
        const e = events[j];
        if (e === undefined) break;
        max = worst(max, rpoAt(e.at));
        latest.set(e.disk, Math.max(latest.get(e.disk) ?? 0, e.time));
      }
      return worst(max, end <= since ? null : rpoAt(end));
    });
  }
}
