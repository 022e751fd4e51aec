import type { FastifyInstance } from 'fastify';
import type { ServerResponse } from 'node:http';
import type { AlertRow, ComponentRow, JobRow, ProtectedItemRow } from '../db/schema.js';
import { nowIso } from '../ids.js';
import { alertToApi } from '../services/alert-service.js';
import type { VaultContext } from '../vault-context.js';
import { componentToApi } from './component-routes.js';
import { jobToApi } from './operations-routes.js';
import { itemToApi } from './protection-routes.js';

/**
 * `GET /api/events`: server-sent events for live pages (portal, `lifeboat vault ... --follow`).
 * One poller per vault instance reads what changed in the database since its last round (jobs,
 * protected items, alerts, components) and sends it to every open stream, so changes made
 * through any vault instance on a shared PostgreSQL reach every client. Events:
 * `job`, `protected-item`, `alert`, `component`, each with the object as the API shows it;
 * a comment line every 15 s keeps proxies from closing idle streams.
 */
export function registerEventRoutes(
  app: FastifyInstance,
  vault: VaultContext,
  pollMs: number,
): void {
  const clients = new Set<ServerResponse>();
  let timer: NodeJS.Timeout | undefined;
  let since = nowIso();
  let polling = false;
  let lastKeepAlive = Date.now();

  const send = (event: string, data: unknown): void => {
    const frame = `event: ${event}\ndata: ${JSON.stringify(data)}\n\n`;
    for (const c of clients) c.write(frame);
  };

  const poll = async (): Promise<void> => {
    if (polling || clients.size === 0) return;
    polling = true;
    try {
      // Read up to now minus a little, so a row committed with a slightly older timestamp by
      // another instance is not skipped; rows seen twice are harmless to a live view.
      const until = nowIso(new Date(Date.now() - 200));
      if (until <= since) return;
      const db = vault.db;
      const jobs = (await db
        .selectFrom('jobs')
        .selectAll()
        .where('updatedAt', '>', since)
        .where('updatedAt', '<=', until)
        .orderBy('updatedAt')
        .limit(500)
        .execute()) as JobRow[];
      const items = (await db
        .selectFrom('protectedItems')
        .selectAll()
        .where('updatedAt', '>', since)
        .where('updatedAt', '<=', until)
        .orderBy('updatedAt')
        .limit(500)
        .execute()) as ProtectedItemRow[];
      const alerts = (await db
        .selectFrom('alerts')
        .selectAll()
        .where((eb) =>
          eb.or([
            eb.and([eb('raisedAt', '>', since), eb('raisedAt', '<=', until)]),
            eb.and([eb('clearedAt', '>', since), eb('clearedAt', '<=', until)]),
            eb.and([eb('acknowledgedAt', '>', since), eb('acknowledgedAt', '<=', until)]),
          ]),
        )
        .limit(500)
        .execute()) as AlertRow[];
      const components = (await db
        .selectFrom('components')
        .selectAll()
        .where('updatedAt', '>', since)
        .where('updatedAt', '<=', until)
        .orderBy('updatedAt')
        .limit(500)
        .execute()) as ComponentRow[];
      for (const j of jobs) send('job', jobToApi(j));
      for (const i of items) send('protected-item', itemToApi(i));
      for (const a of alerts) send('alert', alertToApi(a));
      for (const c of components) send('component', componentToApi(c, vault));
      // A burst beyond one round's 500 rows continues from the last row sent, not past it.
      let next = until;
      for (const rows of [jobs, items, components]) {
        const last = rows[rows.length - 1];
        if (rows.length === 500 && last !== undefined && last.updatedAt < next)
          next = last.updatedAt;
      }
      since = next;
      if (Date.now() - lastKeepAlive > 15_000) {
        lastKeepAlive = Date.now();
        for (const c of clients) c.write(': keep-alive\n\n');
      }
    } catch (err) {
      vault.log.warn({ err }, 'event stream poll failed');
    } finally {
      polling = false;
    }
  };

  app.get(
    '/api/events',
    {
      config: { access: 'viewer' },
      schema: {
        tags: ['events'],
        summary:
          'Server-sent events: job, protected-item, alert and component changes as they happen',
      },
    },
    (request, reply) => {
      void reply.hijack();
      const res = reply.raw;
      res.writeHead(200, {
        'content-type': 'text/event-stream',
        'cache-control': 'no-cache',
        connection: 'keep-alive',
        'x-accel-buffering': 'no',
      });
      res.write(`retry: 3000\nevent: ready\ndata: ${JSON.stringify({ time: nowIso() })}\n\n`);
      clients.add(res);
      if (timer === undefined) {
        since = nowIso(new Date(Date.now() - 200));
        timer = setInterval(() => void poll(), pollMs);
      }
      request.raw.on('close', () => {
        clients.delete(res);
        if (clients.size === 0 && timer !== undefined) {
          clearInterval(timer);
          timer = undefined;
        }
      });
    },
  );

  // Open streams would keep the server from closing: end them first.
  app.addHook('preClose', async () => {
    if (timer !== undefined) clearInterval(timer);
    timer = undefined;
    for (const c of clients) c.end();
    clients.clear();
  });
}
