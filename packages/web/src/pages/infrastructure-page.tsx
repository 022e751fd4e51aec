import { ago, time } from '../format';
import { PagedTable } from '../paged-table';
import { Badge, PageHeader } from '../ui';
import type { NetworkMapping } from '../types';

interface Component {
  id: string;
  name: string;
  kind: string;
  status: string;
  address: string | null;
  version: string | null;
  lastHeartbeatAt: string | null;
  certificateExpiresAt: string | null;
  health: Record<string, unknown>;
}
interface SourceHost {
  id: string;
  name: string;
  kind: string;
  processServerId: string | null;
  endpoints: unknown[];
  discoveredAt: string | null;
}
interface TargetStore {
  id: string;
  name: string;
  kind: string;
  path: string | null;
  container: string | null;
}
interface Site {
  id: string;
  name: string;
  kind: string;
  description: string;
}

const componentColumns = [
  { title: 'Name', cell: (c: Component) => c.name },
  { title: 'Health', cell: (c: Component) => <Badge value={c.status} /> },
  { title: 'Last heartbeat', cell: (c: Component) => ago(c.lastHeartbeatAt) },
  { title: 'Address', cell: (c: Component) => c.address ?? '—' },
  { title: 'Version', cell: (c: Component) => c.version ?? '—' },
  { title: 'Certificate expires', cell: (c: Component) => time(c.certificateExpiresAt) },
];

/** Sites, process servers, recovery hosts, source hosts and target stores. */
export function InfrastructurePage() {
  return (
    <>
      <PageHeader title="Infrastructure" />
      <div className="stack">
        <section className="card" aria-labelledby="ps-h">
          <h2 id="ps-h">Process servers</h2>
          <PagedTable<Component>
            path="/api/process-servers"
            caption="Process servers"
            testId="process-servers"
            live={['component']}
            columns={componentColumns}
            empty="No process server registered. Create a registration key and register one."
          />
        </section>
        <section className="card" aria-labelledby="rh-h">
          <h2 id="rh-h">Recovery hosts</h2>
          <PagedTable<Component>
            path="/api/recovery-hosts"
            caption="Recovery hosts"
            testId="recovery-hosts"
            live={['component']}
            columns={componentColumns}
            empty="No recovery host registered."
          />
        </section>
        <section className="card" aria-labelledby="sh-h">
          <h2 id="sh-h">Source hosts</h2>
          <PagedTable<SourceHost>
            path="/api/source-hosts"
            caption="Source hosts"
            testId="source-hosts"
            columns={[
              { title: 'Name', cell: (h) => h.name },
              { title: 'Kind', cell: (h) => h.kind.toUpperCase() },
              { title: 'Endpoints', cell: (h) => h.endpoints.length, numeric: true },
              { title: 'Last discovery', cell: (h) => ago(h.discoveredAt) },
            ]}
          />
        </section>
        <section className="card" aria-labelledby="ts-h">
          <h2 id="ts-h">Target stores</h2>
          <PagedTable<TargetStore>
            path="/api/target-stores"
            caption="Target stores"
            testId="target-stores"
            columns={[
              { title: 'Name', cell: (s) => s.name },
              { title: 'Kind', cell: (s) => s.kind },
              { title: 'Location', cell: (s) => s.path ?? s.container ?? '—' },
            ]}
          />
        </section>
        <section className="card" aria-labelledby="nm-h">
          <h2 id="nm-h">Network mappings</h2>
          <PagedTable<NetworkMapping>
            path="/api/network-mappings"
            caption="Network mappings"
            testId="network-mappings"
            columns={[
              { title: 'Name', cell: (m) => m.name },
              { title: 'Source network', cell: (m) => m.sourceNetwork },
              { title: 'Recovery network', cell: (m) => m.targetNetwork },
              {
                title: 'Test failover network',
                cell: (m) => m.testNetwork ?? '—',
              },
            ]}
            empty="No network mapping yet."
          />
        </section>
        <section className="card" aria-labelledby="sites-h">
          <h2 id="sites-h">Sites</h2>
          <PagedTable<Site>
            path="/api/sites"
            caption="Sites"
            testId="sites"
            columns={[
              { title: 'Name', cell: (s) => s.name },
              { title: 'Kind', cell: (s) => s.kind },
              { title: 'Description', cell: (s) => s.description || '—' },
            ]}
          />
        </section>
      </div>
    </>
  );
}
