import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import { LifeboatError } from '@lifeboat/protocol';
import { RecoveryHost, exportUri } from '@lifeboat/recovery';
import type { CliContext } from '../cli-context.js';
import { CliPrinter } from '../cli-printer.js';
import { resolveConfig } from '../config.js';
import type { GlobalCliOptions } from '../config.js';
import { openStore } from '../open-store.js';
import { resolvePoint } from '../point-ref.js';

/** A private run directory for the recovery host: the one given, or a new temporary one. */
export async function recoveryRunDir(given: string | undefined, cwd: string): Promise<string> {
  return given !== undefined ? resolve(cwd, given) : mkdtemp(join(tmpdir(), 'lb-rh-'));
}

/** Parses a positive integer option. */
export function intOption(name: string, value: string): number {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n <= 0) {
    throw new LifeboatError('LB_CLI_BAD_OPTION', `${name} ${value}: give a positive integer.`, {
      details: { option: name, value },
    });
  }
  return n;
}

/** Resolves when the invocation is aborted (Ctrl-C, SIGTERM). */
export function untilAborted(signal: AbortSignal): Promise<void> {
  return new Promise((r) =>
    signal.aborted ? r() : signal.addEventListener('abort', () => r(), { once: true }),
  );
}

/** `lifeboat recovery-host start`: serves recovery points over NBD from the store alone. */
export function registerRecoveryCommands(program: Command, ctx: CliContext): void {
  const group = program
    .command('recovery-host')
    .description('the recovery host: serve recovery points over NBD and boot them');
  group
    .command('start')
    .description(
      'serve points read-only over NBD on UNIX sockets until Ctrl-C (store and passphrase only, no vault)',
    )
    .option('--export <point...>', 'point ids (or "latest" with --machine) to serve')
    .option('--machine <machine>', 'machine for "latest"')
    .option('--run-dir <dir>', 'private directory for sockets (default: a new temporary one)')
    .option('--cache-mib <n>', 'chunk cache per export in MiB', '64')
    .addHelpText(
      'after',
      '\nExample:\n  lifeboat --store /srv/store recovery-host start --export latest --machine web\n  qemu-img info "nbd+unix:///web-d0?socket=..."',
    )
    .action(
      async (
        opts: { export?: string[]; machine?: string; runDir?: string; cacheMib: string },
        cmd: Command,
      ) => {
        const config = resolveConfig(cmd.optsWithGlobals<GlobalCliOptions>(), ctx.io);
        const out = new CliPrinter(ctx.io, config.json);
        const store = await openStore(config, ctx);
        const host = await RecoveryHost.start({
          runDir: await recoveryRunDir(opts.runDir, ctx.io.cwd),
          cacheBytes: intOption('--cache-mib', opts.cacheMib) * 1024 * 1024,
        });
        ctx.cleanups.push(() => host.close());
        const served: Array<{ point: string; machine: string; disk: string; uri: string }> = [];
        for (const ref of opts.export ?? []) {
          const p = await resolvePoint(
            store,
            ref,
            opts.machine !== undefined ? { machine: opts.machine } : {},
          );
          const e = await host.exportPoint(store, p.id);
          served.push({ point: p.id, machine: p.machine, disk: p.disk, uri: exportUri(e) });
        }
        out.json({ runDir: host.options.runDir, accelerator: host.accel, exports: served });
        out.line(`recovery host running in ${host.options.runDir} (accelerator ${host.accel})`);
        out.table(
          ['POINT', 'MACHINE', 'DISK', 'NBD URI'],
          served.map((s) => [s.point.slice(0, 12), s.machine, s.disk, s.uri]),
        );
        out.note('serving until Ctrl-C');
        await untilAborted(ctx.signal);
      },
    );
}
