import { EventEmitter } from 'node:events';
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '@lifeboat/cli';
import type { CliIo } from '@lifeboat/cli';
import { pngSize, type RecoveryHost } from '@lifeboat/recovery';
import { testImageAppend } from '@lifeboat/testing';
import type { Vault } from '@lifeboat/vault';
import {
  api,
  markedRoot,
  qemuUnder,
  startRecoverySite,
  type RecoverySite,
  type SeededMachine,
} from './recovery-fixtures.js';

// `lifeboat failover test|start|change-point|commit|cleanup` through the vault, as an operator
// who logged in (LIFEBOAT_VAULT_TOKEN): the vault picks the points and the recovery host,
// which runs the jobs; the CLI follows them and prints what the vault shows.

let site: RecoverySite;
let dir: string;
let vault: Vault;
let admin: string;
let host: RecoveryHost;
let web: SeededMachine;

async function lifeboat(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  let stdout = '';
  let stderr = '';
  const io: CliIo = {
    stdout: { write: (s: string) => (stdout += s) },
    stderr: { write: (s: string) => (stderr += s), isTTY: false },
    stdin: Object.assign(new EventEmitter(), { resume() {}, pause() {}, isTTY: false }),
    // Logged in: the failover commands go through this vault.
    env: { LIFEBOAT_VAULT_URL: vault.url, LIFEBOAT_VAULT_TOKEN: admin },
    cwd: dir,
  };
  const code = await runCli(args, { io });
  return { code, stdout, stderr };
}

const boot = ['--kernel', '', '--append', ''];

beforeAll(async () => {
  site = await startRecoverySite('lb-fvc-', 'failover vault cli test');
  ({ dir, vault, admin } = site);
  boot[1] = site.image.kernel;
  boot[3] = testImageAppend({ hostname: 'recovered' });
  web = await site.seed.protect('web', await markedRoot(site.image, dir, 'MARK-A'));
  // A second, newer point of web with another marker: change-point goes back to the first.
  await site.seed.addPoint(web, await markedRoot(site.image, dir, 'MARK-B'));
  // No default boot: the CLI names the kernel (`boot`).
  ({ host } = await site.addRecoveryHost('rh-cli', { defaultBoot: false }));
}, 240_000);
afterAll(async () => {
  expect(await site?.close()).toEqual([]);
});

describe('lifeboat failover through the vault', () => {
  it('failover test boots the latest point on the recovery host, prints the verification and the screenshot, and cleans up', async () => {
    const r = await lifeboat([
      '--json',
      'failover',
      'test',
      '--machine',
      'web',
      ...boot,
      '--console',
      'LIFEBOAT-BOOT-OK recovered MARK-B',
      '--port',
      '22',
      '--expect',
      'LIFEBOAT-TCP-OK',
      '--screenshot-out',
      'web.png',
    ]);
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as {
      testFailover: { state: string; machines: Array<{ verification: Record<string, unknown> }> };
      job: { state: string; kind: string };
      cleanup: { state: string };
      screenshots: string[];
    };
    expect(out.job).toMatchObject({ kind: 'test-failover', state: 'succeeded' });
    expect(out.cleanup.state).toBe('succeeded');
    expect(out.testFailover.state).toBe('cleaned-up');
    expect(out.testFailover.machines[0]!.verification).toMatchObject({
      console: 'LIFEBOAT-BOOT-OK recovered MARK-B',
      screenshot: { width: 720, height: 400 },
    });
    expect(out.screenshots).toEqual([join(dir, 'web.png')]);
    expect(pngSize(await readFile(join(dir, 'web.png')))).toEqual({ width: 720, height: 400 });

    // A selector the vault refuses fails the command with the vault's code, before anything boots.
    const refused = await lifeboat([
      'failover',
      'test',
      '--machine',
      'web',
      '--point',
      'no-such-point',
    ]);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/LB_VAULT_POINT_NOT_FOUND/);
    const unknown = await lifeboat(['failover', 'test', '--machine', 'db']);
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toMatch(
      /no machine named db\. List them with "lifeboat vault machine list"/,
    );
    expect(await qemuUnder(join(dir, 'run'))).toEqual([]);
  }, 420_000);

  it('failover start, change-point and commit with hydration: the item is failed over and the machine runs from local files', async () => {
    const started = await lifeboat(['--json', 'failover', 'start', '--machine', 'web', ...boot]);
    expect(started.code, started.stderr).toBe(0);
    const fo = (JSON.parse(started.stdout) as { failover: { id: string; state: string } }).failover;
    expect(fo.state).toBe('booted');
    const item = await api(vault.url, admin, 'GET', `/api/protected-items/${web.itemId}`);
    expect(item['state']).toBe('failed-over');
    const m = host.running.values().next().value!;
    await m.machine.waitForConsole(/LIFEBOAT-BOOT-OK recovered MARK-B/, 180_000);

    const wrong = await lifeboat([
      'failover',
      'change-point',
      '--failover',
      fo.id,
      '--point',
      'no-such-point',
    ]);
    expect(wrong.code).toBe(1);
    expect(wrong.stderr).toMatch(/LB_VAULT_POINT_NOT_FOUND/);
    const changed = await lifeboat([
      '--json',
      'failover',
      'change-point',
      '--failover',
      fo.id,
      '--point',
      web.points[0]!.id,
    ]);
    expect(changed.code, changed.stderr).toBe(0);
    const booted = host.running.values().next().value!;
    await booted.machine.waitForConsole(/LIFEBOAT-BOOT-OK recovered MARK-A/, 180_000);

    const committed = await lifeboat([
      '--json',
      'failover',
      'commit',
      '--failover',
      fo.id,
      '--verify',
    ]);
    expect(committed.code, committed.stderr).toBe(0);
    const out = JSON.parse(committed.stdout) as {
      failover: { state: string; machines: Array<{ localDisks: string[] }> };
      jobs: Array<{ kind: string; state: string; steps: Array<{ name: string }> }>;
    };
    expect(out.jobs.map((j) => [j.kind, j.state])).toEqual([
      ['failover-commit', 'succeeded'],
      ['hydration', 'succeeded'],
    ]);
    expect(out.jobs[1]!.steps.map((s) => s.name)).toContain('verify copies');
    expect(out.failover.state).toBe('hydrated');
    const local = out.failover.machines[0]!.localDisks;
    expect(local).toHaveLength(1);
    expect(local[0]!.startsWith(join(dir, 'disks'))).toBe(true);
    expect(existsSync(local[0]!)).toBe(true);
    // It keeps running, from the local file now.
    expect(booted.machine.exit).toBeUndefined();
    const late = await lifeboat(['failover', 'change-point', '--failover', fo.id]);
    expect(late.code).toBe(1);
    expect(late.stderr).toMatch(/LB_VAULT_INVALID_STATE/);
  }, 420_000);
});
