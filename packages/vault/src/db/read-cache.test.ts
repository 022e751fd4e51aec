import { randomBytes } from 'node:crypto';
import SQLite from 'better-sqlite3';
import { Kysely, PostgresDialect, SqliteDialect, sql, type Dialect } from 'kysely';
import pg from 'pg';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { startPostgres, type PostgresServer } from '@lifeboat/testing';
import { DIALECTS } from '../test-harness.js';
import { ReadCache, WriteTracker } from './read-cache.js';

interface Db {
  a: { id: number; v: string };
  b: { id: number; v: string };
}

describe.each(DIALECTS)('ReadCache and WriteTracker on %s', (dialect) => {
  let server: PostgresServer | undefined;
  beforeAll(async () => {
    if (dialect === 'postgres') server = await startPostgres();
  });
  afterAll(async () => {
    await server?.stop();
  });
  // A fresh database per test: an in-memory SQLite one, or a new PostgreSQL database.
  const dialectOf = async (): Promise<Dialect> => {
    if (server === undefined) return new SqliteDialect({ database: new SQLite(':memory:') });
    const url = await server.createDatabase(`cache_${randomBytes(4).toString('hex')}`);
    return new PostgresDialect({ pool: new pg.Pool({ connectionString: url, max: 4 }) });
  };
  let tracker: WriteTracker;
  let db: Kysely<Db>;
  let cache: ReadCache<string>;
  let reads: number;
  // A cached read of table a's values (or of b's), counting how often it really runs.
  const read = (table: 'a' | 'b' = 'a') =>
    cache.get(table, () => ({
      tables: [table],
      run: async () => {
        reads++;
        const rows = await db.selectFrom(table).select('v').orderBy('id').execute();
        return rows.map((r) => r.v).join(',');
      },
    }));

  beforeEach(async () => {
    tracker = new WriteTracker();
    db = new Kysely<Db>({
      dialect: tracker.wrapDialect(await dialectOf()),
      plugins: [tracker.plugin],
    });
    await db.schema.createTable('a').addColumn('id', 'integer').addColumn('v', 'text').execute();
    await db.schema.createTable('b').addColumn('id', 'integer').addColumn('v', 'text').execute();
    await db.insertInto('a').values({ id: 1, v: 'x' }).execute();
    await db.insertInto('b').values({ id: 1, v: 'y' }).execute();
    cache = new ReadCache<string>(tracker, 60_000, 100, (v) => v.length);
    reads = 0;
  });
  afterEach(async () => {
    await db.destroy();
  });

  it('keeps a read until a write to its table, not to another', async () => {
    expect(await read()).toBe('x');
    expect(await read()).toBe('x');
    expect(reads).toBe(1);
    await db.updateTable('b').set({ v: 'z' }).execute();
    expect(await read()).toBe('x');
    expect(reads).toBe(1);
    await db.updateTable('a').set({ v: 'w' }).execute();
    expect(await read()).toBe('w');
    expect(reads).toBe(2);
    await db.deleteFrom('a').execute();
    expect(await read()).toBe('');
  });

  it('forgets everything after a transaction, a rollback, raw SQL or DDL', async () => {
    await read();
    await db.transaction().execute(async (tx) => {
      await tx.selectFrom('b').selectAll().execute();
    });
    await read();
    expect(reads).toBe(2);
    await db
      .transaction()
      .execute(async (tx) => {
        await tx.insertInto('a').values({ id: 2, v: 'gone' }).execute();
        throw new Error('roll back');
      })
      .catch(() => undefined);
    expect(await read()).toBe('x');
    expect(reads).toBe(3);
    await sql`update a set v = 'raw'`.execute(db);
    expect(await read()).toBe('raw');
    await sql`select 1`.execute(db);
    await read();
    expect(reads).toBe(4);
    await db.schema.createIndex('a_v').on('a').column('v').execute();
    await read();
    expect(reads).toBe(5);
    await db
      .with('w', (qb) => qb.selectFrom('b').select('v'))
      .selectFrom('w')
      .selectAll()
      .execute();
    await read();
    expect(reads).toBe(6);
  });

  it('does not keep a read that ran while a write to its table was under way', async () => {
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const slow = cache.get('a', () => ({
      tables: ['a'],
      run: async () => {
        await gate;
        return 'old';
      },
    }));
    await db.updateTable('a').set({ v: 'new' }).execute();
    release();
    expect(await slow).toBe('old');
    expect(await read()).toBe('new');
  });

  it('shares a read in progress, does not keep failures, and stays within its weight', async () => {
    const [one, two] = await Promise.all([read(), read()]);
    expect([one, two, reads]).toEqual(['x', 'x', 1]);
    let fail = true;
    const flaky = () =>
      cache.get('flaky', () => ({
        tables: ['a'],
        run: () => (fail ? Promise.reject(new Error('no')) : Promise.resolve('ok')),
      }));
    await expect(flaky()).rejects.toThrow('no');
    fail = false;
    expect(await flaky()).toBe('ok');
    // 100 characters at most: a 101-character value empties the cache.
    await db
      .updateTable('b')
      .set({ v: 'y'.repeat(101) })
      .execute();
    await read('b');
    await read();
    expect(reads).toBe(3);
  });

  it('reads every time with a TTL of 0 and again once the TTL passed', async () => {
    cache = new ReadCache<string>(tracker, 0);
    await read();
    await read();
    expect(reads).toBe(2);
    cache = new ReadCache<string>(tracker, 20);
    await read();
    await read();
    expect(reads).toBe(3);
    await new Promise((r) => setTimeout(r, 30));
    await read();
    expect(reads).toBe(4);
  });
});
