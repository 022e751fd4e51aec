import { mkdtemp, readFile } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { Command } from 'commander';
import { LifeboatError, VaultClient } from '@lifeboat/protocol';
import {
  RecoveryHost,
  RecoveryHostLink,
  cleanupRunDir,
  componentClient,
  keepRecoveryHostCertificate,
  exportUri,
  parseNetworkOptions,
  recoveryHostCredentials,
} from '@lifeboat/recovery';
import { openAssignedStore } from '../open-assigned-store.js';
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
      'with --vault: register with a one-time key, heartbeat and run the test failovers and failovers the vault queues; without: serve points over NBD from the store alone',
    )
    .option('--vault <url>', 'the vault to register with and take work from')
    .option(
      '--registration-key-file <file>',
      'one-time key from "lifeboat vault key create --kind recovery-host" (first start only)',
    )
    .option(
      '--vault-ca <file>',
      "with an HTTPS vault: the vault's CA certificate (PEM), as for a process server",
    )
    .option('--name <name>', 'component name at registration (default: this host name)')
    .option(
      '--kernel-dir <dir...>',
      'directories whose kernel files the vault may ask to boot directly (disks without a boot loader)',
    )
    .option(
      '--default-kernel <file>',
      'boot this kernel when neither the vault nor a point says how',
    )
    .option('--default-append <cmdline>', 'kernel command line with --default-kernel')
    .option('--hydrate-dir <dir>', "committed failovers' local disks (default: <run-dir>/disks)")
    .option('--poll-ms <n>', 'how often to heartbeat and read the assignments', '2000')
    .option('--export <point...>', 'point ids (or "latest" with --machine) to serve')
    .option('--machine <machine>', 'machine for "latest"')
    .option(
      '--run-dir <dir>',
      'private directory for sockets, machines, jobs (and with --vault the credentials: required)',
    )
    .option('--cache-mib <n>', 'chunk cache per export in MiB', '64')
    .option(
      '--network <name=bridge:br>',
      "a recovery-site network (repeatable): network mappings' target or test network NAME is the host's Linux bridge BR (needs root)",
      (v: string, all: string[]) => [...all, v],
      [] as string[],
    )
    .addHelpText(
      'after',
      '\nExamples:\n  lifeboat recovery-host start --vault https://vault:9440 --registration-key-file rh.key --run-dir /var/lib/lifeboat/rh --network dr-lan=bridge:br0\n  lifeboat --store /srv/store recovery-host start --export latest --machine web\n  qemu-img info "nbd+unix:///web-d0?socket=..."',
    )
    .action(async (opts: RecoveryHostStartOptions, cmd: Command) => {
      if (opts.vault !== undefined) {
        await startWithVault(opts, cmd, ctx);
        return;
      }
      const config = resolveConfig(cmd.optsWithGlobals<GlobalCliOptions>(), ctx.io);
      const out = new CliPrinter(ctx.io, config.json);
      const store = await openStore(config, ctx);
      const host = await RecoveryHost.start({
        runDir: await recoveryRunDir(opts.runDir, ctx.io.cwd),
        cacheBytes: intOption('--cache-mib', opts.cacheMib) * 1024 * 1024,
        networks: parseNetworkOptions(opts.network),
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
    });
}

interface RecoveryHostStartOptions {
  vault?: string;
  registrationKeyFile?: string;
  vaultCa?: string;
  name?: string;
  kernelDir?: string[];
  defaultKernel?: string;
  defaultAppend?: string;
  hydrateDir?: string;
  pollMs: string;
  export?: string[];
  machine?: string;
  runDir?: string;
  cacheMib: string;
  network: string[];
}

/**
 * `recovery-host start --vault`: registers once (credentials kept 0600 in the run directory,
 * reused on restart), removes what a previous run left, then heartbeats and runs the vault's
 * operations until Ctrl-C.
 */
async function startWithVault(
  opts: RecoveryHostStartOptions,
  cmd: Command,
  ctx: CliContext,
): Promise<void> {
  const config = resolveConfig(cmd.optsWithGlobals<GlobalCliOptions>(), ctx.io);
  const out = new CliPrinter(ctx.io, config.json);
  if (opts.runDir === undefined) {
    throw new LifeboatError(
      'LB_CLI_BAD_OPTION',
      '--vault needs --run-dir: the recovery host keeps its registration (id, token, certificate) there across restarts.',
      { details: { option: '--run-dir' } },
    );
  }
  if (opts.export !== undefined) {
    throw new LifeboatError(
      'LB_CLI_BAD_OPTION',
      '--export serves points from the store alone; with --vault the vault decides what runs.',
      { details: { option: '--export' } },
    );
  }
  // Checked before registering: a typo in --network must not cost the one-time key.
  const networks = parseNetworkOptions(opts.network);
  const runDir = resolve(ctx.io.cwd, opts.runDir);
  const ca =
    opts.vaultCa !== undefined
      ? await readFile(resolve(ctx.io.cwd, opts.vaultCa), 'utf8')
      : undefined;
  const anonymous = new VaultClient({
    url: opts.vault!,
    ...(ca !== undefined ? { tls: { ca } } : {}),
  });
  const keyFile = opts.registrationKeyFile;
  const creds = await recoveryHostCredentials({
    dir: runDir,
    vault: anonymous,
    name: opts.name ?? hostname().toLowerCase(),
    ...(ca !== undefined ? { ca } : {}),
    ...(keyFile !== undefined
      ? {
          registrationKey: async () =>
            (await readFile(resolve(ctx.io.cwd, keyFile), 'utf8')).split(/\r?\n/)[0] ?? '',
        }
      : {}),
  });
  const leftovers = await cleanupRunDir(runDir);
  const host = await RecoveryHost.start({
    runDir,
    cacheBytes: intOption('--cache-mib', opts.cacheMib) * 1024 * 1024,
    networks,
  });
  ctx.cleanups.push(() => host.close());
  const link = new RecoveryHostLink({
    vault: componentClient(anonymous, creds, ca),
    host,
    openStore: openAssignedStore,
    hydrationDir:
      opts.hydrateDir !== undefined ? resolve(ctx.io.cwd, opts.hydrateDir) : join(runDir, 'disks'),
    kernelDirs: (opts.kernelDir ?? []).map((d) => resolve(ctx.io.cwd, d)),
    ...(opts.defaultKernel !== undefined
      ? {
          defaultBoot: {
            kernel: resolve(ctx.io.cwd, opts.defaultKernel),
            ...(opts.defaultAppend !== undefined ? { append: opts.defaultAppend } : {}),
          },
        }
      : {}),
    intervalMs: intOption('--poll-ms', opts.pollMs),
    onError: (err) =>
      void ctx.io.stderr.write(`warning: ${err instanceof Error ? err.message : String(err)}\n`),
  });
  link.start();
  ctx.cleanups.push(() => link.stop());
  // Renewed before it expires, while it runs (hourly checks, a third of its lifetime left).
  const renewal = keepRecoveryHostCertificate({
    dir: runDir,
    vault: anonymous,
    identity: creds,
    ...(ca !== undefined ? { ca } : {}),
    onRenewed: (client, identity) => {
      link.setVault(client);
      ctx.io.stderr.write(`renewed the certificate of recovery host ${identity.id}\n`);
    },
    onError: (err) =>
      void ctx.io.stderr.write(
        `warning: cannot renew the certificate: ${err instanceof Error ? err.message : String(err)}\n`,
      ),
  });
  ctx.cleanups.push(() => renewal.stop());
  out.json({
    id: creds.id,
    name: creds.name,
    vault: anonymous.url,
    runDir,
    accelerator: host.accel,
    networks: host.networkReport(),
    instanceId: link.instanceId,
    removedAtStart: leftovers,
  });
  for (const r of leftovers) out.line(`removed what a previous run left: ${r}`);
  for (const n of host.networkReport()) {
    out.line(
      `network ${n.name}: bridge ${n.bridge}${n.present ? '' : ' (MISSING: create it before a failover uses it)'}`,
    );
  }
  out.line(
    `recovery host ${creds.name} (${creds.id}) registered with ${anonymous.url}; run directory ${runDir}, accelerator ${host.accel}`,
  );
  out.note('taking test failovers and failovers from the vault until Ctrl-C');
  await untilAborted(ctx.signal);
}
