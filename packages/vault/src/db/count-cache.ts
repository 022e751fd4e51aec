import type {
  Kysely,
  KyselyPlugin,
  OperationNode,
  PluginTransformQueryArgs,
  PluginTransformResultArgs,
  QueryResult,
  RootOperationNode,
  UnknownRow,
} from 'kysely';

// The tables an operation node refers to, found by walking it (subqueries included).
function tablesOf(node: unknown, into: Set<string>): Set<string> {
  if (node === null || typeof node !== 'object') return into;
  if (Array.isArray(node)) {
    for (const n of node) tablesOf(n, into);
    return into;
  }
  const o = node as { kind?: string; table?: { identifier?: { name?: unknown } } };
  if (o.kind === 'TableNode' && typeof o.table?.identifier?.name === 'string') {
    into.add(o.table.identifier.name);
    return into;
  }
  for (const v of Object.values(o)) if (v !== null && typeof v === 'object') tablesOf(v, into);
  return into;
}

const WRITES = new Set(['InsertQueryNode', 'UpdateQueryNode', 'DeleteQueryNode', 'MergeQueryNode']);

interface Entry {
  n: number;
  until: number;
  epoch: number;
  tables: string[];
  generations: number[];
}

/**
 * Row counts of list filters (the `total` of every list page), kept until a write touches one
 * of the tables the count reads, or for `ttlMs` at most (writes of other vault instances on the
 * same PostgreSQL are not seen, so they wait for the TTL). Counting 10,000 items costs more
 * than the page itself. Its plugin ({@link CountCache.plugin}) sees every query of the
 * database handle: inserts, updates, deletes and merges bump their tables' generation; any
 * other statement that is not a select (DDL, raw SQL) forgets everything.
 */
export class CountCache {
  private readonly generations = new Map<string, number>();
  private readonly entries = new Map<string, Entry>();
  private readonly depsBySql = new Map<string, string[]>();
  private epoch = 0;

  /** @param ttlMs how long a count may be served from memory; 0 turns the cache off */
  constructor(private readonly ttlMs: number) {}

  /** The Kysely plugin that tracks writes; install it on the database handle. */
  readonly plugin: KyselyPlugin = {
    transformQuery: (args: PluginTransformQueryArgs): RootOperationNode => {
      this.sawQuery(args.node);
      return args.node;
    },
    transformResult: (args: PluginTransformResultArgs): Promise<QueryResult<UnknownRow>> =>
      Promise.resolve(args.result),
  };

  private sawQuery(node: RootOperationNode): void {
    if (node.kind === 'SelectQueryNode') return;
    if (node.kind === 'RawNode') {
      const text = node.sqlFragments.join('?').trimStart().slice(0, 10).toLowerCase();
      if (text.startsWith('select') || text.startsWith('analyze')) return;
    }
    if (WRITES.has(node.kind)) {
      for (const t of tablesOf(node, new Set())) {
        this.generations.set(t, (this.generations.get(t) ?? 0) + 1);
      }
      return;
    }
    this.epoch++;
  }

  /** Forgets every count (after changes made outside the tracked handle). */
  clear(): void {
    this.epoch++;
  }

  /**
   * The count of a compiled count query: from memory when still valid, otherwise from `run`.
   * `node` is the query's operation node (for the tables it reads).
   */
  async get(
    sqlText: string,
    parameters: readonly unknown[],
    node: OperationNode,
    run: () => Promise<number>,
  ): Promise<number> {
    if (this.ttlMs <= 0) return run();
    const key = `${sqlText}\u0000${JSON.stringify(parameters)}`;
    const now = Date.now();
    const e = this.entries.get(key);
    if (
      e !== undefined &&
      e.until > now &&
      e.epoch === this.epoch &&
      e.tables.every((t, i) => (this.generations.get(t) ?? 0) === e.generations[i])
    ) {
      return e.n;
    }
    let tables = this.depsBySql.get(sqlText);
    if (tables === undefined) {
      tables = [...tablesOf(node, new Set())];
      if (this.depsBySql.size > 1000) this.depsBySql.clear();
      this.depsBySql.set(sqlText, tables);
    }
    // The generations before the count ran: a write during it leaves the entry stale at once.
    const epoch = this.epoch;
    const generations = tables.map((t) => this.generations.get(t) ?? 0);
    const n = await run();
    if (this.entries.size > 10_000) this.entries.clear();
    this.entries.set(key, { n, until: now + this.ttlMs, epoch, tables, generations });
    return n;
  }
}

const caches = new WeakMap<Kysely<never>, CountCache>();

/** Makes `cache` the count cache of lists over `db` (whose plugins include its plugin). */
export function attachCountCache<DB>(db: Kysely<DB>, cache: CountCache): void {
  caches.set(db as unknown as Kysely<never>, cache);
}

/** The count cache attached to `db`, if any. */
export function countCacheOf<DB>(db: Kysely<DB>): CountCache | undefined {
  return caches.get(db as unknown as Kysely<never>);
}
