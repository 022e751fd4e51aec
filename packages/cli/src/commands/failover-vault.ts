import { writeFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import { LifeboatError } from '@lifeboat/protocol';
import type { CliContext } from '../cli-context.js';
import { CliPrinter } from '../cli-printer.js';
import type { VaultAccess } from '../config.js';
import { ProgressBar } from '../progress-bar.js';
import { VaultClient, type VaultObject as ApiObject } from '@lifeboat/protocol';
import { intOption } from './recovery.js';

// `lifeboat failover ...` through the vault's API (docs/architecture.md, "Test failover and
// failover through the vault"): the vault picks the points and a recovery host, which runs
// the job; the CLI starts it, follows the job with a progress bar and prints what it shows.

/** Options of the vault mode shared by `failover test` and `failover start`. */
export interface VaultRunOptions {
  machine?: string;
  item?: string[];
  group?: string;
  point?: string;
  latestApp?: boolean;
  at?: string;
  recoveryHost?: string;
  kernel?: string;
  append?: string;
  uefi?: boolean;
  cpus?: string;
  memoryMib?: string;
  port?: string;
  expect?: string;
  console?: string;
  network?: string;
  address?: string;
  gateway?: string;
  keep?: boolean;
  screenshotOut?: string;
  planned?: boolean;
}

interface Job extends ApiObject {
  id: string;
  kind: string;
  state: string;
  progress: number;
  steps: Array<{
    name: string;
    state: string;
    startedAt: string | null;
    finishedAt: string | null;
    detail?: { removed?: unknown };
  }>;
  error: { code: string; message: string; details?: Record<string, unknown> } | null;
}

interface RunMachine {
  name: string;
  machineName: string;
  protectedItemId: string;
  points: Array<{ id: string; disk: string; time: string; kind: string }>;
  verification: {
    console?: string;
    port?: { guestPort: number; answer: string };
    screenshot?: { width: number; height: number };
  } | null;
  artifacts: { screenshot: string | null; console: string | null };
  localDisks: string[];
  /** The recovery host network it is on (its item's network mapping); null or absent: isolated. */
  network?: string | null;
}

interface Run extends ApiObject {
  id: string;
  kind: string;
  state: string;
  recoveryHostId: string;
  jobId: string;
  machines: RunMachine[];
}

/** A vault client for one invocation, aborted with it. */
class Client {
  readonly api: VaultClient;
  constructor(
    readonly access: VaultAccess,
    private readonly ctx: CliContext,
  ) {
    this.api = new VaultClient({ url: access.url, token: access.token });
  }
  call<T = ApiObject>(method: string, path: string, body?: unknown): Promise<T> {
    return this.api.call<T>(method, path, body, this.ctx.signal);
  }
}

function pointChoice(o: { point?: string; latestApp?: boolean; at?: string }): ApiObject {
  if (o.point !== undefined) return { pointId: o.point };
  if (o.at !== undefined && Number.isNaN(Date.parse(o.at))) {
    throw new LifeboatError(
      'LB_CLI_BAD_OPTION',
      `--at ${o.at}: give an ISO time like 2026-11-25T10:00:00Z.`,
      { details: { option: '--at', value: o.at } },
    );
  }
  return {
    pick: o.latestApp ? 'latest-app' : 'latest',
    ...(o.at !== undefined ? { at: new Date(o.at).toISOString() } : {}),
  };
}

/** The active protected item of a machine named (or with the id) `machine`. */
async function itemOfMachine(c: Client, machine: string): Promise<string> {
  const found = await c.call<{ items: ApiObject[] }>(
    'GET',
    `/api/machines?q=${encodeURIComponent(machine)}&limit=1000`,
  );
  const matches = found.items.filter((m) => m['name'] === machine || m['id'] === machine);
  for (const m of matches) {
    const items = await c.call<{ items: ApiObject[] }>(
      'GET',
      `/api/protected-items?machineId=${encodeURIComponent(String(m['id']))}&limit=100`,
    );
    const active = items.items.find((i) => i['state'] !== 'disabled');
    if (active !== undefined) return String(active['id']);
  }
  throw new LifeboatError(
    'LB_CLI_BAD_OPTION',
    matches.length === 0
      ? `The vault knows no machine named ${machine}. List them with "lifeboat vault machine list".`
      : `Machine ${machine} is not protected. Protect it first ("lifeboat vault protect <machine id> --policy ...").`,
    { details: { option: '--machine', value: machine } },
  );
}

async function items(c: Client, o: VaultRunOptions): Promise<string[] | undefined> {
  if (o.item !== undefined) return o.item;
  if (o.machine !== undefined) return [await itemOfMachine(c, o.machine)];
  return undefined;
}

function hardware(o: VaultRunOptions): ApiObject {
  return {
    ...(o.kernel !== undefined
      ? {
          boot: {
            // A path on the recovery host (it must be in one of its --kernel-dir directories).
            kernel: o.kernel,
            ...(o.append !== undefined ? { append: o.append } : {}),
          },
        }
      : o.uefi
        ? { boot: { firmware: 'uefi' } }
        : {}),
    ...(o.cpus !== undefined ? { cpus: intOption('--cpus', o.cpus) } : {}),
    ...(o.memoryMib !== undefined ? { memoryMiB: intOption('--memory-mib', o.memoryMib) } : {}),
    ...(o.recoveryHost !== undefined ? { recoveryHostId: o.recoveryHost } : {}),
  };
}

function verify(o: VaultRunOptions, screenshot: boolean): ApiObject {
  return {
    ...(o.console !== undefined ? { console: o.console } : {}),
    ...(o.port !== undefined ? { guestPort: intOption('--port', o.port) } : {}),
    ...(o.expect !== undefined ? { expect: o.expect } : {}),
    screenshot,
  };
}

/** Follows a job until it ends, with a progress bar of its steps; returns it. */
async function follow(
  ctx: CliContext,
  c: Client,
  out: CliPrinter,
  jobId: string,
  json: boolean,
): Promise<Job> {
  const bar = new ProgressBar({
    out: ctx.io.stderr,
    enabled: !json && ctx.io.stderr.isTTY === true,
    label: `job ${jobId}`,
    total: 1,
    unit: 'points',
    intervalMs: 200,
  });
  let shown = 0;
  for (;;) {
    ctx.signal.throwIfAborted();
    const job = await c.call<Job>('GET', `/api/jobs/${jobId}`);
    const done = job.steps.filter((s) => s.state === 'done' || s.state === 'failed').length;
    bar.update(done, Math.max(job.steps.length, 1));
    // Finished steps, once each, as they happen.
    for (const s of job.steps.slice(shown)) {
      if (s.state !== 'done' && s.state !== 'failed') break;
      const ms =
        s.startedAt !== null && s.finishedAt !== null
          ? Date.parse(s.finishedAt) - Date.parse(s.startedAt)
          : undefined;
      out.note(
        `  ${s.name}: ${s.state}${ms !== undefined ? ` in ${(ms / 1000).toFixed(1)} s` : ''}`,
      );
      shown++;
    }
    if (['succeeded', 'failed', 'cancelled'].includes(job.state)) {
      bar.finish();
      return job;
    }
    await new Promise((r) => setTimeout(r, 500));
  }
}

function failIfFailed(job: Job): void {
  if (job.state === 'succeeded') return;
  throw new LifeboatError(
    job.error?.code ?? 'LB_CLI_JOB_FAILED',
    `Job ${job.id} (${job.kind}) ${job.state}: ${job.error?.message ?? 'no message'}`,
    { details: { jobId: job.id, ...(job.error?.details ?? {}) } },
  );
}

/** What a cleanup job's steps removed (machines, exports, overlays, networks), one line each. */
function printRemoved(out: CliPrinter, job: Job): void {
  const removed = job.steps.flatMap((s) =>
    Array.isArray(s.detail?.removed) ? (s.detail.removed as unknown[]).map(String) : [],
  );
  for (const r of removed) out.line(`removed ${r}`);
  if (removed.length === 0 && job.state === 'succeeded') out.line('nothing was left to remove');
}

function printRun(out: CliPrinter, access: VaultAccess, run: Run): void {
  out.line(`${run.kind} ${run.id}: ${run.state}`);
  for (const m of run.machines) {
    out.line(
      `  ${m.machineName} as ${m.name}: points ${m.points.map((p) => `${p.id.slice(0, 12)} (${p.disk}, ${p.kind}, ${p.time})`).join(', ') || 'from the last sync'}`,
    );
    if (typeof m.network === 'string') out.line(`    network: ${m.network} (network mapping)`);
    const v = m.verification;
    if (v?.console !== undefined) out.line(`    console matched: ${v.console}`);
    if (v?.port !== undefined)
      out.line(`    port ${v.port.guestPort} answered: ${v.port.answer.trim().slice(0, 100)}`);
    if (m.artifacts.screenshot !== null) {
      out.line(
        `    screenshot${v?.screenshot !== undefined ? ` (${v.screenshot.width}x${v.screenshot.height} PNG)` : ''}: ${access.url}${m.artifacts.screenshot}`,
      );
    }
    if (m.artifacts.console !== null)
      out.line(`    console log: ${access.url}${m.artifacts.console}`);
    if (m.localDisks.length > 0) out.line(`    local disks: ${m.localDisks.join(', ')}`);
  }
}

async function saveScreenshot(
  ctx: CliContext,
  c: Client,
  run: Run,
  file: string,
): Promise<string[]> {
  const saved: string[] = [];
  for (const [i, m] of run.machines.entries()) {
    if (m.artifacts.screenshot === null) continue;
    const res = await fetch(`${c.access.url}${m.artifacts.screenshot}`, {
      headers: { authorization: `Bearer ${c.access.token}` },
      signal: ctx.signal,
    });
    if (!res.ok) continue;
    const path = resolve(
      ctx.io.cwd,
      run.machines.length > 1 ? file.replace(/(\.png)?$/, `-${i}.png`) : file,
    );
    await writeFile(path, Buffer.from(await res.arrayBuffer()));
    saved.push(path);
  }
  return saved;
}

/** `failover test` through the vault: start, follow, print the verification, clean up unless --keep. */
export async function vaultTestFailover(
  ctx: CliContext,
  access: VaultAccess,
  o: VaultRunOptions,
  json: boolean,
): Promise<void> {
  const c = new Client(access, ctx);
  const out = new CliPrinter(ctx.io, json);
  const ids = await items(c, o);
  if ((ids === undefined) === (o.group === undefined)) {
    throw new LifeboatError(
      'LB_CLI_BAD_OPTION',
      'Name what to test: --machine <name>, --item <protected item id...> or --group <consistency group>.',
      { details: { option: '--machine' } },
    );
  }
  const started = await c.call<Run>('POST', '/api/test-failovers', {
    ...(ids !== undefined ? { protectedItemIds: ids } : { consistencyGroup: o.group }),
    point: pointChoice(o),
    ...(o.network !== undefined ? { network: o.network } : {}),
    verify: verify(o, true),
    ...hardware(o),
    ...(o.address !== undefined && ids?.length === 1
      ? {
          addresses: [
            {
              protectedItemId: ids[0],
              address: o.address,
              ...(o.gateway !== undefined ? { gateway: o.gateway } : {}),
            },
          ],
        }
      : {}),
  });
  out.note(
    `test failover ${started.id} on recovery host ${started.recoveryHostId}, job ${started.jobId}`,
  );
  const job = await follow(ctx, c, out, started.jobId, json);
  const run = await c.call<Run>('GET', `/api/test-failovers/${started.id}`);
  printRun(out, access, run);
  const screenshots =
    o.screenshotOut !== undefined ? await saveScreenshot(ctx, c, run, o.screenshotOut) : [];
  for (const s of screenshots) out.line(`screenshot saved to ${s}`);
  let cleanup: { run: Run; job: Job } | undefined;
  if (!o.keep || job.state !== 'succeeded') {
    const queued = await c.call<Run>('POST', `/api/test-failovers/${started.id}/cleanup`);
    const cj = await follow(ctx, c, out, queued.jobId, json);
    cleanup = { run: await c.call<Run>('GET', `/api/test-failovers/${started.id}`), job: cj };
    printRemoved(out, cj);
    out.line(`cleanup: ${cj.state}`);
  } else {
    out.note(
      `the test machines keep running; clean up with "lifeboat failover cleanup --test-failover ${started.id}"`,
    );
  }
  out.json({ testFailover: cleanup?.run ?? run, job, cleanup: cleanup?.job ?? null, screenshots });
  failIfFailed(job);
  if (cleanup !== undefined) failIfFailed(cleanup.job);
}

/** `failover start` through the vault: one machine, unplanned from a point or --planned. */
export async function vaultStartFailover(
  ctx: CliContext,
  access: VaultAccess,
  o: VaultRunOptions,
  json: boolean,
): Promise<void> {
  const c = new Client(access, ctx);
  const out = new CliPrinter(ctx.io, json);
  const ids = await items(c, o);
  if (ids === undefined || ids.length !== 1) {
    throw new LifeboatError(
      'LB_CLI_BAD_OPTION',
      'A failover is of one machine: give --machine <name> or one --item <protected item id>.',
      { details: { option: '--machine' } },
    );
  }
  const started = await c.call<Run>('POST', '/api/failovers', {
    protectedItemId: ids[0],
    ...(o.planned ? { planned: true } : { point: pointChoice(o) }),
    ...(o.port !== undefined ? { verify: verify(o, false) } : {}),
    ...hardware(o),
    ...(o.address !== undefined
      ? {
          address: {
            address: o.address,
            ...(o.gateway !== undefined ? { gateway: o.gateway } : {}),
          },
        }
      : {}),
  });
  out.note(
    `${o.planned ? 'planned ' : ''}failover ${started.id} on recovery host ${started.recoveryHostId}, job ${started.jobId}`,
  );
  const job = await follow(ctx, c, out, started.jobId, json);
  const run = await c.call<Run>('GET', `/api/failovers/${started.id}`);
  printRun(out, access, run);
  out.json({ failover: run, job });
  failIfFailed(job);
  out.note(
    `change its point with "lifeboat failover change-point --failover ${run.id} --point <id>", or make it final with "lifeboat failover commit --failover ${run.id}"`,
  );
}

/** `failover change-point --failover <id>` through the vault. */
export async function vaultChangePoint(
  ctx: CliContext,
  access: VaultAccess,
  id: string,
  o: { point?: string[]; latestApp?: boolean; at?: string },
  json: boolean,
): Promise<void> {
  const c = new Client(access, ctx);
  const out = new CliPrinter(ctx.io, json);
  const queued = await c.call<Run>(
    'POST',
    `/api/failovers/${encodeURIComponent(id)}/change-point`,
    {
      point: pointChoice({
        ...(o.point?.[0] !== undefined ? { point: o.point[0] } : {}),
        ...(o.latestApp === true ? { latestApp: true } : {}),
        ...(o.at !== undefined ? { at: o.at } : {}),
      }),
    },
  );
  const job = await follow(ctx, c, out, queued.jobId, json);
  const run = await c.call<Run>('GET', `/api/failovers/${queued.id}`);
  printRun(out, access, run);
  out.json({ failover: run, job });
  failIfFailed(job);
}

/** `failover commit --failover <id>` through the vault, then its hydration (unless --no-hydrate). */
export async function vaultCommit(
  ctx: CliContext,
  access: VaultAccess,
  id: string,
  o: { hydrate: boolean; raw?: boolean; verify?: boolean },
  json: boolean,
): Promise<void> {
  const c = new Client(access, ctx);
  const out = new CliPrinter(ctx.io, json);
  const queued = await c.call<Run & { commitJobId: string; hydrationJobId: string | null }>(
    'POST',
    `/api/failovers/${encodeURIComponent(id)}/commit`,
    { hydrate: o.hydrate, format: o.raw ? 'raw' : 'qcow2', verify: o.verify === true },
  );
  const jobs = [await follow(ctx, c, out, queued.commitJobId, json)];
  failIfFailed(jobs[0]!);
  if (queued.hydrationJobId !== null) {
    out.note('committed; hydrating the disks into local files while the machine runs');
    jobs.push(await follow(ctx, c, out, queued.hydrationJobId, json));
  }
  const run = await c.call<Run>('GET', `/api/failovers/${queued.id}`);
  printRun(out, access, run);
  out.json({ failover: run, jobs });
  for (const j of jobs) failIfFailed(j);
}

/** `failover cleanup --test-failover <id>` through the vault. */
export async function vaultCleanup(
  ctx: CliContext,
  access: VaultAccess,
  id: string,
  json: boolean,
): Promise<void> {
  const c = new Client(access, ctx);
  const out = new CliPrinter(ctx.io, json);
  const queued = await c.call<Run>('POST', `/api/test-failovers/${encodeURIComponent(id)}/cleanup`);
  const job = await follow(ctx, c, out, queued.jobId, json);
  const run = await c.call<Run>('GET', `/api/test-failovers/${queued.id}`);
  printRemoved(out, job);
  out.line(`test failover ${run.id}: ${run.state}`);
  out.json({ testFailover: run, job });
  failIfFailed(job);
}

/** `failover list`: the vault's failovers, or its test failovers with `test`. */
export async function vaultListRuns(
  ctx: CliContext,
  access: VaultAccess,
  o: {
    test?: boolean;
    state?: string;
    protectedItemId?: string;
    recoveryHostId?: string;
    limit?: string;
    all?: boolean;
  },
  json: boolean,
): Promise<void> {
  const c = new Client(access, ctx);
  const out = new CliPrinter(ctx.io, json);
  const params = new URLSearchParams({ limit: o.limit ?? '100' });
  if (o.state !== undefined) params.set('state', o.state);
  if (o.protectedItemId !== undefined) params.set('protectedItemId', o.protectedItemId);
  if (o.recoveryHostId !== undefined) params.set('recoveryHostId', o.recoveryHostId);
  const path = o.test === true ? '/api/test-failovers' : '/api/failovers';
  const runs: Run[] = [];
  let total = 0;
  for (;;) {
    const page = await c.call<{ items: Run[]; nextCursor: string | null; total: number }>(
      'GET',
      `${path}?${params}`,
    );
    runs.push(...page.items);
    total = page.total;
    if (o.all !== true || page.nextCursor === null) break;
    params.set('cursor', page.nextCursor);
  }
  out.json({ items: runs, total });
  for (const r of runs) {
    out.line(
      `${r.id}  ${r.state}  ${r.machines.map((m) => m.machineName).join(', ')}  recovery host ${r.recoveryHostId}  job ${r.jobId}`,
    );
  }
  if (runs.length < total) out.note(`${runs.length} of ${total} shown; use --all or --limit.`);
}

/** `failover show <id>`: one failover (`fo_...`) or test failover (`tf_...`). */
export async function vaultShowRun(
  ctx: CliContext,
  access: VaultAccess,
  id: string,
  json: boolean,
): Promise<void> {
  const c = new Client(access, ctx);
  const out = new CliPrinter(ctx.io, json);
  const path = id.startsWith('tf_') ? '/api/test-failovers' : '/api/failovers';
  const run = await c.call<Run>('GET', `${path}/${encodeURIComponent(id)}`);
  out.json(run);
  printRun(out, access, run);
}
