import { LifeboatError } from '@lifeboat/protocol';
import type { JobRow } from '../db/schema.js';
import { newId, nowIso } from '../ids.js';
import type { JobStep } from '../jobs/job-runner.js';
import type { VaultContext } from '../vault-context.js';
import { componentLeaseOwner } from './component-lease.js';
import { SYSTEM, type Principal } from './principal.js';
import { applyRunJobReport } from './recovery-runs.js';

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
    /** What the step found or did (a cleanup's removed machines, overlays and exports). */
    detail?: Record<string, unknown>;
    error?: { message?: string };
  }>;
  error?: { code: string; message: string; details?: Record<string, unknown> };
  result?: Record<string, unknown>;
}

export { componentLeaseOwner };

const STEP_STATE: Record<string, string> = {
  succeeded: 'done',
  done: 'done',
  failed: 'failed',
  running: 'running',
  pending: 'pending',
};

/**
 * A report's steps as the vault stores and shows them, with each step's detail: what a
 * recovery host's step did (e.g. what a test failover's cleanup removed) must reach the user.
 */
function jobSteps(report: ComponentJobReport): JobStep[] {
  return report.steps.map((s) => ({
    name: s.name,
    state: (STEP_STATE[s.state] ?? s.state) as JobStep['state'],
    startedAt: s.startedAt ?? null,
    finishedAt: s.endedAt ?? null,
    ...(s.detail !== undefined ? { detail: s.detail } : {}),
  }));
}

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
  const now = nowIso();
  // A job the vault queued for this component (a test failover it asked for) is reported under
  // the vault's own id; any other id is a job the component started itself.
  const issued = await db
    .selectFrom('jobs')
    .selectAll()
    .where('id', '=', externalId)
    .executeTakeFirst();
  const assignedTo =
    issued === undefined
      ? undefined
      : (JSON.parse(issued.params) as { assignedTo?: string }).assignedTo;
  if (issued !== undefined && assignedTo !== undefined) {
    if (assignedTo !== component.id) {
      throw new LifeboatError(
        'LB_VAULT_FORBIDDEN',
        `Job ${externalId} was queued for another component; only it may report on it.`,
        { details: { id: externalId } },
      );
    }
    return reportIssuedJob(vault, component, issued, report);
  }
  const id = `job_${component.id}_${externalId}`.slice(0, 100);
  // A report is a sign of life too: its jobs fail only when the component goes silent.
  await db
    .updateTable('components')
    .set({ lastHeartbeatAt: now })
    .where('id', '=', component.id)
    .execute();
  const existing = await db.selectFrom('jobs').selectAll().where('id', '=', id).executeTakeFirst();
  if (existing !== undefined && existing.state !== 'running' && report.state === existing.state) {
    // The same end reported again: a retry whose answer was lost, or details that came after
    // the end (artifacts). The record takes the details; its end, logs and alerts stay as
    // they were.
    await db
      .updateTable('jobs')
      .set({
        steps: JSON.stringify(jobSteps(report)),
        ...(report.error !== undefined
          ? { error: JSON.stringify({ details: {}, ...report.error }) }
          : {}),
        ...(report.result !== undefined ? { result: JSON.stringify(report.result) } : {}),
        updatedAt: now,
      })
      .where('id', '=', id)
      .execute();
    return { id, state: existing.state };
  }
  if (existing !== undefined && existing.state !== 'running') {
    throw new LifeboatError(
      'LB_VAULT_INVALID_STATE',
      `Job ${id} already ended (${existing.state}); report a new job instead.`,
      {
        details: { id, state: existing.state },
      },
    );
  }
  const steps = jobSteps(report);
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
    .selectAll()
    .where('state', 'in', ['running', 'queued'])
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
      .where('state', '=', j.state)
      .executeTakeFirst();
    if (Number(r.numUpdatedRows) === 1) {
      await log(vault, j.id, error.message, 'error');
      await applyRunJobReport(vault, j, { state: 'failed', error }, SYSTEM);
      await vault.alerts.raise({
        kind: 'job-failed',
        severity: 'error',
        subjectType: 'job',
        subjectId: `${j.kind}:${j.targetId ?? ''}`,
        message: `Job ${j.kind} ${j.id} failed: ${error.message}`,
        details: { jobId: j.id, kind: j.kind, targetId: j.targetId, code: error.code },
      });
    }
  }
  return jobs.length;
}

/** Updates a job the vault queued for this component with its report, and the run it serves. */
async function reportIssuedJob(
  vault: VaultContext,
  component: Extract<Principal, { type: 'component' }>,
  job: JobRow,
  report: ComponentJobReport,
): Promise<Record<string, unknown>> {
  const { db } = vault;
  const now = nowIso();
  await db
    .updateTable('components')
    .set({ lastHeartbeatAt: now })
    .where('id', '=', component.id)
    .execute();
  if (job.state !== 'running' && job.state !== 'queued') {
    throw new LifeboatError(
      'LB_VAULT_INVALID_STATE',
      `Job ${job.id} already ended (${job.state}); it cannot be reported on again.`,
      { details: { id: job.id, state: job.state } },
    );
  }
  const steps = jobSteps(report);
  const finished = report.state !== 'running';
  const doneSteps = steps.filter((s) => s.state === 'done').length;
  const r = await db
    .updateTable('jobs')
    .set({
      state: report.state,
      steps: JSON.stringify(steps),
      progress: finished
        ? 1
        : (report.progress ?? (steps.length === 0 ? 0 : doneSteps / Math.max(steps.length, 1))),
      error: report.error === undefined ? null : JSON.stringify({ details: {}, ...report.error }),
      result: report.result === undefined ? null : JSON.stringify(report.result),
      // Finished: no owner, so no later silence fails it; running: still the component's.
      leaseOwner: finished ? null : componentLeaseOwner(component.id),
      attempts: Math.max(1, job.attempts),
      startedAt: job.startedAt ?? now,
      finishedAt: finished ? now : null,
      updatedAt: now,
    })
    .where('id', '=', job.id)
    .where('state', 'in', ['queued', 'running'])
    .executeTakeFirst();
  if (Number(r.numUpdatedRows) !== 1) {
    throw new LifeboatError('LB_VAULT_INVALID_STATE', `Job ${job.id} ended meanwhile.`, {
      details: { id: job.id },
    });
  }
  if (job.state === 'queued') {
    await log(vault, job.id, `Started by ${component.kind} ${component.name}.`, 'info');
  }
  const before = JSON.parse(job.steps) as Array<{ name: string; state: string }>;
  for (const s of report.steps) {
    const was = before.find((b) => b.name === s.name);
    if (s.state === 'failed' && was?.state !== 'failed') {
      await log(
        vault,
        job.id,
        `Step ${s.name} failed: ${s.error?.message ?? 'no message'}`,
        'error',
      );
    }
  }
  await applyRunJobReport(vault, job, report, component);
  if (report.state === 'failed') {
    await log(vault, job.id, `Failed: ${report.error?.message ?? 'no message'}`, 'error');
    await vault.alerts.raise({
      kind: 'job-failed',
      severity: 'error',
      subjectType: 'job',
      subjectId: `${job.kind}:${job.targetId ?? ''}`,
      message: `Job ${job.kind} ${job.id} on ${component.name} failed: ${report.error?.message ?? 'no message'}`,
      details: {
        jobId: job.id,
        kind: job.kind,
        targetId: job.targetId,
        code: report.error?.code ?? 'LB_VAULT_JOB_FAILED',
      },
    });
  } else if (report.state === 'succeeded') {
    await log(vault, job.id, 'Succeeded.', 'info');
    await vault.alerts.clear('job-failed', 'job', `${job.kind}:${job.targetId ?? ''}`);
  }
  return { id: job.id, state: report.state };
}
