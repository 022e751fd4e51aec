import { LifeboatError } from '@lifeboat/protocol';
import type { JobRow } from '../db/schema.js';
import { newId, nowIso } from '../ids.js';
import type { VaultContext } from '../vault-context.js';
import type { Principal } from './principal.js';

/** What a component reports about a job it runs itself. */
export interface ComponentJobReport {
  kind: string;
  target?: Record<string, unknown>;
  state: 'running' | 'succeeded' | 'failed';
  progress?: number;
  steps: Array<{
    name: string;
    state: string;
    startedAt?: string;
    endedAt?: string;
    error?: { message?: string };
  }>;
  error?: { code: string; message: string; details?: Record<string, unknown> };
  result?: Record<string, unknown>;
}

/** The lease owner of jobs a component runs: the vault's runner never claims or resumes them. */
export function componentLeaseOwner(componentId: string): string {
  return `component:${componentId}`;
}

const STEP_STATE: Record<string, string> = {
  succeeded: 'done',
  done: 'done',
  failed: 'failed',
  running: 'running',
  pending: 'pending',
};

/**
 * Upserts a job that a component (a recovery host running a test failover) runs and reports,
 * so operators see it among the vault's jobs with its steps. Its id is the component's id and
 * the component's job id; a finished job cannot be reopened. New step failures become log
 * lines; a failure raises the job-failed alert like the vault's own jobs.
 */
export async function reportComponentJob(
  vault: VaultContext,
  component: Extract<Principal, { type: 'component' }>,
  externalId: string,
  report: ComponentJobReport,
): Promise<Record<string, unknown>> {
  const { db } = vault;
  const id = `job_${component.id}_${externalId}`.slice(0, 100);
  const now = nowIso();
  // A report is a sign of life too: its jobs fail only when the component goes silent.
  await db
    .updateTable('components')
    .set({ lastHeartbeatAt: now })
    .where('id', '=', component.id)
    .execute();
  const existing = await db.selectFrom('jobs').selectAll().where('id', '=', id).executeTakeFirst();
  if (existing !== undefined && existing.state !== 'running') {
    throw new LifeboatError(
      'LB_VAULT_INVALID_STATE',
      `Job ${id} already ended (${existing.state}); report a new job instead.`,
      {
        details: { id, state: existing.state },
      },
    );
  }
  const steps = report.steps.map((s) => ({
    name: s.name,
    state: STEP_STATE[s.state] ?? s.state,
    startedAt: s.startedAt ?? null,
    finishedAt: s.endedAt ?? null,
  }));
  const finished = report.state !== 'running';
  const doneSteps = steps.filter((s) => s.state === 'done').length;
  const fields: Partial<JobRow> = {
    state: report.state,
    steps: JSON.stringify(steps),
    progress: finished
      ? 1
      : (report.progress ?? (steps.length === 0 ? 0 : doneSteps / steps.length)),
    error: report.error === undefined ? null : JSON.stringify({ details: {}, ...report.error }),
    result: report.result === undefined ? null : JSON.stringify(report.result),
    leaseOwner: finished ? null : componentLeaseOwner(component.id),
    leaseUntil: null,
    finishedAt: finished ? now : null,
    updatedAt: now,
  };
  const target = report.target ?? {};
  const targetId =
    typeof target['id'] === 'string'
      ? target['id']
      : typeof target['machine'] === 'string'
        ? target['machine']
        : null;
  if (existing === undefined) {
    await db
      .insertInto('jobs')
      .values({
        id,
        kind: report.kind,
        targetType: component.kind,
        targetId,
        params: JSON.stringify({ target, reportedBy: component.id, externalId }),
        attempts: 1,
        scheduleKey: null,
        cancelRequested: 0,
        createdBy: component.name,
        createdAt: now,
        startedAt: now,
        result: null,
        error: null,
        progress: 0,
        steps: '[]',
        leaseOwner: null,
        leaseUntil: null,
        finishedAt: null,
        updatedAt: now,
        state: 'running',
        ...fields,
      })
      .execute();
    await log(vault, id, `Reported by ${component.kind} ${component.name}.`, 'info');
  } else {
    await db.updateTable('jobs').set(fields).where('id', '=', id).execute();
  }
  const before =
    existing === undefined
      ? []
      : (JSON.parse(existing.steps) as Array<{ name: string; state: string }>);
  for (const s of report.steps) {
    const was = before.find((b) => b.name === s.name);
    if (s.state === 'failed' && was?.state !== 'failed') {
      await log(vault, id, `Step ${s.name} failed: ${s.error?.message ?? 'no message'}`, 'error');
    }
  }
  if (report.state === 'failed') {
    await log(vault, id, `Failed: ${report.error?.message ?? 'no message'}`, 'error');
    await vault.alerts.raise({
      kind: 'job-failed',
      severity: 'error',
      subjectType: 'job',
      subjectId: `${report.kind}:${targetId ?? ''}`,
      message: `Job ${report.kind} ${id} on ${component.name} failed: ${report.error?.message ?? 'no message'}`,
      details: {
        jobId: id,
        kind: report.kind,
        targetId,
        code: report.error?.code ?? 'LB_VAULT_JOB_FAILED',
      },
    });
  } else if (report.state === 'succeeded') {
    await log(vault, id, 'Succeeded.', 'info');
    await vault.alerts.clear('job-failed', 'job', `${report.kind}:${targetId ?? ''}`);
  }
  return { id, state: report.state };
}

async function log(
  vault: VaultContext,
  jobId: string,
  message: string,
  level: string,
): Promise<void> {
  await vault.db
    .insertInto('jobLogs')
    .values({ id: newId('log'), jobId, time: nowIso(), level, message })
    .execute();
}

/** Fails the running jobs of a component that stopped reporting (its heartbeat is missing). */
export async function failJobsOfSilentComponent(
  vault: VaultContext,
  componentId: string,
  name: string,
): Promise<number> {
  const now = nowIso();
  const jobs = await vault.db
    .selectFrom('jobs')
    .select(['id'])
    .where('state', '=', 'running')
    .where('leaseOwner', '=', componentLeaseOwner(componentId))
    .execute();
  for (const j of jobs) {
    const error = {
      code: 'LB_VAULT_JOB_INTERRUPTED',
      message: `${name} stopped sending heartbeats while running this job; its outcome is unknown. Check ${name}, then run the job again.`,
      details: { componentId },
    };
    const r = await vault.db
      .updateTable('jobs')
      .set({
        state: 'failed',
        error: JSON.stringify(error),
        leaseOwner: null,
        finishedAt: now,
        updatedAt: now,
      })
      .where('id', '=', j.id)
      .where('state', '=', 'running')
      .executeTakeFirst();
    if (Number(r.numUpdatedRows) === 1) await log(vault, j.id, error.message, 'error');
  }
  return jobs.length;
}
