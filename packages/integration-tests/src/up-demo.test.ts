import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { mkdir, readFile, readdir, mkdtemp, rm, stat, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

// The README's first command, as a user runs it: the built `lifeboat up --demo` in a child
// process, watched through its output, the vault's API and `lifeboat store points`; then
// SIGTERM, and nothing may be left running. Sized for TCG (CI may have no KVM).

const root = join(import.meta.dirname, '..', '..', '..');
const bin = join(root, 'packages', 'cli', 'bin', 'lifeboat.js');

interface Run {
  child: ChildProcess;
  out: () => string;
  err: () => string;
  exited: Promise<number | null>;
}

function run(args: string[]): Run {
  const child = spawn(process.execPath, [bin, ...args], {
    cwd: root,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout?.on('data', (c: Buffer) => (out += c.toString()));
  child.stderr?.on('data', (c: Buffer) => (err += c.toString()));
  const exited = new Promise<number | null>((resolve) =>
    child.once('exit', (code) => resolve(code)),
  );
  return { child, out: () => out, err: () => err, exited };
}

async function waitForOutput(
  r: Run,
  pattern: RegExp,
  timeoutMs: number,
): Promise<RegExpMatchArray> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const m = r.out().match(pattern);
    if (m) return m;
    if (r.child.exitCode !== null) {
      throw new Error(
        `lifeboat up exited (${r.child.exitCode}) before ${pattern}:\n${r.out()}\n${r.err()}`,
      );
    }
    if (Date.now() > deadline) {
      throw new Error(`no ${pattern} within ${timeoutMs} ms:\n${r.out()}\n${r.err()}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Processes whose command line mentions `text` (QEMU started for the demo, by its paths). */
async function processesMentioning(text: string): Promise<number[]> {
  const pids: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue;
    const cmdline = await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '');
    if (cmdline.includes(text)) pids.push(Number(name));
  }
  return pids;
}

describe('lifeboat up --demo', () => {
  let dir: string;
  let data: string;
  let up: Run | undefined;
  let qemuPid: number | undefined;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'lb-up-demo-'));
    data = join(dir, 'data');
  });
  // A test that failed midway leaves its `lifeboat up` running: stop it (cleanly if it can)
  // and whatever QEMU it started, so the next test does not meet it.
  afterEach(async () => {
    if (up !== undefined && up.child.exitCode === null && up.child.signalCode === null) {
      up.child.kill('SIGTERM');
      const t = setTimeout(() => up?.child.kill('SIGKILL'), 30_000);
      await up.exited;
      clearTimeout(t);
    }
    if (qemuPid !== undefined && alive(qemuPid)) process.kill(qemuPid, 'SIGKILL');
    for (const pid of await processesMentioning(data)) process.kill(pid, 'SIGKILL');
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('protects a writing VM through the vault, shows the RPO, verifies a test failover, and stops cleanly on SIGTERM', async () => {
    up = run(['up', '--demo', '--data-dir', data]);
    const u = up;
    qemuPid = Number((await waitForOutput(u, /QEMU pid (\d+)/, 300_000))[1]);
    const vaultUrl = (await waitForOutput(u, /vault: (http:\/\/\S+)/, 10_000))[1] ?? '';
    const token = (await waitForOutput(u, /admin token: (\S+)/, 10_000))[1] ?? '';
    // The store was created with a random passphrase only its owner can read.
    await waitForOutput(u, /created the store /, 10_000);
    expect((await stat(join(data, 'store-passphrase'))).mode & 0o777).toBe(0o600);
    const first = await waitForOutput(u, /first recovery point committed: ([0-9a-f]+)/, 360_000);
    const firstPoint = first[1] ?? '';
    await waitForOutput(u, /test failover verified/, 360_000);
    const text = u.out();

    // The RPO the user watched stayed under the policy's threshold.
    const rpos = [...text.matchAll(/rpo (\d+(?:\.\d+)?)s \(threshold (\d+)s\)/g)];
    expect(rpos.length).toBeGreaterThan(0);
    for (const m of rpos) expect(Number(m[1])).toBeLessThan(Number(m[2]));
    // The boot verification: the marker the source wrote, the guest's port, a screenshot.
    expect(text).toMatch(
      / {2}console of demo-vm-test: succeeded .*LIFEBOAT-BOOT-OK recovered LIFEBOAT-DEMO-MARK/,
    );
    expect(text).toMatch(/ {2}port 22 of demo-vm-test: succeeded .*LIFEBOAT-TCP-OK recovered/);
    const shot = (text.match(/demo-vm-test-screenshot: (\S+\.png)/) ?? [])[1] ?? '';
    expect((await readFile(shot)).subarray(1, 4).toString()).toBe('PNG');

    // The vault shows it: the item protected, the point in its catalogue, the job with steps.
    const api = async (path: string): Promise<Record<string, unknown>> => {
      const res = await fetch(`${vaultUrl}${path}`, {
        headers: { authorization: `Bearer ${token}` },
      });
      expect(res.status).toBe(200);
      return (await res.json()) as Record<string, unknown>;
    };
    const items = (await api('/api/protected-items')).items as Array<Record<string, unknown>>;
    expect(items.map((i) => i['state'])).toEqual(['protected']);
    const catalogue = (await api('/api/recovery-points?limit=1000')).items as Array<{ id: string }>;
    expect(catalogue.map((p) => p.id)).toContain(firstPoint);
    const jobs = (await api('/api/jobs?kind=test-failover')).items as Array<
      Record<string, unknown>
    >;
    const tf = jobs.find((j) => j['kind'] === 'test-failover');
    expect(tf?.['state']).toBe('succeeded');
    // Reported by the recovery host with its steps: points, boot, console, port, screenshot, isolation.
    const steps = tf?.['steps'] as Array<{ name: string; state: string }>;
    expect(steps.map((s) => s.name)).toEqual(
      expect.arrayContaining([
        'console of demo-vm-test',
        'port 22 of demo-vm-test',
        'screenshot of demo-vm-test',
      ]),
    );
    expect(steps.filter((s) => s.state !== 'done')).toEqual([]);

    // The store alone lists the point, as `lifeboat store points` shows it.
    const points = run([
      '--store',
      join(data, 'store'),
      '--passphrase-file',
      join(data, 'store-passphrase'),
      'store',
      'points',
      '--json',
    ]);
    expect(await points.exited).toBe(0);
    expect(points.out()).toContain(firstPoint);

    // SIGTERM: everything stops, nothing is left running.
    u.child.kill('SIGTERM');
    const code = await Promise.race([
      u.exited,
      new Promise<'timeout'>((resolve) => setTimeout(() => resolve('timeout'), 90_000)),
    ]);
    expect(code, u.err()).toBe(0);
    expect(u.out()).toMatch(/stopped\n$/);
    expect(alive(qemuPid)).toBe(false);
    expect(await processesMentioning(data)).toEqual([]);
  }, 600_000);

  it(
    'runs again on the same data directory: the machine stays protected, a new point of the new VM, and SIGTERM in the middle of the test failover leaves nothing running',
    // Once in five full runs (2026-11-26) the second demo VM printed nothing on its console for
    // 300 s under TCG, then passed on its own; it has not been reproduced since (see
    // docs/quickstart.md, "If the demo VM stays silent"). One retry keeps that guest hang from
    // failing CI; every assertion still has to hold on the attempt that passes, and a failed
    // attempt prints (and keeps in .test-results/up-demo/) what the guest and QEMU were doing.
    { timeout: 600_000, retry: 1 },
    async () => {
      try {
        await secondRun();
      } catch (err) {
        const text = `${new Date().toISOString()} second demo run failed:\n${(err as Error).stack ?? String(err)}\n`;
        const dirOut = join(root, '.test-results', 'up-demo');
        await mkdir(dirOut, { recursive: true });
        await writeFile(join(dirOut, `second-run-${Date.now()}.log`), text);
        console.error(text);
        throw err;
      }
    },
  );

  /** The second run's steps; its retry wrapper above reports a failed attempt. */
  async function secondRun(): Promise<void> {
    const started = Date.now();
    up = run(['up', '--demo', '--data-dir', data]);
    const u = up;
    qemuPid = Number((await waitForOutput(u, /QEMU pid (\d+)/, 300_000))[1]);
    await waitForOutput(u, /machine already protected by item \S+ \(protected\)/, 300_000);
    const first = await waitForOutput(
      u,
      /first recovery point committed: \S+ \(\S+, taken (\S+)\)/,
      300_000,
    );
    expect(Date.parse(first[1] ?? '')).toBeGreaterThanOrEqual(started);
    await waitForOutput(u, /== Test failover: booting/, 60_000);
    // Give the recovery host a moment to start booting, then interrupt.
    await new Promise((resolve) => setTimeout(resolve, 3000));
    u.child.kill('SIGTERM');
    const code = await Promise.race([
      u.exited,
      new Promise<'timeout'>((resolve) => setTimeout(() => resolve('timeout'), 120_000)),
    ]);
    expect(code).not.toBe('timeout');
    expect(alive(qemuPid)).toBe(false);
    expect(await processesMentioning(data)).toEqual([]);
  }

  it('refuses to start when the store exists but its passphrase file is gone, and leaves the store as it was', async () => {
    // Runs on the store the demo filled (or an empty one when the demo test was skipped).
    const storeDir = join(data, 'store');
    const before = (await readdir(storeDir, { recursive: true }).catch(() => [])).sort();
    await unlink(join(data, 'store-passphrase'));
    const r = run(['up', '--data-dir', data]);
    expect(await r.exited).toBe(1);
    expect(r.err()).toMatch(
      /error LB_UP_PASSPHRASE_MISSING: The store .* exists but its passphrase file .* is missing/,
    );
    expect((await readdir(storeDir, { recursive: true })).sort()).toEqual(before);
    await expect(readFile(join(data, 'store-passphrase'))).rejects.toThrow();
  }, 60_000);
});
