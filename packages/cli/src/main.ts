import { readFileSync } from 'node:fs';
import { Command, CommanderError } from 'commander';
import type { CliContext, CliIo } from './cli-context.js';
import { debugEnabled, processEnvironment } from './config.js';
import { ExitCode, exitCodeFor } from './exit-codes.js';
import type { ExitCodeValue } from './exit-codes.js';
import { reportError } from './report-error.js';

/** Adds one group of subcommands (`lifeboat store ...`, `lifeboat vault ...`) to the program. */
export type CommandGroup = (program: Command, ctx: CliContext) => void;

/** A top-level command and how to load the module that registers it. */
export interface CommandGroupEntry {
  /** The top-level command the group registers (`store`, `vault`, ...). */
  name: string;
  /** One line for `lifeboat --help`. */
  summary: string;
  /** Imports the group's module; only the group being run is loaded. */
  load: () => Promise<CommandGroup>;
}

// Every command group, one entry each. To add a group, write commands/<group>.ts exporting
// `register<Group>Commands(program, ctx)` (registering the top-level command `name`) and add
// an entry here. Groups load lazily: importing every role (fastify, pg, QEMU helpers, ...) on
// each run cost seconds of startup, even for `lifeboat store points`.
const COMMAND_GROUPS: readonly CommandGroupEntry[] = [
  {
    name: 'store',
    summary: 'the target store: import disk images, list, restore and check recovery points',
    load: async () => (await import('./commands/store.js')).registerStoreCommands,
  },
  {
    name: 'vault',
    summary: 'Run the vault (control plane) or use its API',
    load: async () => (await import('./commands/vault.js')).registerVaultCommands,
  },
  {
    name: 'process-server',
    summary:
      'The data gateway: receives agents’ change streams, journals them, commits recovery points',
    load: async () => (await import('./commands/process-server.js')).registerProcessServerCommands,
  },
  {
    name: 'recovery-host',
    summary: 'the recovery host: serve recovery points over NBD and boot them',
    load: async () => (await import('./commands/recovery.js')).registerRecoveryCommands,
  },
  {
    name: 'failover',
    summary: 'test failover and failover of protected machines',
    load: async () => (await import('./commands/failover.js')).registerFailoverCommands,
  },
  {
    name: 'up',
    summary: 'run all four roles in one process on embedded defaults (--demo: the guided tour)',
    load: async () => (await import('./commands/up.js')).registerUpCommands,
  },
  {
    name: 'agent',
    summary: 'The agent for QEMU/KVM: exact change tracking and a consistent cut every few seconds',
    load: async () => (await import('./commands/agent.js')).registerAgentCommands,
  },
];

/**
 * The top-level command an argument list runs (`help <name>` counts as `<name>`), skipping
 * the global options and their values.
 */
function selectedCommand(program: Command, args: readonly string[]): string | undefined {
  const takesValue = new Set(
    program.options.filter((o) => o.required || o.optional).flatMap((o) => [o.long, o.short]),
  );
  const operands: string[] = [];
  for (let i = 0; i < args.length && operands.length < 2; i++) {
    const arg = args[i] as string;
    if (arg === '--') break;
    if (arg.startsWith('-')) {
      if (takesValue.has(arg)) i++;
      continue;
    }
    operands.push(arg);
  }
  return operands[0] === 'help' ? operands[1] : operands[0];
}

function version(): string {
  try {
    const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as {
      version?: string;
    };
    return pkg.version ?? '0.0.0';
  } catch {
    return '0.0.0';
  }
}

/**
 * Builds the `lifeboat` program: global options, then the command groups. Only the group that
 * `args` runs is loaded and registered in full; the others appear in help by name and summary.
 * Without `args` every group is loaded.
 */
export async function buildProgram(ctx: CliContext, args?: readonly string[]): Promise<Command> {
  const { io } = ctx;
  const program = new Command('lifeboat')
    .description('Site recovery for virtual machines and Linux servers')
    .version(version(), '-V, --version')
    // Settings made before the groups are registered are inherited by every subcommand.
    .exitOverride()
    .configureOutput({
      writeOut: (s) => void io.stdout.write(s),
      writeErr: (s) => void io.stderr.write(s),
      // Usage errors are printed by runCli as `error LB_CLI_USAGE: ...`.
      outputError: () => undefined,
    })
    .showSuggestionAfterError(true)
    // `lifeboat store points --help` lists --store, --json, ... too.
    .configureHelp({ showGlobalOptions: true })
    // Environment fallbacks are applied by config.ts (the one module that reads them).
    .option(
      '--store <location>',
      'store: a directory or an Azure container URL (or LIFEBOAT_STORE)',
    )
    .option(
      '--azure-connection-string <string>',
      'Azure Storage connection string (or AZURE_STORAGE_CONNECTION_STRING)',
    )
    .option(
      '--passphrase-file <file>',
      'read the store passphrase from the first line of a file (or LIFEBOAT_PASSPHRASE)',
    )
    .option('--json', 'machine-readable output on stdout')
    .option('--progress', 'show progress on stderr even when it is not a terminal')
    .addHelpText(
      'after',
      `
Exit codes (stable, for scripts):
  ${ExitCode.ok}  done
  ${ExitCode.failure}  failed (the error's code and message are on stderr; with --json also on stdout)
  ${ExitCode.usage}  wrong command line: unknown option, missing argument, bad value
  ${ExitCode.integrityFault}  an integrity fault was found (store verify)

Examples:
  lifeboat up --demo
  lifeboat vault item list --state protected --json
  lifeboat failover test --machine web --console "login:"
`,
    );
  const selected = args === undefined ? undefined : selectedCommand(program, args);
  for (const group of COMMAND_GROUPS) {
    if (args === undefined || group.name === selected) {
      (await group.load())(program, ctx);
    } else {
      program.command(group.name).description(group.summary);
    }
  }
  return program;
}

/** Options of {@link runCli}. */
export interface RunCliOptions {
  /** Streams, environment and working directory. @default this process's */
  io?: CliIo;
  /** Aborts long work (Ctrl-C). */
  signal?: AbortSignal;
}

/** Runs `lifeboat <args>` and resolves with the exit code; never throws, never exits. */
export async function runCli(
  args: readonly string[],
  options: RunCliOptions = {},
): Promise<ExitCodeValue> {
  const io = options.io ?? {
    stdout: process.stdout,
    stderr: process.stderr,
    stdin: process.stdin,
    env: processEnvironment(),
    cwd: process.cwd(),
  };
  const ctx: CliContext = {
    io,
    exitCode: ExitCode.ok,
    cleanups: [],
    signal: options.signal ?? new AbortController().signal,
  };
  // Before config is validated we only know --json from the raw arguments.
  const json = args.includes('--json');
  const debug = debugEnabled(io);
  try {
    const program = await buildProgram(ctx, args);
    await program.parseAsync([...args], { from: 'user' });
    return ctx.exitCode;
  } catch (err) {
    if (err instanceof CommanderError) {
      if (err.exitCode === 0) return ExitCode.ok;
      const message = err.message.replace(/^error: /, '');
      io.stderr.write(`error LB_CLI_USAGE: ${message}\nRun "lifeboat --help" for usage.\n`);
      if (json) {
        io.stdout.write(
          `${JSON.stringify({ error: { code: 'LB_CLI_USAGE', message, details: { commander: err.code } } }, null, 2)}\n`,
        );
      }
      return ExitCode.usage;
    }
    reportError(err, io, { json, debug });
    return exitCodeFor(err);
  } finally {
    await runCleanups(ctx);
  }
}

/** Runs the invocation's cleanups newest first; a failing cleanup does not stop the others. */
export async function runCleanups(ctx: CliContext): Promise<void> {
  while (ctx.cleanups.length > 0) {
    const cleanup = ctx.cleanups.pop();
    try {
      await cleanup?.();
    } catch (err) {
      ctx.io.stderr.write(`warning: cleanup failed: ${(err as Error).message}\n`);
    }
  }
}

/** Entry point of bin/lifeboat.js: runs with this process's arguments and sets its exit code. */
export async function main(): Promise<void> {
  const controller = new AbortController();
  let interrupted = 0;
  const onSignal = (): void => {
    interrupted += 1;
    // The second Ctrl-C leaves at once; the first lets the command abort and clean up.
    if (interrupted > 1) process.exit(130);
    process.stderr.write('\ninterrupted, cleaning up (Ctrl-C again to quit at once)\n');
    controller.abort(new Error('interrupted'));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  // A reader that goes away (`lifeboat vault item list | head -1`) ends the command like
  // Ctrl-C instead of crashing it with an unhandled EPIPE and a stack trace.
  let stdoutClosed = false;
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code !== 'EPIPE') throw err;
    if (stdoutClosed) return;
    stdoutClosed = true;
    controller.abort(new Error('stdout closed'));
  });
  const code: ExitCodeValue | 130 = await runCli(process.argv.slice(2), {
    signal: controller.signal,
  });
  process.off('SIGINT', onSignal);
  process.off('SIGTERM', onSignal);
  process.exitCode = interrupted > 0 && code !== ExitCode.ok ? 130 : stdoutClosed ? 0 : code;
}
