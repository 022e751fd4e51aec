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
import { resolveConfig, resolveVaultAccess } from '../config.js';
import type { GlobalCliOptions, VaultAccess } from '../config.js';
import {
  vaultChangePoint,
  vaultCleanup,
  vaultCommit,
  vaultListRuns,
  vaultShowRun,
  vaultStartFailover,
  vaultTestFailover,
  type VaultRunOptions,
} from './failover-vault.js';
import { openStore } from '../open-store.js';
import { intOption, recoveryRunDir, untilAborted } from './recovery.js';

interface MachineOpts extends VaultRunOptions {
  machine?: string;
  token?: string;
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
    .option('--machine <machine>', 'the protected machine (by name; in the vault: its name or id)')
    .option(
      '--vault <url>',
      'run it through this vault (a user token: --token or LIFEBOAT_VAULT_TOKEN); with --vault-token-file, run it here from the store and report its jobs to the vault',
    )
    .option('--token <token>', 'vault: a session or API token (or LIFEBOAT_VAULT_TOKEN)')
    .option(
      '--vault-token-file <file>',
      "store mode: the recovery host's component token to report jobs with",
    )
    .option('--item <id...>', 'vault: protected item ids instead of --machine')
    .option(
      '--recovery-host <id>',
      'vault: the recovery host (default: the vault picks a healthy one)',
    )
    .option('--address <a.b.c.d/n>', 'vault: a static address for the guest (cloud-init seed)')
    .option('--gateway <a.b.c.d>', 'vault: the default gateway with --address')
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

/** The vault to run a failover command through, or undefined for the store-only mode. */
function vaultOf(
  o: { vault?: string; token?: string; vaultTokenFile?: string },
  cmd: Command,
  ctx: CliContext,
): VaultAccess | undefined {
  // With a component token file the run happens here, from the store, reporting to the vault.
  if (o.vaultTokenFile !== undefined) return undefined;
  const globals = cmd.optsWithGlobals<GlobalCliOptions>();
  return resolveVaultAccess(
    {
      ...(o.vault !== undefined ? { vault: o.vault } : {}),
      ...(o.token !== undefined ? { token: o.token } : {}),
      ...(globals.store !== undefined ? { store: globals.store } : {}),
    },
    ctx.io,
  );
}

function requireMachine(o: MachineOpts): string {
  if (o.machine === undefined) {
    throw new LifeboatError(
      'LB_CLI_BAD_OPTION',
      "Give --machine <machine> (the store's machine id).",
      {
        details: { option: '--machine' },
      },
    );
  }
  return o.machine;
}

function machineName(o: MachineOpts): string {
  return (
    o.name ??
    requireMachine(o)
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
    machine: requireMachine(o),
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

interface FailoverRef {
  runDir?: string;
  failover?: string;
  vault?: string;
  token?: string;
}

function requireRunDir(runDir: string | undefined, vaultOption: string): string {
  if (runDir === undefined) {
    throw new LifeboatError(
      'LB_CLI_BAD_OPTION',
      `Give --run-dir <dir> (store mode) or ${vaultOption} (through the vault).`,
      { details: { option: '--run-dir' } },
    );
  }
  return runDir;
}

/** A run named by its vault id always goes through the vault (logged in, or --vault/--token). */
function vaultAccessFor(o: FailoverRef, ctx: CliContext): VaultAccess {
  const access = resolveVaultAccess(
    {
      ...(o.vault !== undefined ? { vault: o.vault } : {}),
      ...(o.token !== undefined ? { token: o.token } : {}),
      required: true,
    },
    ctx.io,
  );
  return access!;
}

/**
 * `lifeboat failover test|start|change-point|commit|cleanup`: through the vault's API when
 * logged in to a vault or given --vault (the vault picks the point and a recovery host), or
 * standalone from the store and its passphrase.
 */
export function registerFailoverCommands(program: Command, ctx: CliContext): void {
  const group = program
    .command('failover')
    .description('test failover and failover of protected machines');

  withMachineOptions(group.command('test'))
    .description(
      'boot a point in an isolated network, verify it, clean up (or keep it with --keep until Ctrl-C)',
    )
    .option('--console <regex>', 'console pattern that proves the boot')
    .option('--expect <regex>', "what the --port's answer must match (default: any data)")
    .option('--group <name>', 'vault: every machine of a consistency group')
    .option(
      '--network <kind>',
      'vault: isolated-user (each alone) or segment (the machines together)',
    )
    .option('--screenshot-out <file>', 'vault: save the boot screenshot (PNG) here')
    .option(
      '--keep',
      'keep the machines running (store mode: until Ctrl-C, then clean up; vault: until "failover cleanup --test-failover <id>")',
    )
    .addHelpText(
      'after',
      '\nExamples:\n  lifeboat failover test --vault https://vault:9440 --machine web --console "login:" --port 22 --screenshot-out web.png\n  lifeboat --store /srv/store failover test --machine web --kernel vmlinuz --append "console=ttyS0 root=/dev/nvme0n1" --console LIFEBOAT-READY --port 22',
    )
    .action(async (o: MachineOpts & { console?: string; keep?: boolean }, cmd: Command) => {
      const config = resolveConfig(cmd.optsWithGlobals<GlobalCliOptions>(), ctx.io);
      const access = vaultOf(o, cmd, ctx);
      if (access !== undefined) {
        await vaultTestFailover(ctx, access, o, config.json);
        return;
      }
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
    .option('--commit', 'store mode: commit the failover once the machine runs')
    .option(
      '--planned',
      'vault: replicate a last cycle and stop the source first (through its process server), so nothing is lost',
    )
    .option(
      '--hydrate-to <dir>',
      'after commit, copy the disks into local qcow2 files here and switch to them',
    )
    .addHelpText(
      'after',
      '\nExamples:\n  lifeboat failover start --vault https://vault:9440 --machine web --planned\n  lifeboat --store /srv/store failover start --machine web --kernel vmlinuz --append "console=ttyS0 root=/dev/vda" --commit --hydrate-to /var/lib/vms/web\n',
    )
    .action(async (o: MachineOpts & { commit?: boolean; hydrateTo?: string }, cmd: Command) => {
      const config = resolveConfig(cmd.optsWithGlobals<GlobalCliOptions>(), ctx.io);
      const access = vaultOf(o, cmd, ctx);
      if (access !== undefined) {
        await vaultStartFailover(ctx, access, o, config.json);
        return;
      }
      if (o.planned) {
        throw new LifeboatError(
          'LB_CLI_BAD_OPTION',
          '--planned needs the vault (it reaches the source through its process server): give --vault or log in.',
          { details: { option: '--planned' } },
        );
      }
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
    .option('--run-dir <dir>', 'store mode: the run directory of "failover start"')
    .option('--failover <id>', 'vault: the failover (from "failover start")')
    .option(
      '--point <id...>',
      'point ids, one per disk in boot order (vault: one point id; its cut gives the other disks)',
    )
    .option('--latest-app', 'vault: the latest app-consistent point')
    .option('--at <time>', 'vault: the latest point at or before this ISO time')
    .option('--vault <url>', 'the vault (or LIFEBOAT_VAULT_URL)')
    .option('--token <token>', 'a session or API token (or LIFEBOAT_VAULT_TOKEN)')
    .addHelpText(
      'after',
      '\nExamples:\n  lifeboat failover change-point --failover fo_... --latest-app\n  lifeboat failover change-point --run-dir /tmp/lifeboat-fo --point 3f2a9c\n',
    )
    .action(
      async (
        o: FailoverRef & { point?: string[]; latestApp?: boolean; at?: string },
        cmd: Command,
      ) => {
        const config = resolveConfig(cmd.optsWithGlobals<GlobalCliOptions>(), ctx.io);
        const out = new CliPrinter(ctx.io, config.json);
        const access = o.failover !== undefined ? vaultAccessFor(o, ctx) : undefined;
        if (access !== undefined) {
          await vaultChangePoint(ctx, access, o.failover!, o, config.json);
          return;
        }
        const runDir = requireRunDir(o.runDir, '--failover <id>');
        if (o.point === undefined) {
          throw new LifeboatError('LB_CLI_BAD_OPTION', 'Give --point <id...>, one per disk.', {
            details: { option: '--point' },
          });
        }
        const reply = await failoverControlRequest(
          join(resolve(ctx.io.cwd, runDir), 'control.sock'),
          {
            op: 'change-point',
            pointIds: o.point,
          },
        );
        report(out, reply);
      },
    );

  group
    .command('commit')
    .description(
      'make a running failover final; with --hydrate-to, then move its disks to local files while it runs',
    )
    .option('--run-dir <dir>', 'store mode: the run directory of "failover start"')
    .option('--failover <id>', 'vault: the failover (from "failover start")')
    .option(
      '--hydrate-to <dir>',
      'store mode: copy the disks into local files here and switch the machine to them',
    )
    .option(
      '--no-hydrate',
      'vault: commit only (the vault hydrates into the recovery host by default)',
    )
    .option('--vault <url>', 'the vault (or LIFEBOAT_VAULT_URL)')
    .option('--token <token>', 'a session or API token (or LIFEBOAT_VAULT_TOKEN)')
    .option('--raw', 'hydrate into raw files instead of qcow2')
    .option(
      '--verify',
      "pause the guest briefly to compare each copy with the point plus the guest's writes",
    )
    .addHelpText(
      'after',
      '\nExamples:\n  lifeboat failover commit --failover fo_...\n  lifeboat failover commit --run-dir /tmp/lifeboat-fo --hydrate-to /var/lib/vms/web\n',
    )
    .action(
      async (
        o: FailoverRef & { hydrateTo?: string; raw?: boolean; verify?: boolean; hydrate: boolean },
        cmd: Command,
      ) => {
        const config = resolveConfig(cmd.optsWithGlobals<GlobalCliOptions>(), ctx.io);
        const out = new CliPrinter(ctx.io, config.json);
        const access = o.failover !== undefined ? vaultAccessFor(o, ctx) : undefined;
        if (access !== undefined) {
          await vaultCommit(ctx, access, o.failover!, o, config.json);
          return;
        }
        const socket = join(
          resolve(ctx.io.cwd, requireRunDir(o.runDir, '--failover <id>')),
          'control.sock',
        );
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
    .description(
      'vault: clean up a test failover (--test-failover <id>); store mode: stop machines and remove overlays a recovery host left in its run directory',
    )
    .option('--run-dir <dir>', 'store mode: the recovery host run directory')
    .option('--test-failover <id>', 'vault: the test failover to clean up')
    .option('--vault <url>', 'the vault (or LIFEBOAT_VAULT_URL)')
    .option('--token <token>', 'a session or API token (or LIFEBOAT_VAULT_TOKEN)')
    .addHelpText(
      'after',
      '\nExamples:\n  lifeboat failover cleanup --test-failover tf_...\n  lifeboat failover cleanup --run-dir /var/lib/lifeboat/recovery\n',
    )
    .action(async (o: FailoverRef & { testFailover?: string }, cmd: Command) => {
      const config = resolveConfig(cmd.optsWithGlobals<GlobalCliOptions>(), ctx.io);
      const out = new CliPrinter(ctx.io, config.json);
      const access = o.testFailover !== undefined ? vaultAccessFor(o, ctx) : undefined;
      if (access !== undefined) {
        await vaultCleanup(ctx, access, o.testFailover!, config.json);
        return;
      }
      const runDir = resolve(ctx.io.cwd, requireRunDir(o.runDir, '--test-failover <id>'));
      const removed = await cleanupRunDir(runDir);
      out.json({ removed });
      for (const r of removed) out.line(`removed ${r}`);
      if (removed.length === 0) out.line(`nothing to remove in ${runDir}`);
    });

  group
    .command('list')
    .description('vault: the failovers (or with --test the test failovers), newest first')
    .option('--test', 'list test failovers instead')
    .option('--state <state>', 'only in this state')
    .option('--protected-item-id <id>', 'only of this protected item')
    .option('--recovery-host-id <id>', 'only on this recovery host')
    .option('--limit <n>', 'rows per page (1-1000)', '100')
    .option('--all', 'fetch every page')
    .option('--vault <url>', 'the vault (or LIFEBOAT_VAULT_URL)')
    .option('--token <token>', 'a session or API token (or LIFEBOAT_VAULT_TOKEN)')
    .addHelpText('after', '\nExample:\n  lifeboat failover list --test --state running\n')
    .action(
      async (
        o: FailoverRef & {
          test?: boolean;
          state?: string;
          protectedItemId?: string;
          recoveryHostId?: string;
          limit: string;
          all?: boolean;
        },
        cmd: Command,
      ) => {
        const config = resolveConfig(cmd.optsWithGlobals<GlobalCliOptions>(), ctx.io);
        await vaultListRuns(ctx, vaultAccessFor(o, ctx), o, config.json);
      },
    );

  group
    .command('show <id>')
    .description('vault: one failover (fo_...) or test failover (tf_...), its machines and points')
    .option('--vault <url>', 'the vault (or LIFEBOAT_VAULT_URL)')
    .option('--token <token>', 'a session or API token (or LIFEBOAT_VAULT_TOKEN)')
    .addHelpText('after', '\nExample:\n  lifeboat failover show tf_... --json\n')
    .action(async (id: string, o: FailoverRef, cmd: Command) => {
      const config = resolveConfig(cmd.optsWithGlobals<GlobalCliOptions>(), ctx.io);
      await vaultShowRun(ctx, vaultAccessFor(o, ctx), id, config.json);
    });
}
