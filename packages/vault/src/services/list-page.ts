import { sql, type Kysely, type RawBuilder, type SelectQueryBuilder } from 'kysely';
import { readCachesOf, tablesOf } from '../db/read-cache.js';
import { invalid, notFound } from './errors.js';

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
  /** The columns an item has (the sort column and `id` are read anyway). @default all */
  columns?: readonly string[];
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

// The filtered, cursor-limited, ordered query of a list (without selection, limit or offset),
// and its filtered count query.
function listQueries(
  db: AnyDb,
  spec: ListSpec,
  page: PageQuery,
): { ordered: AnyQuery; count: AnyQuery; sort: string; desc: boolean; limit: number } {
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
  let query = filtered(db.selectFrom(spec.table));
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
  const count = filtered(db.selectFrom(spec.table)).select((eb) => eb.fn.countAll().as('n'));
  return { ordered: query, count, sort, desc, limit };
}

// Rows matching the filters over all pages, from the count cache when the database has one.
async function countRows(db: AnyDb, count: AnyQuery): Promise<number> {
  const run = async () => {
    const row = (await count.executeTakeFirst()) as { n: number | string } | undefined;
    return Number(row?.n ?? 0);
  };
  const cache = readCachesOf(db)?.counts;
  if (cache === undefined) return run();
  const compiled = count.compile();
  return cache.get(`${compiled.sql}\u0000${JSON.stringify(compiled.parameters)}`, () => ({
    tables: [...tablesOf(compiled.query)],
    run,
  }));
}

/** Lists a page of rows with keyset paging on (sort, id), or offset paging. */
export async function listPage(
  db: AnyDb,
  spec: ListSpec,
  page: PageQuery,
): Promise<Page<Record<string, unknown>>> {
  const { ordered, count, sort, limit } = listQueries(db, spec, page);
  const selected =
    spec.columns === undefined
      ? ordered.selectAll()
      : ordered.select([...new Set([...spec.columns, sort, 'id'])]);
  let query = selected.limit(limit + 1);
  if (page.offset !== undefined) query = query.offset(page.offset);
  const rows = (await query.execute()) as Record<string, unknown>[];
  const total = await countRows(db, count);
  const more = rows.length > limit;
  const items = more ? rows.slice(0, limit) : rows;
  const last = items[items.length - 1];
  return {
    items,
    nextCursor:
      more && last !== undefined
        ? encodeCursor([sort === 'id' ? null : last[sort], last['id']])
        : null,
    total,
  };
}

/**
 * One field of a list item that the database renders as JSON: the column as it is, a text
 * column holding JSON (`json`), or the seconds from a timestamp column to `now` (`ageSeconds`,
 * never negative, null when the column is).
 */
export interface JsonField {
  key: string;
  column?: string;
  as?: 'json' | 'ageSeconds';
}

/** A list whose items the database renders as JSON (see {@link listPageJson}). */
export interface JsonListSpec extends ListSpec {
  dialect: 'sqlite' | 'postgres';
  /** The item's fields in order. */
  fields: readonly JsonField[];
  /** The time `ageSeconds` fields count to, in ms. @default Date.now() */
  now?: number;
  /** A row that must exist (the parent of the list), else 404 naming `noun`. */
  parent?: { table: string; id: string; noun: string };
  /**
   * What identifies this list and its filters (the route and its normalised query, paging
   * excluded): with it, a rendered page is kept in the database's page cache until a write
   * touches a table the list reads (see ReadCache), and served from there.
   */
  cacheKey?: string;
}

/**
 * The same page as {@link listPage}, already serialised: the database builds each item's JSON
 * and aggregates them (SQLite json_object/json_group_array, PostgreSQL json_build_object/
 * json_agg), so the vault neither builds row objects nor serialises them; one statement
 * returns the items, the cursor's key and (when asked for) whether the parent row exists.
 * The result is the page's UTF-8 JSON: send it with content type application/json.
 * With a `cacheKey`, pages come from the database's page cache while they are valid.
 */
export async function listPageJson(
  db: AnyDb,
  spec: JsonListSpec,
  page: PageQuery,
): Promise<Buffer> {
  const cache = spec.cacheKey === undefined ? undefined : readCachesOf(db)?.pages;
  if (cache === undefined) return renderPage(db, spec, page).run();
  const key = `${spec.cacheKey}\u0000${page.limit ?? 50}\u0000${page.offset ?? ''}\u0000${page.cursor ?? ''}`;
  return cache.get(key, () => renderPage(db, spec, page));
}

// The statements of a rendered page (built at once, so that bad paging throws here), the
// tables they read and the function that runs them.
function renderPage(
  db: AnyDb,
  spec: JsonListSpec,
  page: PageQuery,
): { tables: string[]; run: () => Promise<Buffer> } {
  const { ordered, count, sort, desc, limit } = listQueries(db, spec, page);
  const pg = spec.dialect === 'postgres';
  const now = spec.now ?? Date.now();
  const value = (f: JsonField): RawBuilder<unknown> => {
    const ref = sql.ref(`p.${f.column ?? f.key}`);
    if (f.as === 'json') return pg ? sql`${ref}::json` : sql`json(${ref})`;
    if (f.as === 'ageSeconds') {
      // Whole milliseconds as Date.parse gives them, then one division as in JavaScript, so
      // the value is the same double. SQLite's max() is null when the column is.
      if (!pg) return sql`max(0, (${now} - round(unixepoch(${ref}, 'subsec') * 1000)) / 1000.0)`;
      const diff = sql`cast((cast(${String(now)} as numeric) - extract(epoch from cast(${ref} as timestamptz)) * 1000) / 1000 as float8)`;
      return sql`case when ${ref} is null then null else greatest(0, ${diff}) end`;
    }
    return ref;
  };
  const object = sql.join(
    spec.fields.map((f) => sql`${sql.lit(f.key)}, ${value(f)}`),
    sql`, `,
  );
  const order = (alias: string) => {
    const dir = desc ? sql`desc` : sql`asc`;
    const id = sql`${sql.ref(`${alias}.id`)} ${dir}`;
    return sort === 'id'
      ? id
      : sql`${sql.ref(`${alias}.${sort}`)} ${dir} ${desc ? sql`nulls last` : sql`nulls first`}, ${id}`;
  };
  const offset = page.offset ?? 0;
  let rows = ordered.selectAll().limit(limit);
  if (offset > 0) rows = rows.offset(offset);
  // The last row of this page and the first of the next: the cursor, and whether there is more.
  const keys = ordered
    .select([sql.ref(sort).as('s'), sql.ref('id').as('i')])
    .limit(2)
    .offset(offset + limit - 1);
  const items = pg
    ? sql`coalesce(json_agg(json_build_object(${object}) order by ${order('p')}), '[]'::json)::text`
    : sql`json_group_array(json_object(${object}) order by ${order('p')})`;
  const keyDir = desc ? sql`desc` : sql`asc`;
  const keyOrder =
    sort === 'id'
      ? sql`k.i ${keyDir}`
      : sql`k.s ${keyDir} ${desc ? sql`nulls last` : sql`nulls first`}, k.i ${keyDir}`;
  const keyJson = pg
    ? sql`coalesce(json_agg(json_build_array(k.s, k.i) order by ${keyOrder}), '[]'::json)::text`
    : sql`json_group_array(json_array(k.s, k.i) order by ${keyOrder})`;
  const parent = spec.parent;
  const statement = db.selectNoFrom((eb) => [
    eb.selectFrom(rows.as('p')).select(items.as('j')).as('items'),
    eb.selectFrom(keys.as('k')).select(keyJson.as('j')).as('keys'),
    ...(parent === undefined
      ? []
      : [
          eb
            .selectFrom(parent.table)
            .select(sql.lit(1).as('one'))
            .where('id', '=', parent.id)
            .as('parent'),
        ]),
  ]);
  const tables = [...tablesOf(count.toOperationNode(), tablesOf(statement.toOperationNode()))];
  const run = async (): Promise<Buffer> => {
    const row = (await statement.executeTakeFirst()) as
      { items: string; keys: string; parent?: number | null } | undefined;
    if (parent !== undefined && (row?.parent ?? null) === null) {
      throw notFound(parent.noun, parent.id);
    }
    const total = await countRows(db, count);
    const next = JSON.parse(row?.keys ?? '[]') as Array<[unknown, string]>;
    const last = next[0];
    const cursor =
      next.length === 2 && last !== undefined
        ? encodeCursor([sort === 'id' ? null : last[0], last[1]])
        : null;
    // Encoded once here rather than on every send of a cached page.
    return Buffer.from(
      `{"items":${row?.items ?? '[]'},"nextCursor":${JSON.stringify(cursor)},"total":${total}}`,
    );
  };
  return { tables, run };
}
