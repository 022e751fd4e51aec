import pg from 'pg';
import { componentStatus } from '../http/component-routes.js';
import { failJobsOfSilentComponent } from '../services/component-jobs.js';
import { SYSTEM } from '../services/principal.js';
import type { VaultContext } from '../vault-context.js';

// Items read per query when evaluating alerts.
const EVALUATE_PAGE = 500;

// One number for all Lifeboat vaults on a database: pg_try_advisory_lock's key.
const SCHEDULER_LOCK_KEY = 0x4c42_5641; // "LBVA"

/**
 * The scheduler: evaluates alerts, recovers orphaned jobs and creates scheduled jobs
 * (retention per policy). On PostgreSQL only the instance holding a session-level advisory
 * lock (on its own connection) schedules; the others keep trying, so another takes over when
 * the holder dies. Scheduled jobs also carry a unique slot key, so even a split-brain moment
 * cannot create one slot twice.
 */
export class Scheduler {
  private timer: NodeJS.Timeout | undefined;
  private lockClient: pg.Client | undefined;
  private leader = false;
  private ticking: Promise<void> | undefined;
  private stopped = false;
  /** Scheduled jobs this instance created (for tests and logs). */
  readonly created: string[] = [];

  constructor(private readonly vault: VaultContext) {}

  /** True while this instance schedules. */
  get isLeader(): boolean {
    return this.leader;
  }

  /** Starts ticking. */
  start(): void {
    this.timer = setInterval(() => void this.tick(), this.vault.options.schedulerIntervalMs);
    void this.tick();
  }

  /** One round now (also run on the timer); resolves when done. */
  async tick(now = new Date()): Promise<void> {
    if (this.ticking !== undefined) return this.ticking;
    this.ticking = this.round(now)
      .catch((err: unknown) => this.vault.log.error({ err }, 'scheduler round failed'))
      .finally(() => {
        this.ticking = undefined;
      });
    return this.ticking;
  }

  private async acquire(): Promise<boolean> {
    if (this.vault.dialect === 'sqlite') return true; // one process owns the SQLite file
    if (this.lockClient !== undefined) return this.leader;
    const client = new pg.Client({ connectionString: this.vault.options.databaseUrl });
    client.on('error', (err) => {
      // The lock dies with its connection: step down and try again next round.
      this.vault.log.warn({ err }, 'scheduler lock connection lost');
      this.leader = false;
      this.lockClient = undefined;
      void client.end().catch(() => undefined);
    });
    try {
      await client.connect();
      const r = await client.query<{ ok: boolean }>('select pg_try_advisory_lock($1) as ok', [
        SCHEDULER_LOCK_KEY,
      ]);
      if (r.rows[0]?.ok === true) {
        this.lockClient = client;
        this.vault.log.info('this vault instance is now the scheduler');
        return true;
      }
      await client.end();
      return false;
    } catch (err) {
      await client.end().catch(() => undefined);
      throw err;
    }
  }

  private async round(now: Date): Promise<void> {
    if (this.stopped) return;
    this.leader = await this.acquire();
    this.vault.metrics.schedulerLeader.set(this.leader ? 1 : 0);
    if (!this.leader) return;
    await this.vault.jobs.recoverOrphans(false);
    await this.evaluateAlerts(now);
    await this.scheduleRetention(now);
    await this.scheduleStoreStats(now);
    await this.scheduleStoreGc(now);
    await this.pruneHistory(now);
    await this.refreshGauges();
  }

  private async scheduleRetention(now: Date): Promise<void> {
    const policies = await this.vault.db
      .selectFrom('policies')
      .select(['id', 'retentionIntervalSeconds'])
      .execute();
    for (const p of policies) {
      const slot = Math.floor(now.getTime() / (p.retentionIntervalSeconds * 1000));
      const job = await this.vault.jobs.create(
        {
          kind: 'retention',
          target: { type: 'policy', id: p.id },
          scheduleKey: `retention:${p.id}:${slot}`,
        },
        SYSTEM,
      );
      if (job !== undefined) this.created.push(job.id);
    }
  }

  // Each target store's size and deduplication, measured once per interval (and at once for a
  // store never measured, since its first slot is the current one).
  private scheduleStoreStats(now: Date): Promise<void> {
    return this.perStore('store-stats', this.vault.options.storeStatsIntervalSeconds, now);
  }

  // Each target store's garbage collection once per interval: retention only deletes points,
  // this frees their data. A store's first slot is the current one, so a new store (still
  // small) is collected at once and then on the interval's boundaries.
  private scheduleStoreGc(now: Date): Promise<void> {
    return this.perStore('store-gc', this.vault.options.storeGcIntervalSeconds, now);
  }

  /** One job of `kind` per target store and slot of `seconds`. */
  private async perStore(kind: string, seconds: number, now: Date): Promise<void> {
    const slot = Math.floor(now.getTime() / (seconds * 1000));
    const stores = await this.vault.db.selectFrom('targetStores').select('id').execute();
    for (const s of stores) {
      const job = await this.vault.jobs.create(
        {
          kind,
          target: { type: 'target-store', id: s.id },
          scheduleKey: `${kind}:${s.id}:${slot}`,
        },
        SYSTEM,
      );
      if (job !== undefined) this.created.push(job.id);
    }
  }

  private lastHistoryPrune = 0;

  // Per-item samples older than the retention go, at most once a minute.
  private async pruneHistory(now: Date): Promise<void> {
    if (now.getTime() - this.lastHistoryPrune < 60_000) return;
    this.lastHistoryPrune = now.getTime();
    const hours = this.vault.options.historyRetentionHours;
    await this.vault.history.prune(new Date(now.getTime() - hours * 3_600_000));
  }

  /** Raises and clears the alerts that follow from the database's state at `now`. */
  async evaluateAlerts(now: Date): Promise<void> {
    const { db, alerts, options } = this.vault;
    // RPO: an item is as recent as its last point; over the policy's threshold it alerts.
    // Read in pages with a turn of the event loop between them: one query over 10,000 items
    // held the API's event loop (better-sqlite3 is synchronous) every few seconds.
    type Row = { id: string; state: string; lastPointAt: string | null; threshold: number };
    const items: Row[] = [];
    for (let after = ''; ;) {
      const page = await db
        .selectFrom('protectedItems')
        .innerJoin('policies', 'policies.id', 'protectedItems.policyId')
        .select([
          'protectedItems.id as id',
          'protectedItems.state as state',
          'protectedItems.lastPointAt as lastPointAt',
          'policies.rpoThresholdSeconds as threshold',
        ])
        .where('protectedItems.state', 'in', ['protected', 'resync-needed'])
        .where('protectedItems.id', '>', after)
        .orderBy('protectedItems.id')
        .limit(EVALUATE_PAGE)
        .execute();
      items.push(...page);
      const last = page[page.length - 1];
      if (page.length < EVALUATE_PAGE || last === undefined) break;
      after = last.id;
      await new Promise((resolve) => setImmediate(resolve));
    }
    const over = new Map<string, { rpo: number; threshold: number }>();
    for (const i of items) {
      if (i.lastPointAt === null) continue;
      const rpo = (now.getTime() - Date.parse(i.lastPointAt)) / 1000;
      if (rpo > i.threshold) over.set(i.id, { rpo, threshold: i.threshold });
    }
    const rpoActive = await alerts.activeSubjects('rpo-exceeded');
    for (const [id, { rpo, threshold }] of over) {
      if (rpoActive.has(id)) continue;
      await alerts.raise({
        kind: 'rpo-exceeded',
        severity: 'error',
        subjectType: 'protected-item',
        subjectId: id,
        message: `RPO of protected item ${id} is ${Math.round(rpo)} s, above the policy's ${threshold} s. Check its process server and agent.`,
        details: { rpoSeconds: Math.round(rpo), thresholdSeconds: threshold },
      });
    }
    for (const id of rpoActive)
      if (!over.has(id)) await alerts.clear('rpo-exceeded', 'protected-item', id);

    const resync = new Set(items.filter((i) => i.state === 'resync-needed').map((i) => i.id));
    const resyncActive = await alerts.activeSubjects('resync-needed');
    for (const id of resync) {
      if (!resyncActive.has(id)) {
        await alerts.raise({
          kind: 'resync-needed',
          severity: 'warning',
          subjectType: 'protected-item',
          subjectId: id,
          message: `Protected item ${id} needs a resync (changes were lost from tracking); it compares chunk hashes and sends what differs.`,
        });
      }
    }
    for (const id of resyncActive)
      if (!resync.has(id)) await alerts.clear('resync-needed', 'protected-item', id);

    const components = await db
      .selectFrom('components')
      .selectAll()
      .where('kind', 'in', ['process-server', 'recovery-host'])
      .execute();
    const conditions: Array<{
      kind:
        | 'process-server-no-heartbeat'
        | 'process-server-journal-full'
        | 'process-server-store-unreachable'
        | 'recovery-host-no-heartbeat';
      test: (c: (typeof components)[number]) => string | undefined;
    }> = [
      {
        kind: 'process-server-no-heartbeat',
        test: (c) =>
          c.kind === 'process-server' && componentStatus(c, this.vault, now.getTime()) !== 'healthy'
            ? `Process server ${c.name} sent no heartbeat for over ${options.heartbeatTimeoutSeconds} s${c.lastHeartbeatAt === null ? ' (never)' : ` (last ${c.lastHeartbeatAt})`}. Check that it runs and reaches the vault.`
            : undefined,
      },
      {
        kind: 'recovery-host-no-heartbeat',
        test: (c) =>
          c.kind === 'recovery-host' &&
          c.lastHeartbeatAt !== null &&
          componentStatus(c, this.vault, now.getTime()) !== 'healthy'
            ? `Recovery host ${c.name} sent no heartbeat since ${c.lastHeartbeatAt}. Check that it runs.`
            : undefined,
      },
      {
        kind: 'process-server-journal-full',
        test: (c) => {
          const h = JSON.parse(c.health) as {
            journalUsedBytes?: number;
            journalCapacityBytes?: number;
          };
          if (
            c.kind !== 'process-server' ||
            !h.journalCapacityBytes ||
            h.journalUsedBytes === undefined
          )
            return undefined;
          const ratio = h.journalUsedBytes / h.journalCapacityBytes;
          return ratio >= options.journalFullRatio
            ? `Journal of process server ${c.name} is ${Math.round(ratio * 100)}% full. Check the target store's reachability and bandwidth, or enlarge the journal.`
            : undefined;
        },
      },
      {
        kind: 'process-server-store-unreachable',
        test: (c) => {
          const h = JSON.parse(c.health) as { storeReachable?: boolean };
          return c.kind === 'process-server' && h.storeReachable === false
            ? `Process server ${c.name} cannot reach its target store; replication continues into its journal. Check the network and the store's credentials.`
            : undefined;
        },
      },
    ];
    for (const cond of conditions) {
      const active = await alerts.activeSubjects(cond.kind);
      const failing = new Set<string>();
      for (const c of components) {
        const message = cond.test(c);
        if (message === undefined) continue;
        failing.add(c.id);
        if (!active.has(c.id)) {
          await alerts.raise({
            kind: cond.kind,
            severity: 'critical',
            subjectType: c.kind,
            subjectId: c.id,
            message,
          });
        }
        if (cond.kind.endsWith('no-heartbeat')) {
          await failJobsOfSilentComponent(this.vault, c.id, `${c.kind} ${c.name}`);
        }
      }
      for (const id of active)
        if (!failing.has(id))
          await alerts.clear(
            cond.kind,
            components.find((c) => c.id === id)?.kind ?? 'process-server',
            id,
          );
    }
  }

  private async refreshGauges(): Promise<void> {
    const { db, metrics } = this.vault;
    const states = await db
      .selectFrom('protectedItems')
      .select(['state', (eb) => eb.fn.countAll().as('n')])
      .groupBy('state')
      .execute();
    metrics.protectedItems.reset();
    for (const s of states) metrics.protectedItems.set({ state: s.state }, Number(s.n));
    const kinds = await db
      .selectFrom('alerts')
      .select(['kind', (eb) => eb.fn.countAll().as('n')])
      .where('state', '=', 'active')
      .groupBy('kind')
      .execute();
    metrics.activeAlerts.reset();
    for (const k of kinds) metrics.activeAlerts.set({ kind: k.kind }, Number(k.n));
  }

  /** Stops ticking and releases the lock. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer !== undefined) clearInterval(this.timer);
    await this.ticking;
    const client = this.lockClient;
    this.lockClient = undefined;
    this.leader = false;
    if (client !== undefined) await client.end().catch(() => undefined);
  }
}
