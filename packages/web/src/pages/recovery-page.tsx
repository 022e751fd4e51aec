import { roleAtLeast, type Role } from '../api';
import { time } from '../format';
import { PagedTable, type Column } from '../paged-table';
import { Link } from '../router';
import type { RecoveryRun } from '../types';
import { PageHeader } from '../ui';
import { RunState, runPath } from './recovery-fields';

/** Columns of a list of runs. */
export function runColumns(): Array<Column<RecoveryRun>> {
  return [
    {
      title: 'Machines',
      cell: (r) => (
        <Link to={runPath(r.kind, r.id)}>
          {r.machines.map((m) => m.machineName).join(', ') ||
            (r.consistencyGroup !== null ? `group ${r.consistencyGroup}` : r.id)}
        </Link>
      ),
    },
    { title: 'State', cell: (r) => <RunState state={r.state} /> },
    { title: 'Started', cell: (r) => time(r.createdAt) },
    { title: 'By', cell: (r) => r.createdBy },
  ];
}

/** Test failovers and failovers, newest first, live. */
export function RecoveryPage({ role }: { role: Role }) {
  return (
    <>
      <PageHeader title="Recovery">
        {roleAtLeast(role, 'operator') ? (
          <Link to="/test-failover" className="button primary">
            Test failover…
          </Link>
        ) : null}
      </PageHeader>
      <section className="card" aria-labelledby="tf-h">
        <h2 id="tf-h">Test failovers</h2>
        <PagedTable<RecoveryRun>
          path="/api/test-failovers"
          columns={runColumns()}
          caption="Test failovers, newest first"
          testId="test-failover-rows"
          live={['job']}
          empty="No test failover yet."
        />
      </section>
      <section className="card" aria-labelledby="fo-h">
        <h2 id="fo-h">Failovers</h2>
        <p className="muted small">A failover starts from the machine’s page.</p>
        <PagedTable<RecoveryRun>
          path="/api/failovers"
          columns={runColumns()}
          caption="Failovers, newest first"
          testId="failover-rows"
          live={['job']}
          empty="No failover yet."
        />
      </section>
    </>
  );
}
