import { EventEmitter } from 'node:events';
import { existsSync } from 'node:fs';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RecoveryHost, type RecoveryJobRecord } from '@lifeboat/recovery';
import { DirectoryBackend, Store } from '@lifeboat/store';
import { startVault, type Vault } from '@lifeboat/vault';
import { buildTestImage, testImageAppend, type TestImage } from '@lifeboat/testing';
import type { CliInput } from '../cli-context.js';
import { runCli } from '../main.js';

// `lifeboat failover test` end to end, in-process: a store holding the test image (imported
// with `lifeboat store import`), booted through the recovery host with the store alone.

const run = promisify(execFile);
let dir: string;
let image: TestImage;
let vault: Vault;
let vaultToken: string;
const PASS = 'failover test passphrase';

async function lifeboat(
  args: string[],
  signal?: AbortSignal,
): Promise<{ code: number; stdout: string; stderr: string }> {
  let stdout = '';
  let stderr = '';
  const stdin = Object.assign(new EventEmitter(), {
    isTTY: false,
    resume: () => undefined,
    pause: () => undefined,
  }) as CliInput;
  const code = await runCli(args, {
    io: {
      stdout: { write: (s: string) => (stdout += s) },
      stderr: { write: (s: string) => (stderr += s), isTTY: false },
      stdin,
      env: { LIFEBOAT_STORE: join(dir, 'store'), LIFEBOAT_PASSPHRASE: PASS },
      cwd: dir,
    },
    ...(signal ? { signal } : {}),
  });
  return { code, stdout, stderr };
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lb-cli-fo-'));
  image = await buildTestImage();
  expect((await lifeboat(['store', 'init'])).code).toBe(0);
  const imported = await lifeboat([
    'store',
    'import',
    image.rootImage,
    '--machine',
    'web',
    '--disk',
    'root',
    // The machine's recorded hardware, which failover uses when the command line does not say.
    '--label',
    'machine.memory-mib=256',
  ]);
  expect(imported.code).toBe(0);
  // A vault the recovery host reports its jobs to, with the host registered as a component.
  vault = await startVault({
    dataDir: join(dir, 'vault'),
    port: 0,
    logLevel: 'silent',
    passwordCost: 1024,
    initialAdmin: { username: 'admin', password: 'admin-password' },
  });
  vaultToken = await adminToken();
  const key = (await api('POST', '/api/registration-keys', { kind: 'recovery-host' }))['key'];
  const reg = await fetch(`${vault.url}/api/register`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ key, kind: 'recovery-host', name: 'rh' }),
  });
  await writeFile(join(dir, 'rh.token'), `${((await reg.json()) as { token: string }).token}\n`);
}, 600_000);

async function adminToken(): Promise<string> {
  const res = await fetch(`${vault.url}/api/auth/login`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ username: 'admin', password: 'admin-password' }),
  });
  return ((await res.json()) as { token: string }).token;
}

async function api(method: string, path: string, body?: unknown): Promise<Record<string, unknown>> {
  const res = await fetch(`${vault.url}${path}`, {
    method,
    headers: {
      authorization: `Bearer ${vaultToken}`,
      ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
    },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  return (await res.json()) as Record<string, unknown>;
}

afterAll(async () => {
  await vault?.close();
  await rm(dir, { recursive: true, force: true });
});

describe('lifeboat failover', () => {
  it('test: boots the latest point, verifies console, port and screenshot, then cleans up', async () => {
    const runDir = join(dir, 'run');
    const r = await lifeboat([
      '--json',
      'failover',
      'test',
      '--machine',
      'web',
      '--kernel',
      image.kernel,
      '--append',
      testImageAppend(),
      '--console',
      'LIFEBOAT-READY',
      '--port',
      '22',
      '--run-dir',
      runDir,
      '--vault',
      vault.url,
      '--vault-token-file',
      join(dir, 'rh.token'),
    ]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const out = JSON.parse(r.stdout) as { job: RecoveryJobRecord; cleanup: RecoveryJobRecord };
    expect(out.job.state).toBe('succeeded');
    expect(out.job.steps.map((s) => s.name)).toContain('port 22 of web');
    expect(out.job.steps.find((s) => s.name === 'boot web')?.detail).toMatchObject({
      cpus: 1,
      memoryMiB: 256,
    });
    expect(existsSync(out.job.artifacts['web-screenshot']!)).toBe(true);
    expect(out.cleanup.state).toBe('succeeded');
    expect(existsSync(join(runDir, 'm', 'web'))).toBe(false);
    // The vault shows both jobs, with their steps.
    const jobs = (await api('GET', '/api/jobs?limit=50'))['items'] as Array<{
      id: string;
      kind: string;
      state: string;
    }>;
    const tfJob = jobs.find((j) => j.kind === 'test-failover');
    expect(tfJob?.state).toBe('succeeded');
    expect(jobs.find((j) => j.kind === 'test-failover-cleanup')?.state).toBe('succeeded');
    const steps = (await api('GET', `/api/jobs/${tfJob!.id}`))['steps'] as Array<{ name: string }>;
    expect(steps.map((x) => x.name)).toEqual(out.job.steps.map((x) => x.name));
    // Nothing left behind for cleanup to find.
    const c = await lifeboat(['failover', 'cleanup', '--run-dir', runDir]);
    expect(c.code).toBe(0);
    expect(c.stdout).toMatch(/nothing to remove/);
  }, 300_000);

  it('start runs the machine; commit from another invocation makes it final and hydrates it while it runs', async () => {
    const runDir = join(dir, 'run-fo');
    const stop = new AbortController();
    const started = lifeboat(
      [
        '--json',
        'failover',
        'start',
        '--machine',
        'web',
        '--kernel',
        image.kernel,
        '--append',
        testImageAppend({ mark: 'AFTER-FAILOVER' }),
        '--memory-mib',
        '256',
        '--run-dir',
        runDir,
      ],
      stop.signal,
    );
    try {
      const deadline = Date.now() + 120_000;
      while (!existsSync(join(runDir, 'control.sock')) && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 200));
      }
      // Let the guest boot and write before the commit, so the copy must carry its writes.
      const consoleLog = join(runDir, 'm', 'web', 'console.log');
      while (Date.now() < deadline) {
        const text = existsSync(consoleLog) ? await readFile(consoleLog, 'latin1') : '';
        if (text.includes('LIFEBOAT-READY')) break;
        await new Promise((r) => setTimeout(r, 200));
      }
      const local = join(dir, 'local');
      const c = await lifeboat([
        '--json',
        'failover',
        'commit',
        '--run-dir',
        runDir,
        '--hydrate-to',
        local,
        '--raw',
        '--verify',
      ]);
      expect(c.stderr).toBe('');
      expect(c.code).toBe(0);
      const replies = c.stdout
        .trim()
        .split(/\n(?=\{)/)
        .map((j) => JSON.parse(j) as { ok: boolean; state: string; localDisks: string[] });
      expect(replies.map((r) => r.state)).toEqual(['committed', 'hydrated']);
      // A raw file: the guest's writes are in it as they are on its disk.
      const copy = replies[1]!.localDisks[0]!;
      expect(copy).toBe(join(local, 'web-disk0.raw'));
      const { stdout: info } = await run('qemu-img', ['info', '-U', '--output=json', copy]);
      expect(JSON.parse(info)).toMatchObject({
        format: 'raw',
        'virtual-size': (await stat(image.rootImage)).size,
      });
      expect((await readFile(copy)).includes('AFTER-FAILOVER')).toBe(true);
      // A second commit is refused with the failover's state.
      const again = await lifeboat(['failover', 'commit', '--run-dir', runDir]);
      expect(again.code).not.toBe(0);
      expect(again.stderr).toMatch(/LB_RECOVERY_FAILOVER_STATE/);
    } finally {
      stop.abort();
      const s = await started;
      expect(s.code).toBe(0);
    }
    expect(existsSync(join(runDir, 'm', 'web'))).toBe(false);
    expect(existsSync(join(dir, 'local', 'web-disk0.raw'))).toBe(true);
  }, 300_000);

  it('recovery-host start serves the latest point over NBD until stopped', async () => {
    const runDir = join(dir, 'run-rh');
    const stop = new AbortController();
    const served = lifeboat(
      [
        '--json',
        'recovery-host',
        'start',
        '--export',
        'latest',
        '--machine',
        'web',
        '--run-dir',
        runDir,
      ],
      stop.signal,
    );
    try {
      const deadline = Date.now() + 60_000;
      let socket: string | undefined;
      while (socket === undefined && Date.now() < deadline) {
        const names = existsSync(join(runDir, 'x')) ? await readdir(join(runDir, 'x')) : [];
        const found = names.find((n) => n.endsWith('.nbd.sock'));
        if (found) socket = join(runDir, 'x', found);
        else await new Promise((r) => setTimeout(r, 100));
      }
      const name = socket!.slice(join(runDir, 'x').length + 1, -'.nbd.sock'.length);
      const { stdout } = await run('qemu-img', [
        'info',
        '--output=json',
        `nbd+unix:///${name}?socket=${socket!}`,
      ]);
      expect((JSON.parse(stdout) as { 'virtual-size': number })['virtual-size']).toBe(
        (await stat(image.rootImage)).size,
      );
    } finally {
      stop.abort();
    }
    const r = await served;
    expect(r.code).toBe(0);
    const out = JSON.parse(r.stdout) as { exports: Array<{ machine: string; uri: string }> };
    expect(out.exports.map((e) => e.machine)).toEqual(['web']);
    expect(await readdir(join(runDir, 'x'))).toEqual([]);
  }, 120_000);

  it('cleanup stops the QEMU a crashed invocation left in its run directory and removes its overlays', async () => {
    const runDir = join(dir, 'run-crashed');
    const store = await Store.open({
      backend: new DirectoryBackend({ path: join(dir, 'store') }),
      passphrase: PASS,
    });
    // What a killed "failover start" leaves: a running QEMU, its overlay and sockets.
    const host = await RecoveryHost.start({ runDir, accel: 'tcg' });
    await writeFile(join(runDir, 'x', 'dead.nbd.sock'), ''); // a socket file nobody serves
    try {
      const [p] = await store.listPoints({ machine: 'web' });
      const b = await host.bootMachine(store, {
        name: 'web',
        disks: [{ pointId: p!.id }],
        boot: { kernel: image.kernel, append: testImageAppend() },
        memoryMiB: 256,
      });
      const pid = b.machine.pid!;
      while (!existsSync(join(runDir, 'm', 'web', 'qemu.pid')))
        await new Promise((r) => setTimeout(r, 50));
      const c = await lifeboat(['failover', 'cleanup', '--run-dir', runDir]);
      expect(c.code).toBe(0);
      expect(c.stdout).toContain(`removed machine web (QEMU pid ${pid})`);
      const deadline = Date.now() + 10_000;
      while (existsSync(`/proc/${pid}`) && Date.now() < deadline)
        await new Promise((r) => setTimeout(r, 50));
      expect(existsSync(`/proc/${pid}`)).toBe(false);
      expect(existsSync(join(runDir, 'm', 'web'))).toBe(false);
      expect(c.stdout).toContain('stale socket');
      expect(existsSync(join(runDir, 'x', 'dead.nbd.sock'))).toBe(false);
      // The live export of this (still running) host is left alone.
      expect(existsSync(b.exports[0]!.socketPath)).toBe(true);
    } finally {
      await host.close();
      await store.close();
    }
  }, 120_000);

  it('start refuses --hydrate-to without --commit, before touching anything', async () => {
    const r = await lifeboat([
      'failover',
      'start',
      '--machine',
      'web',
      '--hydrate-to',
      join(dir, 'x'),
    ]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/LB_CLI_BAD_OPTION/);
  });
});
