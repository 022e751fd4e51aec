import { useEffect, useState } from 'react';
import { api, apiBytes, ApiError, roleAtLeast, type Role } from '../api';
import { useFieldErrors } from '../form';
import { duration, time } from '../format';
import { useLiveRefresh } from '../live';
import { Link } from '../router';
import type { Component, Job, RecoveryRun, RunMachine } from '../types';
import { useApi } from '../use-api';
import { Badge, ErrorBox, PageHeader, Progress } from '../ui';
import {
  pointChoice,
  pointErrors,
  PointFields,
  pointSelector,
  pointWords,
  runPath,
  RunState,
} from './recovery-fields';

/** Reads an artifact with the session's token and shows it as an image. */
function Screenshot({ url, alt }: { url: string; alt: string }) {
  const [src, setSrc] = useState<string>();
  const [error, setError] = useState<ApiError>();
  useEffect(() => {
    const abort = new AbortController();
    apiBytes(url, abort.signal).then(
      (blob) => {
        // A data: URL, which the portal's Content-Security-Policy allows for images.
        const reader = new FileReader();
        reader.onload = () => setSrc(String(reader.result));
        reader.readAsDataURL(blob);
      },
      (e: unknown) => {
        if (!abort.signal.aborted && e instanceof ApiError) setError(e);
      },
    );
    return () => abort.abort();
  }, [url]);
  if (error !== undefined) return <ErrorBox error={error} />;
  if (src === undefined) return <p aria-busy="true">Loading the screenshot…</p>;
  return <img className="screenshot" src={src} alt={alt} data-testid="screenshot" />;
}

/** The tail of a machine's console log. */
function ConsoleLog({ url, name }: { url: string; name: string }) {
  const [text, setText] = useState<string>();
  useEffect(() => {
    const abort = new AbortController();
    apiBytes(url, abort.signal).then(
      (b) => void b.text().then(setText),
      () => setText(undefined),
    );
    return () => abort.abort();
  }, [url]);
  if (text === undefined) return null;
  return (
    <details>
      <summary>Console log</summary>
      <pre className="log" tabIndex={0} aria-label={`Console log of ${name}`}>
        {text}
      </pre>
    </details>
  );
}

function MachineResult({ m, run }: { m: RunMachine; run: RecoveryRun }) {
  const v = m.verification;
  const shot = m.artifacts?.screenshot ?? null;
  const log = m.artifacts?.console ?? null;
  return (
    <section className="card wide" aria-labelledby={`m-${m.name}`} data-testid="run-machine">
      <h2 id={`m-${m.name}`}>
        {m.machineName} <span className="muted small">as {m.name}</span>
      </h2>
      <div className="grid halves">
        <div>
          <dl className="facts">
            <dt>Points</dt>
            <dd>
              <ul className="plain">
                {m.points.map((p) => (
                  <li key={p.id}>
                    {p.disk}: {time(p.time)} ({p.kind === 'app' ? 'app' : 'crash'}-consistent)
                  </li>
                ))}
                {m.points.length === 0 ? <li className="muted">Not chosen yet</li> : null}
              </ul>
            </dd>
            <dt>Boot</dt>
            <dd data-testid="boot-result">
              {v !== null
                ? 'Booted and verified'
                : BOOTED.includes(run.state)
                  ? 'Booted'
                  : run.state === 'failed'
                    ? 'Did not boot (see the error)'
                    : 'Not booted yet'}
            </dd>
            {v?.console != null ? (
              <>
                <dt>Console</dt>
                <dd>
                  showed <code>{v.console}</code>
                </dd>
              </>
            ) : null}
            {v?.port != null ? (
              <>
                <dt>Guest port</dt>
                <dd>
                  {v.port.guestPort} answered <code>{v.port.answer.slice(0, 80)}</code>
                </dd>
              </>
            ) : null}
            {(m.localDisks ?? []).length > 0 ? (
              <>
                <dt>Local disks</dt>
                <dd>
                  <ul className="plain">
                    {(m.localDisks ?? []).map((d) => (
                      <li key={String(d)}>
                        <code>{typeof d === 'string' ? d : JSON.stringify(d)}</code>
                      </li>
                    ))}
                  </ul>
                </dd>
              </>
            ) : null}
          </dl>
          {log !== null ? <ConsoleLog url={log} name={m.machineName} /> : null}
        </div>
        <div>
          {shot !== null ? (
            <Screenshot url={shot} alt={`Screen of ${m.machineName} after booting`} />
          ) : v !== null ? (
            <p className="muted">No screenshot was taken.</p>
          ) : null}
        </div>
      </div>
    </section>
  );
}

// Run states in which its machines have booted.
const BOOTED = ['running', 'booted', 'committing', 'committed', 'hydrating', 'hydrated'];

const CLEANABLE = (s: string) => s !== 'cleaned-up' && s !== 'cleaning-up' && s !== 'queued';

/** True when the run's state allows an operator something (its Actions card then shows). */
/** The run's network, and each machine's mapped network where it has one. */
function runNetworkWords(r: RecoveryRun): string {
  const isolated =
    r.network === 'segment'
      ? 'A private segment'
      : r.network === 'isolated-user'
        ? 'No network (isolated)'
        : (r.network ?? '—');
  const mapped = r.machines.filter((m) => typeof m.network === 'string' && m.network !== '');
  if (mapped.length === 0) return isolated;
  const on = mapped.map(
    (m) => `${r.machines.length > 1 ? `${m.machineName}: ` : ''}network ${m.network ?? ''}`,
  );
  const rest = r.machines.length - mapped.length;
  return `${on.join('; ')}${rest > 0 ? `; the others: ${isolated.toLowerCase()}` : ''}`;
}

function actionable(r: RecoveryRun): boolean {
  return r.kind === 'test-failover'
    ? CLEANABLE(r.state)
    : r.state === 'booted' || r.state === 'failed';
}

/**
 * One test failover or failover: its state, each machine's boot result with its screenshot and
 * console, the jobs it ran with their steps; and, for operators, what its state allows next:
 * cleanup (test failover), change of point and commit (failover).
 */
export function RecoveryRunPage(props: { kind: RecoveryRun['kind']; id: string; role: Role }) {
  const base = runPath(props.kind, props.id);
  const run = useApi<RecoveryRun>(`/api${base}`);
  const r = run.data;
  const job = useApi<Job>(r?.jobId == null ? null : `/api/jobs/${encodeURIComponent(r.jobId)}`);
  const host = useApi<Component>(
    r?.recoveryHostId == null
      ? null
      : `/api/recovery-hosts/${encodeURIComponent(r.recoveryHostId)}`,
  );
  useLiveRefresh(
    ['job'],
    () => {
      run.reload();
      job.reload();
    },
    3000,
  );
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<ApiError>();
  const [pending, setPending] = useState<'change-point' | 'commit'>();
  const [point, setPoint] = useState(pointChoice());
  const [hydrate, setHydrate] = useState(true);
  const [format, setFormat] = useState<'qcow2' | 'raw'>('qcow2');
  const [compare, setCompare] = useState(false);
  const pointF = useFieldErrors('cp', pointErrors(point, 1), {
    point: 'mode',
    'point.at': 'at',
    'point.pointId': 'pointId',
  });
  const operator = roleAtLeast(props.role, 'operator');
  const title =
    r === undefined
      ? props.kind === 'failover'
        ? 'Failover'
        : 'Test failover'
      : `${r.kind === 'failover' ? 'Failover' : 'Test failover'} of ${r.machines.map((m) => m.machineName).join(', ') || r.protectedItemIds.join(', ')}`;

  const act = async (action: string, body: unknown) => {
    setBusy(true);
    setError(undefined);
    try {
      await api('POST', `/api${base}/${action}`, body);
      setPending(undefined);
      run.reload();
    } catch (e) {
      if (!(e instanceof ApiError)) throw e;
      setError(e);
      pointF.refused(e);
    } finally {
      setBusy(false);
    }
  };

  return (
    <>
      <p className="crumbs">
        <Link to="/recovery">Recovery</Link> /
      </p>
      <PageHeader title={title}>{r !== undefined ? <RunState state={r.state} /> : null}</PageHeader>
      <ErrorBox error={run.error} />
      {r?.error != null ? (
        <div className="error-box" role="alert" data-testid="run-error">
          <strong>{r.error.message}</strong> <code>{r.error.code}</code>
        </div>
      ) : null}
      {r?.kind === 'test-failover' && r.state === 'cleaned-up' ? (
        <p role="status" data-testid="cleaned-up">
          Cleaned up: its machines, overlays, exports and network are gone.
        </p>
      ) : null}
      {r?.kind === 'failover' && (r.state === 'committed' || r.state === 'hydrated') ? (
        <p role="status" data-testid="committed">
          Committed: the machine runs on the recovery host for good
          {r.state === 'hydrated' ? ', from local disks (it no longer needs the store)' : ''}.
        </p>
      ) : null}
      {r === undefined ? null : (
        <div className="grid halves">
          <section className="card" aria-labelledby="run-h">
            <h2 id="run-h">Run</h2>
            <dl className="facts">
              <dt>State</dt>
              <dd data-testid="run-state">{r.state}</dd>
              <dt>Machines</dt>
              <dd>
                {r.protectedItemIds.map((id, i) => (
                  <span key={id}>
                    {i > 0 ? ', ' : ''}
                    <Link to={`/machines/${encodeURIComponent(id)}`}>
                      {r.machines.find((m) => m.protectedItemId === id)?.machineName ?? id}
                    </Link>
                  </span>
                ))}
                {r.consistencyGroup !== null ? ` (group ${r.consistencyGroup})` : ''}
              </dd>
              <dt>Point</dt>
              <dd>
                {r.planned === true
                  ? 'Planned: a last sync first'
                  : r.point !== null && 'pointId' in r.point
                    ? `A chosen point (${time(r.machines[0]?.points[0]?.time)})`
                    : pointWords(r.point)}
              </dd>
              <dt>Network</dt>
              <dd data-testid="run-network">{runNetworkWords(r)}</dd>
              <dt>Recovery host</dt>
              <dd>
                {host.data?.name ?? r.recoveryHostId ?? '—'}{' '}
                {host.data !== undefined ? <Badge value={host.data.status} /> : null}
              </dd>
              <dt>Started</dt>
              <dd>
                {time(r.createdAt)} by {r.createdBy}
              </dd>
            </dl>
          </section>
          <section className="card" aria-labelledby="job-h">
            <h2 id="job-h">
              {job.data === undefined ? 'Job' : job.data.kind}{' '}
              {job.data !== undefined ? <Badge value={job.data.state} /> : null}
            </h2>
            {job.data !== undefined ? (
              <>
                <Progress value={job.data.progress} label="Job progress" />
                <ol className="steps" data-testid="run-steps">
                  {job.data.steps.map((s) => (
                    <li key={s.name}>
                      <Badge value={s.state} /> {s.name}{' '}
                      <span className="muted small">
                        {s.startedAt === null
                          ? ''
                          : duration(
                              ((s.finishedAt === null ? Date.now() : Date.parse(s.finishedAt)) -
                                Date.parse(s.startedAt)) /
                                1000,
                            )}
                      </span>
                    </li>
                  ))}
                </ol>
              </>
            ) : null}
            <ul className="plain small">
              {r.jobs.map((j) => (
                <li key={j.id}>
                  <Link to={`/jobs/${encodeURIComponent(j.id)}`}>{j.kind}</Link>{' '}
                  <Badge value={j.state} />
                </li>
              ))}
            </ul>
          </section>
          {operator && actionable(r) ? (
            <section className="card wide" aria-labelledby="run-actions-h">
              <h2 id="run-actions-h">Actions</h2>
              <div className="toolbar">
                {r.kind === 'test-failover' && CLEANABLE(r.state) ? (
                  <button type="button" disabled={busy} onClick={() => void act('cleanup', {})}>
                    Clean up
                  </button>
                ) : null}
                {r.kind === 'failover' && (r.state === 'booted' || r.state === 'failed') ? (
                  <button
                    type="button"
                    disabled={busy}
                    aria-expanded={pending === 'change-point'}
                    onClick={() =>
                      setPending(pending === 'change-point' ? undefined : 'change-point')
                    }
                  >
                    Change point…
                  </button>
                ) : null}
                {r.kind === 'failover' && r.state === 'booted' ? (
                  <button
                    type="button"
                    disabled={busy}
                    aria-expanded={pending === 'commit'}
                    onClick={() => setPending(pending === 'commit' ? undefined : 'commit')}
                  >
                    Commit…
                  </button>
                ) : null}
              </div>
              {pending === 'change-point' ? (
                <form
                  className="confirm"
                  aria-labelledby="cp-h"
                  noValidate
                  onSubmit={(e) => {
                    e.preventDefault();
                    if (pointF.attempt(['mode', 'at', 'pointId']) !== undefined) return;
                    void act('change-point', { point: pointSelector(point) });
                  }}
                >
                  <h3 id="cp-h">Boot other points</h3>
                  <p>The machine restarts from the new points; what it wrote since is dropped.</p>
                  <PointFields
                    value={point}
                    onChange={setPoint}
                    itemId={r.protectedItemIds[0]}
                    f={pointF}
                  />
                  <button type="submit" className="danger" disabled={busy}>
                    Change point now
                  </button>
                </form>
              ) : null}
              {pending === 'commit' ? (
                <div className="confirm" role="group" aria-labelledby="commit-h">
                  <h3 id="commit-h">Commit the failover</h3>
                  <p>
                    This makes the failover final: the machine keeps running on the recovery host,
                    and you can no longer change its point.
                  </p>
                  <label className="choice">
                    <input
                      type="checkbox"
                      checked={hydrate}
                      onChange={(e) => setHydrate(e.target.checked)}
                    />{' '}
                    Copy its disks to local files while it runs (hydrate), so it no longer needs the
                    store
                  </label>
                  {hydrate ? (
                    <>
                      <div className="field">
                        <label htmlFor="commit-format">Disk format</label>
                        <select
                          id="commit-format"
                          value={format}
                          onChange={(e) => setFormat(e.target.value as 'qcow2' | 'raw')}
                        >
                          <option value="qcow2">qcow2</option>
                          <option value="raw">raw</option>
                        </select>
                      </div>
                      <label className="choice">
                        <input
                          type="checkbox"
                          checked={compare}
                          onChange={(e) => setCompare(e.target.checked)}
                        />{' '}
                        Compare each copy with the point before switching (pauses the guest)
                      </label>
                    </>
                  ) : null}
                  <p>
                    <button
                      type="button"
                      className="danger"
                      disabled={busy}
                      onClick={() =>
                        void act(
                          'commit',
                          hydrate ? { hydrate, format, verify: compare } : { hydrate: false },
                        )
                      }
                    >
                      Commit now
                    </button>
                  </p>
                </div>
              ) : null}
              <ErrorBox error={error} />
            </section>
          ) : null}
          {r.machines.map((m) => (
            <MachineResult key={m.name} m={m} run={r} />
          ))}
        </div>
      )}
    </>
  );
}
