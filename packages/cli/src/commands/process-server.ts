import { readFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { ProcessServer, startManagedProcessServer } from '@lifeboat/process-server';
import type {
  ProcessServerHealth,
  ProcessServerOptions,
  WorkerStoreSpec,
} from '@lifeboat/process-server';
import { LifeboatError } from '@lifeboat/protocol';
import type { CliContext } from '../cli-context.js';
import { CliPrinter } from '../cli-printer.js';
import { requireStore, resolveConfig } from '../config.js';
import type { GlobalCliOptions } from '../config.js';
import { formatBytes, formatDuration, formatRate } from '../format.js';
import { openStore, storePassphrase } from '../open-store.js';

// `process-server start` runs the data gateway until Ctrl-C, managed by the vault (--vault:
// registration, certificates, target stores and agents come from it) or on its own (the global
// --store and files for its certificates); `process-server status` reads its health listener
// (GET /health), so it works against any running process server.

function bad(message: string, details: Record<string, unknown> = {}): LifeboatError {
  return new LifeboatError('LB_CLI_BAD_OPTION', message, { details });
}

function parseHostPort(
  value: string,
  option: string,
  defaultHost: string,
): { host: string; port: number } {
  const m = /^(?:(.*):)?(\d+)$/.exec(value);
  const port = Number(m?.[2]);
  if (m === null || !Number.isInteger(port) || port > 65535)
    throw bad(`${option} ${value}: give host:port or a port.`, { value });
  return {
    host: m[1] === undefined || m[1] === '' ? defaultHost : m[1].replace(/^\[|\]$/g, ''),
    port,
  };
}

function parseBytes(value: string, option: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]i?b?)?$/i.exec(value.trim());
  if (!m) throw bad(`${option} ${value}: give a number of bytes, e.g. 10G or 512MiB.`, { value });
  const unit = (m[2] ?? '').toLowerCase()[0];
  const mult =
    unit === 'k'
      ? 1024
      : unit === 'm'
        ? 1024 ** 2
        : unit === 'g'
          ? 1024 ** 3
          : unit === 't'
            ? 1024 ** 4
            : 1;
  return Math.floor(Number(m[1]) * mult);
}

interface ProcessServerStartOptions {
  vault?: string;
  registrationKeyFile?: string;
  stateDir?: string;
  name?: string;
  address?: string;
  vaultCa?: string;
  journalDir?: string;
  cert?: string;
  key?: string;
  clientCa?: string;
  listen: string;
  health: string;
  journalSize: string;
  bandwidth: string;
  machineBandwidth: string;
  storeConcurrency: string;
  storeWorkers: string;
  logLevel: string;
}

async function readFirstLine(ctx: CliContext, file: string, what: string): Promise<string> {
  const text = (await readPem(ctx, file, what)).toString('utf8');
  const line = text.split(/\r?\n/, 1)[0]?.trim() ?? '';
  if (line === '')
    throw bad(`The ${what} ${file} is empty: put the key on its first line.`, { file });
  return line;
}

async function readPem(ctx: CliContext, file: string, what: string): Promise<Buffer> {
  try {
    return await readFile(resolve(ctx.io.cwd, file));
  } catch (err) {
    throw bad(`Cannot read the ${what} ${file}: ${(err as Error).message}.`, { file });
  }
}

/** Prints a health report for humans. */
function printHealth(out: CliPrinter, h: ProcessServerHealth): void {
  out.line(
    `status ${h.status}   uptime ${formatDuration(h.uptimeSeconds)}   cpu ${h.process.cpuPercent.toFixed(0)}%   rss ${formatBytes(h.process.rssBytes)}`,
  );
  out.line(
    `journal ${formatBytes(h.journal.usedBytes)} of ${formatBytes(h.journal.maxBytes)} (${(h.journal.usedRatio * 100).toFixed(1)}%)${h.journal.directIo === false ? ', through the page cache (no direct I/O here)' : ''}${h.journal.fullForSeconds !== null ? `, FULL for ${formatDuration(h.journal.fullForSeconds)}` : ''}`,
  );
  out.line(
    `store ${h.store.location}: ${h.store.reachable ? 'reachable' : `UNREACHABLE (${h.store.lastError ?? ''})`}`,
  );
  const w = h.storeWorkers ?? null; // absent in the health of an older process server
  if (w !== null)
    out.line(
      `store workers ${w.alive} of ${w.count} running, ${w.restarts} restarted${w.lastError !== null ? ` (last: ${w.lastError} at ${w.lastErrorAt ?? '?'})` : ''}`,
    );
  out.line(
    `ingest ${formatRate(h.ingest.bytesPerSecondIn)} in, ${formatRate(h.ingest.bytesPerSecondOut)} to the store, ${h.ingest.sessions} sessions`,
  );
  out.line();
  const rows: string[][] = [];
  for (const m of h.machines) {
    for (const d of m.disks) {
      rows.push([
        m.machine,
        d.disk,
        m.connected ? 'yes' : 'no',
        d.rpoSeconds === null ? '-' : formatDuration(d.rpoSeconds),
        formatBytes(m.backlogBytes),
        formatRate(d.bytesPerSecondIn),
        formatRate(d.bytesPerSecondOut),
        m.resyncRequired
          ? `RESYNC: ${m.resyncReason ?? ''}`
          : m.lastError
            ? `${m.lastError.code}`
            : 'ok',
      ]);
    }
  }
  out.table(
    ['machine', 'disk', 'connected', 'rpo', 'backlog', 'in', 'out', 'state'],
    rows,
    new Set([3, 4, 5, 6]),
  );
}

/** Registers `lifeboat process-server ...`. */
export function registerProcessServerCommands(program: Command, ctx: CliContext): void {
  const ps = program
    .command('process-server')
    .description(
      'The data gateway: receives agents’ change streams, journals them, commits recovery points',
    );

  ps.command('start')
    .description(
      'Run a process server (until Ctrl-C): managed by the vault (--vault), or on its own with the global --store',
    )
    .option(
      '--vault <url>',
      'managed by this vault: certificates, target stores and agents come from it',
    )
    .option(
      '--registration-key-file <file>',
      'with --vault, first start: file with the one-time key (lifeboat vault key create --kind process-server)',
    )
    .option(
      '--state-dir <dir>',
      'with --vault: its identity (0600), target stores and, by default, its journal',
    )
    .option('--name <name>', 'with --vault: its name in the vault (default: this host name)')
    .option(
      '--address <host[:port]>',
      "with --vault: where agents reach it, put in its certificate (default: --listen's address, else the host name)",
    )
    .option('--vault-ca <file>', "with an HTTPS vault: the vault's CA certificate (PEM)")
    .option(
      '--journal-dir <dir>',
      'local directory of the cache journal (fast disk, fsync honoured); with --vault: <state-dir>/journal',
    )
    .option('--cert <file>', 'without --vault: server certificate (PEM)')
    .option('--key <file>', 'without --vault: server private key (PEM)')
    .option(
      '--client-ca <file>',
      'without --vault: CA whose client certificates agents must present (PEM)',
    )
    .option('--listen <host:port>', 'address agents connect to', '0.0.0.0:9443')
    .option(
      '--health <host:port>',
      'health and metrics listener (GET /health, /metrics)',
      '127.0.0.1:9444',
    )
    .option('--journal-size <bytes>', 'journal size limit (e.g. 20G)', '1G')
    .option('--bandwidth <bytes-per-second>', 'ingest limit of the whole server (0 = none)', '0')
    .option('--machine-bandwidth <bytes-per-second>', 'ingest limit per machine (0 = none)', '0')
    .option('--store-concurrency <n>', 'store operations at once', '8')
    .option(
      '--store-workers <n>',
      'worker threads for hashing, compression, encryption (0 = on the main thread)',
      '2',
    )
    .option('--log-level <level>', 'pino log level', 'info')
    .addHelpText(
      'after',
      '\nExamples:\n  lifeboat process-server start --vault https://vault.example:9440 --state-dir /var/lib/lifeboat/ps \\\n    --registration-key-file ps.key --name ps1 --listen 0.0.0.0:9443\n  lifeboat --store /srv/lifeboat --passphrase-file pw process-server start \\\n    --journal-dir /var/lib/lifeboat/journal --cert ps.crt --key ps.key --client-ca ca.crt\n',
    )
    .action(async (opts: ProcessServerStartOptions, command: Command) => {
      const listen = parseHostPort(opts.listen, '--listen', '0.0.0.0');
      const health = parseHostPort(opts.health, '--health', '127.0.0.1');
      const workers = Number(opts.storeWorkers);
      if (!Number.isInteger(workers) || workers < 0 || workers > 64)
        throw bad(`--store-workers ${opts.storeWorkers}: give 0 to 64.`);
      const common = {
        host: listen.host,
        port: listen.port,
        healthHost: health.host,
        healthPort: health.port,
        journalMaxBytes: parseBytes(opts.journalSize, '--journal-size'),
        bandwidthBytesPerSecond: parseBytes(opts.bandwidth, '--bandwidth'),
        machineBandwidthBytesPerSecond: parseBytes(opts.machineBandwidth, '--machine-bandwidth'),
        storeConcurrency: Number(opts.storeConcurrency),
        logLevel: opts.logLevel as 'info',
      };
      const globals = command.optsWithGlobals<GlobalCliOptions>();
      let stop: () => Promise<void>;
      if (opts.vault !== undefined) {
        for (const [flag, given] of [
          ['--cert', opts.cert],
          ['--key', opts.key],
          ['--client-ca', opts.clientCa],
          ['--store', globals.store],
        ] as const) {
          if (given !== undefined)
            throw bad(
              `With --vault, leave out ${flag}: the certificates come from the vault's CA and the target stores from the process server's assignments.`,
            );
        }
        if (opts.stateDir === undefined)
          throw bad('--vault needs --state-dir (where the process server keeps its identity).');
        const stateDir = resolve(ctx.io.cwd, opts.stateDir);
        const name = opts.name ?? hostname();
        const address =
          opts.address ?? (['0.0.0.0', '::'].includes(listen.host) ? hostname() : listen.host);
        const key =
          opts.registrationKeyFile === undefined
            ? undefined
            : await readFirstLine(ctx, opts.registrationKeyFile, 'registration key file');
        const managed = await startManagedProcessServer({
          ...common,
          vaultUrl: opts.vault,
          ...(opts.vaultCa !== undefined
            ? { vaultCa: await readPem(ctx, opts.vaultCa, 'vault CA certificate') }
            : {}),
          stateDir,
          ...(key !== undefined ? { registrationKey: key } : {}),
          name,
          address,
          ...(opts.journalDir !== undefined
            ? { journalDir: resolve(ctx.io.cwd, opts.journalDir) }
            : {}),
          storeWorkerCount: workers,
        });
        const id = managed.identity;
        ctx.io.stderr.write(
          `process server ${id.id} (${id.name}) managed by ${opts.vault}; listening on ${listen.host}:${managed.server.port} (health: http://${health.host}:${managed.server.healthPort}/health)\n`,
        );
        stop = () => managed.close();
      } else {
        for (const [flag, given] of [
          ['--journal-dir', opts.journalDir],
          ['--cert', opts.cert],
          ['--key', opts.key],
          ['--client-ca', opts.clientCa],
        ] as const) {
          if (given === undefined)
            throw bad(
              `Give ${flag} (a process server on its own), or --vault to have the vault manage it.`,
            );
        }
        const config = resolveConfig(globals, ctx.io);
        let storeChoice: Pick<ProcessServerOptions, 'store' | 'storeWorkers'>;
        // Packs go to disk past the page cache, as in store workers (openWorkerStore).
        if (workers === 0)
          storeChoice = { store: await openStore(config, ctx, { directWrites: true }) };
        else {
          // Each worker thread opens the store itself; check here once that it opens at all.
          await openStore(config, ctx);
          const location = requireStore(config);
          const passphrase = await storePassphrase(config, ctx);
          const spec: WorkerStoreSpec =
            location.kind === 'directory'
              ? { kind: 'directory', path: location.path, passphrase }
              : {
                  kind: 'azure',
                  connectionString: location.connectionString,
                  containerUrl: location.url,
                  passphrase,
                };
          storeChoice = { storeWorkers: { count: workers, spec } };
        }
        const server = await ProcessServer.start({
          ...common,
          ...storeChoice,
          journalDir: resolve(ctx.io.cwd, opts.journalDir as string),
          tls: {
            cert: await readPem(ctx, opts.cert as string, 'certificate'),
            key: await readPem(ctx, opts.key as string, 'key'),
            ca: await readPem(ctx, opts.clientCa as string, 'client CA'),
          },
        });
        ctx.io.stderr.write(
          `process server listening on ${listen.host}:${server.port} (health: http://${health.host}:${server.healthPort}/health)\n`,
        );
        stop = () => server.stop();
      }
      await new Promise<void>((done) => {
        if (ctx.signal.aborted) done();
        ctx.signal.addEventListener('abort', () => done(), { once: true });
      });
      await stop();
    });

  ps.command('status')
    .description(
      'Show a running process server’s health: RPO per disk, backlog, journal, throughput',
    )
    .option('--health <host:port>', 'its health listener', '127.0.0.1:9444')
    .addHelpText(
      'after',
      '\nExample:\n  lifeboat process-server status --health 127.0.0.1:9444 --json\n',
    )
    .action(async (opts: { health: string }, command: Command) => {
      const config = resolveConfig(command.optsWithGlobals<GlobalCliOptions>(), ctx.io);
      const out = new CliPrinter(ctx.io, config.json);
      const { host, port } = parseHostPort(opts.health, '--health', '127.0.0.1');
      const url = `http://${host.includes(':') ? `[${host}]` : host}:${port}/health`;
      let h: ProcessServerHealth;
      try {
        const res = await fetch(url, { signal: ctx.signal });
        h = (await res.json()) as ProcessServerHealth;
      } catch (err) {
        throw new LifeboatError(
          'LB_CLI_PS_UNREACHABLE',
          `Cannot read the process server's health at ${url}: ${(err as Error).message}. Is it running, and is --health its health address?`,
          { cause: err, details: { url } },
        );
      }
      out.json(h);
      printHealth(out, h);
    });
}
