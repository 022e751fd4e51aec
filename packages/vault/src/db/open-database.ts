import { mkdir } from 'node:fs/promises';
import { dirname } from 'node:path';
import SQLite from 'better-sqlite3';
import {
  Kysely,
  Migrator,
  PostgresDialect,
  SqliteDialect,
  type PostgresPool,
  type PostgresPoolClient,
} from 'kysely';
import pg from 'pg';
import { LifeboatError } from '@lifeboat/protocol';
import { attachReadCaches, ReadCache, WriteTracker } from './read-cache.js';
import { migrationProvider } from './migrations.js';
import type { VaultDatabase } from './schema.js';

/** Which database the vault runs on. */
export type DialectName = 'sqlite' | 'postgres';

/** An open, migrated vault database. */
export interface OpenDatabase {
  readonly db: Kysely<VaultDatabase>;
  readonly dialect: DialectName;
  /** The PostgreSQL URL (for the scheduler's own lock connection), when on PostgreSQL. */
  readonly postgresUrl?: string;
  close(): Promise<void>;
}

// bigint (int8) columns hold byte counts below 2^53: return them as numbers, not strings.
// Set on this pool's own type map rather than pg's global one.
const pgTypes = {
  getTypeParser: (oid: number, format?: 'text' | 'binary') =>
    oid === 20 ? (v: string) => Number(v) : pg.types.getTypeParser(oid, format),
};

/**
 * Opens the vault's database and brings its schema up to date: PostgreSQL when `postgresUrl`
 * is given, otherwise the SQLite file (WAL mode, so readers never wait for the writer).
 */
export async function openDatabase(options: {
  sqliteFile: string;
  postgresUrl?: string | undefined;
  poolSize?: number;
  /** How long list totals may be served from memory (see ReadCache). @default 1000 */
  countCacheMs?: number;
  /** How long rendered list pages may be served from memory (see ReadCache). @default 1000 */
  listCacheMs?: number;
}): Promise<OpenDatabase> {
  let db: Kysely<VaultDatabase>;
  let dialect: DialectName;
  const tracker = new WriteTracker();
  const plugins = [tracker.plugin];
  if (options.postgresUrl !== undefined) {
    dialect = 'postgres';
    const pool = new pg.Pool({
      connectionString: options.postgresUrl,
      max: options.poolSize ?? 10,
      types: pgTypes,
    });
    // An idle client losing its server must not crash the vault; the next query reports it.
    pool.on('error', () => undefined);
    db = new Kysely<VaultDatabase>({
      dialect: tracker.wrapDialect(new PostgresDialect({ pool: namingStatements(pool) })),
      plugins,
    });
  } else {
    dialect = 'sqlite';
    await mkdir(dirname(options.sqliteFile), { recursive: true });
    let sqlite: SQLite.Database;
    try {
      sqlite = new SQLite(options.sqliteFile);
    } catch (err) {
      throw new LifeboatError(
        'LB_VAULT_DATABASE_UNAVAILABLE',
        `Cannot open the vault's SQLite database ${options.sqliteFile}. Check the data directory's permissions.`,
        { cause: err, details: { file: options.sqliteFile } },
      );
    }
    sqlite.pragma('journal_mode = WAL');
    sqlite.pragma('synchronous = NORMAL');
    sqlite.pragma('busy_timeout = 5000');
    db = new Kysely<VaultDatabase>({
      dialect: tracker.wrapDialect(new SqliteDialect({ database: reusingStatements(sqlite) })),
      plugins,
    });
  }
  attachReadCaches(db, {
    tracker,
    counts: new ReadCache<number>(tracker, options.countCacheMs ?? 1000, 10_000),
    // At most 32 MiB of pages are kept.
    pages: new ReadCache<Buffer>(
      tracker,
      options.listCacheMs ?? 1000,
      32 * 2 ** 20,
      (page) => page.length,
    ),
  });
  try {
    const migrator = new Migrator({ db, provider: migrationProvider });
    const { error } = await migrator.migrateToLatest();
    if (error !== undefined) throw error;
  } catch (err) {
    await db.destroy();
    throw new LifeboatError(
      'LB_VAULT_DATABASE_UNAVAILABLE',
      `Cannot open or migrate the vault's ${dialect} database: ${(err as Error).message}. Check the connection URL or file and that the server runs.`,
      { cause: err, details: { dialect } },
    );
  }
  return {
    db,
    dialect,
    ...(options.postgresUrl !== undefined ? { postgresUrl: options.postgresUrl } : {}),
    close: () => db.destroy(),
  };
}

/**
 * better-sqlite3 with prepared statements reused by SQL text: Kysely prepares every query
 * afresh, which costs as much as running a small one. Kysely runs one query at a time on
 * this connection, so a statement is never in use twice; SQLite re-prepares a cached
 * statement by itself after a schema change.
 */
function reusingStatements(sqlite: SQLite.Database): {
  close(): void;
  prepare(sql: string): SQLite.Statement;
} {
  const cache = new Map<string, SQLite.Statement>();
  return {
    close: () => {
      cache.clear();
      sqlite.close();
    },
    prepare: (text: string) => {
      let stmt = cache.get(text);
      if (stmt === undefined) {
        stmt = sqlite.prepare(text);
        // Many distinct texts (lists of ids of varying length) would grow the map forever.
        if (cache.size >= 500) cache.clear();
        cache.set(text, stmt);
      }
      return stmt;
    },
  };
}

/**
 * A pg pool whose selects run as named prepared statements: PostgreSQL then parses and
 * analyses a statement once per connection instead of on every call (a list page's JSON
 * statement is long). At most 500 texts get a name; a statement whose tables changed shape
 * under it ("cached plan must not change result type", after another vault migrated) runs
 * unnamed from then on.
 */
function namingStatements(pool: pg.Pool): PostgresPool {
  const names = new Map<string, string | null>();
  const nameOf = (text: string): string | null => {
    let name = names.get(text);
    if (name === undefined) {
      name = names.size < 500 && /^\s*select\b/i.test(text) ? `lifeboat_${names.size + 1}` : null;
      names.set(text, name);
    }
    return name;
  };
  return {
    connect: async () => {
      const client = await pool.connect();
      const query = async (text: string, values: readonly unknown[]) => {
        const name = nameOf(text);
        if (name === null) return client.query(text, [...values]);
        try {
          return await client.query({ name, text, values: [...values] });
        } catch (err) {
          if ((err as { code?: unknown }).code !== '0A000') throw err;
          names.set(text, null);
          return client.query(text, [...values]);
        }
      };
      const wrapped = {
        query: (a: unknown, b?: readonly unknown[]) =>
          typeof a === 'string' ? query(a, b ?? []) : client.query(a as never),
        release: (destroy?: boolean) => client.release(destroy),
      };
      return wrapped as unknown as PostgresPoolClient;
    },
    end: () => pool.end(),
  };
}
