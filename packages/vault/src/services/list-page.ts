import type { Kysely, SelectQueryBuilder } from 'kysely';
import { invalid } from './errors.js';

// Lists are built over any table by name; rows come back untyped and each resource maps them.
// eslint-disable-next-line @typescript-eslint/no-explicit-any
type AnyDb = Kysely<any>;
// eslint-disable-next-line @typescript-eslint/no-explicit-any
type AnyQuery = SelectQueryBuilder<any, any, any>;

/** Paging parameters every list takes. */
export interface PageQuery {
  /** Rows per page. @default 50 */
  limit?: number;
  /** Opaque cursor from the previous page's `nextCursor` (keyset paging, stable under inserts). */
  cursor?: string;
  /** Rows to skip, for jumping to a page; not with `cursor`. */
  offset?: number;
}

/** One page of a list. */
export interface Page<T> {
  items: T[];
  /** Pass as `cursor` for the next page; null on the last page. */
  nextCursor: string | null;
  /** Rows matching the filters, over all pages. */
  total: number;
}

/** How to list one table. */
export interface ListSpec {
  table: string;
  /** Sort column (ties broken by `id`). @default 'id' */
  sort?: string;
  /** @default false */
  descending?: boolean;
  /** Equality filters: value per column (undefined = no filter). */
  equals?: Record<string, string | number | undefined>;
  /** Case-insensitive substring search over this column with `q`. */
  search?: { column: string; q: string | undefined };
  /** Further conditions. */
  where?: (qb: AnyQuery) => AnyQuery;
}

/** JSON schema of the paging parameters, for list routes' querystrings. */
export const pageQuerySchema = {
  limit: { type: 'integer', minimum: 1, maximum: 1000, default: 50 },
  cursor: { type: 'string', minLength: 1, maxLength: 500 },
  offset: { type: 'integer', minimum: 0 },
} as const;

function encodeCursor(key: unknown[]): string {
  return Buffer.from(JSON.stringify(key)).toString('base64url');
}

function decodeCursor(cursor: string): [unknown, string] {
  try {
    const key: unknown = JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8'));
    if (Array.isArray(key) && key.length === 2 && typeof key[1] === 'string') {
      return [key[0], key[1]];
    }
  } catch {
    // Reported below.
  }
  throw invalid('query.cursor', 'not a cursor this vault returned. Start again without a cursor.');
}

/** Lists a page of rows with keyset paging on (sort, id), or offset paging. */
export async function listPage(
  db: AnyDb,
  spec: ListSpec,
  page: PageQuery,
): Promise<Page<Record<string, unknown>>> {
  if (page.cursor !== undefined && page.offset !== undefined) {
    throw invalid('query.offset', 'give either cursor or offset, not both.');
  }
  const sort = spec.sort ?? 'id';
  const desc = spec.descending ?? false;
  const limit = page.limit ?? 50;
  const filtered = (qb: AnyQuery): AnyQuery => {
    for (const [column, value] of Object.entries(spec.equals ?? {})) {
      if (value !== undefined) qb = qb.where(column, '=', value);
    }
    if (spec.search?.q !== undefined && spec.search.q !== '') {
      const pattern = `%${spec.search.q.toLowerCase().replace(/[\\%_]/g, (c) => `\\${c}`)}%`;
      const column = spec.search.column;
      qb = qb.where((eb) => eb(eb.fn('lower', [column]), 'like', pattern));
    }
    return spec.where === undefined ? qb : spec.where(qb);
  };
  let query = filtered(db.selectFrom(spec.table).selectAll());
  // NULLs of the sort column (an item without a point yet) come first ascending and last
  // descending on both dialects (their defaults differ), and the cursor condition follows.
  if (page.cursor !== undefined) {
    const [value, id] = decodeCursor(page.cursor);
    const op = desc ? '<' : '>';
    query =
      sort === 'id'
        ? query.where('id', op, id)
        : query.where((eb) => {
            if (value === null) {
              const sameNull = eb.and([eb(sort, 'is', null), eb('id', op, id)]);
              return desc ? sameNull : eb.or([sameNull, eb(sort, 'is not', null)]);
            }
            const after = eb.or([
              eb(sort, op, value),
              eb.and([eb(sort, '=', value), eb('id', op, id)]),
            ]);
            return desc ? eb.or([after, eb(sort, 'is', null)]) : after;
          });
  }
  query =
    sort === 'id'
      ? query.orderBy('id', desc ? 'desc' : 'asc')
      : query
          .orderBy(sort, (ob) => (desc ? ob.desc().nullsLast() : ob.asc().nullsFirst()))
          .orderBy('id', desc ? 'desc' : 'asc');
  query = query.limit(limit + 1);
  if (page.offset !== undefined) query = query.offset(page.offset);
  const rows = (await query.execute()) as Record<string, unknown>[];
  const countRow = (await filtered(db.selectFrom(spec.table))
    .select((eb) => eb.fn.countAll().as('n'))
    .executeTakeFirst()) as { n: number | string } | undefined;
  const more = rows.length > limit;
  const items = more ? rows.slice(0, limit) : rows;
  const last = items[items.length - 1];
  return {
    items,
    nextCursor:
      more && last !== undefined
        ? encodeCursor([sort === 'id' ? null : last[sort], last['id']])
        : null,
    total: Number(countRow?.n ?? 0),
  };
}
