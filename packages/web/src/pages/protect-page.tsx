import { useState, type FormEvent } from 'react';
import { api, ApiError, query, type Page } from '../api';
import { bytes } from '../format';
import { Link } from '../router';
import type { Machine, Policy } from '../types';
import { useApi } from '../use-api';
import { ErrorBox, PageHeader } from '../ui';
import { WizardButtons, WizardSteps } from '../wizard';

interface SourceHost {
  id: string;
  name: string;
  processServerId: string | null;
}
interface Named {
  id: string;
  name: string;
  kind?: string;
}
interface Result {
  machine: string;
  ok: boolean;
  text: string;
  id?: string;
  jobId?: string;
}

const STEPS = ['Machines', 'Replication settings', 'Review'] as const;

/**
 * The enable-replication wizard: pick machines from a source host's inventory, then a policy,
 * a target store and optionally a network mapping, review, and protect. The rules are the
 * API's (a machine, a policy, a store and the host's process server are required); the API's
 * own answer per machine is shown at the end, so a machine already protected says so.
 */
export function ProtectPage() {
  const [step, setStep] = useState(0);
  const [hostId, setHostId] = useState('');
  const [search, setSearch] = useState('');
  const [chosen, setChosen] = useState<Map<string, Machine>>(new Map());
  const [policyId, setPolicyId] = useState('');
  const [storeId, setStoreId] = useState('');
  const [mappingId, setMappingId] = useState('');
  const [tried, setTried] = useState([false, false]);
  const [results, setResults] = useState<Result[]>();
  const [busy, setBusy] = useState(false);

  const hosts = useApi<Page<SourceHost>>('/api/source-hosts?limit=1000');
  const policies = useApi<Page<Policy>>('/api/policies?limit=1000');
  const stores = useApi<Page<Named>>('/api/target-stores?limit=1000');
  const mappings = useApi<Page<Named>>('/api/network-mappings?limit=1000');
  const machines = useApi<Page<Machine>>(
    hostId === ''
      ? null
      : `/api/machines${query({ sourceHostId: hostId, present: true, q: search, limit: 100 })}`,
  );
  const host = hosts.data?.items.find((h) => h.id === hostId);

  const machineErrors: Record<string, string> = {};
  if (hostId === '') machineErrors['host'] = 'Choose the source host the machines run on.';
  else if (host?.processServerId === null)
    machineErrors['host'] =
      'This source host has no process server; give it one before protecting its machines.';
  if (chosen.size === 0) machineErrors['machines'] = 'Choose at least one machine.';
  const settingErrors: Record<string, string> = {};
  if (policyId === '') settingErrors['policy'] = 'Choose a replication policy.';
  if (storeId === '') settingErrors['store'] = 'Choose the target store for the recovery points.';
  const errors = [machineErrors, settingErrors];

  const next = (e: FormEvent) => {
    e.preventDefault();
    setTried((t) => t.map((v, i) => (i === step ? true : v)));
    const errs = errors[step] ?? {};
    const first = Object.keys(errs)[0];
    if (first !== undefined) {
      document.getElementById(`protect-${first}`)?.focus();
      return;
    }
    if (step < STEPS.length - 1) setStep((s) => s + 1);
    else if (!busy) void protect();
  };

  const protect = async () => {
    if (host?.processServerId == null) return;
    setBusy(true);
    const out: Result[] = [];
    for (const m of chosen.values()) {
      try {
        const r = await api<{ id: string; jobId?: string }>('POST', '/api/protected-items', {
          machineId: m.id,
          policyId,
          processServerId: host.processServerId,
          targetStoreId: storeId,
          ...(mappingId !== '' ? { networkMappingId: mappingId } : {}),
        });
        out.push({
          machine: m.name,
          ok: true,
          text: 'Replication is being enabled.',
          id: r.id,
          ...(r.jobId !== undefined ? { jobId: r.jobId } : {}),
        });
      } catch (err) {
        out.push({
          machine: m.name,
          ok: false,
          text: err instanceof ApiError ? `${err.message} (${err.code})` : String(err),
        });
      }
    }
    setResults(out);
    setBusy(false);
  };

  const shown = (k: string) => (tried[step] === true ? errors[step]?.[k] : undefined);
  const fieldError = (k: string) => {
    const msg = shown(k);
    return msg === undefined ? null : (
      <p className="field-error" id={`protect-${k}-error`} role="alert">
        {msg}
      </p>
    );
  };
  const described = (k: string) =>
    shown(k) === undefined
      ? {}
      : { 'aria-invalid': true as const, 'aria-describedby': `protect-${k}-error` };

  if (results !== undefined) {
    return (
      <>
        <PageHeader title="Protect machines: done" />
        <ul className="plain" data-testid="protect-results">
          {results.map((r) => (
            <li key={r.machine} className={r.ok ? '' : 'error-text'}>
              <strong>{r.machine}</strong>: {r.text}{' '}
              {r.id !== undefined ? (
                <Link to={`/machines/${encodeURIComponent(r.id)}`}>Open machine</Link>
              ) : null}{' '}
              {r.jobId !== undefined ? (
                <Link to={`/jobs/${encodeURIComponent(r.jobId)}`}>Follow the job</Link>
              ) : null}
            </li>
          ))}
        </ul>
        <p>
          <Link to="/machines">Back to machines</Link>
        </p>
      </>
    );
  }

  return (
    <>
      <PageHeader title="Protect machines" />
      <WizardSteps steps={STEPS} step={step} />
      <ErrorBox
        error={hosts.error ?? policies.error ?? stores.error ?? mappings.error ?? machines.error}
      />
      <form onSubmit={next} noValidate className="card wizard">
        {step === 0 ? (
          <>
            <div className="field">
              <label htmlFor="protect-host">Source host</label>
              <select
                id="protect-host"
                value={hostId}
                {...described('host')}
                onChange={(e) => {
                  setHostId(e.target.value);
                  setChosen(new Map());
                }}
              >
                <option value="">Choose…</option>
                {(hosts.data?.items ?? []).map((h) => (
                  <option key={h.id} value={h.id}>
                    {h.name}
                  </option>
                ))}
              </select>
              {fieldError('host')}
            </div>
            {hostId !== '' ? (
              <fieldset className="field" {...described('machines')} id="protect-machines">
                <legend>Machines ({chosen.size} chosen)</legend>
                <label htmlFor="protect-search" className="sr-only">
                  Filter machines by name
                </label>
                <input
                  id="protect-search"
                  type="search"
                  placeholder="Filter by name"
                  value={search}
                  onChange={(e) => setSearch(e.target.value)}
                />
                <ul className="plain choices" data-testid="inventory">
                  {(machines.data?.items ?? []).map((m) => (
                    <li key={m.id}>
                      <label>
                        <input
                          type="checkbox"
                          checked={chosen.has(m.id)}
                          onChange={(e) =>
                            setChosen((old) => {
                              const n = new Map(old);
                              if (e.target.checked) n.set(m.id, m);
                              else n.delete(m.id);
                              return n;
                            })
                          }
                        />{' '}
                        {m.name}{' '}
                        <span className="muted small">
                          {m.os ?? ''} {m.cpus ?? '?'} CPU, {bytes(m.memoryBytes)}
                        </span>
                      </label>
                    </li>
                  ))}
                </ul>
                {machines.data !== undefined && machines.data.total > machines.data.items.length ? (
                  <p className="muted small">
                    Showing {machines.data.items.length} of {machines.data.total}; filter by name to
                    find others.
                  </p>
                ) : null}
                {fieldError('machines')}
              </fieldset>
            ) : null}
          </>
        ) : null}
        {step === 1 ? (
          <>
            <div className="field">
              <label htmlFor="protect-policy">Replication policy</label>
              <select
                id="protect-policy"
                value={policyId}
                {...described('policy')}
                onChange={(e) => setPolicyId(e.target.value)}
              >
                <option value="">Choose…</option>
                {(policies.data?.items ?? []).map((p) => (
                  <option key={p.id} value={p.id}>
                    {p.name} (RPO threshold {p.rpoThresholdSeconds} s)
                  </option>
                ))}
              </select>
              {fieldError('policy')}
            </div>
            <div className="field">
              <label htmlFor="protect-store">Target store</label>
              <select
                id="protect-store"
                value={storeId}
                {...described('store')}
                onChange={(e) => setStoreId(e.target.value)}
              >
                <option value="">Choose…</option>
                {(stores.data?.items ?? []).map((s) => (
                  <option key={s.id} value={s.id}>
                    {s.name} ({s.kind})
                  </option>
                ))}
              </select>
              {fieldError('store')}
            </div>
            <div className="field">
              <label htmlFor="protect-mapping">Network mapping (optional)</label>
              <select
                id="protect-mapping"
                value={mappingId}
                onChange={(e) => setMappingId(e.target.value)}
              >
                <option value="">None</option>
                {(mappings.data?.items ?? []).map((m) => (
                  <option key={m.id} value={m.id}>
                    {m.name}
                  </option>
                ))}
              </select>
            </div>
          </>
        ) : null}
        {step === 2 ? (
          <dl className="facts" data-testid="protect-review">
            <dt>Machines</dt>
            <dd>{[...chosen.values()].map((m) => m.name).join(', ')}</dd>
            <dt>Source host</dt>
            <dd>{host?.name}</dd>
            <dt>Policy</dt>
            <dd>{policies.data?.items.find((p) => p.id === policyId)?.name}</dd>
            <dt>Target store</dt>
            <dd>{stores.data?.items.find((s) => s.id === storeId)?.name}</dd>
            <dt>Network mapping</dt>
            <dd>{mappings.data?.items.find((m) => m.id === mappingId)?.name ?? 'None'}</dd>
          </dl>
        ) : null}
        <WizardButtons
          step={step}
          steps={STEPS.length}
          busy={busy}
          onBack={() => setStep((s) => s - 1)}
          cancelTo="/machines"
          finish={`Protect ${chosen.size} ${chosen.size === 1 ? 'machine' : 'machines'}`}
          finishing="Protecting…"
        />
      </form>
    </>
  );
}
