import { useState } from 'react';
import { roleAtLeast, type Role } from '../api';
import { duration } from '../format';
import { PagedTable } from '../paged-table';
import { PageHeader } from '../ui';
import { PolicyForm } from './policy-form';

interface PolicyRow {
  id: string;
  name: string;
  rpoThresholdSeconds: number;
  crashConsistentIntervalSeconds: number;
  appConsistentIntervalSeconds: number;
  retentionIntervalSeconds: number;
  retention: { rules: Array<{ for: string; every?: string }>; keepAppConsistentFor?: string };
}

/** Replication policies: RPO threshold, point intervals and retention. */
export function PoliciesPage({ role }: { role: Role }) {
  const [created, setCreated] = useState(0);
  return (
    <>
      <PageHeader title="Policies" />
      {roleAtLeast(role, 'operator') ? (
        <PolicyForm onCreated={() => setCreated((n) => n + 1)} />
      ) : null}
      <PagedTable<PolicyRow>
        path="/api/policies"
        caption="Replication policies"
        testId="policies"
        reloadKey={created}
        columns={[
          { title: 'Name', cell: (p) => p.name },
          { title: 'RPO threshold', cell: (p) => duration(p.rpoThresholdSeconds), numeric: true },
          {
            title: 'Crash-consistent every',
            cell: (p) => duration(p.crashConsistentIntervalSeconds),
            numeric: true,
          },
          {
            title: 'App-consistent every',
            cell: (p) =>
              p.appConsistentIntervalSeconds === 0
                ? 'off'
                : duration(p.appConsistentIntervalSeconds),
            numeric: true,
          },
          {
            title: 'Retention',
            cell: (p) =>
              p.retention.rules
                .map((r) =>
                  r.every === undefined ? `all for ${r.for}` : `one per ${r.every} for ${r.for}`,
                )
                .join('; ') +
              (p.retention.keepAppConsistentFor !== undefined
                ? `; app-consistent for ${p.retention.keepAppConsistentFor}`
                : ''),
          },
        ]}
      />
    </>
  );
}
