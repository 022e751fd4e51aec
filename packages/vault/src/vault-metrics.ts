import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

/** Prometheus metrics of one vault instance (its own registry, so instances never collide). */
export class VaultMetrics {
  readonly registry = new Registry();
  readonly httpRequests = new Histogram({
    name: 'lifeboat_vault_http_request_seconds',
    help: 'HTTP request duration by route and status',
    labelNames: ['method', 'route', 'status'] as const,
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
    registers: [this.registry],
  });
  readonly jobsStarted = new Counter({
    name: 'lifeboat_vault_jobs_started_total',
    help: 'Jobs started (or resumed) by this instance',
    labelNames: ['kind'] as const,
    registers: [this.registry],
  });
  readonly jobsFinished = new Counter({
    name: 'lifeboat_vault_jobs_finished_total',
    help: 'Jobs finished by this instance, by final state',
    labelNames: ['kind', 'state'] as const,
    registers: [this.registry],
  });
  readonly protectedItems = new Gauge({
    name: 'lifeboat_vault_protected_items',
    help: 'Protected items by state (refreshed by the scheduler)',
    labelNames: ['state'] as const,
    registers: [this.registry],
  });
  readonly activeAlerts = new Gauge({
    name: 'lifeboat_vault_active_alerts',
    help: 'Active alerts by kind (refreshed by the scheduler)',
    labelNames: ['kind'] as const,
    registers: [this.registry],
  });
  readonly alertWebhookDeliveries = new Counter({
    name: 'lifeboat_vault_alert_webhook_deliveries_total',
    help: 'Alert webhook POSTs by this instance, by outcome (delivered, retried, failed)',
    labelNames: ['outcome'] as const,
    registers: [this.registry],
  });
  readonly schedulerLeader = new Gauge({
    name: 'lifeboat_vault_scheduler_leader',
    help: '1 when this instance holds the scheduler lock',
    registers: [this.registry],
  });

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: 'lifeboat_vault_' });
  }
}
