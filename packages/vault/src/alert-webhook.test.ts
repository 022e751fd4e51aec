import { createServer, type Server } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DIALECTS,
  dialectFixture,
  startTestVault,
  type DialectFixture,
  type TestVault,
} from './test-harness.js';

// Issue 5: alerts are "delivered to a webhook when configured". A receiver that is down or
// overloaded for a moment still gets each raised and cleared alert, once and in order; a final
// no (4xx) is not retried; a vault that stops keeps what it could not deliver, and the next
// vault on the same database delivers it.
describe.each(DIALECTS)('alert webhook on %s', (dialect) => {
  let fx: DialectFixture;
  let hook: Server;
  let url = '';
  // What the receiver answers next, one status per request (then 200); 0: no answer at all;
  // 1: 200 after 150 ms.
  let answers: number[] = [];
  const received: Array<{ event: string; alert: { subjectId: string }; delivery: string }> = [];
  // The delivery id of every request, answered or not.
  const ids: string[] = [];
  let requests = 0;
  beforeAll(async () => {
    fx = await dialectFixture(dialect);
    hook = createServer((req, res) => {
      let body = '';
      req.on('data', (c: Buffer) => (body += c.toString()));
      req.on('end', () => {
        requests++;
        const delivery = String(req.headers['x-lifeboat-delivery']);
        ids.push(delivery);
        const status = answers.shift() ?? 200;
        if (status === 0) return; // hangs: the vault's request times out or is cut off
        const answer = (code: number): void => {
          if (code === 200)
            received.push({ ...(JSON.parse(body) as (typeof received)[number]), delivery });
          res.statusCode = code;
          res.end();
        };
        if (status === 1) setTimeout(() => answer(200), 150);
        else answer(status);
      });
    });
    await new Promise<void>((resolve) => hook.listen(0, '127.0.0.1', resolve));
    url = `http://127.0.0.1:${(hook.address() as { port: number }).port}/alerts`;
  });
  afterAll(async () => {
    hook?.closeAllConnections();
    await new Promise((resolve) => hook?.close(resolve));
    await fx?.stop();
  });

  const raise = (t: TestVault, subjectId: string) =>
    t.vault.context.alerts.raise({
      kind: 'job-failed',
      severity: 'warning',
      subjectType: 'job',
      subjectId,
      message: `test alert ${subjectId}`,
    });

  const events = (subjectId: string) =>
    received.filter((r) => r.alert.subjectId === subjectId).map((r) => r.event);
  const deliveries = (t: TestVault) =>
    t.vault.context.db
      .selectFrom('alertDeliveries')
      .select(['id', 'event', 'state', 'attempts', 'lastError'])
      .orderBy('createdAt')
      .orderBy('id')
      .execute();

  it('retries a delivery the receiver could not take, and drops one it refused or that failed every retry', async () => {
    const t = await startTestVault(await fx.fresh(), {
      webhookUrl: url,
      webhookRetryDelaysMs: [20, 20, 20],
    });
    try {
      // Down twice (503, then overloaded 429), then taken: delivered once.
      answers = [503, 429];
      requests = 0;
      await raise(t, 'a');
      await t.vault.context.alerts.flush();
      expect(requests).toBe(3);
      expect(events('a')).toEqual(['alert.raised']);
      // The three requests were one delivery (a receiver can tell a repeat by its id).
      expect(new Set(ids.slice(-3)).size).toBe(1);
      // Cleared: delivered too.
      await t.vault.context.alerts.clear('job-failed', 'job', 'a');
      await t.vault.context.alerts.flush();
      expect(received.filter((r) => r.alert.subjectId === 'a').map((r) => r.event)).toEqual([
        'alert.raised',
        'alert.cleared',
      ]);
      // A final no is not retried.
      answers = [400];
      requests = 0;
      await raise(t, 'b');
      await t.vault.context.alerts.flush();
      expect(requests).toBe(1);
      expect(received.filter((r) => r.alert.subjectId === 'b')).toEqual([]);
      // Down for longer than the retries: given up after the last one.
      answers = [500, 500, 500, 500, 500];
      requests = 0;
      await raise(t, 'c');
      await t.vault.context.alerts.flush();
      expect(requests).toBe(4);
      answers = [];
      // What happened to each delivery is in the database.
      expect((await deliveries(t)).map((d) => [d.event, d.state, d.attempts, d.lastError])).toEqual(
        [
          ['alert.raised', 'delivered', 3, 'HTTP 429'],
          ['alert.cleared', 'delivered', 1, null],
          ['alert.raised', 'failed', 1, 'HTTP 400'],
          ['alert.raised', 'failed', 4, 'HTTP 500'],
        ],
      );
      const metrics = await t.vault.context.metrics.registry.metrics();
      expect(metrics).toMatch(
        /lifeboat_vault_alert_webhook_deliveries_total\{outcome="delivered"\} 2/,
      );
      expect(metrics).toMatch(
        /lifeboat_vault_alert_webhook_deliveries_total\{outcome="failed"\} 2/,
      );
    } finally {
      await t.close();
    }
  });

  it('sends the cleared event of an alert only after its raised event', async () => {
    const t = await startTestVault(await fx.fresh(), {
      webhookUrl: url,
      webhookRetryDelaysMs: [150],
    });
    try {
      answers = [503];
      requests = 0;
      await raise(t, 'e');
      await t.vault.context.alerts.clear('job-failed', 'job', 'e');
      await t.vault.context.alerts.flush();
      expect(events('e')).toEqual(['alert.raised', 'alert.cleared']);
      expect(requests).toBe(3);
    } finally {
      await t.close();
    }
  });

  it('keeps what it could not deliver when the vault stops, and the next vault delivers it', async () => {
    const where = await fx.fresh();
    const first = await startTestVault(where, {
      webhookUrl: url,
      webhookRetryDelaysMs: [60_000],
    });
    // 'f': the receiver never answers, and the vault stops while it waits.
    // 'g': the receiver is down; the retry is a minute away when the vault stops.
    answers = [0, 503];
    requests = 0;
    const before = ids.length;
    await raise(first, 'f');
    const deadline = Date.now() + 5000;
    while (requests === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    await raise(first, 'g');
    while (requests < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    expect(requests).toBe(2);
    const started = Date.now();
    await first.close();
    expect(Date.now() - started).toBeLessThan(3000);
    expect(events('f')).toEqual([]);
    expect(events('g')).toEqual([]);

    // Restarted on the same database, with the receiver back: both go out, each once.
    const second = await startTestVault(where, {
      webhookUrl: url,
      webhookRetryDelaysMs: [20],
    });
    try {
      // 'f' is due at once; 'g' keeps the minute its failed attempt set, so move it closer.
      await second.vault.context.db
        .updateTable('alertDeliveries')
        .set({ nextAttemptAt: new Date().toISOString() })
        .where('state', '=', 'pending')
        .execute();
      await second.vault.context.alerts.flush();
      expect(events('f')).toEqual(['alert.raised']);
      expect(events('g')).toEqual(['alert.raised']);
      // The same deliveries as before the restart, by id.
      const f = received.find((r) => r.alert.subjectId === 'f');
      const g = received.find((r) => r.alert.subjectId === 'g');
      expect(ids.slice(before, before + 2)).toEqual([f?.delivery, g?.delivery]);
      expect((await deliveries(second)).map((d) => d.state)).toEqual(['delivered', 'delivered']);
    } finally {
      await second.close();
    }
  });

  it.runIf(dialect === 'postgres')(
    'two vault instances on one database send each delivery once',
    async () => {
      const where = await fx.fresh();
      // Both look for pending deliveries every 20 ms, and the receiver takes 150 ms to answer:
      // without its claim, the instance that did not raise an alert would POST it too.
      const a = await startTestVault(
        { ...where, dataDir: `${where.dataDir}-a` },
        { webhookUrl: url, webhookPollMs: 20 },
      );
      const b = await startTestVault(
        { ...where, dataDir: `${where.dataDir}-b` },
        { webhookUrl: url, webhookPollMs: 20, secretKeyFile: `${where.dataDir}-a/secret.key` },
      );
      try {
        const before = ids.length;
        answers = Array.from({ length: 20 }, () => 1);
        for (let i = 0; i < 6; i++) await raise(i % 2 === 0 ? a : b, `h${i}`);
        await a.vault.context.alerts.flush();
        await b.vault.context.alerts.flush();
        const sent = ids.slice(before);
        expect(sent).toHaveLength(6);
        expect(new Set(sent).size).toBe(6);
        for (let i = 0; i < 6; i++) expect(events(`h${i}`)).toEqual(['alert.raised']);
      } finally {
        answers = [];
        await a.close();
        await b.close();
      }
    },
  );
});
