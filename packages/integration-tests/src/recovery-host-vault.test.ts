import { EventEmitter } from 'node:events';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runCli } from '@lifeboat/cli';
import type { CliIo } from '@lifeboat/cli';
import { pngSize } from '@lifeboat/recovery';
import { testImageAppend, type TestImage } from '@lifeboat/testing';
import type { Vault } from '@lifeboat/vault';
import {
  api,
  markedRoot,
  qemuUnder,
  startRecoverySite,
  waitForJob,
  type RecoverySite,
  type SeededMachine,
} from './recovery-fixtures.js';

// `lifeboat recovery-host start --vault`: a recovery host registered with a one-time key takes
// the test failovers the vault queues (it polls; the vault never connects to it), boots the
// point from the store the vault hands it, verifies the boot, uploads the screenshot, cleans
// up; and its registration survives a restart, while the machines of a restarted host are lost
// visibly.

let site: RecoverySite;
let dir: string;
let image: TestImage;
let vault: Vault;
let admin: string;
let web: SeededMachine;

interface Host {
  stop(): Promise<number>;
  out: () => string;
  err: () => string;
}

function startHost(args: string[]): Host {
  let out = '';
  let err = '';
  const io: CliIo = {
    stdout: { write: (s: string) => (out += s) },
    stderr: { write: (s: string) => (err += s), isTTY: false },
    stdin: Object.assign(new EventEmitter(), { resume() {}, pause() {}, isTTY: false }),
    env: {},
    cwd: dir,
  };
  const controller = new AbortController();
  const done = runCli(['--json', 'recovery-host', 'start', ...args], {
    io,
    signal: controller.signal,
  });
  return {
    stop: async () => {
      controller.abort();
      return done;
    },
    out: () => out,
    err: () => err,
  };
}

const a = <T = Record<string, unknown>>(method: string, path: string, body?: unknown) =>
  api<T>(vault.url, admin, method, path, body);

async function waitHealthy(name: string): Promise<Record<string, unknown>> {
  const deadline = Date.now() + 60_000;
  for (;;) {
    const hosts = await a<{ items: Array<Record<string, unknown>> }>(
      'GET',
      '/api/recovery-hosts?limit=100',
    );
    const h = hosts.items.find((x) => x['name'] === name);
    if (h !== undefined && h['status'] === 'healthy') return h;
    if (Date.now() > deadline) throw new Error(`recovery host ${name} never became healthy`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

beforeAll(async () => {
  site = await startRecoverySite('lb-rhv-', 'recovery host vault test', {
    schedulerIntervalMs: 200,
  });
  ({ dir, image, vault, admin } = site);
  web = await site.seed.protect('web', await markedRoot(image, dir, 'BEFORE-THE-CUT'));
}, 240_000);
afterAll(async () => {
  expect(await site?.close()).toEqual([]);
});

describe('recovery host driven by the vault', () => {
  it('registers with a key, runs the test failover the vault queues with the screenshot in the vault, cleans up, and keeps its registration across a restart', async () => {
    const key = await a<{ key: string }>('POST', '/api/registration-keys', {
      kind: 'recovery-host',
    });
    await writeFile(join(dir, 'rh.key'), `${key.key}\n`, { mode: 0o600 });
    const runDir = join(dir, 'run');
    const hostArgs = [
      '--vault',
      vault.url,
      '--run-dir',
      runDir,
      '--name',
      'rh-test',
      '--kernel-dir',
      dirname(image.kernel),
      '--poll-ms',
      '300',
    ];
    let host = startHost([...hostArgs, '--registration-key-file', join(dir, 'rh.key')]);
    try {
      const registered = await waitHealthy('rh-test');
      const creds = join(runDir, 'identity.json');
      expect((await stat(creds)).mode & 0o777).toBe(0o600);
      const saved = JSON.parse(await readFile(creds, 'utf8')) as Record<string, string>;
      expect(saved['id']).toBe(registered['id']);
      expect(saved['cert']).toContain('BEGIN CERTIFICATE');
      expect(saved['token']).toMatch(/^lbc_/);

      const started = await a('POST', '/api/test-failovers', {
        protectedItemIds: [web.itemId],
        verify: {
          console: 'LIFEBOAT-BOOT-OK recovered BEFORE-THE-CUT',
          guestPort: 22,
          expect: 'LIFEBOAT-TCP-OK recovered',
        },
        boot: { kernel: image.kernel, append: testImageAppend({ hostname: 'recovered' }) },
      });
      expect(started['recoveryHostId']).toBe(registered['id']);
      const job = await waitForJob(vault.url, admin, String(started['jobId']));
      expect(job['state'], JSON.stringify(job['error'])).toBe('succeeded');
      const steps = (job['steps'] as Array<{ name: string; state: string }>).map((s) => s.name);
      const name = (started['machines'] as Array<{ name: string }>)[0]!.name;
      expect(steps).toEqual([
        'select points',
        `boot ${name}`,
        `console of ${name}`,
        `port 22 of ${name}`,
        `screenshot of ${name}`,
        `isolation of ${name}`,
      ]);
      const run = await a(`GET`, `/api/test-failovers/${String(started['id'])}`);
      expect(run['state']).toBe('running');
      const m = (run['machines'] as Array<Record<string, unknown>>)[0]!;
      expect(m['verification']).toMatchObject({
        console: 'LIFEBOAT-BOOT-OK recovered BEFORE-THE-CUT',
        port: { guestPort: 22, answer: expect.stringContaining('LIFEBOAT-TCP-OK recovered') },
        screenshot: { width: 720, height: 400 },
      });
      const urls = m['artifacts'] as { screenshot: string; console: string };
      const shot = await fetch(vault.url + urls.screenshot, {
        headers: { authorization: `Bearer ${admin}` },
      });
      expect(shot.headers.get('content-type')).toBe('image/png');
      expect(pngSize(Buffer.from(await shot.arrayBuffer()))).toEqual({ width: 720, height: 400 });
      const consoleLog = await fetch(vault.url + urls.console, {
        headers: { authorization: `Bearer ${admin}` },
      });
      expect(await consoleLog.text()).toContain('LIFEBOAT-BOOT-OK recovered BEFORE-THE-CUT');
      expect((await a(`GET`, `/api/protected-items/${web.itemId}`))['state']).toBe('protected');
      expect(await qemuUnder(runDir)).toHaveLength(1);

      const cleanup = await a('POST', `/api/test-failovers/${String(started['id'])}/cleanup`);
      const cjob = await waitForJob(vault.url, admin, String(cleanup['jobId']));
      expect(cjob['state']).toBe('succeeded');
      expect((await a(`GET`, `/api/test-failovers/${String(started['id'])}`))['state']).toBe(
        'cleaned-up',
      );
      expect(await qemuUnder(runDir)).toEqual([]);

      // A second test failover, left running when the recovery host restarts.
      const second = await a('POST', '/api/test-failovers', {
        protectedItemIds: [web.itemId],
        verify: { console: 'LIFEBOAT-BOOT-OK', screenshot: false },
        boot: { kernel: image.kernel, append: testImageAppend({ hostname: 'recovered' }) },
      });
      expect((await waitForJob(vault.url, admin, String(second['jobId'])))['state']).toBe(
        'succeeded',
      );
      expect(await host.stop()).toBe(0);
      expect(await qemuUnder(runDir)).toEqual([]);

      // No key this time: the registration in the run directory is reused.
      host = startHost(hostArgs);
      await waitHealthy('rh-test');
      const hosts = await a<{ items: Array<{ id: string }> }>('GET', '/api/recovery-hosts');
      expect(hosts.items.map((h) => h.id)).toEqual([registered['id']]);
      const deadline = Date.now() + 30_000;
      let lost: Record<string, unknown> = {};
      while (Date.now() < deadline) {
        lost = await a(`GET`, `/api/test-failovers/${String(second['id'])}`);
        if (lost['state'] === 'failed') break;
        await new Promise((r) => setTimeout(r, 200));
      }
      expect(lost['state']).toBe('failed');
      expect((lost['error'] as { code: string }).code).toBe('LB_VAULT_RECOVERY_RUN_LOST');
      const c2 = await a('POST', `/api/test-failovers/${String(second['id'])}/cleanup`);
      expect((await waitForJob(vault.url, admin, String(c2['jobId'])))['state']).toBe('succeeded');
    } finally {
      await host.stop();
    }
  }, 300_000);

  it('refuses a kernel outside the directories the recovery host allows, with a clear code', async () => {
    const runDir = join(dir, 'run');
    const host = startHost(['--vault', vault.url, '--run-dir', runDir, '--poll-ms', '300']);
    try {
      await waitHealthy('rh-test');
      const started = await a('POST', '/api/test-failovers', {
        protectedItemIds: [web.itemId],
        boot: { kernel: '/etc/passwd' },
      });
      const job = await waitForJob(vault.url, admin, String(started['jobId']));
      expect(job['state']).toBe('failed');
      expect((job['error'] as { code: string }).code).toBe('LB_RECOVERY_BOOT_FILE');
      const run = await a(`GET`, `/api/test-failovers/${String(started['id'])}`);
      expect(run['state']).toBe('failed');
    } finally {
      await host.stop();
    }
  }, 120_000);
});
