import { useEffect, useState, type ReactNode } from 'react';
import type { Page } from './api';
import type { LiveKind } from './live';
import { useLiveRefresh } from './live';
import { useApi } from './use-api';
import { ErrorBox, Pager } from './ui';

/** A column of a {@link PagedTable}. */
export interface Column<T> {
  title: string;
  cell: (row: T) => ReactNode;
  numeric?: boolean;
}

/**
 * A server-side paged table over one list route (`?limit=&offset=`), refreshed by the given
 * live events or every 15 s. `reloadKey` changes force a reload (after a create).
 */
export function PagedTable<T extends { id: string }>(props: {
  path: string;
  columns: Array<Column<T>>;
  caption: string;
  testId: string;
  live?: LiveKind[];
  limit?: number;
  empty?: string;
  reloadKey?: number;
}) {
  const limit = props.limit ?? 25;
  const [offset, setOffset] = useState(0);
  const sep = props.path.includes('?') ? '&' : '?';
  const list = useApi<Page<T>>(`${props.path}${sep}limit=${limit}&offset=${offset}`);
  const { reload } = list;
  // The API refuses unknown query parameters, so a create elsewhere reloads through this key.
  useEffect(() => {
    if ((props.reloadKey ?? 0) > 0) reload();
  }, [props.reloadKey, reload]);
  useLiveRefresh(props.live ?? [], list.reload, 15_000);
  const rows = list.data?.items ?? [];
  return (
    <>
      <ErrorBox error={list.error} />
      <div className="table-wrap">
        <table aria-busy={list.loading}>
          <caption className="sr-only">{props.caption}</caption>
          <thead>
            <tr>
              {props.columns.map((c) => (
                <th key={c.title} scope="col">
                  {c.title}
                </th>
              ))}
            </tr>
          </thead>
          <tbody data-testid={props.testId}>
            {rows.map((r) => (
              <tr key={r.id}>
                {props.columns.map((c) => (
                  <td key={c.title} className={c.numeric === true ? 'num' : undefined}>
                    {c.cell(r)}
                  </td>
                ))}
              </tr>
            ))}
            {list.data !== undefined && rows.length === 0 ? (
              <tr>
                <td colSpan={props.columns.length} className="muted">
                  {props.empty ?? 'None.'}
                </td>
              </tr>
            ) : null}
          </tbody>
        </table>
      </div>
      {list.data !== undefined && list.data.total > limit ? (
        <Pager
          offset={offset}
          limit={limit}
          total={list.data.total}
          onChange={setOffset}
          label={props.caption}
        />
      ) : null}
    </>
  );
}
