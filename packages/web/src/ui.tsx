import type { ReactNode } from 'react';
import type { ApiError } from './api';

/** A state or severity shown as text on a tinted background (colour is never the only cue). */
export function Badge({ value, label }: { value: string; label?: string }) {
  return <span className={`badge badge-${value}`}>{label ?? value}</span>;
}

/** An error box that says what the vault said, with its code. */
export function ErrorBox({ error }: { error: ApiError | undefined }) {
  if (error === undefined) return null;
  return (
    <div className="error-box" role="alert">
      <strong>{error.message}</strong> <code>{error.code}</code>
    </div>
  );
}

/** A progress bar with its value for screen readers. */
export function Progress({ value, label }: { value: number; label: string }) {
  const pct = Math.max(0, Math.min(100, Math.round(value * 100)));
  return (
    <span className="progress">
      <progress max={100} value={pct} aria-label={label} /> {pct}%
    </span>
  );
}

/** A page's heading and optional tools on the right. */
export function PageHeader({ title, children }: { title: string; children?: ReactNode }) {
  return (
    <div className="page-header">
      <h1 tabIndex={-1} id="page-title">
        {title}
      </h1>
      {children !== undefined ? <div className="page-tools">{children}</div> : null}
    </div>
  );
}

/** Previous/next paging over `offset` with the total, for server-side paged tables. */
export function Pager(props: {
  offset: number;
  limit: number;
  total: number;
  onChange: (offset: number) => void;
  label: string;
}) {
  const { offset, limit, total, onChange, label } = props;
  const pages = Math.max(1, Math.ceil(total / limit));
  const page = Math.floor(offset / limit) + 1;
  return (
    <nav className="pager" aria-label={`${label} pages`}>
      <button
        type="button"
        disabled={offset === 0}
        onClick={() => onChange(Math.max(0, offset - limit))}
      >
        Previous
      </button>
      <span aria-live="polite">
        Page {page} of {pages} ({total} {total === 1 ? 'row' : 'rows'})
      </span>
      <button
        type="button"
        disabled={offset + limit >= total}
        onClick={() => onChange(offset + limit)}
      >
        Next
      </button>
    </nav>
  );
}
