import { time } from '../format';
import { PagedTable } from '../paged-table';
import { PageHeader } from '../ui';

interface AuditRow {
  id: string;
  time: string;
  actorType: string;
  actorName: string;
  action: string;
  targetType: string;
  targetId: string;
}

/** The audit log, newest first: who changed what, when. */
export function AuditPage() {
  return (
    <>
      <PageHeader title="Audit log" />
      <PagedTable<AuditRow>
        path="/api/audit"
        caption="Audit log, newest first"
        testId="audit-rows"
        limit={50}
        columns={[
          { title: 'Time', cell: (a) => time(a.time) },
          { title: 'Who', cell: (a) => `${a.actorName} (${a.actorType})` },
          { title: 'Action', cell: (a) => <code>{a.action}</code> },
          { title: 'Object', cell: (a) => `${a.targetType} ${a.targetId}` },
        ]}
      />
    </>
  );
}
