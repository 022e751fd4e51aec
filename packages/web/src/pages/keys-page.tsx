import { useState, type FormEvent } from 'react';
import { api, ApiError } from '../api';
import { time } from '../format';
import { PagedTable } from '../paged-table';
import { Badge, ErrorBox, PageHeader } from '../ui';

interface Key {
  id: string;
  kind: string;
  description: string;
  expiresAt: string;
  usedAt: string | null;
  usedByComponentId: string | null;
  createdBy: string;
  createdAt: string;
}

const KINDS = {
  'process-server': 'Process server',
  'recovery-host': 'Recovery host',
  agent: 'Agent',
};

function hoursError(v: string): string | undefined {
  const n = Number(v);
  // The API takes 60 s to 30 days.
  if (v.trim() === '' || !Number.isFinite(n)) return 'Enter a number of hours.';
  if (n * 3600 < 60 || n > 720) return 'Between 1 minute (0.02 h) and 720 hours (30 days).';
  return undefined;
}

/** One-time registration keys for process servers, recovery hosts and agents (admins). */
export function KeysPage() {
  const [kind, setKind] = useState<keyof typeof KINDS>('process-server');
  const [hours, setHours] = useState('24');
  const [description, setDescription] = useState('');
  const [created, setCreated] = useState<{ key: string; kind: string; expiresAt: string }>();
  const [error, setError] = useState<ApiError>();
  const [reload, setReload] = useState(0);
  const hErr = hoursError(hours);

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    if (hErr !== undefined) {
      document.getElementById('key-hours')?.focus();
      return;
    }
    try {
      const r = await api<{ key: string; kind: string; expiresAt: string }>(
        'POST',
        '/api/registration-keys',
        {
          kind,
          expiresInSeconds: Math.round(Number(hours) * 3600),
          ...(description !== '' ? { description } : {}),
        },
      );
      setCreated(r);
      setError(undefined);
      setReload((n) => n + 1);
    } catch (x) {
      if (x instanceof ApiError) setError(x);
    }
  };

  return (
    <>
      <PageHeader title="Registration keys" />
      <section className="card" aria-labelledby="new-key-h">
        <h2 id="new-key-h">New key</h2>
        <form className="toolbar" onSubmit={(e) => void submit(e)} noValidate>
          <div className="field inline">
            <label htmlFor="key-kind">For a</label>
            <select
              id="key-kind"
              value={kind}
              onChange={(e) => setKind(e.target.value as keyof typeof KINDS)}
            >
              {Object.entries(KINDS).map(([v, l]) => (
                <option key={v} value={v}>
                  {l}
                </option>
              ))}
            </select>
          </div>
          <div className="field inline">
            <label htmlFor="key-hours">Valid for (hours)</label>
            <input
              id="key-hours"
              inputMode="decimal"
              value={hours}
              aria-invalid={hErr !== undefined}
              aria-describedby={hErr !== undefined ? 'key-hours-error' : undefined}
              onChange={(e) => setHours(e.target.value)}
            />
            {hErr !== undefined ? (
              <p className="field-error" id="key-hours-error">
                {hErr}
              </p>
            ) : null}
          </div>
          <div className="field inline">
            <label htmlFor="key-description">Description (optional)</label>
            <input
              id="key-description"
              maxLength={500}
              value={description}
              onChange={(e) => setDescription(e.target.value)}
            />
          </div>
          <button type="submit" className="primary">
            Create key
          </button>
        </form>
        <ErrorBox error={error} />
        {created !== undefined ? (
          <div role="status" className="key-once">
            <p>
              Key for a {KINDS[created.kind as keyof typeof KINDS] ?? created.kind}, valid until{' '}
              {time(created.expiresAt)}. It is shown only now: copy it to the machine that registers
              (<code>lifeboat vault register --key KEY --kind KIND --name NAME</code>).
            </p>
            <code data-testid="new-key">{created.key}</code>
          </div>
        ) : null}
      </section>
      <PagedTable<Key>
        path="/api/registration-keys"
        caption="Registration keys"
        testId="key-rows"
        reloadKey={reload}
        columns={[
          { title: 'For', cell: (k) => KINDS[k.kind as keyof typeof KINDS] ?? k.kind },
          { title: 'Description', cell: (k) => k.description || '—' },
          {
            title: 'State',
            cell: (k) =>
              k.usedAt !== null ? (
                <Badge value="done" label={`Used by ${k.usedByComponentId ?? '?'}`} />
              ) : Date.parse(k.expiresAt) < Date.now() ? (
                <Badge value="failed" label="Expired" />
              ) : (
                <Badge value="queued" label="Unused" />
              ),
          },
          { title: 'Expires', cell: (k) => time(k.expiresAt) },
          { title: 'Created', cell: (k) => `${time(k.createdAt)} by ${k.createdBy}` },
        ]}
      />
    </>
  );
}
