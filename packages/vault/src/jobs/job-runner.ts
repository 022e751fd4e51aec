import { setTimeout as sleep } from 'node:timers/promises';
import { LifeboatError, isLifeboatError } from '@lifeboat/protocol';
import type { JobRow } from '../db/schema.js';
import { newId, nowIso } from '../ids.js';
import { isUniqueViolation } from '../services/errors.js';
import type { Principal } from '../services/principal.js';
import type { VaultContext } from '../vault-context.js';
import type { JobContext, JobHandler } from './job-handler.js';

/** One step of a job as stored and shown. */
export interface JobStep {
  name: string;
  state: 'pending' | 'running' | 'done' | 'failed';
  startedAt: string | null;
  finishedAt: string | null;
  /** What the step found or did, as a component reported it (its own jobs have none). */
  detail?: Record<string, unknown>;
}

/** Job states: queued → running → succeeded | failed | cancelled (running → queued on resume). */
export type JobState = 'queued' | 'running' | 'succeeded' | 'failed' | 'cancelled';

/** What creates a job. */
export interface NewJob {
  kind: string;
  target?: { type: string; id: string };
  params?: Record<string, unknown>;
  /** For scheduled jobs: a slot key that is unique, so no slot ever runs twice. */
  scheduleKey?: string;
}

interface Running {
  id: string;
  controller: AbortController;
  done: Promise<void>;
}

/**
 * Runs jobs from the database. Every instance runs jobs; a job is claimed with a conditional
 * update so only one instance runs it, and holds a lease the runner renews. A job whose lease
 * ran out (its vault died) is resumed when its handler is resumable, otherwise failed with
 * LB_VAULT_JOB_INTERRUPTED: never left `running` forever.
 */
export class JobRunner {
  private readonly handlers = new Map<string, JobHandler>();
  private readonly running = new Map<string, Running>();
  private pollTimer: NodeJS.Timeout | undefined;
  private leaseTimer: NodeJS.Timeout | undefined;
  private polling = false;
  private stopped = false;

  constructor(private readonly vaultRef: () => VaultContext) {}

  private get vault(): VaultContext {
    return this.vaultRef();
  }

  /** Adds a kind of job. */
  register(handler: JobHandler): void {
    this.handlers.set(handler.kind, handler);
  }

  /** Starts polling for queued jobs. */
  start(): void {
    const { jobPollIntervalMs, jobLeaseMs } = this.vault.options;
    this.pollTimer = setInterval(() => this.kick(), jobPollIntervalMs);
    this.leaseTimer = setInterval(() => void this.renewLeases(), Math.max(50, jobLeaseMs / 3));
    this.kick();
  }

  /** Creates a queued job; returns its row, or undefined when its schedule slot already exists. */
  async create(job: NewJob, by: Principal): Promise<JobRow | undefined> {
    const handler = this.handlers.get(job.kind);
    if (handler === undefined) {
      throw new LifeboatError('LB_VAULT_UNKNOWN_JOB_KIND', `No job kind "${job.kind}".`, {
        details: { kind: job.kind },
      });
    }
    const now = nowIso();
    const row: JobRow = {
      id: newId('job'),
      kind: job.kind,
      state: 'queued',
      targetType: job.target?.type ?? null,
      targetId: job.target?.id ?? null,
      params: JSON.stringify(job.params ?? {}),
      result: null,
      error: null,
      progress: 0,
      steps: JSON.stringify(
        handler.steps.map((name) => ({
          name,
          state: 'pending',
          startedAt: null,
          finishedAt: null,
        })),
      ),
      attempts: 0,
      scheduleKey: job.scheduleKey ?? null,
      leaseOwner: null,
      leaseUntil: null,
      cancelRequested: 0,
      createdBy: by.name,
      createdAt: now,
      startedAt: null,
      finishedAt: null,
      updatedAt: now,
    };
    try {
      await this.vault.db.insertInto('jobs').values(row).execute();
    } catch (err) {
      if (job.scheduleKey !== undefined && isUniqueViolation(err)) return undefined;
      throw err;
    }
    this.kick();
    return row;
  }

  /** Looks for queued jobs now (also called on a timer). */
  kick(): void {
    if (this.stopped || this.polling) return;
    this.polling = true;
    this.poll()
      .catch((err: unknown) => this.vault.log.error({ err }, 'job runner poll failed'))
      .finally(() => {
        this.polling = false;
      });
  }

  private async poll(): Promise<void> {
    const free = this.vault.options.jobConcurrency - this.running.size;
    if (free <= 0) return;
    const candidates = await this.vault.db
      .selectFrom('jobs')
      .select(['id'])
      .where('state', '=', 'queued')
      // Jobs queued for a component (a recovery host's test failover) are the component's to run.
      .where((eb) =>
        eb.or([eb('leaseOwner', 'is', null), eb('leaseOwner', 'not like', 'component:%')]),
      )
      .orderBy('id')
      .limit(free)
      .execute();
    for (const { id } of candidates) {
      if (this.stopped) return;
      const now = new Date();
      const result = await this.vault.db
        .updateTable('jobs')
        .set((eb) => ({
          state: 'running',
          leaseOwner: this.vault.instanceId,
          leaseUntil: nowIso(new Date(now.getTime() + this.vault.options.jobLeaseMs)),
          attempts: eb('attempts', '+', 1),
          startedAt: eb.fn.coalesce('startedAt', eb.val(nowIso(now))),
          updatedAt: nowIso(now),
        }))
        .where('id', '=', id)
        .where('state', '=', 'queued')
        .where((eb) =>
          eb.or([eb('leaseOwner', 'is', null), eb('leaseOwner', 'not like', 'component:%')]),
        )
        .executeTakeFirst();
      if (Number(result.numUpdatedRows) !== 1) continue; // another instance took it
      const job = await this.vault.db
        .selectFrom('jobs')
        .selectAll()
        .where('id', '=', id)
        .executeTakeFirstOrThrow();
      const controller = new AbortController();
      const entry: Running = { id, controller, done: Promise.resolve() };
      entry.done = this.execute(job, controller.signal).finally(() => {
        this.running.delete(id);
        this.kick();
      });
      this.running.set(id, entry);
    }
  }

  private async renewLeases(): Promise<void> {
    if (this.running.size === 0) return;
    const until = nowIso(new Date(Date.now() + this.vault.options.jobLeaseMs));
    for (const entry of [...this.running.values()]) {
      try {
        const row = await this.vault.db
          .selectFrom('jobs')
          .select(['cancelRequested', 'leaseOwner', 'state'])
          .where('id', '=', entry.id)
          .executeTakeFirst();
        if (
          row === undefined ||
          row.leaseOwner !== this.vault.instanceId ||
          row.state !== 'running'
        ) {
          entry.controller.abort(
            new LifeboatError(
              'LB_VAULT_JOB_LEASE_LOST',
              'Another vault instance took over this job.',
            ),
          );
          continue;
        }
        if (row.cancelRequested === 1) {
          entry.controller.abort(
            new LifeboatError('LB_VAULT_JOB_CANCELLED', 'The job was cancelled.'),
          );
        }
        await this.vault.db
          .updateTable('jobs')
          .set({ leaseUntil: until })
          .where('id', '=', entry.id)
          .where('leaseOwner', '=', this.vault.instanceId)
          .execute();
      } catch (err) {
        this.vault.log.warn({ err, job: entry.id }, 'job lease renewal failed');
      }
    }
  }

  private async execute(job: JobRow, signal: AbortSignal): Promise<void> {
    const db = this.vault.db;
    const handler = this.handlers.get(job.kind);
    const steps = JSON.parse(job.steps) as JobStep[];
    const saveSteps = async (): Promise<void> => {
      await db
        .updateTable('jobs')
        .set({ steps: JSON.stringify(steps), updatedAt: nowIso() })
        .where('id', '=', job.id)
        .execute();
    };
    const log = async (
      message: string,
      level: 'info' | 'warn' | 'error' = 'info',
    ): Promise<void> => {
      await db
        .insertInto('jobLogs')
        .values({ id: newId('log'), jobId: job.id, time: nowIso(), level, message })
        .execute();
    };
    const ctx: JobContext = {
      id: job.id,
      kind: job.kind,
      targetId: job.targetId,
      params: JSON.parse(job.params) as Record<string, unknown>,
      attempt: job.attempts,
      signal,
      vault: this.vault,
      log,
      progress: async (fraction) => {
        await db
          .updateTable('jobs')
          .set({ progress: Math.max(0, Math.min(1, fraction)), updatedAt: nowIso() })
          .where('id', '=', job.id)
          .execute();
      },
      step: async (name, fn) => {
        let step = steps.find((s) => s.name === name);
        if (step === undefined) {
          step = { name, state: 'pending', startedAt: null, finishedAt: null };
          steps.push(step);
        }
        step.state = 'running';
        step.startedAt = nowIso();
        step.finishedAt = null;
        await saveSteps();
        try {
          const value = await fn();
          step.state = 'done';
          step.finishedAt = nowIso();
          await saveSteps();
          return value;
        } catch (err) {
          step.state = 'failed';
          step.finishedAt = nowIso();
          await saveSteps();
          throw err;
        }
      },
      waitFor: async (what, check, timeoutMs) => {
        const deadline = Date.now() + timeoutMs;
        for (;;) {
          signal.throwIfAborted();
          const value = await check();
          if (value !== undefined) return value;
          if (Date.now() > deadline) {
            throw new LifeboatError(
              'LB_VAULT_JOB_TIMEOUT',
              `Timed out after ${Math.round(timeoutMs / 1000)} s waiting for ${what}. Check the component named in the job's log, then retry.`,
              { details: { what, timeoutMs } },
            );
          }
          await sleep(Math.min(1000, this.vault.options.jobPollIntervalMs), undefined, {
            signal,
          }).catch(() => undefined);
        }
      },
    };
    this.vault.metrics.jobsStarted.inc({ kind: job.kind });
    try {
      if (handler === undefined) {
        throw new LifeboatError(
          'LB_VAULT_UNKNOWN_JOB_KIND',
          `No job kind "${job.kind}" in this vault.`,
        );
      }
      if (job.attempts > 1)
        await log(`Resuming after a vault restart (attempt ${job.attempts}).`, 'warn');
      else await log(`Started by ${job.createdBy}.`);
      const result = await handler.run(ctx);
      if (signal.aborted) throw signal.reason;
      await this.finish(job, 'succeeded', { result: result ?? {} });
      await log('Succeeded.');
      await this.vault.alerts.clear('job-failed', 'job', `${job.kind}:${job.targetId ?? ''}`);
    } catch (err) {
      const reason = signal.aborted ? (signal.reason as unknown) : err;
      if (isLifeboatError(reason, 'LB_VAULT_JOB_LEASE_LOST') || this.stopped) {
        // Another instance owns it now, or this vault is stopping: leave the row to the lease.
        return;
      }
      const cancelled = isLifeboatError(reason, 'LB_VAULT_JOB_CANCELLED');
      const error = isLifeboatError(reason)
        ? reason.toJSON()
        : {
            code: 'LB_VAULT_JOB_FAILED',
            message: (reason as Error).message ?? String(reason),
            details: {},
          };
      await log(
        `${cancelled ? 'Cancelled' : 'Failed'}: ${error.message}`,
        cancelled ? 'warn' : 'error',
      );
      await this.finish(job, cancelled ? 'cancelled' : 'failed', { error });
      if (!cancelled) await this.raiseFailed(job, error.message, error.code);
    }
  }

  private async finish(
    job: JobRow,
    state: JobState,
    outcome: { result?: unknown; error?: unknown },
  ): Promise<void> {
    const now = nowIso();
    await this.vault.db
      .updateTable('jobs')
      .set({
        state,
        ...(outcome.result !== undefined
          ? { result: JSON.stringify(outcome.result), progress: 1 }
          : {}),
        ...(outcome.error !== undefined ? { error: JSON.stringify(outcome.error) } : {}),
        leaseOwner: null,
        leaseUntil: null,
        finishedAt: now,
        updatedAt: now,
      })
      .where('id', '=', job.id)
      .execute();
    this.vault.metrics.jobsFinished.inc({ kind: job.kind, state });
  }

  private async raiseFailed(job: JobRow, message: string, code: string): Promise<void> {
    await this.vault.alerts.raise({
      kind: 'job-failed',
      severity: 'error',
      subjectType: 'job',
      subjectId: `${job.kind}:${job.targetId ?? ''}`,
      message: `Job ${job.kind} ${job.id} failed: ${message}`,
      details: { jobId: job.id, kind: job.kind, targetId: job.targetId, code },
    });
  }

  /**
   * Recovers jobs left `running` by a vault that stopped: all of them when `all` (SQLite: one
   * instance, so none can be alive), else those whose lease ran out.
   */
  async recoverOrphans(all: boolean): Promise<number> {
    const now = nowIso();
    // Jobs that components run themselves (leaseOwner component:<id>) are not the runner's:
    // they fail when their component stops sending heartbeats (see the scheduler).
    let query = this.vault.db
      .selectFrom('jobs')
      .selectAll()
      .where('state', '=', 'running')
      .where((eb) =>
        eb.or([eb('leaseOwner', 'is', null), eb('leaseOwner', 'not like', 'component:%')]),
      );
    if (!all) query = query.where('leaseUntil', '<', now);
    const orphans = (await query.execute()).filter((j) => !this.running.has(j.id));
    for (const job of orphans) {
      const handler = this.handlers.get(job.kind);
      const resumable =
        handler?.resumable === true && job.attempts < this.vault.options.jobMaxAttempts;
      const update = this.vault.db
        .updateTable('jobs')
        .where('id', '=', job.id)
        .where('state', '=', 'running')
        .where('leaseOwner', job.leaseOwner === null ? 'is' : '=', job.leaseOwner);
      if (resumable) {
        const r = await update
          .set({ state: 'queued', leaseOwner: null, leaseUntil: null, updatedAt: now })
          .executeTakeFirst();
        if (Number(r.numUpdatedRows) === 1) {
          await this.vault.db
            .insertInto('jobLogs')
            .values({
              id: newId('log'),
              jobId: job.id,
              time: now,
              level: 'warn',
              message: 'The vault running this job stopped; the job is queued to resume.',
            })
            .execute();
        }
      } else {
        const error = {
          code: 'LB_VAULT_JOB_INTERRUPTED',
          message:
            job.attempts >= this.vault.options.jobMaxAttempts
              ? `The vault stopped during this job ${job.attempts} times; it is not retried again. Look at its log and start it again.`
              : 'The vault stopped during this job and it cannot resume safely. Look at its log and start it again.',
          details: { attempts: job.attempts },
        };
        const r = await update
          .set({
            state: 'failed',
            error: JSON.stringify(error),
            leaseOwner: null,
            leaseUntil: null,
            finishedAt: now,
            updatedAt: now,
          })
          .executeTakeFirst();
        if (Number(r.numUpdatedRows) === 1) {
          await this.vault.db
            .insertInto('jobLogs')
            .values({
              id: newId('log'),
              jobId: job.id,
              time: now,
              level: 'error',
              message: error.message,
            })
            .execute();
          await this.raiseFailed(job, error.message, error.code);
        }
      }
    }
    if (orphans.length > 0) this.kick();
    return orphans.length;
  }

  /** Stops taking jobs; running ones are aborted and left to their lease (resumed on restart). */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.pollTimer !== undefined) clearInterval(this.pollTimer);
    if (this.leaseTimer !== undefined) clearInterval(this.leaseTimer);
    for (const entry of this.running.values()) {
      entry.controller.abort(new LifeboatError('LB_VAULT_STOPPING', 'The vault is stopping.'));
    }
    await Promise.allSettled([...this.running.values()].map((e) => e.done));
  }

  /** Ids of the jobs this instance is running now. */
  runningIds(): string[] {
    return [...this.running.keys()];
  }
}
