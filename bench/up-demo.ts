// Benchmark of the main job, `lifeboat up --demo`, as a user runs it (the built CLI in a child
// process, packages already built), in one run:
//   - seconds from its start to the vault's address, to the demo VM's writer running, to the
//     first committed recovery point, and to the first verified test failover;
//   - peak memory (VmHWM) of the `lifeboat up` process while the demo runs, sampled after the
//     demo has kept replicating for --settle seconds;
//   - the reference: the same test VM booted bare (startVm until the same marker), so the
//     ratio says what protecting and test-failing it adds to simply booting it.
//
//   npx tsx bench/up-demo.ts [--settle 60] [--via-demo-sh]
//
// With --via-demo-sh it runs `bash scripts/demo.sh` (the README's first command: install-deps.sh,
// that is package checks and `tsc -b`, then `exec lifeboat up --demo`) and times from its start.
import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { cpus, loadavg } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildTestImage, createRootOverlay, startVm, testImageAppend } from '@lifeboat/testing';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const args = process.argv.slice(2);
const SETTLE_S = Number(args[args.indexOf('--settle') + 1] ?? 60) || 60;
const VIA_DEMO_SH = args.includes('--via-demo-sh');

async function bareBoot(dir: string): Promise<{ seconds: number; accel: string }> {
  const t0 = performance.now();
  const image = await buildTestImage();
  const root = await createRootOverlay(image, join(dir, 'bare.qcow2'));
  const vm = await startVm({
    kernel: image.kernel,
    disks: [{ path: root }],
    append: testImageAppend({ hostname: 'bare', mark: 'LIFEBOAT-DEMO-MARK', writer: true }),
    memoryMiB: 256,
  });
  try {
    await vm.waitForConsole('LIFEBOAT-MARK-WRITTEN LIFEBOAT-DEMO-MARK', 300_000);
    return { seconds: (performance.now() - t0) / 1000, accel: vm.accel };
  } finally {
    await vm.stop();
  }
}

async function demo(dir: string): Promise<Record<string, number | string>> {
  const t0 = performance.now();
  // demo.sh ends with `exec`, so the child's pid is the `lifeboat up` process either way.
  const child = VIA_DEMO_SH
    ? spawn('bash', [join(ROOT, 'scripts/demo.sh'), '--data-dir', join(dir, 'data')], {
        stdio: ['ignore', 'pipe', 'pipe'],
      })
    : spawn(
        process.execPath,
        [
          join(ROOT, 'packages/cli/bin/lifeboat.js'),
          'up',
          '--demo',
          '--data-dir',
          join(dir, 'data'),
        ],
        { stdio: ['ignore', 'pipe', 'pipe'] },
      );
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const marks: Record<string, number | string> = {};
  const patterns: Array<[string, RegExp]> = [
    ['vault_s', /^vault: /m],
    ['writer_running_s', /its writer runs/],
    ['first_point_s', /first recovery point committed/],
    ['test_failover_verified_s', /test failover verified/],
  ];
  let out = '';
  child.stdout.on('data', (c: Buffer) => {
    out += c.toString();
    for (const [name, re] of patterns) {
      if (marks[name] === undefined && re.test(out)) marks[name] = (performance.now() - t0) / 1000;
    }
  });
  let err = '';
  child.stderr.on('data', (c: Buffer) => (err += c.toString()));
  try {
    const deadline = Date.now() + 900_000;
    while (marks['test_failover_verified_s'] === undefined) {
      if (child.exitCode !== null || Date.now() > deadline) {
        throw new Error(`lifeboat up --demo did not verify a test failover:\n${out}\n${err}`);
      }
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
    marks['accel'] = (/\((KVM|TCG)\)/.exec(out) ?? [])[1] ?? '?';
    await new Promise((resolve) => setTimeout(resolve, SETTLE_S * 1000));
    const status = await readFile(`/proc/${child.pid}/status`, 'utf8');
    const kib = (key: string): number => Number(new RegExp(`${key}:\\s+(\\d+)`).exec(status)?.[1]);
    marks['peak_rss_mib'] = Math.round(kib('VmHWM') / 1024);
    marks['rss_mib'] = Math.round(kib('VmRSS') / 1024);
    marks['points_shown'] = (out.match(/^rpo /gm) ?? []).length;
  } finally {
    child.kill('SIGTERM');
    await exited;
  }
  return marks;
}

await mkdir(join(ROOT, 'bench', 'out'), { recursive: true });
const dir = await mkdtemp(join(ROOT, 'bench', 'out', 'up-demo-'));
try {
  console.log(
    `machine: ${cpus().length} × ${cpus()[0]?.model ?? '?'}, load ${loadavg()[0]?.toFixed(1)}`,
  );
  const ref = await bareBoot(dir);
  console.log(
    `reference: bare boot of the test VM to its writer: ${ref.seconds.toFixed(1)} s (${ref.accel})`,
  );
  const m = await demo(dir);
  for (const [k, v] of Object.entries(m))
    console.log(`${k}: ${typeof v === 'number' ? v.toFixed(1) : v}`);
  const first = Number(m['first_point_s']);
  const tf = Number(m['test_failover_verified_s']);
  console.log(`ratio first point / bare boot: ${(first / ref.seconds).toFixed(2)}`);
  console.log(`ratio verified test failover / bare boot: ${(tf / ref.seconds).toFixed(2)}`);
} finally {
  await rm(dir, { recursive: true, force: true });
}
