import type { Kysely } from 'kysely';
import type { Logger } from 'pino';
import type { AlertRow, VaultDatabase } from '../db/schema.js';
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

/**
 * Raises and clears alerts. Each condition (kind + subject) is active at most once: the
 * `activeKey` column is unique while active and NULL once cleared, so raising an active
 * condition again (from any vault instance) does nothing. Raised and cleared alerts are POSTed
 * to the webhook when one is configured.
 */
export class AlertService {
  private readonly deliveries = new Set<Promise<void>>();
  // Aborted on close: deliveries waiting for a retry give up.
  private readonly closing = new AbortController();

  constructor(
    private readonly db: Kysely<VaultDatabase>,
    private readonly log: Logger,
    private readonly webhookUrl: string | undefined,
    /** Waits before each retry of a failed delivery (no answer, 429, 5xx). */
    private readonly retryDelaysMs: readonly number[] = [1000, 5000, 30_000, 120_000],
  ) {}

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
      await this.db.insertInto('alerts').values(row).execute();
    } catch (err) {
      if (isUniqueViolation(err)) return undefined;
      throw err;
    }
    this.log.warn({ alert: row.id, kind: row.kind, subject: row.subjectId }, row.message);
    this.deliver('alert.raised', row);
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
    const r = await this.db
      .updateTable('alerts')
      .set({ state: 'cleared', clearedAt: now, activeKey: null })
      .where('id', '=', row.id)
      .where('activeKey', '=', key)
      .executeTakeFirst();
    if (Number(r.numUpdatedRows) !== 1) return false;
    this.log.info({ alert: row.id, kind }, `cleared: ${row.message}`);
    this.deliver('alert.cleared', { ...row, state: 'cleared', clearedAt: now, activeKey: null });
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

  private deliver(event: string, alert: AlertRow): void {
    const url = this.webhookUrl;
    if (url === undefined) return;
    const body = JSON.stringify({ event, alert: alertToApi(alert) });
    const p = this.post(url, event, body).finally(() => this.deliveries.delete(p));
    this.deliveries.add(p);
  }

  // One delivery: retried with the configured waits while the receiver is down or overloaded
  // (no answer, 429, 5xx); a 4xx other than 429 is the receiver's final no.
  private async post(url: string, event: string, body: string): Promise<void> {
    for (let attempt = 0; ; attempt++) {
      let retryable: boolean;
      let why: Record<string, unknown>;
      try {
        const res = await fetch(url, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body,
          signal: AbortSignal.timeout(5000),
        });
        await res.body?.cancel();
        if (res.ok) return;
        retryable = res.status === 429 || res.status >= 500;
        why = { status: res.status };
      } catch (err) {
        retryable = true;
        why = { err };
      }
      const wait = this.retryDelaysMs[attempt];
      if (!retryable || wait === undefined || this.closing.signal.aborted) {
        this.log.warn(
          { ...why, event, attempts: attempt + 1 },
          'alert webhook delivery failed; not retried',
        );
        return;
      }
      this.log.warn({ ...why, event, retryInMs: wait }, 'alert webhook delivery failed; retrying');
      const stopped = await new Promise<boolean>((resolve) => {
        const onAbort = (): void => {
          clearTimeout(timer);
          resolve(true);
        };
        const timer = setTimeout(() => {
          this.closing.signal.removeEventListener('abort', onAbort);
          resolve(false);
        }, wait);
        this.closing.signal.addEventListener('abort', onAbort, { once: true });
      });
      if (stopped) {
        this.log.warn({ event }, 'alert webhook delivery dropped: the vault is stopping');
        return;
      }
    }
  }

  /** Waits for webhook deliveries in flight, retries included (tests). */
  async flush(): Promise<void> {
    await Promise.allSettled([...this.deliveries]);
  }

  /** On shutdown: deliveries waiting for a retry give up; waits for those in flight. */
  async close(): Promise<void> {
    this.closing.abort();
    await this.flush();
  }
}
