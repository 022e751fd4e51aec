import { createServer } from 'node:http';
import type { Server } from 'node:http';
import { Gauge, Registry, collectDefaultMetrics } from 'prom-client';
import type { ProcessServerHealth } from './process-server.js';

/** Options for {@link HealthServer.start}. */
export interface HealthServerOptions {
  host: string;
  port: number;
  report: () => ProcessServerHealth;
}

/** The small HTTP listener of `GET /health` (JSON) and `GET /metrics` (Prometheus text). */
export class HealthServer {
  private constructor(
    private readonly server: Server,
    /** Prometheus registry of this process server. */
    readonly registry: Registry,
  ) {}

  /** Listens; keep it on 127.0.0.1 (or behind a proxy): it has no authentication. */
  static async start(options: HealthServerOptions): Promise<HealthServer> {
    const registry = new Registry();
    collectDefaultMetrics({ register: registry, prefix: 'lifeboat_ps_' });
    registerGauges(registry, options.report);
    const server = createServer((req, res) => {
      const url = req.url ?? '/';
      if (req.method === 'GET' && url === '/health') {
        const body = JSON.stringify(options.report());
        res.writeHead(200, { 'content-type': 'application/json' }).end(body);
      } else if (req.method === 'GET' && url === '/metrics') {
        registry.metrics().then(
          (text) => res.writeHead(200, { 'content-type': registry.contentType }).end(text),
          (err: Error) => res.writeHead(500).end(err.message),
        );
      } else {
        res.writeHead(404, { 'content-type': 'application/json' }).end(
          JSON.stringify({
            code: 'LB_PS_NOT_FOUND',
            message: 'Only GET /health and GET /metrics exist here.',
          }),
        );
      }
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(options.port, options.host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    return new HealthServer(server, registry);
  }

  /** The listening port. */
  get port(): number {
    const a = this.server.address();
    return typeof a === 'object' && a ? a.port : 0;
  }

  /** Closes the listener and its connections. */
  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

function registerGauges(registry: Registry, report: () => ProcessServerHealth): void {
  // One snapshot per scrape, shared by every gauge's collect.
  let cached: { at: number; h: ProcessServerHealth } | undefined;
  const snap = (): ProcessServerHealth => {
    const now = performance.now();
    if (!cached || now - cached.at > 500) cached = { at: now, h: report() };
    return cached.h;
  };
  const gauge = (
    name: string,
    help: string,
    labelNames: string[],
    fill: (g: Gauge, h: ProcessServerHealth) => void,
  ): void => {
    new Gauge({
      name,
      help,
      labelNames,
      registers: [registry],
      collect(this: Gauge) {
        this.reset();
        fill(this, snap());
      },
    });
  };
  gauge('lifeboat_ps_journal_used_bytes', 'Bytes used by the cache journal', [], (g, h) =>
    g.set(h.journal.usedBytes),
  );
  gauge('lifeboat_ps_journal_max_bytes', 'Size limit of the cache journal', [], (g, h) =>
    g.set(h.journal.maxBytes),
  );
  gauge('lifeboat_ps_sessions', 'Agent sessions connected', [], (g, h) => g.set(h.ingest.sessions));
  gauge(
    'lifeboat_ps_ingest_bytes_per_second',
    'Bytes per second received from agents',
    [],
    (g, h) => g.set(h.ingest.bytesPerSecondIn),
  );
  gauge('lifeboat_ps_store_bytes_per_second', 'Bytes per second written to the store', [], (g, h) =>
    g.set(h.ingest.bytesPerSecondOut),
  );
  gauge(
    'lifeboat_ps_commit_latency_ms',
    'Time from a cut durable in the journal to its committed points (last 1000 cuts)',
    ['quantile'],
    (g, h) => {
      g.set({ quantile: '0.5' }, h.ingest.commitLatencyMs.p50);
      g.set({ quantile: '0.99' }, h.ingest.commitLatencyMs.p99);
    },
  );
  gauge(
    'lifeboat_ps_store_workers_alive',
    'Store worker threads running (fewer than configured while one is restarted)',
    [],
    (g, h) => g.set(h.storeWorkers?.alive ?? 0),
  );
  gauge(
    'lifeboat_ps_store_worker_restarts',
    'Store worker threads restarted since the process server started',
    [],
    (g, h) => g.set(h.storeWorkers?.restarts ?? 0),
  );
  gauge('lifeboat_ps_cpu_percent', 'CPU use of the process server (100 = one core)', [], (g, h) =>
    g.set(h.process.cpuPercent),
  );
  gauge(
    'lifeboat_ps_machine_backlog_bytes',
    'Journal bytes of a machine not yet committed',
    ['machine'],
    (g, h) => {
      for (const m of h.machines) g.set({ machine: m.machine }, m.backlogBytes);
    },
  );
  gauge(
    'lifeboat_ps_machine_resync_required',
    '1 when the machine must be resynced',
    ['machine'],
    (g, h) => {
      for (const m of h.machines) g.set({ machine: m.machine }, m.resyncRequired ? 1 : 0);
    },
  );
  gauge(
    'lifeboat_ps_machine_ingest_bytes_per_second',
    'Bytes per second received from a machine',
    ['machine'],
    (g, h) => {
      for (const m of h.machines) g.set({ machine: m.machine }, m.bytesPerSecondIn);
    },
  );
  gauge(
    'lifeboat_ps_disk_rpo_seconds',
    'Age of the newest committed point of a disk',
    ['machine', 'disk'],
    (g, h) => {
      for (const m of h.machines)
        for (const d of m.disks)
          if (d.rpoSeconds !== null) g.set({ machine: m.machine, disk: d.disk }, d.rpoSeconds);
    },
  );
}
