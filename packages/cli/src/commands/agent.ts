import { readFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { Agent, discoverDisks } from '@lifeboat/agent';
import type { AgentStatus, CutReport, SyncProgressReport } from '@lifeboat/agent';
import { LifeboatError, ReplicationClient } from '@lifeboat/protocol';
import { QmpClient } from '@lifeboat/qmp';
import { parseDuration } from '@lifeboat/store';
import type { CliContext } from '../cli-context.js';
import { CliPrinter } from '../cli-printer.js';
import { resolveConfig } from '../config.js';
import type { GlobalCliOptions } from '../config.js';
import { formatBytes, formatDuration, formatRate } from '../format.js';

// `agent start` protects one machine (a running qemu-system or qemu-storage-daemon, by its QMP
// socket) and streams to a process server until Ctrl-C; `agent status` reads the status file
// the running agent keeps in its state directory.

function bad(message: string, details: Record<string, unknown> = {}): LifeboatError {
  return new LifeboatError('LB_CLI_BAD_OPTION', message, { details });
}

function parseHostPort(value: string): { host: string; port: number } {
  const m = /^(?:[a-z]+:\/\/)?(.*?)(?::(\d+))?\/?$/.exec(value);
  const host = m?.[1]?.replace(/^\[|\]$/g, '');
  const port = m?.[2] === undefined ? 9443 : Number(m[2]);
  if (!host || !Number.isInteger(port) || port < 1 || port > 65535) {
    throw bad(`--process-server ${value}: give host:port (the port defaults to 9443).`, { value });
  }
  return { host, port };
}

function ms(value: string, option: string): number {
  try {
    return parseDuration(value);
  } catch {
    throw bad(`${option} ${value}: give a duration such as 5s, 1m or 1h.`, { value });
  }
}

async function readPem(ctx: CliContext, file: string, what: string): Promise<Buffer> {
  try {
    return await readFile(resolve(ctx.io.cwd, file));
  } catch (err) {
    throw bad(`Cannot read the ${what} ${file}: ${(err as Error).message}.`, { file });
  }
}

function printStatus(out: CliPrinter, s: AgentStatus & { updatedAt?: string }): void {
  out.line(
    `machine ${s.machine}   phase ${s.phase}   cycles ${s.cycles}   lag ${formatDuration(s.lagMs / 1000)}   sent ${formatBytes(s.bytesSent)}${s.updatedAt ? `   (as of ${s.updatedAt})` : ''}`,
  );
  if (s.lastCut) {
    out.line(
      `last cut ${s.lastCut.id} (${s.lastCut.kind}) at ${new Date(s.lastCut.time).toISOString()}, ${formatDuration((Date.now() - s.lastCut.time) / 1000)} ago`,
    );
  }
  if (s.sync) printProgress(out, s.sync);
  if (s.error) out.line(`error ${s.error.code}: ${s.error.message}`);
  out.table(
    ['disk', 'size', 'format', 'bitmaps'],
    s.disks.map((d) => [
      d.name,
      formatBytes(d.size),
      d.format,
      d.persistentBitmaps ? 'persistent' : 'in memory',
    ]),
    new Set([1]),
  );
}

function printProgress(out: CliPrinter, p: SyncProgressReport): void {
  const pct = p.totalBytes > 0 ? (100 * p.doneBytes) / p.totalBytes : 100;
  out.line(
    `${p.kind} ${p.disk}: ${formatBytes(p.doneBytes)} of ${formatBytes(p.totalBytes)} (${pct.toFixed(1)}%), ${formatRate(p.bytesPerSecond)}, ETA ${p.etaSeconds === undefined ? '-' : formatDuration(p.etaSeconds)}, sent ${formatBytes(p.sentBytes)}`,
  );
}

/** Registers `lifeboat agent ...`. */
export function registerAgentCommands(program: Command, ctx: CliContext): void {
  const agent = program
    .command('agent')
    .description(
      'The agent for QEMU/KVM: exact change tracking and a consistent cut every few seconds',
    );

  agent
    .command('start')
    .description(
      'Protect one machine (until Ctrl-C): initial replication, then a cut every interval',
    )
    .requiredOption('--qmp <path>', 'QMP socket of the running qemu-system or qemu-storage-daemon')
    .requiredOption('--process-server <host:port>', 'the process server (port 9443 by default)')
    .requiredOption('--machine <id>', 'the machine id')
    .requiredOption('--state-dir <dir>', 'state directory (progress, bitmaps in use, status)')
    .requiredOption('--cert <file>', 'this agent’s client certificate (PEM)')
    .requiredOption('--key <file>', 'this agent’s private key (PEM)')
    .requiredOption('--ca <file>', 'CA that signed the process server’s certificate (PEM)')
    .option('--server-name <name>', 'name in the process server’s certificate (default: its host)')
    .option('--interval <duration>', 'time between crash-consistent cuts (at least 1s)', '5s')
    .option(
      '--nbd-socket <path>',
      'an NBD server QEMU already runs (qemu-storage-daemon --nbd-server)',
    )
    .option(
      '--guest-agent <path>',
      'host side of the guest agent’s virtio-serial port (for app-consistent points)',
    )
    .option(
      '--app-consistent-every <duration>',
      'time between app-consistent points (needs --guest-agent)',
    )
    .option('--disks <nodes>', 'protect only these block nodes (comma-separated)')
    .option('--consistency-group <name>', 'consistency group put on every cut')
    .addHelpText(
      'after',
      '\nExample:\n  lifeboat agent start --qmp /run/vm1/qmp.sock --process-server ps1:9443 --machine vm1 \\\n    --state-dir /var/lib/lifeboat/agent/vm1 --cert agent.crt --key agent.key --ca ca.crt\n',
    )
    .action(
      async (opts: {
        qmp: string;
        processServer: string;
        machine: string;
        stateDir: string;
        cert: string;
        key: string;
        ca: string;
        serverName?: string;
        interval: string;
        nbdSocket?: string;
        guestAgent?: string;
        appConsistentEvery?: string;
        disks?: string;
        consistencyGroup?: string;
      }) => {
        const { host, port } = parseHostPort(opts.processServer);
        const only = opts.disks
          ?.split(',')
          .map((d) => d.trim())
          .filter(Boolean);
        const qmpPath = resolve(ctx.io.cwd, opts.qmp);
        // The client's hello names the disks: find them first (the agent finds them again).
        const probe = await QmpClient.connect({ path: qmpPath });
        const disks = await discoverDisks(probe, only).finally(() => probe.close());
        if (disks.length === 0) {
          throw new LifeboatError(
            'LB_AGENT_NO_DISKS',
            `QEMU at ${qmpPath} has no disk to protect.`,
            {
              details: { qmp: qmpPath },
            },
          );
        }
        const client = new ReplicationClient({
          host,
          port,
          ca: await readPem(ctx, opts.ca, 'CA certificate'),
          cert: await readPem(ctx, opts.cert, 'certificate'),
          key: await readPem(ctx, opts.key, 'key'),
          ...(opts.serverName ? { servername: opts.serverName } : {}),
          machine: opts.machine,
          disks: disks.map((d) => ({ name: d.name, size: d.size })),
        });
        ctx.cleanups.push(() => client.close());
        const a = new Agent({
          qmpSocket: qmpPath,
          machine: opts.machine,
          sink: client,
          stateDir: resolve(ctx.io.cwd, opts.stateDir),
          intervalMs: ms(opts.interval, '--interval'),
          ...(opts.nbdSocket ? { nbdSocket: resolve(ctx.io.cwd, opts.nbdSocket) } : {}),
          ...(opts.guestAgent ? { guestAgentSocket: resolve(ctx.io.cwd, opts.guestAgent) } : {}),
          ...(opts.appConsistentEvery
            ? { appConsistentIntervalMs: ms(opts.appConsistentEvery, '--app-consistent-every') }
            : {}),
          ...(only ? { disks: only } : {}),
          ...(opts.consistencyGroup ? { consistencyGroup: opts.consistencyGroup } : {}),
        });
        const err = ctx.io.stderr;
        a.on('progress', (p: SyncProgressReport) => {
          const out = new CliPrinter({ ...ctx.io, stdout: err }, false);
          printProgress(out, p);
        });
        a.on('cut', (c: CutReport) =>
          err.write(
            `cut ${c.cutId} ${c.kind} ${formatBytes(c.bytes)} in ${c.durationMs} ms${c.lagMs > 0 ? `, ${c.lagMs} ms late` : ''}\n`,
          ),
        );
        a.on('warning', (w: { code: string; message: string }) =>
          err.write(`warning ${w.code}: ${w.message}\n`),
        );
        let failure: LifeboatError | undefined;
        const failed = new Promise<void>((done) =>
          a.once('failed', (e: LifeboatError) => {
            failure = e;
            done();
          }),
        );
        client.once('failed', (e: LifeboatError) => {
          failure ??= e;
          void a.stop();
        });
        void client.start().catch(() => undefined);
        await a.start();
        ctx.cleanups.push(() => a.stop());
        err.write(
          `agent protecting ${opts.machine} (${disks.map((d) => d.name).join(', ')}) -> ${host}:${port}\n`,
        );
        await Promise.race([
          failed,
          new Promise<void>((done) => {
            if (ctx.signal.aborted) done();
            ctx.signal.addEventListener('abort', () => done(), { once: true });
          }),
        ]);
        await a.stop();
        if (failure) throw failure;
      },
    );

  agent
    .command('status')
    .description('Show what a running agent is doing (from its state directory)')
    .requiredOption('--state-dir <dir>', 'the agent’s state directory')
    .action(async (opts: { stateDir: string }, command: Command) => {
      const config = resolveConfig(command.optsWithGlobals<GlobalCliOptions>(), ctx.io);
      const out = new CliPrinter(ctx.io, config.json);
      const path = resolve(ctx.io.cwd, opts.stateDir, 'status.json');
      let status: AgentStatus & { updatedAt?: string };
      try {
        status = JSON.parse(await readFile(path, 'utf8')) as AgentStatus;
      } catch (err) {
        throw new LifeboatError(
          'LB_CLI_AGENT_NO_STATUS',
          `No agent status at ${path} (${(err as Error).message}). Is an agent running with --state-dir ${opts.stateDir}?`,
          { cause: err, details: { path } },
        );
      }
      out.json(status);
      printStatus(out, status);
    });
}
