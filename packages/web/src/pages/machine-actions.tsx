import { useState } from 'react';
import { api, ApiError } from '../api';
import { Link } from '../router';
import type { ProtectedItem } from '../types';
import { ErrorBox } from '../ui';

type Pending = 'disable' | undefined;

/**
 * What an operator can do to a protected machine in its state (the vault's state machine:
 * docs/architecture.md): resync, a test failover or a failover (their wizards), re-protect,
 * disable. Disabling asks for a confirmation in place. Not rendered at all for viewers.
 */
export function MachineActions(props: { item: ProtectedItem; onDone: () => void }) {
  const { item } = props;
  const [pending, setPending] = useState<Pending>();
  const [deletePoints, setDeletePoints] = useState(false);
  const [error, setError] = useState<ApiError>();
  const [message, setMessage] = useState<{ text: string; jobId?: string }>();
  const [busy, setBusy] = useState(false);
  const base = `/api/protected-items/${encodeURIComponent(item.id)}`;
  const s = item.state;

  const run = async (action: string, body: unknown, done: string) => {
    setBusy(true);
    setError(undefined);
    try {
      const r = await api<{ jobId?: string }>('POST', `${base}/${action}`, body);
      setMessage({ text: done, ...(r.jobId !== undefined ? { jobId: r.jobId } : {}) });
      setPending(undefined);
      props.onDone();
    } catch (e) {
      if (e instanceof ApiError) setError(e);
    } finally {
      setBusy(false);
    }
  };

  return (
    <section className="card wide" aria-labelledby="actions-h">
      <h2 id="actions-h">Actions</h2>
      <div className="toolbar">
        {s === 'protected' || s === 'initial-replication' ? (
          <button
            type="button"
            disabled={busy}
            onClick={() => void run('resync', undefined, 'Resync requested.')}
          >
            Resync
          </button>
        ) : null}
        {item.lastPointAt !== null && s !== 'disabled' ? (
          <Link
            to={`/test-failover?item=${encodeURIComponent(item.id)}`}
            className="button"
            data-testid="start-test-failover"
          >
            Test failover…
          </Link>
        ) : null}
        {(s === 'protected' || s === 'resync-needed') && item.lastPointAt !== null ? (
          <Link to={`/failover?item=${encodeURIComponent(item.id)}`} className="button">
            Fail over…
          </Link>
        ) : null}
        {s === 'failed-over' ? (
          <button
            type="button"
            disabled={busy}
            onClick={() => void run('reprotect', undefined, 'Re-protection started.')}
          >
            Re-protect
          </button>
        ) : null}
        {s !== 'disabled' ? (
          <button
            type="button"
            disabled={busy}
            aria-expanded={pending === 'disable'}
            onClick={() => setPending(pending === 'disable' ? undefined : 'disable')}
          >
            Disable replication…
          </button>
        ) : null}
      </div>
      {pending === 'disable' ? (
        <div className="confirm" role="group" aria-labelledby="disable-h">
          <h3 id="disable-h">Disable replication</h3>
          <p>The process server stops replicating this machine.</p>
          <label>
            <input
              type="checkbox"
              checked={deletePoints}
              onChange={(e) => setDeletePoints(e.target.checked)}
            />{' '}
            Also delete its recovery points from the store
          </label>
          <p>
            <button
              type="button"
              className="danger"
              disabled={busy}
              onClick={() => void run('disable', { deletePoints }, 'Replication disabled.')}
            >
              Disable now
            </button>
          </p>
        </div>
      ) : null}
      <ErrorBox error={error} />
      {message !== undefined ? (
        <p role="status">
          {message.text}{' '}
          {message.jobId !== undefined ? (
            <Link to={`/jobs/${encodeURIComponent(message.jobId)}`}>Follow the job</Link>
          ) : null}
        </p>
      ) : null}
    </section>
  );
}
