import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import type { BrowserContext, Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startVault, type Vault } from '@lifeboat/vault';
import { ensurePortalBuilt, launchChromium, REPO_ROOT } from './portal-browser.js';
import { call, recoveryHostPlayer, seedPortal, type PortalSeed } from './portal-seed.js';

// The portal in Debian's Chromium against a real vault (SQLite) serving the built app. The
// data is seeded through the vault's API, with the process server's part (heartbeats, points)
// played by a registered process server token: what the portal shows comes only from the API.

const SHOTS = join(REPO_ROOT, '.test-results', 'portal');
const ADMIN = { username: 'admin', password: 'admin-password' };
const VIEWER = { username: 'vera', password: 'viewer-password' };
const MACHINES = 12;

describe('portal', () => {
  let dir: string;
  let vault: Vault;
  let seed: PortalSeed;
  let context: BrowserContext | undefined;
  let profile: string | undefined;
  let page: Page;
  // Errors the app logs (uncaught exceptions, CSP violations, failed loads other than the
  // deliberate bad login's 401), checked at the end.
  const consoleErrors: string[] = [];

  const shot = (name: string, p: Page = page) =>
    p.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: false });

  const login = async (p: Page, who: { username: string; password: string }) => {
    await p.goto(vault.url + '/');
    await p.getByLabel('Username').fill(who.username);
    await p.getByLabel('Password').fill(who.password);
    await p.getByRole('button', { name: 'Log in' }).click();
    await p.getByRole('heading', { name: 'Dashboard' }).waitFor();
  };

  const text = async (p: Page, testId: string) =>
    (await p.getByTestId(testId).textContent())?.trim();

  beforeAll(async () => {
    await ensurePortalBuilt();
    await mkdir(SHOTS, { recursive: true });
    dir = await mkdtemp(join(tmpdir(), 'lifeboat-portal-'));
    vault = await startVault({
      dataDir: join(dir, 'vault'),
      port: 0,
      logLevel: 'silent',
      passwordCost: 1024,
      initialAdmin: ADMIN,
      // Alerts are evaluated and jobs picked up quickly, so the seeded state settles in seconds.
      schedulerIntervalMs: 300,
      jobPollIntervalMs: 100,
      jobConcurrency: 16,
      summaryCacheMs: 0,
      eventPollMs: 200,
    });
    seed = await seedPortal(vault.url, ADMIN, join(dir, 'store'), MACHINES);
    await call(vault.url, seed.adminToken, 'POST', '/api/users', { ...VIEWER, role: 'viewer' });
    // Wait for what the scheduler and the job runner derive from the seed: the RPO and resync
    // alerts, and the two enable jobs still waiting for their items.
    const deadline = Date.now() + 60_000;
    for (;;) {
      const s = await call<{ alerts: { unacknowledged: number }; jobs: Record<string, number> }>(
        vault.url,
        seed.adminToken,
        'GET',
        '/api/summary',
      );
      if (s.alerts.unacknowledged === 3 && s.jobs['running'] === 2 && !s.jobs['queued']) break;
      if (Date.now() > deadline) throw new Error(`seed did not settle: ${JSON.stringify(s)}`);
      await new Promise((r) => setTimeout(r, 200));
    }
    ({ context, profile } = await launchChromium());
    page = context.pages()[0] ?? (await context.newPage());
    page.setDefaultTimeout(30_000);
    page.on('console', (m) => {
      if (m.type() === 'error') consoleErrors.push(m.text());
    });
    page.on('pageerror', (e) => consoleErrors.push(e.message));
  }, 180_000);

  afterAll(async () => {
    await context?.close().catch(() => undefined);
    seed?.stop();
    await vault?.close();
    if (profile !== undefined) await rm(profile, { recursive: true, force: true });
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });

  it('shows the field error on a bad login, then logs in', async () => {
    await page.goto(vault.url + '/');
    await page.getByLabel('Username').fill('admin');
    await page.getByLabel('Password').fill('not-the-password');
    await page.getByRole('button', { name: 'Log in' }).click();
    const error = page.locator('#password-error');
    await error.waitFor();
    expect(await error.textContent()).toBe('Wrong username or password.');
    expect(await page.getByLabel('Password').getAttribute('aria-invalid')).toBe('true');
    // A username the API's rule refuses is flagged while typing, before any request.
    await page.getByLabel('Username').fill('bad name');
    expect(await page.locator('#username-error').textContent()).toContain('letters, digits');
    await shot('login-error');
    await login(page, ADMIN);
  });

  it('dashboard counts equal the seeded machines, alerts, jobs and components', async () => {
    await page.getByTestId('count-total').waitFor();
    expect(await text(page, 'count-total')).toBe(String(MACHINES));
    expect(await text(page, 'count-protected')).toBe(String(seed.items.protected.length));
    expect(await text(page, 'count-resync-needed')).toBe('2');
    expect(await text(page, 'count-initial-replication')).toBe('1');
    expect(await text(page, 'count-enabling')).toBe('1');
    expect(await text(page, 'count-alerts')).toBe('3');
    expect(await text(page, 'count-unacknowledged')).toBe('3');
    expect(await text(page, 'count-running-jobs')).toBe('2');
    // The stale machine (point two hours old) has the worst RPO.
    const worst = page.getByTestId('worst-rpo').locator('tr').first();
    expect(await worst.textContent()).toContain(seed.names[seed.staleItem]);
    expect(await worst.textContent()).toMatch(/2 h 0 min|120 min/);
    // The store's size and dedup ratio, from the vault's store-stats job over the real store
    // (3 points of a 1 MiB disk with the same data: 3 MiB of points in less than 1 MiB).
    await page.getByTestId('store-dedup').filter({ hasText: '×' }).waitFor();
    const dedup = Number((await text(page, 'store-dedup'))?.replace('×', ''));
    expect(dedup).toBeGreaterThan(3);
    expect(await page.getByRole('region', { name: 'Target stores' }).textContent()).toContain(
      '3.0 MiB of recovery points',
    );
    const components = await page.getByTestId('components').textContent();
    expect(components).toContain('ps-east-1');
    expect(components).toContain('rh-west-1');
    await shot('dashboard');
  });

  it('updates the dashboard without a reload when an item changes state', async () => {
    // Through the vault's event stream (the header says so), not only the polling.
    await page.getByText('Live', { exact: true }).waitFor();
    const id = seed.items.protected[2] ?? '';
    await call(vault.url, seed.processServerToken, 'POST', '/api/components/self/heartbeat', {
      items: [{ id, state: 'resync-needed', reason: 'test: bitmap lost' }],
    });
    await page.getByTestId('count-resync-needed').filter({ hasText: '3' }).waitFor();
    expect(await text(page, 'count-protected')).toBe(String(seed.items.protected.length - 1));
  });

  it('lists machines a page at a time, filtered by state and searched by name', async () => {
    const machineRequests: string[] = [];
    const onRequest = (r: { url(): string }) => {
      if (new URL(r.url()).pathname.startsWith('/api/machines')) machineRequests.push(r.url());
    };
    page.on('request', onRequest);
    await page
      .getByRole('navigation', { name: 'Main' })
      .getByRole('link', { name: 'Machines' })
      .click();
    const rows = page.getByTestId('machine-rows').locator('tr');
    await page.getByText(`Page 1 of 1 (${MACHINES} rows)`).waitFor();
    expect(await rows.count()).toBe(MACHINES);
    // Names come from the machines API and replace the ids as they arrive: one request for
    // the page's rows, not one a row.
    await page.getByRole('link', { name: seed.names[seed.staleItem] ?? '' }).waitFor();
    page.off('request', onRequest);
    expect(machineRequests).toHaveLength(1);
    expect(
      new URL(machineRequests[0] ?? 'http://x/').searchParams.get('ids')?.split(','),
    ).toHaveLength(MACHINES);
    await page.getByLabel('State').selectOption('resync-needed');
    await page.getByText('Page 1 of 1 (3 rows)').waitFor();
    await page.getByLabel('State').selectOption('');
    // The site filter: every machine runs at east, none at west.
    expect(await rows.first().textContent()).toContain('east');
    await page.getByLabel('Site').selectOption({ label: 'west' });
    await page.getByText('No protected machine matches.').waitFor();
    await page.getByLabel('Site').selectOption({ label: 'east' });
    await page.getByText(`Page 1 of 1 (${MACHINES} rows)`).waitFor();
    expect(page.url()).toContain('site=');
    await page.getByLabel('Site').selectOption('');
    await page.getByLabel('Search by name').fill(seed.pointsItem.name);
    await page.getByText('Page 1 of 1 (1 row)').waitFor();
    await shot('machines');
    await page.getByRole('link', { name: seed.pointsItem.name }).click();
  });

  it('opens a machine and shows its disks and points, crash and app marked differently', async () => {
    await page.getByRole('heading', { name: seed.pointsItem.name }).waitFor();
    const total = seed.pointsItem.crash + seed.pointsItem.app;
    await page
      .getByTestId('points-total')
      .filter({ hasText: `${total} points` })
      .waitFor();
    expect(await page.getByTestId('disks').locator('tr').count()).toBe(2);
    expect(await page.getByTestId('points').locator('tr').count()).toBe(total);
    expect(
      await page.getByTestId('points').getByText('App-consistent', { exact: true }).count(),
    ).toBe(seed.pointsItem.app);
    // One mark per cut on the timeline (this machine has two disks).
    expect(await page.locator('.timeline .pt-app').count()).toBe(seed.pointsItem.app / 2);
    expect(await page.locator('.timeline .pt-crash').count()).toBe(seed.pointsItem.crash / 2);
    // The RPO over the last hours, derived by the vault from the points 5 min apart, against
    // the policy's 5 min threshold; the throughput the process server reported.
    const rpo = await page.getByTestId('rpo-chart').getAttribute('aria-label');
    expect(rpo).toContain('RPO over the last 6 h: worst 5 min');
    expect(rpo).toContain('threshold 5 min');
    const tp = await page.getByTestId('throughput-chart').getAttribute('aria-label');
    expect(tp).toContain('peak 3.0 MiB/s');
    await page.getByLabel('Over the last', { exact: true }).selectOption('1');
    await page
      .getByTestId('rpo-chart')
      .and(page.locator('[aria-label^="RPO over the last 1 h"]'))
      .waitFor();
    await shot('machine');
    await page.getByLabel('Kind').selectOption('app');
    await page
      .getByTestId('points-total')
      .filter({ hasText: `${seed.pointsItem.app} points` })
      .waitFor();
  });

  it('acknowledges an alert as admin', async () => {
    await page
      .getByRole('navigation', { name: 'Main' })
      .getByRole('link', { name: 'Alerts' })
      .click();
    const buttons = page.getByRole('button', { name: /^Acknowledge/ });
    await buttons.first().waitFor();
    // The live test above added a fourth alert (the new resync).
    await expect.poll(() => buttons.count(), { timeout: 20_000 }).toBe(4);
    await buttons.first().click();
    await expect.poll(() => buttons.count(), { timeout: 20_000 }).toBe(3);
    expect(await page.getByTestId('alert-rows').textContent()).toContain('admin,');
    // The subject is named by its machine, not by the item's id.
    await page
      .getByTestId('alert-rows')
      .getByRole('link', { name: seed.names[seed.staleItem] ?? '' })
      .waitFor();
    await shot('alerts');
  });

  it('shows jobs with their steps and progress', async () => {
    await page
      .getByRole('navigation', { name: 'Main' })
      .getByRole('link', { name: 'Jobs' })
      .click();
    // The enable jobs and the scheduler's retention jobs.
    await page
      .getByTestId('job-rows')
      .getByRole('link', { name: 'enable-replication' })
      .first()
      .waitFor();
    await page.getByLabel('State').selectOption('running');
    await page.getByText('Page 1 of 1 (2 rows)').waitFor();
    await shot('jobs');
    await page.getByTestId('job-rows').getByRole('link').first().click();
    const steps = page.getByTestId('steps');
    await steps.waitFor();
    expect(await steps.textContent()).toContain('wait-for-process-server');
    expect(await page.getByRole('button', { name: 'Cancel job' }).count()).toBe(1);
    await shot('job');
  });

  it('a viewer sees the alerts and jobs but no button to act on them', async () => {
    // A new tab has its own sessionStorage: a separate login.
    const viewer = await context!.newPage();
    try {
      await login(viewer, VIEWER);
      expect(await viewer.getByTestId('who').textContent()).toContain('viewer');
      await viewer.getByTestId('store-dedup').waitFor();
      expect(await viewer.getByRole('button', { name: 'Measure now' }).count()).toBe(0);
      await viewer.goto(vault.url + '/alerts');
      await viewer.getByTestId('alert-rows').locator('tr').first().waitFor();
      await viewer.getByText('Not yet').first().waitFor();
      expect(await viewer.getByRole('button', { name: /Acknowledge/ }).count()).toBe(0);
      await shot('alerts-viewer', viewer);
      await viewer.goto(vault.url + `/jobs?state=running`);
      await viewer.getByTestId('job-rows').getByRole('link').first().click();
      await viewer.getByTestId('steps').waitFor();
      expect(await viewer.getByRole('button', { name: 'Cancel job' }).count()).toBe(0);
      await viewer.goto(vault.url + '/machines');
      await viewer.getByTestId('machine-rows').getByRole('link').first().waitFor();
      expect(await viewer.getByRole('link', { name: 'Protect machines' }).count()).toBe(0);
      await viewer.goto(vault.url + `/machines/${seed.pointsItem.id}`);
      await viewer.getByTestId('points').locator('tr').first().waitFor();
      expect(await viewer.getByRole('button', { name: /Fail over|Resync|Disable/ }).count()).toBe(
        0,
      );
      expect(await viewer.getByRole('heading', { name: 'Actions' }).count()).toBe(0);
      const nav = viewer.getByRole('navigation', { name: 'Main' });
      expect(await nav.getByRole('link', { name: 'Users' }).count()).toBe(0);
      expect(await nav.getByRole('link', { name: 'Audit log' }).count()).toBe(0);
    } finally {
      await viewer.close();
    }
  });

  it('fits a phone-sized screen without sideways scrolling of the page', async () => {
    await page.setViewportSize({ width: 390, height: 844 });
    try {
      const id = encodeURIComponent(seed.pointsItem.id);
      for (const [path, ready, name] of [
        ['/', 'count-total', 'dashboard-phone'],
        ['/machines', 'machine-rows', 'machines-phone'],
        [`/machines/${id}`, 'points', 'machine-phone'],
        [`/test-failover?item=${id}`, 'tf-candidates', 'test-failover-phone'],
        ['/recovery', 'test-failover-rows', 'recovery-phone'],
      ] as const) {
        await page.goto(vault.url + path);
        await page.getByTestId(ready).waitFor();
        // A string: this package's type check has no DOM library. Wide tables scroll inside
        // their own box; the page itself must not.
        const overflow = Number(
          await page.evaluate(
            'document.documentElement.scrollWidth - document.documentElement.clientWidth',
          ),
        );
        expect(overflow, path).toBeLessThanOrEqual(0);
        // Until a machine's name arrives the title is its id, one long word: it wraps too.
        const withIdTitle = Number(
          await page.evaluate(`(() => {
            const h1 = document.querySelector('h1');
            if (h1) h1.textContent = 'pi_0mx63cxmv000fb488ca485pi_0mx63cxmv000fb488ca485';
            return document.documentElement.scrollWidth - document.documentElement.clientWidth;
          })()`),
        );
        expect(withIdTitle, `${path} with an id as its title`).toBeLessThanOrEqual(0);
        await page.goto(vault.url + path);
        await page.getByTestId(ready).waitFor();
        await shot(name);
      }
    } finally {
      await page.setViewportSize({ width: 1280, height: 800 });
    }
  });

  it('protects machines through the wizard, with field errors for what is missing', async () => {
    await page.goto(vault.url + '/machines');
    await page.getByRole('link', { name: 'Protect machines' }).click();
    await page.getByRole('heading', { name: 'Protect machines' }).waitFor();
    const next = page.getByRole('button', { name: 'Next' });
    await next.click();
    expect(await page.locator('#protect-host-error').textContent()).toBe(
      'Choose the source host the machines run on.',
    );
    await page.getByLabel('Source host').selectOption({ label: 'kvm-east-1' });
    // The error goes as soon as the field is valid; the next one shows on the next attempt.
    expect(await page.locator('#protect-host-error').count()).toBe(0);
    await page
      .getByTestId('inventory')
      .getByText(seed.spares[0] ?? '')
      .waitFor();
    await next.click();
    expect(await page.locator('#protect-machines-error').textContent()).toBe(
      'Choose at least one machine.',
    );
    // Two new machines, and one already protected (the API refuses that one).
    for (const name of [...seed.spares, seed.pointsItem.name]) {
      await page.getByLabel('Filter machines by name').fill(name);
      await page.getByRole('checkbox', { name: new RegExp(`^${name}\\b`) }).check();
    }
    await next.click();
    await next.click();
    expect(await page.locator('#protect-policy-error').textContent()).toBe(
      'Choose a replication policy.',
    );
    await page.getByLabel('Replication policy').selectOption({ index: 1 });
    await page.getByLabel('Target store').selectOption({ label: 'east-store (directory)' });
    await next.click();
    const review = await page.getByTestId('protect-review').textContent();
    expect(review).toContain(seed.spares.join(', '));
    await page.getByRole('button', { name: 'Protect 3 machines' }).click();
    const results = page.getByTestId('protect-results');
    await results.waitFor();
    expect(await results.getByText('Replication is being enabled.').count()).toBe(2);
    expect(await results.textContent()).toContain('LB_VAULT_CONFLICT');
    await shot('protect-result');
    await page
      .getByRole('navigation', { name: 'Main' })
      .getByRole('link', { name: 'Dashboard' })
      .click();
    await page
      .getByTestId('count-total')
      .filter({ hasText: String(MACHINES + 2) })
      .waitFor();
  });

  it('shows policies, infrastructure and the audit log, and creates a user with field checks', async () => {
    const nav = page.getByRole('navigation', { name: 'Main' });
    await nav.getByRole('link', { name: 'Policies' }).click();
    await page.getByTestId('policies').getByText('gold').waitFor();
    expect(await page.getByTestId('policies').textContent()).toContain('5 min');
    // A new policy: the API's rules as you type, its refusal of a taken name at the field.
    await page.getByLabel('Name', { exact: true }).fill('gold');
    await page.getByLabel('Crash-consistent every (s)').fill('600');
    expect(await page.locator('#policy-crash-error').textContent()).toContain('exceed the RPO');
    await page.getByLabel('Crash-consistent every (s)').fill('30');
    await page.getByLabel('Keep every point for').fill('forever');
    expect(await page.locator('#policy-keepFor-error').textContent()).toContain('24h');
    await page.getByLabel('Keep every point for').fill('48h');
    await page.getByRole('button', { name: 'Create policy' }).click();
    await page.locator('#policy-name-error').filter({ hasText: 'already exists' }).waitFor();
    await page.getByLabel('Name', { exact: true }).fill('silver');
    await page.getByRole('button', { name: 'Create policy' }).click();
    await page.getByTestId('policies').getByText('silver').waitFor();
    expect(await page.getByTestId('policies').textContent()).toContain('all for 48h');
    await shot('policies');
    await nav.getByRole('link', { name: 'Infrastructure' }).click();
    await page.getByTestId('process-servers').getByText('ps-east-1').waitFor();
    await page.getByTestId('recovery-hosts').getByText('rh-west-1').waitFor();
    await page.getByTestId('source-hosts').getByText('kvm-east-1').waitFor();
    await page.getByTestId('target-stores').getByText('east-store').waitFor();
    await page.getByTestId('network-mappings').getByText('No network mapping yet.').waitFor();
    expect(await page.getByTestId('process-servers').textContent()).toContain('healthy');
    await shot('infrastructure');
    await nav.getByRole('link', { name: 'Audit log' }).click();
    await page.getByTestId('audit-rows').getByText('protected-item.create').first().waitFor();
    await shot('audit');
    await nav.getByRole('link', { name: 'Users' }).click();
    await page.getByTestId('user-rows').getByText(VIEWER.username).waitFor();
    await page.getByLabel('Username').fill(VIEWER.username);
    await page.getByLabel('Password').fill('short');
    expect(await page.locator('#new-password-error').textContent()).toBe('At least 8 characters.');
    await page.getByLabel('Password').fill('long-enough-password');
    await page.getByRole('button', { name: 'Create user' }).click();
    // The vault's own refusal, shown at the field it names.
    await page.locator('#new-username-error').filter({ hasText: 'already exists' }).waitFor();
    await shot('users-error');
    await page.getByLabel('Username').fill('olga');
    await page.getByLabel('Role').selectOption('operator');
    await page.getByRole('button', { name: 'Create user' }).click();
    await page.getByTestId('user-rows').getByText('olga').waitFor();
    expect(await page.getByTestId('user-rows').textContent()).toContain('operator');
  });

  it('creates a one-time registration key that registers a component once', async () => {
    const nav = page.getByRole('navigation', { name: 'Main' });
    await nav.getByRole('link', { name: 'Keys' }).click();
    await page.getByLabel('Valid for (hours)').fill('0');
    expect(await page.locator('#key-hours-error').textContent()).toContain('Between');
    await page.getByLabel('Valid for (hours)').fill('2');
    await page.getByLabel('For a').selectOption('recovery-host');
    await page.getByRole('button', { name: 'Create key' }).click();
    const key = (await page.getByTestId('new-key').textContent()) ?? '';
    await page.getByTestId('key-rows').getByText('Unused').first().waitFor();
    await shot('keys');
    // The key shown works, once.
    const body = { key, kind: 'recovery-host', name: 'rh-from-portal' };
    await call(vault.url, null, 'POST', '/api/register', body);
    await expect(call(vault.url, null, 'POST', '/api/register', body)).rejects.toThrow(
      /LB_VAULT_REGISTRATION_KEY_USED/,
    );
  });

  /** A time as a `datetime-local` value in the browser's (and this process's) zone. */
  const localInput = (ms: number) =>
    new Date(ms - new Date(ms).getTimezoneOffset() * 60_000).toISOString().slice(0, 19);

  it('runs a test failover from the timeline: checks as you type, the vault’s refusal at its field, the boot screenshot, cleanup', async () => {
    const rh = recoveryHostPlayer(vault.url, seed.recoveryHostToken);
    await page.goto(vault.url + `/machines/${seed.pointsItem.id}`);
    await page.getByTestId('points').locator('tr').first().waitFor();
    // The newest point's mark on the timeline opens the wizard for this machine and point.
    await page.locator('.timeline a.pt-link').first().click();
    await page.getByRole('heading', { name: 'Test failover', level: 1 }).waitFor();
    expect(await page.getByLabel('A point from the list').isChecked()).toBe(true);
    expect(await page.getByLabel('Point', { exact: true }).inputValue()).toMatch(/^pt-/);
    await shot('test-failover-point');
    const next = page.getByRole('button', { name: 'Next' });
    await next.click();

    // The vault's rules as the operator types.
    const port = page.getByLabel('Guest TCP port that must answer (optional)');
    await port.fill('99999');
    expect(await page.locator('#tf-guestPort-error').textContent()).toBe(
      'A TCP port from 1 to 65535, or leave empty.',
    );
    const consoleField = page.getByLabel('Console must show (regular expression, optional)');
    await consoleField.fill('(boot');
    expect(await page.locator('#tf-console-error').textContent()).toBe(
      'Not a valid regular expression.',
    );
    expect(await consoleField.getAttribute('aria-invalid')).toBe('true');
    await next.click();
    // Still on this step, the first wrong field focused.
    expect(await page.evaluate('document.activeElement.id')).toBe('tf-console');
    await consoleField.fill('LIFEBOAT-BOOT-OK');
    await port.fill('22');
    expect(await page.locator('#tf-guestPort-error').count()).toBe(0);
    await shot('test-failover-checks');

    // A time before every point passes the form but not the vault, which names the field.
    await page.getByRole('button', { name: 'Back' }).click();
    await page.getByLabel('The latest point at or before a time').check();
    await page
      .getByLabel('Recover to (your local time)')
      .fill(localInput(Date.now() - 3 * 3600_000));
    await next.click();
    await next.click();
    await page.getByRole('button', { name: 'Start test failover' }).click();
    const refused = page.locator('#tf-mode-error');
    await refused.waitFor();
    expect(await refused.textContent()).toContain('has no point at or before');
    expect(await page.getByLabel('The latest point at or before a time').isVisible()).toBe(true);
    await page.getByLabel('A point from the list').check();
    await next.click();
    await next.click();
    const review = await page.getByTestId('tf-review').textContent();
    expect(review).toContain(seed.pointsItem.name);
    expect(review).toContain('port 22 answers');
    await page.getByRole('button', { name: 'Start test failover' }).click();

    // The run's page follows what the recovery host reports.
    await page.waitForURL(/\/test-failovers\/tf/);
    const runId = decodeURIComponent(page.url().split('/').pop() ?? '');
    await page.getByTestId('run-state').filter({ hasText: 'queued' }).waitFor();
    const op = await rh.operation(runId, 'test-failover');
    const machine = (op.spec['machines'] as Array<{ name: string; pointIds: string[] }>)[0];
    expect(machine?.pointIds).toHaveLength(2);
    await rh.report(op.jobId, {
      kind: 'test-failover',
      state: 'running',
      steps: [
        { name: 'select points', state: 'succeeded' },
        { name: `boot ${machine?.name ?? ''}`, state: 'running' },
      ],
      result: { instanceId: 'seed-rh' },
    });
    await page.getByTestId('run-state').filter({ hasText: 'starting' }).waitFor();
    // A real PNG for the screenshot: the browser's own rendering of the login box.
    const png = await page.screenshot({
      type: 'png',
      clip: { x: 0, y: 0, width: 320, height: 200 },
    });
    await rh.artifact(op.jobId, `${machine?.name ?? ''}-screenshot`, 'image/png', png);
    await rh.artifact(
      op.jobId,
      `${machine?.name ?? ''}-console`,
      'text/plain',
      Buffer.from('LIFEBOAT-BOOT-OK recovered\n'),
    );
    await rh.report(op.jobId, {
      kind: 'test-failover',
      state: 'succeeded',
      steps: [
        { name: 'select points', state: 'succeeded' },
        { name: `boot ${machine?.name ?? ''}`, state: 'succeeded' },
        { name: `verify ${machine?.name ?? ''}`, state: 'succeeded' },
      ],
      result: {
        instanceId: 'seed-rh',
        machines: [
          {
            name: machine?.name,
            verification: {
              console: 'LIFEBOAT-BOOT-OK recovered',
              port: { guestPort: 22, answer: 'LIFEBOAT-TCP-OK recovered' },
              screenshot: { width: 320, height: 200 },
            },
          },
        ],
      },
    });
    await page.getByTestId('boot-result').filter({ hasText: 'Booted and verified' }).waitFor();
    // The screenshot the recovery host uploaded, read with the session's token, decoded.
    // Decoded and laid out: an <img> has no height before its data URL is decoded.
    const img = page.getByTestId('screenshot');
    await expect
      .poll(async () => (await img.boundingBox())?.height ?? 0, { timeout: 30_000 })
      .toBeGreaterThan(50);
    expect(await page.getByTestId('run-machine').textContent()).toContain(
      'LIFEBOAT-TCP-OK recovered',
    );
    await shot('test-failover-run');

    // A viewer sees the result but no button to clean up, and no wizard.
    const viewer = await context!.newPage();
    try {
      await login(viewer, VIEWER);
      await viewer.goto(vault.url + `/test-failovers/${runId}`);
      await viewer.getByTestId('boot-result').filter({ hasText: 'Booted and verified' }).waitFor();
      expect(await viewer.getByRole('button', { name: 'Clean up' }).count()).toBe(0);
      await viewer.goto(vault.url + `/machines/${seed.pointsItem.id}`);
      await viewer.getByTestId('points').locator('tr').first().waitFor();
      expect(await viewer.getByRole('link', { name: /Test failover|Fail over/ }).count()).toBe(0);
      expect(await viewer.locator('.timeline a').count()).toBe(0);
      await viewer.goto(vault.url + '/test-failover');
      await viewer.getByRole('heading', { name: 'Not found' }).waitFor();
    } finally {
      await viewer.close();
    }

    await page.getByRole('button', { name: 'Clean up' }).click();
    const cleanup = await rh.operation(runId, 'test-failover-cleanup');
    expect(cleanup.spec['machines']).toEqual([machine?.name]);
    await rh.report(cleanup.jobId, { kind: 'test-failover-cleanup', state: 'succeeded' });
    await page.getByTestId('cleaned-up').waitFor();
    expect(await page.getByRole('button', { name: 'Clean up' }).count()).toBe(0);
    // The machine's page lists it.
    await page.goto(vault.url + `/machines/${seed.pointsItem.id}`);
    await page.getByTestId('machine-test-failovers').getByText('cleaned-up').waitFor();
  });

  it('fails a machine over onto its mapped network through the wizard (confirmed by its name), then commits it', async () => {
    const rh = recoveryHostPlayer(vault.url, seed.recoveryHostToken);
    const id = seed.items['resync-needed'][0] ?? '';
    const name = seed.names[id] ?? '';
    // Its network mapping sends it to the recovery site's dr-lan, which no recovery host has yet.
    const mapping = await call<{ id: string }>(
      vault.url,
      seed.adminToken,
      'POST',
      '/api/network-mappings',
      { name: 'prod-lan', sourceNetwork: 'lan', targetNetwork: 'dr-lan' },
    );
    await call(vault.url, seed.adminToken, 'PATCH', `/api/protected-items/${id}`, {
      networkMappingId: mapping.id,
    });
    await page.goto(vault.url + `/machines/${id}`);
    await page.getByRole('link', { name: 'Fail over…' }).click();
    await page.getByRole('heading', { name: `Fail over ${name}` }).waitFor();
    const next = page.getByRole('button', { name: 'Next' });
    await next.click();
    await page.getByTestId('fo-network').filter({ hasText: 'dr-lan (mapping prod-lan)' }).waitFor();
    await next.click();
    // The wizard stays at the network: no recovery host can attach the machine to dr-lan.
    expect(await page.locator('#fo-network-error').textContent()).toContain(
      'No healthy recovery host has network dr-lan',
    );
    await shot('failover-network-missing');
    // The recovery host now reports dr-lan with its bridge; the wizard, opened again, goes on.
    seed.recoveryHostHealth['networks'] = [
      { name: 'dr-lan', kind: 'bridge', bridge: 'br-dr', present: true },
    ];
    await call(vault.url, seed.recoveryHostToken, 'POST', '/api/components/self/heartbeat', {
      health: seed.recoveryHostHealth,
    });
    await page.reload();
    await page.getByRole('heading', { name: `Fail over ${name}` }).waitFor();
    await next.click();
    await page.getByTestId('fo-network').filter({ hasText: 'dr-lan' }).waitFor();
    await next.click();
    expect(await page.getByTestId('fo-review').textContent()).toContain(
      'dr-lan (mapping prod-lan)',
    );
    await page.getByLabel('Type the machine’s name to confirm').fill('not-it');
    await page.getByRole('button', { name: 'Fail over now' }).click();
    expect(await page.locator('#fo-confirm-error').textContent()).toBe(`Type ${name} to confirm.`);
    await page.getByLabel('Type the machine’s name to confirm').fill(name);
    await shot('failover-confirm');
    await page.getByRole('button', { name: 'Fail over now' }).click();
    await page.waitForURL(/\/failovers\/fo/);
    const runId = decodeURIComponent(page.url().split('/').pop() ?? '');
    const op = await rh.operation(runId, 'failover');
    expect((op.spec['machine'] as { network?: string }).network).toBe('dr-lan');
    await rh.report(op.jobId, {
      kind: 'failover',
      state: 'running',
      result: { instanceId: 'seed-rh' },
    });
    await rh.report(op.jobId, {
      kind: 'failover',
      state: 'succeeded',
      result: { instanceId: 'seed-rh' },
    });
    await page.getByTestId('run-state').filter({ hasText: 'booted' }).waitFor();
    expect(await text(page, 'run-network')).toBe('network dr-lan');
    await page.getByRole('button', { name: 'Commit…' }).click();
    await page.getByLabel(/Copy its disks to local files/).uncheck();
    await page.getByRole('button', { name: 'Commit now' }).click();
    const commit = await rh.operation(runId, 'failover-commit');
    await rh.report(commit.jobId, { kind: 'failover-commit', state: 'succeeded' });
    await page.getByTestId('run-state').filter({ hasText: 'committed' }).waitFor();
    expect(await page.getByRole('button', { name: 'Change point…' }).count()).toBe(0);
    await shot('failover');
    const item = await call<{ state: string }>(
      vault.url,
      seed.adminToken,
      'GET',
      `/api/protected-items/${id}`,
    );
    expect(item.state).toBe('failed-over');
    await page.goto(vault.url + `/machines/${id}`);
    await page.getByRole('button', { name: 'Re-protect' }).waitFor();
  });

  it('is usable from the keyboard: skip link first, focus moves to each new page', async () => {
    await page.goto(vault.url + '/');
    await page.getByTestId('count-total').waitFor();
    await page.keyboard.press('Tab');
    expect(await page.evaluate('document.activeElement.textContent')).toBe('Skip to content');
    await page.keyboard.press('Tab');
    expect(await page.evaluate('document.activeElement.textContent')).toBe('Dashboard');
    await page.keyboard.press('Tab');
    await page.keyboard.press('Enter');
    await page.getByRole('heading', { name: 'Machines', level: 1 }).waitFor();
    await expect
      .poll(() => page.evaluate('document.activeElement.id'), { timeout: 10_000 })
      .toBe('page-title');
  });

  it('logged no error in the browser (no CSP violation, no uncaught exception)', () => {
    // The bad login (401) and the refusals the tests provoke (404, 409) are logged by Chromium too.
    const unexpected = consoleErrors.filter((e) => !/status of (401|404|409) /.test(e));
    expect(unexpected).toEqual([]);
  });
});
