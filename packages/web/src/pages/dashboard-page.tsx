import { useState } from 'react';
import { api, ApiError, roleAtLeast, type Page, type Role } from '../api';
import { ago, bytes, duration, ratio, STATE_LABELS } from '../format';
import { useLiveRefresh } from '../live';
import { Link } from '../router';
import type { Job, Summary } from '../types';
import { useApi } from '../use-api';
import { Badge, ErrorBox, PageHeader, Progress } from '../ui';

const STATES = [
  'protected',
  'initial-replication',
  'enabling',
  'resync-needed',
  'failed-over',
  'disabled',
];
const SEVERITIES = ['critical', 'error', 'warning'];

/** Health at a glance: machines by state, worst RPOs, alerts, running jobs, components. */
export function DashboardPage({ role }: { role: Role }) {
  const summary = useApi<Summary>('/api/summary');
  const running = useApi<Page<Job>>('/api/jobs?state=running&limit=5');
  useLiveRefresh(
    ['job', 'protected-item', 'alert', 'component'],
    () => {
      summary.reload();
      running.reload();
    },
    5000,
  );
  const s = summary.data;

  return (
    <>
      <PageHeader title="Dashboard" />
      <ErrorBox error={summary.error} />
      {s === undefined ? (
        summary.error === undefined ? (
          <p aria-busy="true">Loading…</p>
        ) : null
      ) : (
        <div className="stack" data-testid="dashboard">
          <div className="grid">
            <section className="card" aria-labelledby="machines-h">
              <h2 id="machines-h">Protected machines</h2>
              <p className="big">
                <Link to="/machines" data-testid="count-total">
                  {s.protectedItems.total}
                </Link>
              </p>
              <ul className="counts">
                {STATES.map((st) => (
                  <li key={st}>
                    <Link to={`/machines?state=${st}`}>
                      <Badge value={st} label={STATE_LABELS[st] ?? st} />{' '}
                      <span data-testid={`count-${st}`}>{s.protectedItems.byState[st] ?? 0}</span>
                    </Link>
                  </li>
                ))}
              </ul>
            </section>

            <section className="card" aria-labelledby="alerts-h">
              <h2 id="alerts-h">Active alerts</h2>
              <p className="big">
                <Link to="/alerts" data-testid="count-alerts">
                  {Object.values(s.alerts.active).reduce((a, b) => a + b, 0)}
                </Link>
              </p>
              <ul className="counts">
                {SEVERITIES.map((sev) => (
                  <li key={sev}>
                    <Badge value={sev} /> {s.alerts.active[sev] ?? 0}
                  </li>
                ))}
                <li>
                  Not acknowledged:{' '}
                  <span data-testid="count-unacknowledged">{s.alerts.unacknowledged}</span>
                </li>
              </ul>
            </section>

            <section className="card" aria-labelledby="jobs-h">
              <h2 id="jobs-h">Jobs</h2>
              <p className="big">
                <Link to="/jobs?state=running" data-testid="count-running-jobs">
                  {s.jobs['running'] ?? 0}
                </Link>{' '}
                <span className="muted small">running, {s.jobs['queued'] ?? 0} queued</span>
              </p>
              {running.data !== undefined && running.data.items.length > 0 ? (
                <ul className="plain">
                  {running.data.items.map((j) => (
                    <li key={j.id}>
                      <Link to={`/jobs/${encodeURIComponent(j.id)}`}>{j.kind}</Link>{' '}
                      <Progress value={j.progress} label={`${j.kind} progress`} />
                    </li>
                  ))}
                </ul>
              ) : (
                <p className="muted">No job is running.</p>
              )}
            </section>
            <StoresCard
              stores={s.stores}
              canMeasure={roleAtLeast(role, 'operator')}
              onMeasured={summary.reload}
            />
          </div>
          <section className="card" aria-labelledby="rpo-h">
            <h2 id="rpo-h">Worst RPOs</h2>
            {s.worstRpo.length === 0 ? (
              <p className="muted">No machine has a recovery point yet.</p>
            ) : (
              <div className="table-wrap">
                <table>
                  <thead>
                    <tr>
                      <th scope="col">Machine</th>
                      <th scope="col">State</th>
                      <th scope="col">RPO</th>
                      <th scope="col">Last point</th>
                    </tr>
                  </thead>
                  <tbody data-testid="worst-rpo">
                    {s.worstRpo.map((w) => (
                      <tr key={w.id}>
                        <td>
                          <Link to={`/machines/${encodeURIComponent(w.id)}`}>{w.machineName}</Link>
                        </td>
                        <td>
                          <Badge value={w.state} label={STATE_LABELS[w.state] ?? w.state} />
                        </td>
                        <td className="num">{duration(w.rpoSeconds)}</td>
                        <td>{ago(w.lastPointAt)}</td>
                      </tr>
                    ))}
                  </tbody>
                </table>
              </div>
            )}
          </section>

          <section className="card" aria-labelledby="components-h">
            <h2 id="components-h">Process servers and recovery hosts</h2>
            {s.components.length === 0 ? (
              <p className="muted">None registered yet.</p>
            ) : (
              <div className="table-wrap">
                <table>
                  <thead>
                    <tr>
                      <th scope="col">Name</th>
                      <th scope="col">Role</th>
                      <th scope="col">Health</th>
                      <th scope="col">Last heartbeat</th>
                      <th scope="col">Journal</th>
                    </tr>
                  </thead>
                  <tbody data-testid="components">
                    {s.components.map((c) => {
                      const used = c.health['journalUsedBytes'];
                      const cap = c.health['journalCapacityBytes'];
                      return (
                        <tr key={c.id}>
                          <td>{c.name}</td>
                          <td>
                            {c.kind === 'process-server' ? 'Process server' : 'Recovery host'}
                          </td>
                          <td>
                            <Badge value={c.status} />
                          </td>
                          <td>{ago(c.lastHeartbeatAt)}</td>
                          <td className="num">
                            {typeof used === 'number' && typeof cap === 'number' && cap > 0
                              ? `${Math.round((used / cap) * 100)}% used`
                              : '—'}
                          </td>
                        </tr>
                      );
                    })}
                  </tbody>
                </table>
              </div>
            )}
          </section>
        </div>
      )}
    </>
  );
}

/**
 * The target stores' size and dedup ratio, as the vault's store-stats jobs last measured them
 * (the dashboard never scans a store): bytes stored, logical bytes of every point, and their
 * ratio (deduplication and compression together).
 */
function StoresCard({
  stores,
  canMeasure,
  onMeasured,
}: {
  stores: Summary['stores'];
  canMeasure: boolean;
  onMeasured: () => void;
}) {
  const measured = stores?.items.filter((x) => x.measuredAt !== null) ?? [];
  const [measuring, setMeasuring] = useState<string>();
  const [askedAt, setAskedAt] = useState<string>();
  // Once every store's figures are newer than the newest shown at the click (the vault's
  // clock on both sides), the figures shown are the new ones.
  const pending =
    measuring !== undefined &&
    (askedAt === undefined ||
      measured.length < (stores?.items.length ?? 0) ||
      measured.some((x) => (x.measuredAt ?? '') <= askedAt));
  const [error, setError] = useState<ApiError>();
  // Starts a store-stats job per store; the figures change when they end (job events).
  const measure = async () => {
    setError(undefined);
    setMeasuring('Measuring…');
    setAskedAt(measured.map((x) => x.measuredAt ?? '').sort()[measured.length - 1] ?? '');
    try {
      for (const x of stores?.items ?? [])
        await api('POST', `/api/target-stores/${encodeURIComponent(x.id)}/stats`);
      setMeasuring('Measuring: the figures change when the jobs end.');
      onMeasured();
    } catch (e) {
      setMeasuring(undefined);
      if (e instanceof ApiError) setError(e);
    }
  };
  return (
    <section className="card" aria-labelledby="stores-h">
      <h2 id="stores-h">Target stores</h2>
      {stores === undefined || stores.items.length === 0 ? (
        <p className="muted">No target store yet.</p>
      ) : measured.length === 0 ? (
        <p className="muted">Not measured yet: the vault measures each store within the hour.</p>
      ) : (
        <>
          <p className="big">
            <span data-testid="store-stored">{bytes(stores.storedBytes)}</span>{' '}
            <span className="muted small">stored</span>
          </p>
          <p>
            Dedup ratio <strong data-testid="store-dedup">{ratio(stores.dedupRatio)}</strong>{' '}
            <span className="muted small">
              ({bytes(stores.logicalBytes)} of recovery points in {bytes(stores.storedBytes)})
            </span>
          </p>
        </>
      )}
      {stores !== undefined && stores.items.length > 1 ? (
        <ul className="plain small" data-testid="store-list">
          {stores.items.map((x) => (
            <li key={x.id}>
              {x.name}:{' '}
              {x.measuredAt === null
                ? 'not measured yet'
                : `${bytes(x.storedBytes)}, ${ratio(x.dedupRatio)}, ${x.points ?? 0} points`}
            </li>
          ))}
        </ul>
      ) : null}
      {measured.length > 0 ? (
        <p className="muted small">
          Measured {ago(measured.map((x) => x.measuredAt ?? '').sort()[0])}.
        </p>
      ) : null}
      {canMeasure && stores !== undefined && stores.items.length > 0 ? (
        <p className="small">
          <button
            type="button"
            onClick={() => void measure()}
            disabled={measuring === 'Measuring…'}
          >
            Measure now
          </button>{' '}
          <span role="status">{pending ? measuring : ''}</span>
        </p>
      ) : null}
      <ErrorBox error={error} />
    </section>
  );
}
