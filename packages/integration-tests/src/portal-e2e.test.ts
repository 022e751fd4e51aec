import { mkdir, mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import type { BrowserContext, Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startLocalInstallation, type LocalInstallation } from '@lifeboat/cli';
import {
  buildTestImage,
  createRootOverlay,
  startVm,
  testImageAppend,
  type TestImage,
  type TestVm,
} from '@lifeboat/testing';
import { ensurePortalBuilt, launchChromium, REPO_ROOT } from './portal-browser.js';
import { call } from './portal-seed.js';

// The portal end to end, as an operator uses it, against `lifeboat up`'s installation (its
// composition root, startLocalInstallation: the vault, a real process server, the agents it
// starts, a real recovery host that polls the vault) and a real VM under QEMU that writes
// continuously: log in, protect the VM through the wizard, watch its first recovery point
// appear, start a test failover from the machine's timeline, see the boot verified with the
// screenshot the recovery host took, clean up. A viewer cannot start one; bad input shows
// at its field. Screenshots of every page at 1280x800 go to .test-results/portal-e2e/.

const SHOTS = join(REPO_ROOT, '.test-results', 'portal-e2e');
const MARK = 'LIFEBOAT-E2E-MARK';
const OPERATOR = { username: 'olivia', password: 'operator-password' };
const VIEWER = { username: 'vera', password: 'viewer-password' };

/** Processes whose command line mentions `text` (QEMU started for this test, by its paths). */
async function processesMentioning(text: string): Promise<number[]> {
  const pids: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue;
    const cmdline = await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '');
    if (cmdline.includes(text)) pids.push(Number(name));
  }
  return pids;
}

describe('portal end to end with lifeboat up and a real VM', () => {
  let dir: string;
  let image: TestImage;
  let inst: LocalInstallation | undefined;
  let vm: TestVm | undefined;
  let context: BrowserContext | undefined;
  let profile: string | undefined;
  let page: Page;
  let itemId = '';
  let runId = '';
  const consoleErrors: string[] = [];
  // What lifeboat up reports as background failures (it prints them as warnings).
  const backgroundErrors: string[] = [];

  const shot = (name: string, p: Page = page) =>
    p.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: false });
  const admin = <T = Record<string, unknown>>(method: string, path: string, body?: unknown) =>
    call<T>(inst?.vault.url ?? '', inst?.adminToken ?? '', method, path, body);

  const login = async (p: Page, who: { username: string; password: string }) => {
    await p.goto((inst?.vault.url ?? '') + '/');
    await p.getByLabel('Username').fill(who.username);
    await p.getByLabel('Password').fill(who.password);
    await p.getByRole('button', { name: 'Log in' }).click();
    await p.getByRole('heading', { name: 'Dashboard' }).waitFor();
  };

  beforeAll(async () => {
    await ensurePortalBuilt();
    await mkdir(SHOTS, { recursive: true });
    dir = await mkdtemp(join(tmpdir(), 'lifeboat-portal-e2e-'));
    image = await buildTestImage();
    inst = await startLocalInstallation({
      dataDir: join(dir, 'up'),
      logLevel: 'silent',
      onError: (what, err) => backgroundErrors.push(`${what}: ${String(err)}`),
    });
    // What `lifeboat recovery-host start --kernel-dir` allows: the test image has no boot
    // loader, so its test failover boots its kernel file (named in the wizard).
    inst.recoveryLink.allowKernelDir(dirname(image.kernel));

    const root = await createRootOverlay(image, join(dir, 'web-root.qcow2'));
    vm = await startVm({
      kernel: image.kernel,
      disks: [{ path: root }],
      append: testImageAppend({
        hostname: 'web',
        mark: MARK,
        writer: true,
        writerIntervalMs: 1000,
      }),
      memoryMiB: 256,
    });
    await vm.waitForConsole(`LIFEBOAT-MARK-WRITTEN ${MARK}`, 240_000);

    // The operator's set-up before the portal (or `lifeboat vault ...`): the KVM host the
    // process server discovers, a 5-second policy, the users.
    const host = await admin<{ id: string }>('POST', '/api/source-hosts', {
      name: 'kvm-e2e',
      kind: 'kvm',
      processServerId: inst.processServerCredentials.id,
      endpoints: [{ name: 'web', qmp: vm.qmpSocket }],
    });
    await admin('POST', `/api/source-hosts/${host.id}/discover`);
    await admin('POST', '/api/policies', {
      name: 'every-5s',
      crashConsistentIntervalSeconds: 5,
      rpoThresholdSeconds: 30,
      retention: { rules: [{ for: '1d' }] },
    });
    await admin('POST', '/api/users', { ...OPERATOR, role: 'operator' });
    await admin('POST', '/api/users', { ...VIEWER, role: 'viewer' });
    const deadline = Date.now() + 60_000;
    while (
      (await admin<{ total: number }>('GET', `/api/machines?sourceHostId=${host.id}`)).total < 1
    ) {
      if (Date.now() > deadline) throw new Error('the process server did not discover the VM');
      await new Promise((r) => setTimeout(r, 250));
    }

    ({ context, profile } = await launchChromium());
    page = context.pages()[0] ?? (await context.newPage());
    page.setDefaultTimeout(30_000);
    page.on('console', (m) => {
      if (m.type() === 'error') consoleErrors.push(m.text());
    });
    page.on('pageerror', (e) => consoleErrors.push(e.message));
  }, 300_000);

  afterAll(async () => {
    await context?.close().catch(() => undefined);
    if (profile !== undefined) await rm(profile, { recursive: true, force: true });
    await inst?.link.stop().catch(() => undefined);
    await vm?.stop().catch(() => undefined);
    await inst?.close();
    if (dir !== undefined) {
      // Nothing this test started may outlive it (the VM, the recovery host's QEMU).
      const left = await processesMentioning(dir);
      for (const pid of left) process.kill(pid, 'SIGKILL');
      await rm(dir, { recursive: true, force: true });
      expect(left).toEqual([]);
    }
  }, 120_000);

  it('logs in as an operator and protects the VM through the wizard', async () => {
    await login(page, OPERATOR);
    await page
      .getByRole('navigation', { name: 'Main' })
      .getByRole('link', { name: 'Machines' })
      .click();
    await page.getByRole('link', { name: 'Protect machines' }).click();
    await page.getByLabel('Source host').selectOption({ label: 'kvm-e2e' });
    await page.getByRole('checkbox', { name: /^web\b/ }).check();
    await shot('protect-machines');
    await page.getByRole('button', { name: 'Next' }).click();
    await page
      .getByLabel('Replication policy')
      .selectOption({ label: 'every-5s (RPO threshold 30 s)' });
    await page.getByLabel('Target store').selectOption({ label: 'local (directory)' });
    await page.getByRole('button', { name: 'Next' }).click();
    await page.getByRole('button', { name: 'Protect 1 machine' }).click();
    const results = page.getByTestId('protect-results');
    await results.getByText('Replication is being enabled.').waitFor();
    await shot('protect-result');
    await results.getByRole('link', { name: 'Open machine' }).click();
    await page.getByRole('heading', { name: 'web', level: 1 }).waitFor();
    itemId = decodeURIComponent(page.url().split('/').pop() ?? '');
    expect(itemId).toMatch(/^pi_/);
  });

  it('watches its first recovery point appear, live', { timeout: 240_000 }, async () => {
    // The agent's initial copy, then its first cut: the page follows without a reload.
    await page
      .getByTestId('points')
      .getByText('Crash-consistent', { exact: true })
      .first()
      .waitFor({ timeout: 150_000 });
    await page
      .getByTestId('item-state')
      .filter({ hasText: 'Protected' })
      .waitFor({ timeout: 30_000 });
    // Points keep coming every 5 s.
    const count = async () =>
      Number((await page.getByTestId('points-total').textContent())?.split(' ')[0]);
    const first = await count();
    await expect.poll(count, { timeout: 60_000, interval: 1000 }).toBeGreaterThan(first);
    await page.locator('.timeline a.pt-link').first().waitFor();
    await shot('machine');
  });

  it(
    'runs a test failover from the timeline, with field errors for bad input, and sees the boot screenshot',
    { timeout: 240_000 },
    async () => {
      await page.locator('.timeline a.pt-link').first().click();
      await page.getByRole('heading', { name: 'Test failover', level: 1 }).waitFor();
      expect(await page.getByLabel('A point from the list').isChecked()).toBe(true);
      await page.getByRole('button', { name: 'Next' }).click();
      await page
        .getByLabel('Console must show (regular expression, optional)')
        .fill('LIFEBOAT-BOOT-OK recovered');
      await page.getByLabel('Guest TCP port that must answer (optional)').fill('22');
      await page
        .getByLabel('Its answer must match (regular expression, optional)')
        .fill('LIFEBOAT-TCP-OK recovered');
      // The disk has no boot loader: boot the test image's kernel file on the recovery host.
      await page.getByLabel(/A kernel file on the recovery host/).check();
      await page.getByLabel('Memory in MiB (optional; default: the machine’s)').fill('32');
      await page.getByRole('button', { name: 'Next' }).click();
      expect(await page.locator('#tf-kernel-error').textContent()).toBe(
        'Enter the kernel file’s path on the recovery host.',
      );
      expect(await page.locator('#tf-memoryMiB-error').textContent()).toBe(
        'From 64 to 1048576 MiB, or leave empty.',
      );
      await shot('test-failover-errors');
      await page.getByLabel('Memory in MiB (optional; default: the machine’s)').fill('256');
      await page.getByLabel('Kernel file (a path the recovery host allows)').fill(image.kernel);
      await page
        .getByLabel('Kernel command line (optional)')
        .fill(testImageAppend({ hostname: 'recovered' }));
      expect(await page.locator('#tf-kernel-error').count()).toBe(0);
      await page.getByRole('button', { name: 'Next' }).click();
      await page.getByTestId('tf-review').waitFor();
      await page.getByRole('button', { name: 'Start test failover' }).click();
      await page.waitForURL(/\/test-failovers\/tf/);
      runId = decodeURIComponent(page.url().split('/').pop() ?? '');

      // The recovery host finds it in its assignments, boots the point over NBD, verifies it.
      await page
        .getByTestId('boot-result')
        .filter({ hasText: 'Booted and verified' })
        .waitFor({ timeout: 150_000 });
      await page
        .getByTestId('run-state')
        .filter({ hasText: /^running$/ })
        .waitFor();
      const result = await page.getByTestId('run-machine').textContent();
      expect(result).toContain('LIFEBOAT-BOOT-OK recovered');
      expect(result).toContain('LIFEBOAT-TCP-OK recovered');
      // Decoded and laid out: an <img> has no height before its data URL is decoded.
      const img = page.getByTestId('screenshot');
      await shot('test-failover-run');
      await expect
        .poll(async () => (await img.boundingBox())?.height ?? 0, { timeout: 30_000 })
        .toBeGreaterThan(50);
      await shot('test-failover-run');
    },
  );

  it('a viewer sees the run but cannot start a failover or clean up', async () => {
    const viewer = await context!.newPage();
    try {
      await login(viewer, VIEWER);
      await viewer.goto(`${inst?.vault.url ?? ''}/test-failovers/${runId}`);
      await viewer.getByTestId('boot-result').filter({ hasText: 'Booted and verified' }).waitFor();
      expect(
        await viewer
          .getByRole('button')
          .filter({ hasText: /Clean up|Commit|Change point/ })
          .count(),
      ).toBe(0);
      await viewer.goto(`${inst?.vault.url ?? ''}/machines/${itemId}`);
      await viewer.getByTestId('points').locator('tr').first().waitFor();
      expect(await viewer.getByRole('link', { name: /Test failover|Fail over/ }).count()).toBe(0);
      expect(await viewer.getByRole('heading', { name: 'Actions' }).count()).toBe(0);
      await viewer.goto(`${inst?.vault.url ?? ''}/failover?item=${itemId}`);
      await viewer.getByRole('heading', { name: 'Not found' }).waitFor();
      // And the vault refuses it anyway.
      const token = JSON.parse(
        String(await viewer.evaluate('sessionStorage.getItem("lifeboat.session")')),
      ) as { token: string };
      await expect(
        call(inst?.vault.url ?? '', token.token, 'POST', '/api/failovers', {
          protectedItemId: itemId,
        }),
      ).rejects.toThrow(/403/);
      await shot('machine-viewer', viewer);
    } finally {
      await viewer.close();
    }
  });

  it('cleans the test failover up', { timeout: 90_000 }, async () => {
    await page.getByRole('button', { name: 'Clean up' }).click();
    await page.getByTestId('cleaned-up').waitFor({ timeout: 60_000 });
    expect(await page.getByTestId('run-state').textContent()).toBe('cleaned-up');
    // The recovery host's QEMU for it is gone; the source VM still runs.
    expect(await processesMentioning(join(dir, 'up', 'recovery'))).toEqual([]);
    expect(vm?.process.child.exitCode).toBeNull();
    await shot('test-failover-cleaned-up');
  });

  it(
    'shows every page at 1280x800 (screenshots saved), the dashboard with the store measured',
    { timeout: 120_000 },
    async () => {
      const url = inst?.vault.url ?? '';
      await page.goto(url + '/');
      await page.getByRole('button', { name: 'Measure now' }).click();
      await page.getByTestId('store-dedup').filter({ hasText: '×' }).waitFor({ timeout: 60_000 });
      // The figures shown may be the hourly measurement's; the status clears once the jobs
      // the click started have ended and their figures are shown (a store-stats job reads
      // the whole store, seconds under a loaded CI machine).
      await expect
        .poll(
          () =>
            page.getByRole('region', { name: 'Target stores' }).getByRole('status').textContent(),
          { timeout: 60_000, interval: 250 },
        )
        .toBe('');
      // The worst RPO row is the protected VM's, a few seconds old.
      await page.getByTestId('worst-rpo').getByRole('link', { name: 'web' }).waitFor();
      await shot('dashboard');
      await page.screenshot({ path: join(SHOTS, 'dashboard.jpg'), type: 'jpeg', quality: 70 });
      const pages: Array<[string, string, string]> = [
        ['machines', '/machines', 'Machines'],
        ['recovery', '/recovery', 'Recovery'],
        ['jobs', '/jobs', 'Jobs'],
        ['alerts', '/alerts', 'Alerts'],
        ['policies', '/policies', 'Policies'],
        ['infrastructure', '/infrastructure', 'Infrastructure'],
        ['audit', '/audit', 'Audit log'],
      ];
      for (const [name, path, heading] of pages) {
        await page.goto(url + path);
        await page.getByRole('heading', { name: heading, level: 1 }).waitFor();
        // Its first rows (the live event stream keeps the network busy: no networkidle).
        await page.locator('tbody tr, .card p').first().waitFor();
        await expect
          .poll(() => page.locator('[aria-busy="true"]').count(), { timeout: 20_000 })
          .toBe(0);
        await shot(name);
      }
      await page.goto(url + '/jobs?state=succeeded');
      await page
        .getByTestId('job-rows')
        .getByRole('link', { name: 'test-failover' })
        .first()
        .click();
      await page.getByTestId('steps').waitFor();
      await shot('job');
      // The admin's pages.
      const adminPage = await context!.newPage();
      try {
        const password = (
          await readFile(join(dir, 'up', 'vault', 'initial-admin-password'), 'utf8')
        ).trim();
        await login(adminPage, { username: 'admin', password });
        for (const [name, path, heading] of [
          ['users', '/users', 'Users'],
          ['keys', '/keys', 'Registration keys'],
        ] as const) {
          await adminPage.goto(url + path);
          await adminPage.getByRole('heading', { name: heading, level: 1 }).waitFor();
          await shot(name, adminPage);
        }
      } finally {
        await adminPage.close();
      }
    },
  );

  it('logged no error in the browser, and lifeboat up no warning', () => {
    expect(consoleErrors).toEqual([]);
    // A warning lifeboat up would print (a vault report refused, an agent that failed).
    expect(backgroundErrors).toEqual([]);
  });
});
