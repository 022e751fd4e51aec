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
// overloaded for a moment still gets each raised and cleared alert, once; a final no (4xx)
// is not retried; a vault that stops gives up its pending retries instead of hanging.
describe.each(DIALECTS)('alert webhook on %s', (dialect) => {
  let fx: DialectFixture;
  let hook: Server;
  let url = '';
  // What the receiver answers next, one status per request (then 200).
  let answers: number[] = [];
  const received: Array<{ event: string; alert: { subjectId: string } }> = [];
  let requests = 0;
  beforeAll(async () => {
    fx = await dialectFixture(dialect);
    hook = createServer((req, res) => {
      let body = '';
      req.on('data', (c: Buffer) => (body += c.toString()));
      req.on('end', () => {
        requests++;
        const status = answers.shift() ?? 200;
        if (status === 200) received.push(JSON.parse(body) as (typeof received)[number]);
        res.statusCode = status;
        res.end();
      });
    });
    await new Promise<void>((resolve) => hook.listen(0, '127.0.0.1', resolve));
    url = `http://127.0.0.1:${(hook.address() as { port: number }).port}/alerts`;
  });
  afterAll(async () => {
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
      expect(received.filter((r) => r.alert.subjectId === 'a').map((r) => r.event)).toEqual([
        'alert.raised',
      ]);
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
    } finally {
      await t.close();
    }
  });

  it('gives up pending retries when the vault stops', async () => {
    const t = await startTestVault(await fx.fresh(), {
      webhookUrl: url,
      webhookRetryDelaysMs: [60_000],
    });
    answers = [503];
    requests = 0;
    await raise(t, 'd');
    const deadline = Date.now() + 5000;
    while (requests === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    const started = Date.now();
    await t.close();
    expect(Date.now() - started).toBeLessThan(5000);
    expect(requests).toBe(1);
    answers = [];
  });
});
