import { useState } from 'react';
import { api, ApiError, query, roleAtLeast, type Page, type Role } from '../api';
import { duration, time } from '../format';
import { useLiveRefresh } from '../live';
import { Link, navigate, useLocation } from '../router';
import type { Job, JobLog } from '../types';
import { useApi } from '../use-api';
import { Badge, ErrorBox, PageHeader, Pager, Progress } from '../ui';

const LIMIT = 50;

function took(from: string | null, to: string | null): string {
  if (from === null) return '—';
  const end = to === null ? Date.now() : Date.parse(to);
  return duration((end - Date.parse(from)) / 1000);
}

/** Jobs, newest first, with state filter and live progress. */
export function JobsPage() {
  const { params } = useLocation();
  const state = params.get('state') ?? '';
  const offset = Math.max(0, Number(params.get('offset') ?? 0) || 0);
  const jobs = useApi<Page<Job>>(`/api/jobs${query({ limit: LIMIT, offset, state })}`);
  useLiveRefresh(['job'], jobs.reload, 10_000);
  const go = (changes: Record<string, string | number | undefined>) =>
    navigate(`/jobs${query({ state, offset: undefined, ...changes })}`, true);

  return (
    <>
      <PageHeader title="Jobs">
        <div className="field inline">
          <label htmlFor="job-state">State</label>
          <select id="job-state" value={state} onChange={(e) => go({ state: e.target.value })}>
            <option value="">All</option>
            <option value="queued">Queued</option>
            <option value="running">Running</option>
            <option value="succeeded">Succeeded</option>
            <option value="failed">Failed</option>
            <option value="cancelled">Cancelled</option>
          </select>
        </div>
      </PageHeader>
      <ErrorBox error={jobs.error} />
      <div className="table-wrap">
        <table aria-busy={jobs.loading}>
          <caption className="sr-only">Jobs, newest first</caption>
          <thead>
            <tr>
              <th scope="col">Job</th>
              <th scope="col">State</th>
              <th scope="col">Progress</th>
              <th scope="col">Step</th>
              <th scope="col">Started</th>
              <th scope="col">Took</th>
              <th scope="col">By</th>
            </tr>
          </thead>
          <tbody data-testid="job-rows">
            {(jobs.data?.items ?? []).map((j) => (
              <tr key={j.id}>
                <td>
                  <Link to={`/jobs/${encodeURIComponent(j.id)}`}>{j.kind}</Link>
                </td>
                <td>
                  <Badge value={j.state} />
                </td>
                <td>
                  <Progress value={j.progress} label={`${j.kind} progress`} />
                </td>
                <td>
                  {j.steps.find((s) => s.state === 'running' || s.state === 'failed')?.name ?? '—'}
                </td>
                <td>{time(j.startedAt ?? j.createdAt)}</td>
                <td className="num">{took(j.startedAt, j.finishedAt)}</td>
                <td>{j.createdBy}</td>
              </tr>
            ))}
            {jobs.data !== undefined && jobs.data.items.length === 0 ? (
              <tr>
                <td colSpan={7} className="muted">
                  No job.
                </td>
              </tr>
            ) : null}
          </tbody>
        </table>
      </div>
      {jobs.data !== undefined ? (
        <Pager
          offset={offset}
          limit={LIMIT}
          total={jobs.data.total}
          onChange={(o) => go({ offset: o })}
          label="Jobs"
        />
      ) : null}
    </>
  );
}

/** One job: its steps with timings, its error, its log; cancel for operators. */
export function JobPage({ id, role }: { id: string; role: Role }) {
  const job = useApi<Job>(`/api/jobs/${encodeURIComponent(id)}`);
  const logs = useApi<Page<JobLog>>(`/api/jobs/${encodeURIComponent(id)}/logs?limit=500`);
  useLiveRefresh(
    ['job'],
    () => {
      job.reload();
      logs.reload();
    },
    5000,
  );
  const [actionError, setActionError] = useState<ApiError>();
  const j = job.data;
  const canCancel =
    roleAtLeast(role, 'operator') &&
    j !== undefined &&
    (j.state === 'queued' || j.state === 'running') &&
    !j.cancelRequested;

  const cancel = async () => {
    try {
      await api('POST', `/api/jobs/${encodeURIComponent(id)}/cancel`);
      job.reload();
    } catch (e) {
      if (e instanceof ApiError) setActionError(e);
    }
  };

  return (
    <>
      <p className="crumbs">
        <Link to="/jobs">Jobs</Link> /
      </p>
      <PageHeader title={j === undefined ? 'Job' : `${j.kind}`}>
        {j !== undefined ? <Badge value={j.state} /> : null}
        {canCancel ? (
          <button type="button" onClick={() => void cancel()}>
            Cancel job
          </button>
        ) : null}
      </PageHeader>
      <ErrorBox error={job.error ?? actionError} />
      {j === undefined ? null : (
        <div className="grid halves">
          <section className="card" aria-labelledby="job-h">
            <h2 id="job-h">Summary</h2>
            <dl className="facts">
              <dt>Progress</dt>
              <dd>
                <Progress value={j.progress} label="Job progress" />
              </dd>
              <dt>Target</dt>
              <dd>
                {j.targetType === 'protected-item' && j.targetId !== null ? (
                  <Link to={`/machines/${encodeURIComponent(j.targetId)}`}>protected machine</Link>
                ) : (
                  `${j.targetType ?? '—'} ${j.targetId ?? ''}`
                )}
              </dd>
              <dt>Created</dt>
              <dd>
                {time(j.createdAt)} by {j.createdBy}
              </dd>
              <dt>Took</dt>
              <dd>{took(j.startedAt, j.finishedAt)}</dd>
              {j.error !== null ? (
                <>
                  <dt>Error</dt>
                  <dd className="error-text">
                    {j.error.message} <code>{j.error.code}</code>
                  </dd>
                </>
              ) : null}
            </dl>
          </section>
          <section className="card" aria-labelledby="steps-h">
            <h2 id="steps-h">Steps</h2>
            <ol className="steps" data-testid="steps">
              {j.steps.map((s) => (
                <li key={s.name} className={`step step-${s.state}`}>
                  <Badge value={s.state} /> {s.name}{' '}
                  <span className="muted small">
                    {s.startedAt === null ? '' : took(s.startedAt, s.finishedAt)}
                  </span>
                </li>
              ))}
            </ol>
          </section>
          <section className="card wide" aria-labelledby="log-h">
            <h2 id="log-h">Log</h2>
            {(logs.data?.items ?? []).length === 0 ? (
              <p className="muted">No log line yet.</p>
            ) : (
              <pre className="log" tabIndex={0} aria-label="Job log">
                {(logs.data?.items ?? [])
                  .map((l) => `${l.time} ${l.level.padEnd(5)} ${l.message}`)
                  .join('\n')}
              </pre>
            )}
          </section>
        </div>
      )}
    </>
  );
}
