import type { Kysely, Transaction } from 'kysely';
import type { Counter } from 'prom-client';
import type { Logger } from 'pino';
import type { AlertDeliveryRow, AlertRow, VaultDatabase } from '../db/schema.js';
import { newId, nowIso } from '../ids.js';
import { isUniqueViolation } from './errors.js';

/** Kinds of alerts the vault raises. */
export type AlertKind =
  | 'rpo-exceeded'
  | 'process-server-no-heartbeat'
  | 'process-server-journal-full'
  | 'process-server-store-unreachable'
  | 'recovery-host-no-heartbeat'
  | 'resync-needed'
  | 'job-failed';

/** A condition to raise. */
export interface AlertInput {
  kind: AlertKind;
  severity: 'warning' | 'error' | 'critical';
  subjectType: string;
  subjectId: string;
  message: string;
  details?: Record<string, unknown>;
}

/** An alert as the API shows it. */
export function alertToApi(row: AlertRow): Record<string, unknown> {
  return { ...row, activeKey: undefined, details: JSON.parse(row.details) as unknown };
}

/** Options of the webhook deliveries of {@link AlertService}. */
export interface AlertDeliveryOptions {
  /** Alerts are POSTed here when raised and cleared; none when undefined. */
  webhookUrl?: string | undefined;
  /** Waits before each retry of a failed delivery (no answer, 429, 5xx). */
  retryDelaysMs?: readonly number[];
  /**
   * How often pending deliveries are looked for besides the ones this instance makes (those of
   * another instance that stopped, claims that expired). @default 5000
   */
  pollMs?: number;
  /** Counts deliveries by outcome. */
  deliveries?: Counter<'outcome'>;
}

/** Default waits before the retries of a delivery: about 9 hours in all. */
export const DEFAULT_WEBHOOK_RETRY_DELAYS_MS: readonly number[] = [
  1000, 5000, 30_000, 120_000, 600_000, 1_800_000, 3_600_000, 3_600_000, 3_600_000, 3_600_000,
  3_600_000, 3_600_000, 3_600_000,
];

/** How long an instance owns a delivery it is POSTing (longer than the 5 s request timeout). */
const CLAIM_MS = 30_000;
/** Deliveries looked at per pass (the oldest pending first). */
const PASS_ROWS = 500;
/** POSTs at once. */
const PARALLEL = 8;
/** Delivered and given-up deliveries are kept this long, then deleted. */
const KEEP_FINISHED_MS = 30 * 24 * 3600 * 1000;

/**
 * Raises and clears alerts. Each condition (kind + subject) is active at most once: the
 * `activeKey` column is unique while active and NULL once cleared, so raising an active
 * condition again (from any vault instance) does nothing. Raised and cleared alerts are POSTed
 * to the webhook when one is configured, through an outbox: the delivery is a row written in
 * the same transaction as the alert's change, and stays pending until the receiver answers 2xx
 * (delivered), refuses it with another 4xx, or every retry failed (failed). A vault that stops
 * keeps its pending deliveries; the next one to run (this one restarted, or another instance)
 * sends them. The two events of one alert go out in order.
 */
export class AlertService {
  private readonly closing = new AbortController();
  private readonly url: string | undefined;
  private readonly retryDelaysMs: readonly number[];
  private readonly pollMs: number;
  private readonly counter: Counter<'outcome'> | undefined;
  private started = false;
  /** The pass running now; passes never overlap in one instance. */
  private passing: Promise<void> | undefined;
  /** Another pass was asked for while one ran. */
  private again = false;
  private timer: NodeJS.Timeout | undefined;
  private lastCleanup = 0;
  /** When the earliest pending delivery not in flight falls due (ms; Infinity: none known). */
  private nextDue = Infinity;
  /** POSTs in flight, by delivery id. */
  private readonly inFlight = new Map<string, Promise<void>>();

  constructor(
    private readonly db: Kysely<VaultDatabase>,
    private readonly log: Logger,
    options: AlertDeliveryOptions = {},
  ) {
    this.url = options.webhookUrl;
    this.retryDelaysMs = options.retryDelaysMs ?? DEFAULT_WEBHOOK_RETRY_DELAYS_MS;
    this.pollMs = options.pollMs ?? 5000;
    this.counter = options.deliveries;
  }

  /** Starts delivering: first whatever a stopped vault left pending. */
  start(): void {
    if (this.url === undefined || this.started || this.closing.signal.aborted) return;
    this.started = true;
    this.kick();
  }

  /** Raises a condition; returns the new alert, or undefined when it is already active. */
  async raise(input: AlertInput): Promise<AlertRow | undefined> {
    const row: AlertRow = {
      id: newId('alr'),
      kind: input.kind,
      severity: input.severity,
      subjectType: input.subjectType,
      subjectId: input.subjectId,
      message: input.message,
      details: JSON.stringify(input.details ?? {}),
      state: 'active',
      activeKey: `${input.kind}|${input.subjectType}|${input.subjectId}`,
      raisedAt: nowIso(),
      clearedAt: null,
      acknowledgedAt: null,
      acknowledgedBy: null,
    };
    try {
      await this.db.transaction().execute(async (tx) => {
        await tx.insertInto('alerts').values(row).execute();
        await this.enqueue(tx, 'alert.raised', row);
      });
    } catch (err) {
      if (isUniqueViolation(err)) return undefined;
      throw err;
    }
    this.log.warn({ alert: row.id, kind: row.kind, subject: row.subjectId }, row.message);
    this.kick();
    return row;
  }

  /** Clears an active condition; returns whether one was active. */
  async clear(kind: AlertKind, subjectType: string, subjectId: string): Promise<boolean> {
    const key = `${kind}|${subjectType}|${subjectId}`;
    const row = await this.db
      .selectFrom('alerts')
      .selectAll()
      .where('activeKey', '=', key)
      .executeTakeFirst();
    if (row === undefined) return false;
    const now = nowIso();
    const updated = await this.db.transaction().execute(async (tx) => {
      const r = await tx
        .updateTable('alerts')
        .set({ state: 'cleared', clearedAt: now, activeKey: null })
        .where('id', '=', row.id)
        .where('activeKey', '=', key)
        .executeTakeFirst();
      if (Number(r.numUpdatedRows) !== 1) return false;
      await this.enqueue(tx, 'alert.cleared', {
        ...row,
        state: 'cleared',
        clearedAt: now,
        activeKey: null,
      });
      return true;
    });
    if (!updated) return false;
    this.log.info({ alert: row.id, kind }, `cleared: ${row.message}`);
    this.kick();
    return true;
  }

  /** Subjects with an active alert of this kind. */
  async activeSubjects(kind: AlertKind): Promise<Set<string>> {
    const rows = await this.db
      .selectFrom('alerts')
      .select('subjectId')
      .where('kind', '=', kind)
      .where('state', '=', 'active')
      .execute();
    return new Set(rows.map((r) => r.subjectId));
  }

  /**
   * Waits until no delivery is pending (delivered or given up, retries included), running
   * passes as they fall due (tests; it returns only once the receiver answered).
   */
  async flush(): Promise<void> {
    if (this.url === undefined) return;
    for (;;) {
      await this.runPass();
      await Promise.all([...this.inFlight.values()]);
      const next = await this.db
        .selectFrom('alertDeliveries')
        .select(['nextAttemptAt', 'claimedUntil'])
        .where('state', '=', 'pending')
        .orderBy('nextAttemptAt')
        .executeTakeFirst();
      if (next === undefined || this.closing.signal.aborted) return;
      await sleep(Math.min(Math.max(dueAt(next) - Date.now(), 5), 1000));
    }
  }

  /**
   * On shutdown: POSTs in flight are cut off and everything not delivered stays pending in
   * the database for the next vault to send.
   */
  async close(): Promise<void> {
    this.closing.abort();
    clearTimeout(this.timer);
    while (this.passing !== undefined || this.inFlight.size > 0) {
      await this.passing;
      await Promise.all([...this.inFlight.values()]);
    }
  }

  // ---- delivery -----------------------------------------------------------------------------

  private async enqueue(
    tx: Transaction<VaultDatabase>,
    event: 'alert.raised' | 'alert.cleared',
    alert: AlertRow,
  ): Promise<void> {
    if (this.url === undefined) return;
    const now = nowIso();
    const row: AlertDeliveryRow = {
      id: newId('dlv'),
      alertId: alert.id,
      event,
      body: JSON.stringify({ event, alert: alertToApi(alert) }),
      state: 'pending',
      attempts: 0,
      nextAttemptAt: now,
      claimedUntil: null,
      lastError: null,
      createdAt: now,
      finishedAt: null,
    };
    await tx.insertInto('alertDeliveries').values(row).execute();
  }

  /** Runs a pass soon (after the current one, if one runs). */
  private kick(): void {
    if (!this.started || this.closing.signal.aborted) return;
    void this.runPass().catch((err: unknown) => {
      this.log.warn({ err }, 'alert webhook deliveries: a pass failed; retrying later');
    });
  }

  private runPass(): Promise<void> {
    if (this.passing !== undefined) {
      this.again = true;
      return this.passing;
    }
    const run = (async () => {
      try {
        do {
          this.again = false;
          await this.pass();
        } while (this.again && !this.closing.signal.aborted);
      } finally {
        this.passing = undefined;
        this.schedule();
      }
    })();
    this.passing = run;
    return run;
  }

  /** The next pass: when the earliest retry falls due, at the latest after `pollMs`. */
  private schedule(): void {
    clearTimeout(this.timer);
    if (!this.started || this.closing.signal.aborted) return;
    const wait = Math.min(Math.max(this.nextDue - Date.now(), 10), this.pollMs);
    this.timer = setTimeout(() => this.kick(), wait);
    this.timer.unref();
  }

  /**
   * Starts a POST of every pending delivery that is due, the oldest first, one at a time per
   * alert, up to {@link PARALLEL} in flight. It does not wait for them: a receiver that hangs
   * holds up only its own deliveries, never a newer alert's.
   */
  private async pass(): Promise<void> {
    const url = this.url;
    if (url === undefined || this.closing.signal.aborted) return;
    const now = nowIso();
    const rows = await this.db
      .selectFrom('alertDeliveries')
      .selectAll()
      .where('state', '=', 'pending')
      .orderBy('createdAt')
      .orderBy('id')
      .limit(PASS_ROWS)
      .execute();
    // An alert's later event waits while an earlier one is pending.
    const waiting = new Set<string>();
    this.nextDue = Infinity;
    for (const r of rows) {
      if (waiting.has(r.alertId)) continue;
      waiting.add(r.alertId);
      // In flight, or waiting for room: the end of a POST starts the next pass.
      if (this.inFlight.has(r.id) || this.inFlight.size >= PARALLEL) continue;
      if (r.nextAttemptAt > now || (r.claimedUntil !== null && r.claimedUntil > now)) {
        // Not due yet, or another instance is POSTing it (its claim runs out if it stopped).
        this.nextDue = Math.min(this.nextDue, dueAt(r));
        continue;
      }
      const run = this.attempt(url, r)
        .catch((err: unknown) => {
          this.log.warn(
            { err, delivery: r.id },
            'alert webhook delivery: cannot record its outcome',
          );
        })
        .finally(() => {
          this.inFlight.delete(r.id);
          // Its alert's next event, a retry that fell due, or a row that waited for room.
          this.kick();
        });
      this.inFlight.set(r.id, run);
    }
    await this.cleanup();
  }

  /** One POST of a delivery, when this instance can claim it; records the outcome. */
  private async attempt(url: string, r: AlertDeliveryRow): Promise<void> {
    const now = Date.now();
    const nowText = nowIso(new Date(now));
    const claimed = await this.db
      .updateTable('alertDeliveries')
      .set({ claimedUntil: nowIso(new Date(now + CLAIM_MS)) })
      .where('id', '=', r.id)
      .where('state', '=', 'pending')
      // Checked again here, on the row as it is now: the pass may have read it before another
      // attempt of it (this instance's or another's) recorded its outcome.
      .where('attempts', '=', r.attempts)
      .where('nextAttemptAt', '<=', nowText)
      .where((eb) => eb.or([eb('claimedUntil', 'is', null), eb('claimedUntil', '<=', nowText)]))
      .executeTakeFirst();
    if (Number(claimed.numUpdatedRows) !== 1) return;
    const attempts = r.attempts + 1;
    let retryable: boolean;
    let why: string;
    try {
      const res = await fetch(url, {
        method: 'POST',
        headers: {
          'content-type': 'application/json',
          // At least once: a receiver that must not act twice keys on this.
          'x-lifeboat-delivery': r.id,
          'x-lifeboat-event': r.event,
        },
        body: r.body,
        signal: AbortSignal.any([AbortSignal.timeout(5000), this.closing.signal]),
      });
      await res.body?.cancel();
      if (res.ok) {
        await this.finish(r.id, 'delivered', attempts);
        this.counter?.inc({ outcome: 'delivered' });
        return;
      }
      retryable = res.status === 429 || res.status >= 500;
      why = `HTTP ${res.status}`;
    } catch (err) {
      if (this.closing.signal.aborted) {
        // Stopping: the delivery stays pending (it may have reached the receiver: at least once).
        await this.db
          .updateTable('alertDeliveries')
          .set({ claimedUntil: null })
          .where('id', '=', r.id)
          .execute()
          .catch(() => undefined);
        this.log.info(
          { delivery: r.id, event: r.event },
          'alert webhook delivery kept for later: the vault is stopping',
        );
        return;
      }
      retryable = true;
      why = errorText(err);
    }
    const wait = this.retryDelaysMs[attempts - 1];
    const base = { delivery: r.id, alert: r.alertId, event: r.event, attempts, error: why };
    if (!retryable || wait === undefined) {
      await this.finish(r.id, 'failed', attempts, why);
      this.counter?.inc({ outcome: 'failed' });
      this.log.warn(
        base,
        retryable
          ? 'alert webhook delivery failed after its last retry; not retried (the alert itself stays in the alert list)'
          : 'alert webhook delivery refused by the receiver; not retried (the alert itself stays in the alert list)',
      );
      return;
    }
    await this.db
      .updateTable('alertDeliveries')
      .set({
        attempts,
        lastError: why,
        claimedUntil: null,
        nextAttemptAt: nowIso(new Date(Date.now() + wait)),
      })
      .where('id', '=', r.id)
      .execute();
    this.counter?.inc({ outcome: 'retried' });
    this.log.warn({ ...base, retryInMs: wait }, 'alert webhook delivery failed; retrying');
    return;
  }

  private async finish(
    id: string,
    state: 'delivered' | 'failed',
    attempts: number,
    /** Why it was given up; a delivered one keeps the error of its last failed attempt. */
    lastError?: string,
  ): Promise<void> {
    await this.db
      .updateTable('alertDeliveries')
      .set({
        state,
        attempts,
        claimedUntil: null,
        finishedAt: nowIso(),
        ...(lastError === undefined ? {} : { lastError }),
      })
      .where('id', '=', id)
      .execute();
  }

  /** Deletes finished deliveries older than a month, at most once an hour. */
  private async cleanup(): Promise<void> {
    const now = Date.now();
    if (now - this.lastCleanup < 3600_000) return;
    this.lastCleanup = now;
    await this.db
      .deleteFrom('alertDeliveries')
      .where('state', '!=', 'pending')
      .where('finishedAt', '<', nowIso(new Date(now - KEEP_FINISHED_MS)))
      .execute();
  }
}

/** When a pending delivery may be POSTed: its next attempt, once no instance claims it. */
function dueAt(r: Pick<AlertDeliveryRow, 'nextAttemptAt' | 'claimedUntil'>): number {
  return Math.max(
    Date.parse(r.nextAttemptAt),
    r.claimedUntil === null ? 0 : Date.parse(r.claimedUntil),
  );
}

function errorText(err: unknown): string {
  if (err instanceof Error) {
    const cause = (err as { cause?: unknown }).cause;
    return cause instanceof Error ? `${err.message}: ${cause.message}` : err.message;
  }
  return String(err);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
