import { readFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { Agent, ManagedAgent, agentIdentity, discoverDisks } from '@lifeboat/agent';
import type {
  AgentStatus,
  CutReport,
  MachineAssignment,
  ManagedAgentStatus,
  SyncProgressReport,
} from '@lifeboat/agent';
import { LifeboatError, ReplicationClient } from '@lifeboat/protocol';
import { QmpClient } from '@lifeboat/qmp';
import { parseDuration } from '@lifeboat/store';
import type { CliContext } from '../cli-context.js';
import { CliPrinter } from '../cli-printer.js';
import { resolveConfig } from '../config.js';
import type { GlobalCliOptions } from '../config.js';
import { formatBytes, formatDuration, formatRate } from '../format.js';

// `agent start` replicates until Ctrl-C: managed by the vault through its process server (it
// registers with a one-time key, then replicates the machines of its KVM host the vault assigns
// to it), or one machine given by its QMP socket (--qmp) without the vault; `agent status`
// reads the status file the running agent keeps in its state directory.

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

interface AgentStartOptions {
  processServer: string;
  stateDir: string;
  registrationKeyFile?: string;
  name?: string;
  pollInterval: string;
  qmp?: string;
  machine?: string;
  cert?: string;
  key?: string;
  ca?: string;
  serverName?: string;
  interval: string;
  nbdSocket?: string;
  guestAgent?: string;
  appConsistentEvery?: string;
  disks?: string;
  consistencyGroup?: string;
}

function printManagedStatus(out: CliPrinter, s: ManagedAgentStatus & { updatedAt?: string }): void {
  out.line(
    `agent ${s.agent.id} (${s.agent.name})   process server ${s.processServer} ${s.connected ? 'connected' : 'NOT REACHED'}   last poll ${s.lastPollAt ?? '-'}${s.updatedAt ? `   (as of ${s.updatedAt})` : ''}`,
  );
  if (s.lastError) out.line(`error ${s.lastError.code}: ${s.lastError.message}`);
  out.table(
    ['item', 'machine', 'phase', 'last cut', 'lag', 'sent', 'error'],
    s.items.map((i) => [
      i.id,
      i.machine,
      i.status?.phase ?? (i.running ? 'starting' : 'stopped'),
      i.status?.lastCut ? new Date(i.status.lastCut.time).toISOString() : '-',
      i.status ? formatDuration(i.status.lagMs / 1000) : '-',
      i.status ? formatBytes(i.status.bytesSent) : '-',
      i.error ? i.error.code : '',
    ]),
    new Set([4, 5]),
  );
}

function waitForAbort(ctx: CliContext): Promise<void> {
  return new Promise<void>((done) => {
    if (ctx.signal.aborted) done();
    ctx.signal.addEventListener('abort', () => done(), { once: true });
  });
}

/** `agent start` managed by the vault through the process server. */
async function runManaged(ctx: CliContext, opts: AgentStartOptions): Promise<void> {
  for (const [flag, given] of [
    ['--machine', opts.machine],
    ['--cert', opts.cert],
    ['--key', opts.key],
  ] as const) {
    if (given !== undefined)
      throw bad(
        `${flag} goes with --qmp (one machine without the vault). Managed by the vault, the agent gets its certificate with --registration-key-file and its machines from its assignments.`,
      );
  }
  const { host, port } = parseHostPort(opts.processServer);
  const processServer = {
    host,
    port,
    ...(opts.serverName !== undefined ? { servername: opts.serverName } : {}),
  };
  const stateDir = resolve(ctx.io.cwd, opts.stateDir);
  const err = ctx.io.stderr;
  const key =
    opts.registrationKeyFile === undefined
      ? undefined
      : (await readPem(ctx, opts.registrationKeyFile, 'registration key file'))
          .toString('utf8')
          .split(/\r?\n/, 1)[0]
          ?.trim();
  if (key === '') throw bad(`The registration key file ${opts.registrationKeyFile} is empty.`);
  const { identity, registered } = await agentIdentity({
    processServer,
    stateDir,
    name: opts.name ?? hostname(),
    ...(key !== undefined ? { key } : {}),
    ...(opts.ca !== undefined ? { ca: await readPem(ctx, opts.ca, 'CA certificate') } : {}),
  });
  if (registered)
    err.write(`registered agent ${identity.id} (${identity.name}) through ${host}:${port}\n`);
  const managed = ManagedAgent.start({
    processServer,
    stateDir,
    identity,
    pollIntervalMs: ms(opts.pollInterval, '--poll-interval'),
  });
  ctx.cleanups.push(() => managed.stop());
  err.write(
    `agent ${identity.id} (${identity.name}) managed by the vault through the process server ${host}:${port}\n`,
  );
  const progress = new CliPrinter({ ...ctx.io, stdout: err }, false);
  let lastPollError = '';
  managed.on('poll-error', (e: LifeboatError) => {
    if (e.code === lastPollError) return;
    lastPollError = e.code;
    err.write(`warning ${e.code}: ${e.message} (replication goes on)\n`);
  });
  managed.on('started', (item: string, a: MachineAssignment) => {
    lastPollError = '';
    err.write(
      `protecting ${a.machine.name} (item ${item}): a cut every ${a.policy.crashConsistentIntervalSeconds}s\n`,
    );
  });
  managed.on('stopped', (item: string) => err.write(`stopped item ${item}\n`));
  managed.on('progress', (_item: string, p: SyncProgressReport) => printProgress(progress, p));
  managed.on('cut', (item: string, c: CutReport) =>
    err.write(
      `cut ${c.cutId} ${c.kind} ${formatBytes(c.bytes)} in ${c.durationMs} ms (item ${item})\n`,
    ),
  );
  managed.on('inventory', (host: string, machines: unknown[]) =>
    err.write(`inventory of KVM host ${host}: ${machines.length} machine(s)\n`),
  );
  managed.on('failed', (item: string, e: LifeboatError) =>
    err.write(`error ${e.code}: ${e.message} (item ${item}; retried)\n`),
  );
  await waitForAbort(ctx);
  await managed.stop();
}

/** `agent start --qmp`: one machine, without the vault. */
async function runSingle(ctx: CliContext, opts: AgentStartOptions, qmp: string): Promise<void> {
  for (const [flag, given] of [
    ['--machine', opts.machine],
    ['--cert', opts.cert],
    ['--key', opts.key],
    ['--ca', opts.ca],
  ] as const) {
    if (given === undefined) throw bad(`--qmp needs ${flag} too.`);
  }
  const machine = opts.machine as string;
  const { host, port } = parseHostPort(opts.processServer);
  const only = opts.disks
    ?.split(',')
    .map((d) => d.trim())
    .filter(Boolean);
  const qmpPath = resolve(ctx.io.cwd, qmp);
  // The client's hello names the disks: find them first (the agent finds them again).
  const probe = await QmpClient.connect({ path: qmpPath });
  const disks = await discoverDisks(probe, only).finally(() => probe.close());
  if (disks.length === 0) {
    throw new LifeboatError('LB_AGENT_NO_DISKS', `QEMU at ${qmpPath} has no disk to protect.`, {
      details: { qmp: qmpPath },
    });
  }
  const client = new ReplicationClient({
    host,
    port,
    ca: await readPem(ctx, opts.ca as string, 'CA certificate'),
    cert: await readPem(ctx, opts.cert as string, 'certificate'),
    key: await readPem(ctx, opts.key as string, 'key'),
    ...(opts.serverName ? { servername: opts.serverName } : {}),
    machine,
    disks: disks.map((d) => ({ name: d.name, size: d.size })),
  });
  ctx.cleanups.push(() => client.close());
  const a = new Agent({
    qmpSocket: qmpPath,
    machine,
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
    `agent protecting ${machine} (${disks.map((d) => d.name).join(', ')}) -> ${host}:${port}\n`,
  );
  await Promise.race([failed, waitForAbort(ctx)]);
  await a.stop();
  if (failure) throw failure;
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
      'Replicate until Ctrl-C: the machines the vault assigns to this KVM host (through its process server), or one machine (--qmp)',
    )
    .requiredOption('--process-server <host:port>', 'the process server (port 9443 by default)')
    .requiredOption(
      '--state-dir <dir>',
      'state directory (identity, progress, bitmaps in use, status)',
    )
    .option(
      '--registration-key-file <file>',
      'managed, first start: file with the one-time key (lifeboat vault key create --kind agent)',
    )
    .option('--name <name>', 'managed: the agent’s name in the vault (default: this host name)')
    .option('--poll-interval <duration>', 'managed: how often it asks for its assignments', '2s')
    .option(
      '--qmp <path>',
      'one machine without the vault: QMP socket of the running qemu-system or qemu-storage-daemon',
    )
    .option('--machine <id>', 'with --qmp: the machine id')
    .option('--cert <file>', 'with --qmp: this agent’s client certificate (PEM)')
    .option('--key <file>', 'with --qmp: this agent’s private key (PEM)')
    .option(
      '--ca <file>',
      'CA that signed the process server’s certificate (PEM); managed: the vault CA (lifeboat vault ca), needed to register',
    )
    .option('--server-name <name>', 'name in the process server’s certificate (default: its host)')
    .option(
      '--interval <duration>',
      'with --qmp: time between crash-consistent cuts (at least 1s)',
      '5s',
    )
    .option(
      '--nbd-socket <path>',
      'with --qmp: an NBD server QEMU already runs (qemu-storage-daemon --nbd-server)',
    )
    .option(
      '--guest-agent <path>',
      'with --qmp: host side of the guest agent’s virtio-serial port (for app-consistent points)',
    )
    .option(
      '--app-consistent-every <duration>',
      'with --qmp: time between app-consistent points (needs --guest-agent)',
    )
    .option('--disks <nodes>', 'with --qmp: protect only these block nodes (comma-separated)')
    .option('--consistency-group <name>', 'with --qmp: consistency group put on every cut')
    .addHelpText(
      'after',
      '\nExamples:\n  lifeboat agent start --process-server ps1:9443 --state-dir /var/lib/lifeboat/agent \\\n    --registration-key-file agent.key --ca vault-ca.pem --name kvm1\n  lifeboat agent start --qmp /run/vm1/qmp.sock --process-server ps1:9443 --machine vm1 \\\n    --state-dir /var/lib/lifeboat/agent/vm1 --cert agent.crt --key agent.key --ca ca.crt\n',
    )
    .action(async (opts: AgentStartOptions) => {
      if (opts.qmp === undefined) await runManaged(ctx, opts);
      else await runSingle(ctx, opts, opts.qmp);
    });

  agent
    .command('status')
    .description('Show what a running agent is doing (from its state directory)')
    .requiredOption('--state-dir <dir>', 'the agent’s state directory')
    .addHelpText(
      'after',
      '\nExample:\n  lifeboat agent status --state-dir /var/lib/lifeboat/agent --json\n',
    )
    .action(async (opts: { stateDir: string }, command: Command) => {
      const config = resolveConfig(command.optsWithGlobals<GlobalCliOptions>(), ctx.io);
      const out = new CliPrinter(ctx.io, config.json);
      const path = resolve(ctx.io.cwd, opts.stateDir, 'status.json');
      let status: (AgentStatus | ManagedAgentStatus) & { updatedAt?: string };
      try {
        status = JSON.parse(await readFile(path, 'utf8')) as AgentStatus | ManagedAgentStatus;
      } catch (err) {
        throw new LifeboatError(
          'LB_CLI_AGENT_NO_STATUS',
          `No agent status at ${path} (${(err as Error).message}). Is an agent running with --state-dir ${opts.stateDir}?`,
          { cause: err, details: { path } },
        );
      }
      out.json(status);
      if ('mode' in status && status.mode === 'managed') printManagedStatus(out, status);
      else printStatus(out, status as AgentStatus);
    });
}
