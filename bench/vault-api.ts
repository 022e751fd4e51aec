// Benchmark of issue 5 (the vault): latency of the API under 50 concurrent clients with a large
// catalogue, on SQLite and on PostgreSQL in the same run. Run after the README's setup (the
// packages must be built, `tsc -b`):
//
//   npx tsx bench/vault-api.ts [--items 10000] [--points 100] [--seconds 10] [--connections 50]
//
// Seeds N protected items with M recovery points each straight into the vault's database (the
// API would only make seeding slower; what is measured is reading), then drives with autocannon:
//   - GET /api/health                              (the reference: a route with one trivial query)
//   - GET /api/protected-items?limit=50            (first page of the machines table)
//   - GET /api/protected-items?state=protected&sort=lastPointAt&limit=50  (filtered, sorted)
//   - GET /api/protected-items/<random>/points?limit=50  (the timeline of one machine)
//   - GET /api/summary                             (the dashboard's health summary)
// then the three lists again on a vault with the page cache off (listCacheMs 0; not part of the
// target), and prints p50/p99 latency and each route's p99 as a ratio to the reference's p99.
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import autocannon from 'autocannon';
import { sql } from 'kysely';
import { startPostgres, type PostgresServer } from '@lifeboat/testing';
import { startVault, type Vault } from '@lifeboat/vault';
import { seedVault } from './vault-seed.js';

const args = process.argv.slice(2);
const arg = (name: string, fallback: number): number => {
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1]) : fallback;
};
const ITEMS = arg('--items', 10_000);
const POINTS = arg('--points', 100);
const SECONDS = arg('--seconds', 10);
const CONNECTIONS = arg('--connections', 50);

const UNCACHED = ' (page cache off)';

interface Result {
  dialect: string;
  route: string;
  p50: number;
  p99: number;
  rps: number;
  errors: number;
}

async function seed(vault: Vault): Promise<string[]> {
  const itemIds = await seedVault(vault, {
    items: ITEMS,
    pointsPerItem: POINTS,
    states: [
      'protected',
      'protected',
      'protected',
      'protected',
      'initial-replication',
      'resync-needed',
      'enabling',
    ],
    onProgress: (n) => process.stderr.write(`\r  seeded ${n}/${ITEMS} items`),
  });
  process.stderr.write('\n');
  return itemIds;
}

async function measure(
  url: string,
  token: string,
  route: string,
  paths: string[],
): Promise<Omit<Result, 'dialect'>> {
  // The load generator runs in its own worker thread, so it does not share the vault's event
  // loop; each connection cycles through the given paths (random item ids for the timeline).
  const result = await autocannon({
    url,
    connections: CONNECTIONS,
    duration: SECONDS,
    workers: 1,
    headers: { authorization: `Bearer ${token}` },
    requests: paths.map((path) => ({ method: 'GET' as const, path })),
  });
  if (result.errors + result.non2xx > 0) {
    process.stderr.write(
      `  ${route}: ${result.errors} socket errors (${result.timeouts} timeouts), ${result.non2xx} non-2xx answers\n`,
    );
  }
  return {
    route,
    p50: result.latency.p50,
    p99: result.latency.p99,
    rps: result.requests.average,
    errors: result.errors + result.non2xx,
  };
}

async function login(vault: Vault): Promise<string> {
  const res = await fetch(`${vault.url}/api/auth/login`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ username: 'admin', password: 'bench-password' }),
  });
  return ((await res.json()) as { token: string }).token;
}

async function runRoutes(
  dialect: string,
  vault: Vault,
  routes: Array<[string, string[]]>,
  suffix = '',
): Promise<Result[]> {
  const token = await login(vault);
  const out: Result[] = [];
  for (const [route, path] of routes) {
    const r = await measure(vault.url, token, `${route}${suffix}`, path);
    out.push({ dialect, ...r });
    process.stderr.write(
      `  ${r.route}: p50 ${r.p50} ms, p99 ${r.p99} ms, ${Math.round(r.rps)} req/s${r.errors > 0 ? `, ${r.errors} errors` : ''}\n`,
    );
  }
  return out;
}

async function runDialect(
  dialect: 'sqlite' | 'postgres',
  pg: PostgresServer | undefined,
): Promise<Result[]> {
  const dataDir = await mkdtemp(join(tmpdir(), 'lifeboat-bench-vault-'));
  const databaseUrl =
    pg === undefined
      ? undefined
      : await pg.createDatabase(`bench_${randomBytes(3).toString('hex')}`);
  const open = (extra: { listCacheMs?: number } = {}) =>
    startVault({
      dataDir,
      port: 0,
      logLevel: 'silent',
      initialAdmin: { username: 'admin', password: 'bench-password' },
      ...(databaseUrl !== undefined ? { databaseUrl } : {}),
      ...extra,
    });
  let vault = await open();
  try {
    process.stderr.write(`${dialect}:\n`);
    const started = performance.now();
    const ids = await seed(vault);
    process.stderr.write(`  seeding took ${((performance.now() - started) / 1000).toFixed(1)} s\n`);
    // A settled database, as it would be after a bulk load in production: fresh planner
    // statistics on both, and SQLite's write-ahead log folded into the file (reads through a
    // 1-GB WAL are not what a running vault sees).
    await sql`analyze`.execute(vault.context.db);
    if (dialect === 'sqlite') await sql`pragma wal_checkpoint(TRUNCATE)`.execute(vault.context.db);
    const random = Array.from(
      { length: 200 },
      () => ids[Math.floor(Math.random() * ids.length)] ?? '',
    );
    const lists: Array<[string, string[]]> = [
      ['list items, first page', ['/api/protected-items?limit=50']],
      [
        'list items, filtered+sorted',
        ['/api/protected-items?state=protected&sort=lastPointAt&limit=50'],
      ],
      ['points of one item', random.map((id) => `/api/protected-items/${id}/points?limit=50`)],
    ];
    const out = await runRoutes(dialect, vault, [
      ['health (reference)', ['/api/health']],
      ...lists,
      ['health summary', ['/api/summary']],
    ]);
    // The same lists with the page cache off (listCacheMs 0): what every request costs when
    // writes keep invalidating the pages. Not part of the target, which is the default vault.
    await vault.close();
    vault = await open({ listCacheMs: 0 });
    out.push(...(await runRoutes(dialect, vault, lists, UNCACHED)));
    return out;
  } finally {
    await vault.close();
    await rm(dataDir, { recursive: true, force: true });
  }
}

const pg = await startPostgres();
try {
  console.log(
    `vault API benchmark: ${ITEMS} items x ${POINTS} points, ${CONNECTIONS} connections, ${SECONDS} s per route`,
  );
  console.log(
    `machine: ${cpus().length} CPUs (${cpus()[0]?.model ?? '?'}), load average ${loadavg()
      .map((l) => l.toFixed(1))
      .join(' ')}`,
  );
  const results = [
    ...(await runDialect('sqlite', undefined)),
    ...(await runDialect('postgres', pg)),
  ];
  console.log('');
  console.log('| database | route | p50 ms | p99 ms | p99 / reference p99 | req/s | errors |');
  console.log('|---|---|---|---|---|---|---|');
  for (const r of results) {
    const ref = results.find((x) => x.dialect === r.dialect && x.route.startsWith('health ('));
    console.log(
      `| ${r.dialect} | ${r.route} | ${r.p50} | ${r.p99} | ${ref !== undefined && ref.p99 > 0 ? (r.p99 / ref.p99).toFixed(2) : '-'} | ${Math.round(r.rps)} | ${r.errors} |`,
    );
  }
  const over = results.filter(
    (r) => !r.route.startsWith('health (') && !r.route.endsWith(UNCACHED) && r.p99 >= 50,
  );
  console.log('');
  console.log(
    over.length === 0
      ? 'target met: every p99 under 50 ms'
      : `target missed (p99 >= 50 ms): ${over.map((r) => `${r.dialect} ${r.route} ${r.p99} ms`).join('; ')}`,
  );
} finally {
  await pg.stop();
}
