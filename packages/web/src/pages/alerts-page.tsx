import { useState } from 'react';
import { api, ApiError, query, roleAtLeast, type Page, type Role } from '../api';
import { time } from '../format';
import { useLiveRefresh } from '../live';
import { useItemMachineNames } from '../names';
import { Link, navigate, useLocation } from '../router';
import type { Alert } from '../types';
import { useApi } from '../use-api';
import { Badge, ErrorBox, PageHeader, Pager } from '../ui';

const LIMIT = 50;

/** Alerts, newest first, with acknowledge for operators and admins (viewers see no button). */
export function AlertsPage({ role }: { role: Role }) {
  const { params } = useLocation();
  const state = params.get('state') ?? 'active';
  const offset = Math.max(0, Number(params.get('offset') ?? 0) || 0);
  const alerts = useApi<Page<Alert>>(
    `/api/alerts${query({ limit: LIMIT, offset, state: state === 'all' ? undefined : state })}`,
  );
  useLiveRefresh(['alert'], alerts.reload, 10_000);
  const [actionError, setActionError] = useState<ApiError>();
  const [busy, setBusy] = useState<string>();
  const canAck = roleAtLeast(role, 'operator');
  const names = useItemMachineNames(
    (alerts.data?.items ?? [])
      .filter((a) => a.subjectType === 'protected-item')
      .map((a) => a.subjectId),
  );

  const acknowledge = async (id: string) => {
    setBusy(id);
    setActionError(undefined);
    try {
      await api('POST', `/api/alerts/${encodeURIComponent(id)}/acknowledge`);
      alerts.reload();
    } catch (e) {
      if (e instanceof ApiError) setActionError(e);
    } finally {
      setBusy(undefined);
    }
  };

  const go = (changes: Record<string, string | number | undefined>) =>
    navigate(`/alerts${query({ state, offset: undefined, ...changes })}`, true);

  return (
    <>
      <PageHeader title="Alerts">
        <div className="field inline">
          <label htmlFor="alert-state">Show</label>
          <select id="alert-state" value={state} onChange={(e) => go({ state: e.target.value })}>
            <option value="active">Active</option>
            <option value="cleared">Cleared</option>
            <option value="all">All</option>
          </select>
        </div>
      </PageHeader>
      <ErrorBox error={alerts.error ?? actionError} />
      <div className="table-wrap">
        <table aria-busy={alerts.loading}>
          <caption className="sr-only">Alerts, newest first</caption>
          <thead>
            <tr>
              <th scope="col">Severity</th>
              <th scope="col">Alert</th>
              <th scope="col">Subject</th>
              <th scope="col">Raised</th>
              <th scope="col">State</th>
              <th scope="col">Acknowledged</th>
            </tr>
          </thead>
          <tbody data-testid="alert-rows">
            {(alerts.data?.items ?? []).map((a) => (
              <tr key={a.id}>
                <td>
                  <Badge value={a.severity} />
                </td>
                <td>
                  {a.message} <span className="muted small">({a.kind})</span>
                </td>
                <td>
                  {a.subjectType === 'protected-item' ? (
                    <Link to={`/machines/${encodeURIComponent(a.subjectId)}`}>
                      {names[a.subjectId] ?? 'machine'}
                    </Link>
                  ) : (
                    `${a.subjectType} ${a.subjectId}`
                  )}
                </td>
                <td>{time(a.raisedAt)}</td>
                <td>{a.state === 'cleared' ? `Cleared ${time(a.clearedAt)}` : 'Active'}</td>
                <td>
                  {a.acknowledgedAt !== null ? (
                    `${a.acknowledgedBy ?? ''}, ${time(a.acknowledgedAt)}`
                  ) : canAck ? (
                    <button
                      type="button"
                      disabled={busy === a.id}
                      onClick={() => void acknowledge(a.id)}
                      aria-label={`Acknowledge: ${a.message}`}
                    >
                      Acknowledge
                    </button>
                  ) : (
                    'Not yet'
                  )}
                </td>
              </tr>
            ))}
            {alerts.data !== undefined && alerts.data.items.length === 0 ? (
              <tr>
                <td colSpan={6} className="muted">
                  No alert.
                </td>
              </tr>
            ) : null}
          </tbody>
        </table>
      </div>
      {alerts.data !== undefined ? (
        <Pager
          offset={offset}
          limit={LIMIT}
          total={alerts.data.total}
          onChange={(o) => go({ offset: o })}
          label="Alerts"
        />
      ) : null}
    </>
  );
}
