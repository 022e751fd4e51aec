import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runDemo, startLocalInstallation } from '@lifeboat/cli';
import type { Demo, LocalInstallation } from '@lifeboat/cli';

// A planned failover through the vault, on `lifeboat up`'s roles (the same composition as
// `lifeboat up --demo`): the vault asks the process server for a last sync; its agent pauses the
// writing source VM and takes a last cut, the process server waits for its commit, the agent
// quits the source through QMP, and only then the recovery host boots those points. Every file
// the source finished is in the recovered machine, and the source is gone.

interface Job {
  id: string;
  kind: string;
  state: string;
  steps: Array<{ name: string; state: string }>;
  result: Record<string, unknown> | null;
  error: { code: string; message: string } | null;
}

async function until<T>(what: string, check: () => Promise<T | undefined>, ms: number): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

describe('lifeboat up: planned failover', () => {
  let dir: string;
  let inst: LocalInstallation | undefined;
  let demo: Demo | undefined;
  const lines: string[] = [];
  const controller = new AbortController();

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'lb-up-pf-'));
  });
  afterAll(async () => {
    controller.abort();
    await demo?.stop();
    await inst?.close();
    await rm(dir, { recursive: true, force: true });
  });

  it('replicates a last cut of the paused source, stops it, then boots that point: nothing the source finished is lost', async () => {
    inst = await startLocalInstallation({ dataDir: join(dir, 'data'), logLevel: 'silent' });
    const i = inst;
    const out = {
      tty: false,
      step: (t: string) => void lines.push(`== ${t}`),
      line: (t: string) => void lines.push(t),
      live: (t: string) => void lines.push(t),
    };
    demo = await runDemo(i, out, controller.signal, { testFailover: false });
    const d = demo;
    const qemu = lines.map((l) => /^QEMU pid (\d+) .* console (\S+)$/.exec(l)).find((m) => m);
    expect(qemu).toBeDefined();
    const [, pid, sourceConsole] = qemu!;
    const written = async (): Promise<number> =>
      Math.max(
        0,
        ...[...(await readFile(sourceConsole!, 'latin1')).matchAll(/LIFEBOAT-WROTE (\d+)/g)].map(
          (m) => Number(m[1]),
        ),
      );
    await until('the writer', async () => ((await written()) >= 2 ? true : undefined), 60_000);

    const started = await i.admin.call<{
      id: string;
      jobId: string;
      jobs: Array<{ id: string; kind: string }>;
      machines: Array<{ name: string }>;
    }>('POST', '/api/failovers', { protectedItemId: d.itemId, planned: true, memoryMiB: 256 });
    const syncJobId = started.jobs.find((j) => j.kind === 'final-sync')!.id;
    const job = await until(
      'the failover job',
      async () => {
        const j = await i.admin.call<Job>('GET', `/api/jobs/${started.jobId}`);
        return ['succeeded', 'failed'].includes(j.state) ? j : undefined;
      },
      300_000,
    );
    const sync = await i.admin.call<Job>('GET', `/api/jobs/${syncJobId}`);
    expect(sync.state, JSON.stringify(sync.error)).toBe('succeeded');
    expect(job.state, JSON.stringify(job.error)).toBe('succeeded');
    expect(sync.steps.map((s) => [s.name, s.state])).toEqual([
      ['pause the source and take a last cut', 'done'],
      ['commit the last cut', 'done'],
      ['stop the source', 'done'],
    ]);
    const name = started.machines[0]!.name;
    expect(job.steps.map((s) => s.name)).toEqual([
      'last sync of the source',
      'stop the source',
      `boot ${name}`,
    ]);
    // The source is gone, and wrote nothing after it was paused.
    expect(existsSync(`/proc/${pid}`)).toBe(false);
    const lastWritten = await written();
    const pointIds = sync.result?.['pointIds'] as string[];
    const run = await i.admin.call<{
      state: string;
      machines: Array<{ points: Array<{ id: string }> }>;
    }>('GET', `/api/failovers/${started.id}`);
    expect(run.state).toBe('booted');
    expect(run.machines[0]!.points.map((p) => p.id)).toEqual(pointIds);
    const item = await i.admin.call<{ state: string }>('GET', `/api/protected-items/${d.itemId}`);
    expect(item.state).toBe('failed-over');
    // Every file the source finished is in the recovered machine.
    const recovered = i.recoveryHost.running.get(name)!.machine;
    const m = await recovered.waitForConsole(/LIFEBOAT-LAST-INDEX (\d+)/, 180_000);
    expect(Number(m[1])).toBeGreaterThanOrEqual(lastWritten);
    expect(lastWritten).toBeGreaterThanOrEqual(2);
  }, 600_000);
});
