// Benchmark of issue 8 (the portal): the built bundle's size (gzip) and the time to first render
// of the dashboard and of the machines table in Debian's Chromium, with 10,000 protected machines
// against a reference vault with 12, in the same run. Run after the README's setup (the portal
// must be built: scripts/install-deps.sh, or `npx vite build packages/web`):
//
//   npx tsx bench/portal.ts [--items 10000] [--runs 5]
//
// Machines and protected items are inserted straight into the vault's database through its
// Kysely handle (the API would take minutes to seed 10,000; what is measured is reading). Each
// run reloads the page and times from navigation to the page showing the vault's figures: the
// dashboard's total equal to the seeded count, and the machines table's 50 rows with names.
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import type { Page } from 'playwright-core';
import { startVault, type Vault } from '@lifeboat/vault';
import {
  ensurePortalBuilt,
  launchChromium,
  REPO_ROOT,
} from '../packages/integration-tests/src/portal-browser.js';
import { seedVault } from './vault-seed.js';

const args = process.argv.slice(2);
const arg = (name: string, fallback: number): number => {
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1]) : fallback;
};
const ITEMS = arg('--items', 10_000);
const RUNS = arg('--runs', 5);
const ADMIN = { username: 'admin', password: 'admin-password' };

async function seed(vault: Vault, count: number): Promise<void> {
  await seedVault(vault, { items: count });
}

async function timeDashboard(page: Page, url: string, count: number): Promise<number> {
  const start = performance.now();
  await page.goto(url + '/');
  await page
    .getByTestId('count-total')
    .filter({ hasText: new RegExp(`^${count}$`) })
    .waitFor();
  return performance.now() - start;
}

async function timeMachines(page: Page, url: string, count: number): Promise<number> {
  const start = performance.now();
  await page.goto(url + '/machines');
  // The first page's rows with their names (looked up per row) shown.
  await page.getByTestId('machine-rows').getByRole('link', { name: /^vm-/ }).nth(0).waitFor();
  await page.waitForFunction(
    `document.querySelectorAll('[data-testid="machine-rows"] a').length === ${Math.min(50, count)} &&
     [...document.querySelectorAll('[data-testid="machine-rows"] a')].every((a) => a.textContent.startsWith('vm-'))`,
  );
  return performance.now() - start;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;

async function bundleSize(): Promise<{ raw: number; gzip: number }> {
  const dir = join(REPO_ROOT, 'packages', 'web', 'dist');
  const files = [
    join(dir, 'index.html'),
    ...(await readdir(join(dir, 'assets'))).map((f) => join(dir, 'assets', f)),
  ];
  let raw = 0;
  let gzip = 0;
  for (const f of files) {
    const b = await readFile(f);
    raw += b.length;
    gzip += gzipSync(b, { level: 9 }).length;
  }
  return { raw, gzip };
}

await ensurePortalBuilt();
const size = await bundleSize();
console.log(
  `bundle: ${(size.raw / 1024).toFixed(1)} KiB, ${(size.gzip / 1024).toFixed(1)} KiB gzip (index.html + assets)`,
);
const root = await mkdtemp(join(tmpdir(), 'lifeboat-bench-portal-'));
const vaults: Array<{ name: string; count: number; vault: Vault }> = [];
const { context, profile } = await launchChromium();
try {
  for (const [name, count] of [
    ['reference', 12],
    ['large', ITEMS],
  ] as const) {
    const vault = await startVault({
      dataDir: join(root, name),
      port: 0,
      logLevel: 'silent',
      passwordCost: 1024,
      initialAdmin: ADMIN,
      schedulerIntervalMs: 3_600_000,
    });
    vaults.push({ name, count, vault });
    const t0 = performance.now();
    await seed(vault, count);
    console.log(`${name}: seeded ${count} machines in ${(performance.now() - t0).toFixed(0)} ms`);
  }
  const rows: string[] = [];
  let reference: { dashboard: number; machines: number } | undefined;
  for (const { name, count, vault } of vaults) {
    const page = await context.newPage();
    await page.goto(vault.url + '/');
    await page.getByLabel('Username').fill(ADMIN.username);
    await page.getByLabel('Password').fill(ADMIN.password);
    await page.getByRole('button', { name: 'Log in' }).click();
    await page.getByRole('heading', { name: 'Dashboard' }).waitFor();
    // One warm-up of each page (browser cache of the bundle, SQLite page cache).
    await timeDashboard(page, vault.url, count);
    await timeMachines(page, vault.url, count);
    const dash: number[] = [];
    const list: number[] = [];
    for (let r = 0; r < RUNS; r++) {
      dash.push(await timeDashboard(page, vault.url, count));
      list.push(await timeMachines(page, vault.url, count));
    }
    const d = median(dash);
    const m = median(list);
    reference ??= { dashboard: d, machines: m };
    rows.push(
      `${name.padEnd(10)} ${String(count).padStart(6)} machines  dashboard ${d.toFixed(0).padStart(5)} ms (x${(d / reference.dashboard).toFixed(2)})  machines table ${m.toFixed(0).padStart(5)} ms (x${(m / reference.machines).toFixed(2)})`,
    );
    await page.close();
  }
  console.log(`median of ${RUNS} runs after one warm-up, navigation to figures shown:`);
  for (const r of rows) console.log(r);
  console.log(
    `machine: ${cpus().length} cores (${cpus()[0]?.model ?? '?'}), load ${loadavg()
      .map((l) => l.toFixed(1))
      .join(' ')}`,
  );
} finally {
  await context.close();
  for (const v of vaults) await v.vault.close();
  await rm(profile, { recursive: true, force: true });
  await rm(root, { recursive: true, force: true });
}
