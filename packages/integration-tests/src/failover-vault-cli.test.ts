import { EventEmitter } from 'node:events';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '@lifeboat/cli';
import type { CliIo } from '@lifeboat/cli';
import { VaultClient } from '@lifeboat/protocol';
import { RecoveryHost, RecoveryHostLink, pngSize } from '@lifeboat/recovery';
import { DirectoryBackend, Store } from '@lifeboat/store';
import { buildTestImage, testImageAppend, type TestImage } from '@lifeboat/testing';
import { startVault, type Vault } from '@lifeboat/vault';
import {
  adminLogin,
  api,
  markedRoot,
  qemuUnder,
  seedVault,
  type SeededMachine,
} from './recovery-fixtures.js';

// `lifeboat failover test|start|change-point|commit|cleanup` through the vault, as an operator
// who logged in (LIFEBOAT_VAULT_TOKEN): the vault picks the points and the recovery host,
// which runs the jobs; the CLI follows them and prints what the vault shows.

let dir: string;
let image: TestImage;
let vault: Vault;
let admin: string;
let store: Store;
let host: RecoveryHost;
let link: RecoveryHostLink;
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
  dir = await mkdtemp(join(tmpdir(), 'lb-fvc-'));
  image = await buildTestImage();
  boot[1] = image.kernel;
  boot[3] = testImageAppend({ hostname: 'recovered' });
  const passphrase = 'failover vault cli test';
  store = await Store.init({
    backend: new DirectoryBackend({ path: join(dir, 'store') }),
    passphrase,
    kdfCost: 1024,
  });
  vault = await startVault({
    dataDir: join(dir, 'vault'),
    port: 0,
    logLevel: 'silent',
    passwordCost: 1024,
    initialAdmin: { username: 'admin', password: 'admin-password' },
  });
  admin = await adminLogin(vault.url);
  const seed = await seedVault(vault.url, admin, store, join(dir, 'store'), passphrase);
  web = await seed.protect('web', await markedRoot(image, dir, 'MARK-A'));
  // A second, newer point of web with another marker: change-point goes back to the first.
  await seed.addPoint(web, await markedRoot(image, dir, 'MARK-B'));
  const key = await api<{ key: string }>(vault.url, admin, 'POST', '/api/registration-keys', {
    kind: 'recovery-host',
  });
  const reg = await api<{ token: string }>(vault.url, null, 'POST', '/api/register', {
    key: key.key,
    kind: 'recovery-host',
    name: 'rh-cli',
  });
  host = await RecoveryHost.start({ runDir: join(dir, 'run') });
  link = new RecoveryHostLink({
    vault: new VaultClient({ url: vault.url, token: reg.token }),
    host,
    openStore: async (s) =>
      Store.open({ backend: new DirectoryBackend({ path: s.path! }), passphrase: s.passphrase }),
    hydrationDir: join(dir, 'disks'),
    kernelDirs: [dirname(image.kernel)],
    intervalMs: 300,
  });
  link.start();
  await link.sync();
}, 240_000);
afterAll(async () => {
  await link?.stop();
  await host?.close();
  await vault?.close();
  await store?.close();
  expect(await qemuUnder(dir)).toEqual([]);
  await rm(dir, { recursive: true, force: true });
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
