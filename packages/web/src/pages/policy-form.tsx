import { useState, type FormEvent } from 'react';
import { api, ApiError } from '../api';
import { ErrorBox } from '../ui';

// The vault's rules for a policy (simple-resources.ts), checked as the operator types.
const NAME = /^[A-Za-z0-9][A-Za-z0-9 ._-]*$/;
const DURATION = /^[1-9][0-9]*[smhdw]$/;

interface Values {
  name: string;
  rpo: string;
  crash: string;
  app: string;
  keepFor: string;
  hourlyFor: string;
}

function errorsOf(v: Values): Partial<Record<keyof Values, string>> {
  const e: Partial<Record<keyof Values, string>> = {};
  const int = (s: string) => (/^\d+$/.test(s.trim()) ? Number(s) : NaN);
  if (v.name === '') e.name = 'Enter a name.';
  else if (v.name.length > 100 || !NAME.test(v.name))
    e.name = 'Letters, digits, space . _ - (starting with a letter or digit), at most 100.';
  const rpo = int(v.rpo);
  if (!(rpo >= 1 && rpo <= 7 * 86_400)) e.rpo = 'Seconds, from 1 to 604800 (7 days).';
  const crash = int(v.crash);
  if (!(crash >= 1 && crash <= 86_400)) e.crash = 'Seconds, from 1 to 86400.';
  else if (rpo >= 1 && crash > rpo)
    e.crash = 'Must not exceed the RPO threshold, or every machine would always alert.';
  const app = int(v.app);
  if (!(app >= 0 && app <= 7 * 86_400)) e.app = 'Seconds, from 0 (off) to 604800.';
  if (!DURATION.test(v.keepFor)) e.keepFor = 'A duration such as 24h, 7d or 2w.';
  if (v.hourlyFor !== '' && !DURATION.test(v.hourlyFor))
    e.hourlyFor = 'A duration such as 30d, or leave empty.';
  return e;
}

/** Creates a replication policy (operators), with the API's rules checked as fields change. */
export function PolicyForm({ onCreated }: { onCreated: () => void }) {
  const [v, setV] = useState<Values>({
    name: '',
    rpo: '300',
    crash: '30',
    app: '3600',
    keepFor: '24h',
    hourlyFor: '7d',
  });
  const [touched, setTouched] = useState<Partial<Record<keyof Values, boolean>>>({});
  const [server, setServer] = useState<ApiError>();
  const [done, setDone] = useState<string>();
  const errors = errorsOf(v);
  const serverField: Partial<Record<string, keyof Values>> = {
    name: 'name',
    rpoThresholdSeconds: 'rpo',
    crashConsistentIntervalSeconds: 'crash',
    appConsistentIntervalSeconds: 'app',
  };
  const shown = (k: keyof Values) =>
    (touched[k] === true ? errors[k] : undefined) ??
    (server?.field !== undefined && serverField[server.field] === k ? server.message : undefined);

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setTouched({ name: true, rpo: true, crash: true, app: true, keepFor: true, hourlyFor: true });
    setDone(undefined);
    const first = Object.keys(errors)[0];
    if (first !== undefined) {
      document.getElementById(`policy-${first}`)?.focus();
      return;
    }
    try {
      await api('POST', '/api/policies', {
        name: v.name,
        rpoThresholdSeconds: Number(v.rpo),
        crashConsistentIntervalSeconds: Number(v.crash),
        appConsistentIntervalSeconds: Number(v.app),
        retention: {
          rules: [
            { for: v.keepFor },
            ...(v.hourlyFor !== '' ? [{ for: v.hourlyFor, every: '1h' }] : []),
          ],
        },
      });
      setDone(`Policy ${v.name} created.`);
      setServer(undefined);
      setTouched({});
      setV((old) => ({ ...old, name: '' }));
      onCreated();
    } catch (x) {
      if (x instanceof ApiError) setServer(x);
    }
  };

  const field = (k: keyof Values, label: string, hint?: string) => {
    const err = shown(k);
    return (
      <div className="field inline">
        <label htmlFor={`policy-${k}`}>{label}</label>
        <input
          id={`policy-${k}`}
          value={v[k]}
          size={k === 'name' ? 20 : 8}
          aria-invalid={err !== undefined}
          aria-describedby={
            [
              err !== undefined ? `policy-${k}-error` : '',
              hint !== undefined ? `policy-${k}-hint` : '',
            ]
              .filter((x) => x !== '')
              .join(' ') || undefined
          }
          onChange={(e) => {
            setV((old) => ({ ...old, [k]: e.target.value }));
            setTouched((t) => ({ ...t, [k]: true }));
            setServer(undefined);
          }}
        />
        {hint !== undefined ? (
          <span className="muted small" id={`policy-${k}-hint`}>
            {hint}
          </span>
        ) : null}
        {err !== undefined ? (
          <p className="field-error" id={`policy-${k}-error`}>
            {err}
          </p>
        ) : null}
      </div>
    );
  };

  return (
    <section className="card" aria-labelledby="new-policy-h">
      <h2 id="new-policy-h">New policy</h2>
      <form className="toolbar" onSubmit={(e) => void submit(e)} noValidate>
        {field('name', 'Name')}
        {field('rpo', 'RPO threshold (s)', 'alert above this')}
        {field('crash', 'Crash-consistent every (s)')}
        {field('app', 'App-consistent every (s)', '0 = off')}
        {field('keepFor', 'Keep every point for', 'e.g. 24h')}
        {field('hourlyFor', 'Then one per hour for', 'optional, e.g. 7d')}
        <button type="submit" className="primary">
          Create policy
        </button>
      </form>
      {server !== undefined &&
      (server.field === undefined || serverField[server.field] === undefined) ? (
        <ErrorBox error={server} />
      ) : null}
      {done !== undefined ? (
        <p role="status" className="muted">
          {done}
        </p>
      ) : null}
    </section>
  );
}
