import type {
  DatabaseConnection,
  Dialect,
  Driver,
  Kysely,
  KyselyPlugin,
  PluginTransformQueryArgs,
  PluginTransformResultArgs,
  QueryResult,
  RootOperationNode,
  UnknownRow,
} from 'kysely';

/** The tables an operation node refers to, found by walking it (subqueries included). */
export function tablesOf(node: unknown, into: Set<string> = new Set()): Set<string> {
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

/**
 * Watches every statement of a database handle (as a Kysely plugin) and every commit and
 * rollback (as a wrapper of the dialect's driver) so that {@link ReadCache}s know when what
 * they hold may be stale. An insert, update, delete or merge bumps its tables' generation
 * twice: when it is built (before it runs) and when its result comes back (after it ran, and
 * committed unless in a transaction); the end of every transaction bumps the epoch, which
 * invalidates everything. Any other statement that is not a select (DDL, raw SQL) bumps the
 * epoch too. A read remembers the generations from before it started, so a read that
 * overlapped a write in any way (it may have seen the old rows) is stale as soon as the write
 * is done or its transaction ends.
 */
export class WriteTracker {
  private readonly generations = new Map<string, number>();
  private epochValue = 0;
  // Writes built and not yet answered, by their query id: the tables to bump again (null =
  // the epoch).
  private readonly running = new WeakMap<object, string[] | null>();

  /** The Kysely plugin; install it on the database handle. */
  readonly plugin: KyselyPlugin = {
    transformQuery: (args: PluginTransformQueryArgs): RootOperationNode => {
      const written = this.writtenBy(args.node);
      if (written !== undefined) {
        this.bump(written);
        this.running.set(args.queryId, written);
      }
      return args.node;
    },
    transformResult: (args: PluginTransformResultArgs): Promise<QueryResult<UnknownRow>> => {
      const written = this.running.get(args.queryId);
      if (written !== undefined) {
        this.running.delete(args.queryId);
        this.bump(written);
      }
      return Promise.resolve(args.result);
    },
  };

  // undefined: a read; null: unknown (bump everything); else the tables written.
  private writtenBy(node: RootOperationNode): string[] | null | undefined {
    // A select with common table expressions may hide a write in one (`with x as (update ...)`).
    if (node.kind === 'SelectQueryNode') return node.with === undefined ? undefined : null;
    if (node.kind === 'RawNode') {
      const text = node.sqlFragments.join('?').trimStart().slice(0, 10).toLowerCase();
      if (text.startsWith('select') || text.startsWith('analyze')) return undefined;
    }
    if (WRITES.has(node.kind)) return [...tablesOf(node)];
    return null;
  }

  private bump(tables: string[] | null): void {
    if (tables === null) {
      this.epochValue++;
      return;
    }
    for (const t of tables) this.generations.set(t, (this.generations.get(t) ?? 0) + 1);
  }

  /** Changes with every statement that is not a plain write and every transaction's end. */
  get epoch(): number {
    return this.epochValue;
  }

  /** The current generation of each table. */
  generationsOf(tables: readonly string[]): number[] {
    return tables.map((t) => this.generations.get(t) ?? 0);
  }

  /** True when none of the tables was written (nor the epoch changed) since `generations`. */
  unchanged(epoch: number, tables: readonly string[], generations: readonly number[]): boolean {
    if (epoch !== this.epochValue) return false;
    for (let i = 0; i < tables.length; i++) {
      if ((this.generations.get(tables[i] ?? '') ?? 0) !== generations[i]) return false;
    }
    return true;
  }

  /** Invalidates everything (after changes made outside the tracked handle). */
  clear(): void {
    this.epochValue++;
  }

  /** `dialect` with a driver that bumps the epoch after every commit and rollback. */
  wrapDialect(dialect: Dialect): Dialect {
    return {
      createAdapter: () => dialect.createAdapter(),
      createIntrospector: (db) => dialect.createIntrospector(db),
      createQueryCompiler: () => dialect.createQueryCompiler(),
      createDriver: () => this.wrapDriver(dialect.createDriver()),
    };
  }

  private wrapDriver(driver: Driver): Driver {
    const ended = async (end: Promise<void>): Promise<void> => {
      try {
        await end;
      } finally {
        this.epochValue++;
      }
    };
    const wrapped: Driver = {
      init: () => driver.init(),
      acquireConnection: () => driver.acquireConnection(),
      beginTransaction: (c, settings) => driver.beginTransaction(c, settings),
      commitTransaction: (c: DatabaseConnection) => ended(driver.commitTransaction(c)),
      rollbackTransaction: (c: DatabaseConnection) => ended(driver.rollbackTransaction(c)),
      releaseConnection: (c) => driver.releaseConnection(c),
      destroy: () => driver.destroy(),
    };
    if (driver.savepoint !== undefined) {
      wrapped.savepoint = (c, name, compile) =>
        driver.savepoint?.(c, name, compile) as Promise<void>;
    }
    if (driver.rollbackToSavepoint !== undefined) {
      wrapped.rollbackToSavepoint = (c, name, compile) =>
        ended(driver.rollbackToSavepoint?.(c, name, compile) as Promise<void>);
    }
    if (driver.releaseSavepoint !== undefined) {
      wrapped.releaseSavepoint = (c, name, compile) =>
        driver.releaseSavepoint?.(c, name, compile) as Promise<void>;
    }
    return wrapped;
  }
}

interface Entry<T> {
  value: Promise<T>;
  until: number;
  epoch: number;
  tables: readonly string[];
  generations: number[];
  weight: number;
}

/**
 * Results of reads (list totals, rendered list pages), each kept until a write through the
 * tracked handle touches one of the tables it read, a transaction ends, or `ttlMs` passes
 * (writes of other vault instances on the same PostgreSQL are not seen, so they wait for the
 * TTL). Concurrent requests for the same key while it is being read share that read.
 */
export class ReadCache<T> {
  private readonly entries = new Map<string, Entry<T>>();
  private weight = 0;

  /**
   * @param ttlMs how long a result may be served from memory; 0 turns the cache off
   * @param maxWeight when the weights of the entries add up to more, it starts afresh
   */
  constructor(
    private readonly tracker: WriteTracker,
    private readonly ttlMs: number,
    private readonly maxWeight = 10_000,
    private readonly weigh: (value: T) => number = () => 1,
  ) {}

  /**
   * The result for `key`: from memory when still valid, otherwise `read()` is called at once
   * (synchronously) for the tables the read depends on and the function that reads.
   */
  get(key: string, read: () => { tables: readonly string[]; run: () => Promise<T> }): Promise<T> {
    const now = Date.now();
    const e = this.entries.get(key);
    if (
      e !== undefined &&
      e.until > now &&
      this.tracker.unchanged(e.epoch, e.tables, e.generations)
    ) {
      return e.value;
    }
    const { tables, run } = read();
    if (this.ttlMs <= 0) return run();
    // The generations from before the read runs: a write during it leaves the entry stale.
    const entry: Entry<T> = {
      value: Promise.resolve(undefined as T),
      until: now + this.ttlMs,
      epoch: this.tracker.epoch,
      tables,
      generations: this.tracker.generationsOf(tables),
      weight: 0,
    };
    entry.value = run().then(
      (value) => {
        if (this.entries.get(key) === entry) {
          entry.weight = this.weigh(value);
          this.weight += entry.weight;
          if (this.weight > this.maxWeight) this.clear();
        }
        return value;
      },
      (err: unknown) => {
        if (this.entries.get(key) === entry) this.entries.delete(key);
        throw err;
      },
    );
    const old = this.entries.get(key);
    if (old !== undefined) this.weight -= old.weight;
    this.entries.set(key, entry);
    return entry.value;
  }

  /** Forgets every entry. */
  clear(): void {
    this.entries.clear();
    this.weight = 0;
  }
}

/** The caches of one database handle. */
export interface ReadCaches {
  readonly tracker: WriteTracker;
  /** List totals by count statement and parameters. */
  readonly counts: ReadCache<number>;
  /** Rendered list pages (UTF-8 JSON) by the list's normalised query. */
  readonly pages: ReadCache<Buffer>;
}

const caches = new WeakMap<Kysely<never>, ReadCaches>();

/** Makes `c` the read caches of lists over `db` (whose plugins include `c.tracker.plugin`). */
export function attachReadCaches<DB>(db: Kysely<DB>, c: ReadCaches): void {
  caches.set(db as unknown as Kysely<never>, c);
}

/** The read caches attached to `db`, if any. */
export function readCachesOf<DB>(db: Kysely<DB>): ReadCaches | undefined {
  return caches.get(db as unknown as Kysely<never>);
}
