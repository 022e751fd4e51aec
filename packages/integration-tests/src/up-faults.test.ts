import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { until } from './poll.js';
import { runDemo, startLocalInstallation } from '@lifeboat/cli';
import type { Demo, LocalInstallation } from '@lifeboat/cli';

// The demo's fault: its process server stops while the VM keeps writing. The vault raises the
// RPO alert; once the process server is back the alert clears, and every cut the agent had
// acknowledged is a point in the store and in the vault's catalogue. In process (the same
// composition `lifeboat up --demo` runs), so the test can stop and start the process server.

interface Alert {
  id: string;
  kind: string;
  subjectId: string;
  state: string;
}

describe('lifeboat up --demo, process server outage', () => {
  let dir: string;
  let inst: LocalInstallation | undefined;
  let demo: Demo | undefined;
  const lines: string[] = [];
  const controller = new AbortController();

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'lb-up-faults-'));
  });
  afterAll(async () => {
    controller.abort();
    await demo?.stop();
    await inst?.close();
    await rm(dir, { recursive: true, force: true });
  });

  it('raises the RPO alert while the process server is down, clears it when it is back, and loses no acknowledged point', async () => {
    inst = await startLocalInstallation({ dataDir: join(dir, 'data'), logLevel: 'silent' });
    const i = inst;
    const out = {
      tty: false,
      step: (t: string) => void lines.push(`== ${t}`),
      line: (t: string) => void lines.push(t),
      live: (t: string) => void lines.push(t),
    };
    const acked: string[] = [];
    i.agents.on('cut', (_item: string, c: { cutId: string }) => acked.push(c.cutId));
    demo = await runDemo(i, out, controller.signal, { testFailover: false });
    const d = demo;
    const alerts = async (state: string): Promise<Alert[]> =>
      (
        await i.admin.call<{ items: Alert[] }>(
          'GET',
          `/api/alerts?kind=rpo-exceeded&subjectId=${d.itemId}&state=${state}`,
        )
      ).items;
    expect(await alerts('active')).toEqual([]);

    await i.stopProcessServer();
    const raised = await until('the RPO alert', async () => (await alerts('active'))[0], 180_000);
    expect(raised.kind).toBe('rpo-exceeded');
    // The demo shows it as the user would see it.
    await until(
      'the alert line',
      async () => lines.find((l) => l.startsWith('ALERT rpo-exceeded')),
      30_000,
    );

    await i.startProcessServer();
    await until(
      'the RPO alert to clear',
      async () => ((await alerts('active')).length === 0 ? true : undefined),
      180_000,
    );
    expect((await alerts('cleared')).map((a) => a.id)).toContain(raised.id);

    // No point missing: every acknowledged cut is a point in the store, and the catalogue has
    // every point of the store.
    await i.link.sync();
    const stored = await i.store.listPoints({ machine: d.machineId });
    const cuts = new Set(stored.map((p) => p.cut));
    expect(acked.length).toBeGreaterThan(0);
    expect(acked.filter((c) => !cuts.has(c))).toEqual([]);
    const catalogue = await i.admin.call<{ items: Array<{ id: string }> }>(
      'GET',
      `/api/recovery-points?protectedItemId=${d.itemId}&limit=1000`,
    );
    const listed = new Set(catalogue.items.map((p) => p.id));
    expect(stored.map((p) => p.id).filter((id) => !listed.has(id))).toEqual([]);
  }, 600_000);
});
