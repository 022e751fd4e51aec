import { useState } from 'react';
import { query, roleAtLeast, type Page, type Role } from '../api';
import { ago, bytes, duration, STATE_LABELS, time } from '../format';
import { useLiveRefresh } from '../live';
import { Link } from '../router';
import { PagedTable } from '../paged-table';
import type { Machine, Policy, ProtectedItem, RecoveryPoint, RecoveryRun, Summary } from '../types';
import { useApi } from '../use-api';
import { Badge, ErrorBox, PageHeader } from '../ui';
import { MachineActions } from './machine-actions';
import { PointTimeline } from './point-timeline';
import { runColumns } from './recovery-page';
import { HistoryChart } from './history-chart';

const POINTS = 100;

/** One protected machine: state, disks, policy, process server and its recovery points. */
export function MachinePage({ id, role }: { id: string; role: Role }) {
  const item = useApi<ProtectedItem>(`/api/protected-items/${encodeURIComponent(id)}`);
  const it = item.data;
  const machine = useApi<Machine>(
    it === undefined ? null : `/api/machines/${encodeURIComponent(it.machineId)}`,
  );
  const policy = useApi<Policy>(
    it === undefined ? null : `/api/policies/${encodeURIComponent(it.policyId)}`,
  );
  const store = useApi<{ name: string; kind: string }>(
    it === undefined ? null : `/api/target-stores/${encodeURIComponent(it.targetStoreId)}`,
  );
  const summary = useApi<Summary>('/api/summary');
  const [kind, setKind] = useState('');
  const [older, setOlder] = useState<string[]>([]);
  const cursor = older[older.length - 1];
  const points = useApi<Page<RecoveryPoint>>(
    `/api/protected-items/${encodeURIComponent(id)}/points${query({ limit: POINTS, kind, cursor })}`,
  );
  useLiveRefresh(
    ['protected-item'],
    () => {
      item.reload();
      // Only the newest page follows new points; an older page the user chose stays put.
      if (cursor === undefined) points.reload();
    },
    5000,
  );

  const ps = summary.data?.components.find((c) => c.id === it?.processServerId);
  const operator = roleAtLeast(role, 'operator');
  const testFailoverAt = (p: RecoveryPoint) => `/test-failover${query({ item: id, point: p.id })}`;
  const m = machine.data;
  const title = m?.name ?? (it === undefined ? 'Machine' : it.machineId);

  return (
    <>
      <p className="crumbs">
        <Link to="/machines">Machines</Link> /
      </p>
      <PageHeader title={title}>
        {it !== undefined ? (
          <Badge value={it.state} label={STATE_LABELS[it.state] ?? it.state} />
        ) : null}
      </PageHeader>
      <ErrorBox error={item.error} />
      {it === undefined ? null : (
        <div className="grid halves">
          <section className="card" aria-labelledby="state-h">
            <h2 id="state-h">Replication</h2>
            <dl className="facts">
              <dt>State</dt>
              <dd data-testid="item-state">
                {STATE_LABELS[it.state] ?? it.state} — {it.stateReason} ({ago(it.stateChangedAt)})
              </dd>
              <dt>RPO</dt>
              <dd>{duration(it.rpoSeconds)}</dd>
              <dt>Last point</dt>
              <dd>{time(it.lastPointAt)}</dd>
              <dt>Backlog</dt>
              <dd>{bytes(it.backlogBytes)}</dd>
              <dt>Throughput</dt>
              <dd>{bytes(it.throughputBps)}/s</dd>
              <dt>Consistency group</dt>
              <dd>{it.consistencyGroup ?? '—'}</dd>
            </dl>
          </section>
          <section className="card" aria-labelledby="where-h">
            <h2 id="where-h">Machine and placement</h2>
            <dl className="facts">
              <dt>Operating system</dt>
              <dd>{m?.os ?? '—'}</dd>
              <dt>CPUs / memory</dt>
              <dd>
                {m?.cpus ?? '—'} / {bytes(m?.memoryBytes)}
              </dd>
              <dt>Policy</dt>
              <dd>
                {policy.data === undefined
                  ? it.policyId
                  : `${policy.data.name}: RPO threshold ${duration(policy.data.rpoThresholdSeconds)}, crash-consistent every ${duration(policy.data.crashConsistentIntervalSeconds)}, app-consistent every ${policy.data.appConsistentIntervalSeconds === 0 ? '— (off)' : duration(policy.data.appConsistentIntervalSeconds)}`}
              </dd>
              <dt>Process server</dt>
              <dd>
                {ps === undefined ? it.processServerId : `${ps.name} `}
                {ps !== undefined ? <Badge value={ps.status} /> : null}
              </dd>
              <dt>Target store</dt>
              <dd>
                {store.data === undefined
                  ? it.targetStoreId
                  : `${store.data.name} (${store.data.kind})`}
              </dd>
            </dl>
          </section>
          {operator ? (
            <MachineActions
              item={it}
              onDone={() => {
                item.reload();
                points.reload();
              }}
            />
          ) : null}
          <section className="card wide" aria-labelledby="disks-h">
            <h2 id="disks-h">Disks</h2>
            <div className="table-wrap">
              <table>
                <thead>
                  <tr>
                    <th scope="col">Disk</th>
                    <th scope="col">Size</th>
                    <th scope="col">Initial copy</th>
                    <th scope="col">Last point</th>
                    <th scope="col">Backlog</th>
                    <th scope="col">Throughput</th>
                  </tr>
                </thead>
                <tbody data-testid="disks">
                  {(it.disks ?? []).map((d) => (
                    <tr key={d.id}>
                      <td>{d.name}</td>
                      <td className="num">{bytes(d.sizeBytes)}</td>
                      <td className="num">
                        {d.lastPointAt !== null
                          ? 'Done'
                          : d.sizeBytes > 0
                            ? `${Math.min(100, Math.round((d.initialDoneBytes / d.sizeBytes) * 100))}%`
                            : '—'}
                      </td>
                      <td>{ago(d.lastPointAt)}</td>
                      <td className="num">{bytes(d.backlogBytes)}</td>
                      <td className="num">{bytes(d.throughputBps)}/s</td>
                    </tr>
                  ))}
                </tbody>
              </table>
            </div>
          </section>
          <HistoryChart
            itemId={it.id}
            {...(policy.data !== undefined
              ? { thresholdSeconds: policy.data.rpoThresholdSeconds }
              : {})}
          />
          <section className="card wide" aria-labelledby="points-h">
            <h2 id="points-h">Recovery points</h2>
            <div className="toolbar">
              <div className="field inline">
                <label htmlFor="kind-filter">Kind</label>
                <select
                  id="kind-filter"
                  value={kind}
                  onChange={(e) => {
                    setKind(e.target.value);
                    setOlder([]);
                  }}
                >
                  <option value="">Crash- and app-consistent</option>
                  <option value="crash">Crash-consistent only</option>
                  <option value="app">App-consistent only</option>
                </select>
              </div>
              <span className="muted" data-testid="points-total">
                {points.data === undefined
                  ? ''
                  : `${points.data.total} ${points.data.total === 1 ? 'point' : 'points'}`}
              </span>
            </div>
            <ErrorBox error={points.error} />
            {points.data !== undefined ? (
              <PointTimeline
                points={points.data.items}
                {...(operator ? { linkTo: (p: RecoveryPoint) => testFailoverAt(p) } : {})}
              />
            ) : null}
            <div className="table-wrap">
              <table>
                <caption className="sr-only">Recovery points, newest first</caption>
                <thead>
                  <tr>
                    <th scope="col">Time</th>
                    <th scope="col">Kind</th>
                    <th scope="col">Disk</th>
                    <th scope="col">Size</th>
                    <th scope="col">Point id</th>
                    {operator ? <th scope="col">Boot</th> : null}
                  </tr>
                </thead>
                <tbody data-testid="points">
                  {(points.data?.items ?? []).map((p) => (
                    <tr key={`${p.targetStoreId}/${p.id}`}>
                      <td>{time(p.time)}</td>
                      <td>
                        <span className={`kind kind-${p.kind}`}>
                          <span aria-hidden="true" className="kind-mark" />
                          {p.kind === 'app' ? 'App-consistent' : 'Crash-consistent'}
                        </span>
                      </td>
                      <td>{p.disk}</td>
                      <td className="num">{bytes(p.size)}</td>
                      <td>
                        <code>{p.id}</code>
                      </td>
                      {operator ? (
                        <td>
                          <Link to={testFailoverAt(p)}>
                            Test failover<span className="sr-only"> from {time(p.time)}</span>
                          </Link>
                        </td>
                      ) : null}
                    </tr>
                  ))}
                  {points.data !== undefined && points.data.items.length === 0 ? (
                    <tr>
                      <td colSpan={operator ? 6 : 5} className="muted">
                        No recovery point yet.
                      </td>
                    </tr>
                  ) : null}
                </tbody>
              </table>
            </div>
            <nav className="pager" aria-label="Recovery point pages">
              <button
                type="button"
                disabled={older.length === 0}
                onClick={() => setOlder((o) => o.slice(0, -1))}
              >
                Newer
              </button>
              <button
                type="button"
                disabled={points.data?.nextCursor == null}
                onClick={() => {
                  const next = points.data?.nextCursor;
                  if (next != null) setOlder((o) => [...o, next]);
                }}
              >
                Older
              </button>
            </nav>
          </section>
          <section className="card wide" aria-labelledby="runs-h">
            <h2 id="runs-h">Test failovers and failovers</h2>
            <PagedTable<RecoveryRun>
              path={`/api/test-failovers${query({ protectedItemId: id })}`}
              columns={runColumns()}
              caption="Test failovers of this machine"
              testId="machine-test-failovers"
              live={['job']}
              limit={5}
              empty="No test failover of this machine yet."
            />
            <PagedTable<RecoveryRun>
              path={`/api/failovers${query({ protectedItemId: id })}`}
              columns={runColumns()}
              caption="Failovers of this machine"
              testId="machine-failovers"
              live={['job']}
              limit={5}
              empty="No failover of this machine."
            />
          </section>
        </div>
      )}
    </>
  );
}
