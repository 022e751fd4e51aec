import { readFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import { LifeboatError } from '@lifeboat/protocol';
import {
  Failover,
  RecoveryHost,
  cleanupRunDir,
  failoverControlRequest,
  recordedMachineConfig,
  vaultJobReporter,
  runTestFailover,
  selectPoints,
  serveFailoverControl,
} from '@lifeboat/recovery';
import type {
  VaultJobReporter,
  FailoverControlReply,
  MachineBoot,
  PointSelector,
  RecoveryJobRecord,
} from '@lifeboat/recovery';
import type { PointInfo } from '@lifeboat/store';
import type { CliContext } from '../cli-context.js';
import { CliPrinter } from '../cli-printer.js';
import { resolveConfig } from '../config.js';
import type { GlobalCliOptions } from '../config.js';
import { openStore } from '../open-store.js';
import { intOption, recoveryRunDir, untilAborted } from './recovery.js';

interface MachineOpts {
  machine: string;
  point?: string;
  latestApp?: boolean;
  at?: string;
  kernel?: string;
  append?: string;
  uefi?: boolean;
  cpus?: string;
  memoryMib?: string;
  port?: string;
  runDir?: string;
  name?: string;
  vault?: string;
  vaultTokenFile?: string;
}

function withMachineOptions(cmd: Command): Command {
  return cmd
    .requiredOption('--machine <machine>', 'the protected machine')
    .option('--vault <url>', 'report the jobs to this vault (with --vault-token-file)')
    .option('--vault-token-file <file>', "the recovery host's component token (from registration)")
    .option('--point <id>', 'a point id (default: the latest)')
    .option('--latest-app', 'the latest app-consistent point')
    .option('--at <time>', 'the latest point at or before this ISO time')
    .option('--kernel <file>', 'boot this kernel directly (otherwise firmware boots the disk)')
    .option('--append <cmdline>', 'kernel command line with --kernel')
    .option('--uefi', 'boot with UEFI firmware (OVMF) instead of BIOS')
    .option('--cpus <n>', "virtual CPUs (default: the point's machine.cpus label, else 1)")
    .option(
      '--memory-mib <n>',
      "memory in MiB (default: the point's machine.memory-mib label, else 512)",
    )
    .option('--port <n>', 'guest TCP port forwarded from 127.0.0.1 (and verified by test)')
    .option('--name <name>', 'name of the recovered machine (default: the machine)')
    .option(
      '--run-dir <dir>',
      'private directory for overlays, sockets, jobs (default: a new temporary one)',
    );
}

function machineName(o: MachineOpts): string {
  return (
    o.name ??
    o.machine
      .toLowerCase()
      .replace(/[^a-z0-9-]/g, '-')
      .slice(0, 24)
  );
}

function selector(o: MachineOpts): PointSelector {
  if (o.point !== undefined) return { pointId: o.point };
  let at: Date | undefined;
  if (o.at !== undefined) {
    at = new Date(o.at);
    if (Number.isNaN(at.getTime())) {
      throw new LifeboatError(
        'LB_CLI_BAD_OPTION',
        `--at ${o.at}: give an ISO time like 2026-11-25T10:00:00Z.`,
        {
          details: { option: '--at', value: o.at },
        },
      );
    }
  }
  return {
    machine: o.machine,
    ...(o.latestApp ? { pick: 'latest-app' as const } : {}),
    ...(at ? { at } : {}),
  };
}

/** Starts the recovery host, reporting its jobs to the vault when --vault is given. */
async function startHost(o: MachineOpts, ctx: CliContext): Promise<RecoveryHost> {
  if ((o.vault === undefined) !== (o.vaultTokenFile === undefined)) {
    throw new LifeboatError('LB_CLI_BAD_OPTION', '--vault and --vault-token-file go together.', {
      details: { option: '--vault' },
    });
  }
  let reporter: VaultJobReporter | undefined;
  if (o.vault !== undefined && o.vaultTokenFile !== undefined) {
    const token = (await readFile(resolve(ctx.io.cwd, o.vaultTokenFile), 'utf8'))
      .split('\n')[0]!
      .trim();
    reporter = vaultJobReporter({
      url: o.vault,
      token,
      // The recovery site goes on without the vault; say so once per failed report.
      onError: (err, job) =>
        void ctx.io.stderr.write(
          `warning: job ${job.id} not reported to the vault: ${err instanceof Error ? err.message : String(err)}\n`,
        ),
    });
  }
  const host = await RecoveryHost.start({
    runDir: await recoveryRunDir(o.runDir, ctx.io.cwd),
    ...(reporter ? { onJob: reporter.listener } : {}),
  });
  // Cleanups run newest first: the host stops (its last jobs end), then the reports are sent.
  if (reporter) {
    const r = reporter;
    ctx.cleanups.push(() => r.flush());
  }
  ctx.cleanups.push(() => host.close());
  return host;
}

/** CPUs, memory, firmware and disk bus: the command line's, else the point's recorded ones. */
function hardware(
  o: MachineOpts,
  points: readonly PointInfo[],
): {
  boot: MachineBoot;
  cpus: number;
  memoryMiB: number;
  diskBus?: 'nvme' | 'virtio';
} {
  const rec = points[0] ? recordedMachineConfig(points[0]) : {};
  const boot: MachineBoot =
    o.kernel !== undefined
      ? { kernel: resolve(o.kernel), ...(o.append !== undefined ? { append: o.append } : {}) }
      : { firmware: o.uefi ? 'uefi' : (rec.firmware ?? 'bios') };
  return {
    boot,
    cpus: o.cpus !== undefined ? intOption('--cpus', o.cpus) : (rec.cpus ?? 1),
    memoryMiB:
      o.memoryMib !== undefined ? intOption('--memory-mib', o.memoryMib) : (rec.memoryMiB ?? 512),
    ...(rec.diskBus !== undefined ? { diskBus: rec.diskBus } : {}),
  };
}

function printJob(out: CliPrinter, job: RecoveryJobRecord): void {
  out.line(
    `job ${job.id} (${job.kind}): ${job.state}${job.durationMs !== undefined ? ` in ${job.durationMs} ms` : ''}`,
  );
  out.table(
    ['STEP', 'STATE', 'MS', 'DETAIL'],
    job.steps.map((s) => [
      s.name,
      s.state,
      String(s.durationMs ?? ''),
      s.error
        ? `${s.error.code}: ${s.error.message}`
        : JSON.stringify(s.detail ?? {}).slice(0, 100),
    ]),
  );
  for (const [name, path] of Object.entries(job.artifacts)) out.line(`${name}: ${path}`);
}

function report(out: CliPrinter, reply: FailoverControlReply): void {
  if (reply.job) printJob(out, reply.job);
  out.json(reply);
  if (!reply.ok) {
    throw new LifeboatError(
      reply.error?.code ?? 'LB_RECOVERY_CONTROL',
      reply.error?.message ?? 'The failover refused.',
    );
  }
  out.line(
    `failover ${reply.state ?? '?'}; points ${(reply.pointIds ?? []).join(', ')}${reply.localDisks?.length ? `; local disks ${reply.localDisks.join(', ')}` : ''}`,
  );
}

/** `lifeboat failover test|start|change-point|commit|cleanup`: standalone, from the store and its passphrase. */
export function registerFailoverCommands(program: Command, ctx: CliContext): void {
  const group = program
    .command('failover')
    .description('test failover and failover of protected machines');

  withMachineOptions(group.command('test'))
    .description(
      'boot a point in an isolated network, verify it, clean up (or keep it with --keep until Ctrl-C)',
    )
    .option('--console <regex>', 'console pattern that proves the boot')
    .option('--keep', 'keep the machine running until Ctrl-C, then clean up')
    .addHelpText(
      'after',
      '\nExample:\n  lifeboat --store /srv/store failover test --machine web --kernel vmlinuz --append "console=ttyS0 root=/dev/nvme0n1" --console LIFEBOAT-READY --port 22',
    )
    .action(async (o: MachineOpts & { console?: string; keep?: boolean }, cmd: Command) => {
      const config = resolveConfig(cmd.optsWithGlobals<GlobalCliOptions>(), ctx.io);
      const out = new CliPrinter(ctx.io, config.json);
      const store = await openStore(config, ctx);
      const host = await startHost(o, ctx);
      const port = o.port !== undefined ? intOption('--port', o.port) : undefined;
      const points = await selectPoints(store, selector(o));
      const tf = await runTestFailover(host, store, {
        machines: [
          {
            name: machineName(o),
            points: { pointIds: points.map((p) => p.id) },
            ...hardware(o, points),
          },
        ],
        verify: {
          ...(o.console !== undefined ? { console: new RegExp(o.console) } : {}),
          ...(port !== undefined ? { port: { guestPort: port } } : {}),
          screenshot: true,
        },
      });
      printJob(out, tf.job);
      if (o.keep) {
        for (const b of tf.machines) {
          out.line(
            `${b.machine.name}: console ${b.machine.consolePath}; ports ${[...b.machine.ports].map(([g, h]) => `${g}->127.0.0.1:${h}`).join(', ')}`,
          );
        }
        out.note('running until Ctrl-C');
        await untilAborted(ctx.signal);
      }
      const cleanup = await tf.cleanup();
      printJob(out, cleanup);
      out.json({ job: tf.job, cleanup });
    });

  withMachineOptions(group.command('start'))
    .description(
      'fail over from a point (unplanned); with --commit and --hydrate-to, make it final and move the disks to local files while it runs; runs until Ctrl-C',
    )
    .option('--commit', 'commit the failover once the machine runs')
    .option(
      '--hydrate-to <dir>',
      'after commit, copy the disks into local qcow2 files here and switch to them',
    )
    .action(async (o: MachineOpts & { commit?: boolean; hydrateTo?: string }, cmd: Command) => {
      const config = resolveConfig(cmd.optsWithGlobals<GlobalCliOptions>(), ctx.io);
      const out = new CliPrinter(ctx.io, config.json);
      if (o.hydrateTo !== undefined && !o.commit) {
        throw new LifeboatError(
          'LB_CLI_BAD_OPTION',
          '--hydrate-to needs --commit: only a committed failover is hydrated.',
        );
      }
      const store = await openStore(config, ctx);
      const host = await startHost(o, ctx);
      const points = await selectPoints(store, selector(o));
      const port = o.port !== undefined ? intOption('--port', o.port) : undefined;
      const f = await Failover.start(host, store, {
        name: machineName(o),
        pointIds: points.map((p) => p.id),
        ...hardware(o, points),
        nics: [{ kind: 'isolated-user', ...(port !== undefined ? { forwardPorts: [port] } : {}) }],
      });
      if (o.commit) await f.commit();
      if (o.hydrateTo !== undefined) await f.hydrate({ dir: resolve(ctx.io.cwd, o.hydrateTo) });
      // Later invocations (failover commit, failover change-point) reach it here.
      const control = join(host.options.runDir, 'control.sock');
      const server = await serveFailoverControl(f, control);
      ctx.cleanups.push(() => new Promise<void>((r) => server.close(() => r())));
      for (const j of f.jobs) printJob(out, j);
      out.json({
        jobs: f.jobs,
        state: f.state,
        localDisks: f.localDisks,
        runDir: host.options.runDir,
      });
      out.note(
        `machine ${f.machine.name} runs (console ${f.machine.consolePath}); "lifeboat failover commit --run-dir ${host.options.runDir}" commits it; Ctrl-C stops it`,
      );
      await untilAborted(ctx.signal);
      printJob(out, await f.cleanup());
    });

  group
    .command('change-point')
    .description('boot other points in a failover that runs (before commit; the guest restarts)')
    .requiredOption('--run-dir <dir>', 'the run directory of "failover start"')
    .requiredOption('--point <id...>', 'point ids, one per disk in boot order')
    .action(async (o: { runDir: string; point: string[] }, cmd: Command) => {
      const config = resolveConfig(cmd.optsWithGlobals<GlobalCliOptions>(), ctx.io);
      const out = new CliPrinter(ctx.io, config.json);
      const reply = await failoverControlRequest(
        join(resolve(ctx.io.cwd, o.runDir), 'control.sock'),
        {
          op: 'change-point',
          pointIds: o.point,
        },
      );
      report(out, reply);
    });

  group
    .command('commit')
    .description(
      'make a running failover final; with --hydrate-to, then move its disks to local files while it runs',
    )
    .requiredOption('--run-dir <dir>', 'the run directory of "failover start"')
    .option(
      '--hydrate-to <dir>',
      'copy the disks into local files here and switch the machine to them',
    )
    .option('--raw', 'hydrate into raw files instead of qcow2')
    .option(
      '--verify',
      "pause the guest briefly to compare each copy with the point plus the guest's writes",
    )
    .action(
      async (
        o: { runDir: string; hydrateTo?: string; raw?: boolean; verify?: boolean },
        cmd: Command,
      ) => {
        const config = resolveConfig(cmd.optsWithGlobals<GlobalCliOptions>(), ctx.io);
        const out = new CliPrinter(ctx.io, config.json);
        const socket = join(resolve(ctx.io.cwd, o.runDir), 'control.sock');
        const replies = [await failoverControlRequest(socket, { op: 'commit' })];
        if (replies[0]!.ok && o.hydrateTo !== undefined) {
          replies.push(
            await failoverControlRequest(socket, {
              op: 'hydrate',
              dir: resolve(ctx.io.cwd, o.hydrateTo),
              format: o.raw ? 'raw' : 'qcow2',
              ...(o.verify ? { verify: true } : {}),
            }),
          );
        }
        for (const r of replies) report(out, r);
      },
    );

  group
    .command('cleanup')
    .description('stop machines and remove overlays a recovery host left in its run directory')
    .requiredOption('--run-dir <dir>', 'the recovery host run directory')
    .action(async (o: { runDir: string }, cmd: Command) => {
      const config = resolveConfig(cmd.optsWithGlobals<GlobalCliOptions>(), ctx.io);
      const out = new CliPrinter(ctx.io, config.json);
      const runDir = resolve(ctx.io.cwd, o.runDir);
      const removed = await cleanupRunDir(runDir);
      out.json({ removed });
      for (const r of removed) out.line(`removed ${r}`);
      if (removed.length === 0) out.line(`nothing to remove in ${runDir}`);
    });
}
