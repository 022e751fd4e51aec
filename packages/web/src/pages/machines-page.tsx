import { useEffect, useState } from 'react';
import { query, roleAtLeast, type Page, type Role } from '../api';
import { ago, bytes, duration, STATE_LABELS } from '../format';
import { useLiveRefresh } from '../live';
import { useMachines } from '../names';
import { Link, navigate, useLocation } from '../router';
import type { Policy, ProtectedItem } from '../types';
import { useApi } from '../use-api';
import { Badge, ErrorBox, PageHeader, Pager } from '../ui';

const LIMIT = 50;

interface Named {
  id: string;
  name: string;
}

/** Protected machines: a server-side paged table with search, state, site and policy filters, sort. */
export function MachinesPage({ role }: { role: Role }) {
  const { params } = useLocation();
  const state = params.get('state') ?? '';
  const policyId = params.get('policy') ?? '';
  const siteId = params.get('site') ?? '';
  const sort = params.get('sort') ?? 'lastPointAt';
  const q = params.get('q') ?? '';
  const offset = Math.max(0, Number(params.get('offset') ?? 0) || 0);
  const [search, setSearch] = useState(q);

  const set = (changes: Record<string, string | number | undefined>) => {
    const next: Record<string, string | number | undefined> = {
      q,
      state,
      policy: policyId,
      site: siteId,
      sort: sort === 'lastPointAt' ? undefined : sort,
      offset: offset === 0 ? undefined : offset,
      ...changes,
    };
    if (next['offset'] === 0) next['offset'] = undefined;
    navigate(`/machines${query(next)}`, true);
  };

  // Search as you type, without a request per key stroke.
  useEffect(() => {
    if (search === q) return;
    const t = setTimeout(() => set({ q: search, offset: undefined }), 300);
    return () => clearTimeout(t);
  }, [search]);

  const policies = useApi<Page<Policy>>('/api/policies?limit=1000');
  const policyName = new Map((policies.data?.items ?? []).map((p) => [p.id, p.name]));
  const sites = useApi<Page<Named>>('/api/sites?limit=1000');
  const hosts = useApi<Page<Named & { siteId: string | null }>>('/api/source-hosts?limit=1000');
  const siteName = new Map((sites.data?.items ?? []).map((x) => [x.id, x.name]));
  const hostSite = new Map((hosts.data?.items ?? []).map((h) => [h.id, h.siteId]));
  const path = `/api/protected-items${query({
    limit: LIMIT,
    offset,
    q,
    state,
    policyId,
    siteId,
    sort,
    // Oldest last point first is the useful order for an operator: worst RPO on top.
    order: sort === 'id' ? 'asc' : sort === 'lastPointAt' ? 'asc' : 'desc',
  })}`;
  const items = useApi<Page<ProtectedItem>>(path);
  useLiveRefresh(['protected-item'], items.reload, 10_000);
  const rows = items.data?.items ?? [];
  const machines = useMachines(rows.map((r) => r.machineId));
  const siteOf = (machineId: string): string => {
    const host = machines[machineId]?.sourceHostId;
    if (host === undefined) return '';
    const site = hostSite.get(host);
    return site == null ? '—' : (siteName.get(site) ?? site);
  };

  return (
    <>
      <PageHeader title="Machines">
        {roleAtLeast(role, 'operator') ? (
          <Link to="/protect" className="button primary">
            Protect machines
          </Link>
        ) : null}
      </PageHeader>
      <form className="toolbar" role="search" onSubmit={(e) => e.preventDefault()}>
        <div className="field inline">
          <label htmlFor="machine-search">Search by name</label>
          <input
            id="machine-search"
            type="search"
            value={search}
            onChange={(e) => setSearch(e.target.value)}
          />
        </div>
        <div className="field inline">
          <label htmlFor="state-filter">State</label>
          <select
            id="state-filter"
            value={state}
            onChange={(e) => set({ state: e.target.value, offset: undefined })}
          >
            <option value="">All states</option>
            {Object.entries(STATE_LABELS).map(([v, l]) => (
              <option key={v} value={v}>
                {l}
              </option>
            ))}
          </select>
        </div>
        <div className="field inline">
          <label htmlFor="site-filter">Site</label>
          <select
            id="site-filter"
            value={siteId}
            onChange={(e) => set({ site: e.target.value, offset: undefined })}
          >
            <option value="">All sites</option>
            {(sites.data?.items ?? []).map((x) => (
              <option key={x.id} value={x.id}>
                {x.name}
              </option>
            ))}
          </select>
        </div>
        <div className="field inline">
          <label htmlFor="policy-filter">Policy</label>
          <select
            id="policy-filter"
            value={policyId}
            onChange={(e) => set({ policy: e.target.value, offset: undefined })}
          >
            <option value="">All policies</option>
            {(policies.data?.items ?? []).map((p) => (
              <option key={p.id} value={p.id}>
                {p.name}
              </option>
            ))}
          </select>
        </div>
        <div className="field inline">
          <label htmlFor="sort">Sort by</label>
          <select
            id="sort"
            value={sort}
            onChange={(e) => set({ sort: e.target.value, offset: undefined })}
          >
            <option value="lastPointAt">Worst RPO first</option>
            <option value="stateChangedAt">Latest state change</option>
            <option value="id">Protection order</option>
          </select>
        </div>
      </form>
      <ErrorBox error={items.error} />
      <div className="table-wrap">
        <table aria-busy={items.loading}>
          <caption className="sr-only">Protected machines</caption>
          <thead>
            <tr>
              <th scope="col">Machine</th>
              <th scope="col">State</th>
              <th scope="col">RPO</th>
              <th scope="col">Last point</th>
              <th scope="col">Backlog</th>
              <th scope="col">Throughput</th>
              <th scope="col">Site</th>
              <th scope="col">Policy</th>
            </tr>
          </thead>
          <tbody data-testid="machine-rows">
            {rows.map((r) => (
              <tr key={r.id}>
                <td>
                  <Link to={`/machines/${encodeURIComponent(r.id)}`}>
                    {machines[r.machineId]?.name ?? r.machineId}
                  </Link>
                </td>
                <td>
                  <Badge value={r.state} label={STATE_LABELS[r.state] ?? r.state} />
                </td>
                <td className="num">{duration(r.rpoSeconds)}</td>
                <td>{ago(r.lastPointAt)}</td>
                <td className="num">{bytes(r.backlogBytes)}</td>
                <td className="num">{bytes(r.throughputBps)}/s</td>
                <td>{siteOf(r.machineId)}</td>
                <td>{policyName.get(r.policyId) ?? r.policyId}</td>
              </tr>
            ))}
            {items.data !== undefined && rows.length === 0 ? (
              <tr>
                <td colSpan={8} className="muted">
                  No protected machine matches.
                </td>
              </tr>
            ) : null}
          </tbody>
        </table>
      </div>
      {items.data !== undefined ? (
        <Pager
          offset={offset}
          limit={LIMIT}
          total={items.data.total}
          onChange={(o) => set({ offset: o })}
          label="Machines"
        />
      ) : null}
    </>
  );
}
