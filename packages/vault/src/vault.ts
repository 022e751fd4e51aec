import { randomBytes } from 'node:crypto';
import { chmod, readFile, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import Fastify, { LogController, type FastifyInstance } from 'fastify';
import { pino } from 'pino';
import { openDatabase, type OpenDatabase } from './db/open-database.js';
import { AuthCache, installAuth, type Access } from './http/auth.js';
import { registerComponentRoutes } from './http/component-routes.js';
import { registerEventRoutes } from './http/event-routes.js';
import { errorHandler } from './http/error-mapping.js';
import { registerOperationsRoutes } from './http/operations-routes.js';
import { registerPortalRoutes } from './http/portal-routes.js';
import { registerProtectionRoutes } from './http/protection-routes.js';
import { registerRecoveryRoutes } from './http/recovery-routes.js';
import { registerSimpleResources } from './http/simple-resources.js';
import { registerStatisticsRoutes } from './http/statistics-routes.js';
import { createUser, registerUserRoutes } from './http/user-routes.js';
import { lockDataDir } from './data-dir-lock.js';
import { newId } from './ids.js';
import {
  catalogueSyncJob,
  disableReplicationJob,
  enableReplicationJob,
  retentionJob,
} from './jobs/builtin-jobs.js';
import { storeGcJob } from './jobs/store-gc-job.js';
import { storeStatsJob } from './jobs/store-stats-job.js';
import { JobRunner } from './jobs/job-runner.js';
import { Scheduler } from './jobs/scheduler.js';
import { SecretBox } from './secret-box.js';
import { AlertService } from './services/alert-service.js';
import { CertificateAuthority } from './services/certificate-authority.js';
import { ItemHistory } from './services/item-history.js';
import type { VaultContext } from './vault-context.js';
import { VaultMetrics } from './vault-metrics.js';
import {
  resolveVaultOptions,
  type ResolvedVaultOptions,
  type VaultOptions,
} from './vault-options.js';

/** A running vault instance. */
export interface Vault {
  /** Base URL it listens on, e.g. `http://127.0.0.1:9440`. */
  readonly url: string;
  /** The Fastify app (tests use `app.inject`). */
  readonly app: FastifyInstance;
  readonly context: VaultContext;
  readonly scheduler: Scheduler;
  /** Every API route with who may call it (for the route table in docs and the tests). */
  readonly routes: ReadonlyArray<{ method: string; url: string; access: Access }>;
  /** Stops the HTTP server, scheduler and job runner, and closes the database. */
  close(): Promise<void>;
}

/**
 * Starts a vault: opens and migrates the database, loads the secret key and the CA, creates
 * the first admin, starts the job runner (recovering jobs a previous run left), the scheduler
 * and the HTTP API. The composition root of the vault role.
 */
export async function startVault(input: VaultOptions): Promise<Vault> {
  const options = resolveVaultOptions(input);
  const log = pino({ level: options.logLevel, base: { role: 'vault' } });
  // SQLite: one vault process per database (see lockDataDir); PostgreSQL: any number.
  const unlock = options.databaseUrl === undefined ? await lockDataDir(options.dataDir) : undefined;
  let secrets: SecretBox;
  let database: OpenDatabase;
  try {
    secrets = await SecretBox.open(options.secretKeyFile);
    database = await openDatabase({
      sqliteFile: join(options.dataDir, 'vault.sqlite'),
      postgresUrl: options.databaseUrl,
      countCacheMs: options.countCacheMs,
      listCacheMs: options.listCacheMs,
    });
  } catch (err) {
    await unlock?.();
    throw err;
  }
  let app: FastifyInstance | undefined;
  let runner: JobRunner | undefined;
  let scheduler: Scheduler | undefined;
  try {
    const ca = await CertificateAuthority.load(database.db, secrets, options.certificateDays);
    const metrics = new VaultMetrics();
    // The runner and the context refer to each other: the runner reads it once it is built.
    const holder: { context?: VaultContext } = {};
    runner = new JobRunner(() => {
      if (holder.context === undefined) throw new Error('vault context used before it was built');
      return holder.context;
    });
    const context: VaultContext = {
      db: database.db,
      dialect: database.dialect,
      options,
      secrets,
      log,
      metrics,
      alerts: new AlertService(database.db, log, {
        webhookUrl: options.webhookUrl,
        retryDelaysMs: options.webhookRetryDelaysMs,
        pollMs: options.webhookPollMs,
        deliveries: metrics.alertWebhookDeliveries,
      }),
      jobs: runner,
      ca,
      history: new ItemHistory(database.db, options.historyBucketSeconds, log),
      authCache: new AuthCache(options.authCacheMs),
      instanceId: newId('vault'),
    };
    holder.context = context;
    for (const h of [
      enableReplicationJob,
      disableReplicationJob,
      retentionJob,
      catalogueSyncJob,
      storeStatsJob,
      storeGcJob,
      ...options.jobHandlers,
    ])
      runner.register(h);
    await ensureAdmin(context);

    // pino's Logger and Fastify's base logger type differ only in optional members.
    const https = await serverTls(options, ca);
    const fastify = Fastify({
      loggerInstance: log,
      // A log line per request start and end cost more than a list page's query at info
      // level; they are there at debug. Failed requests are logged by errorHandler anyway.
      logController: new LogController({ disableRequestLogging: !log.isLevelEnabled('debug') }),
      ...(https !== undefined ? { https } : {}),
      ajv: {
        customOptions: {
          removeAdditional: false,
          coerceTypes: 'array',
          useDefaults: true,
          allErrors: false,
        },
      },
      bodyLimit: 16 * 1024 * 1024,
    }) as unknown as FastifyInstance;
    app = fastify;
    fastify.setErrorHandler(errorHandler);
    fastify.setNotFoundHandler((request, reply) =>
      reply.status(404).send({
        code: 'LB_VAULT_ROUTE_NOT_FOUND',
        message: `No route ${request.method} ${request.url}. See /api/openapi.json.`,
        details: { method: request.method, url: request.url },
      }),
    );
    await fastify.register(swagger, {
      openapi: {
        info: {
          title: 'Lifeboat vault API',
          version: '0.1.0',
          description: 'The control plane of Lifeboat. Errors are `{ code, message, details }`.',
        },
        components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
        security: [{ bearer: [] }],
      },
    });
    await fastify.register(swaggerUi, { routePrefix: '/api/docs' });
    registerPortalRoutes(fastify); // the built portal at / (not an API route: before onRoute)
    const routes: Array<{ method: string; url: string; access: Access }> = [];
    fastify.addHook('onRoute', (route) => {
      const methods = Array.isArray(route.method) ? route.method : [route.method];
      for (const method of methods) {
        if (method === 'HEAD' || route.url.startsWith('/api/docs')) continue;
        const configured = (route.config as { access?: Access } | undefined)?.access;
        routes.push({
          method,
          url: route.url,
          access: configured ?? (method === 'GET' ? 'viewer' : 'admin'),
        });
      }
    });
    installAuth(fastify, context);
    fastify.addHook('onResponse', async (request, reply) => {
      metrics.httpRequests.observe(
        {
          method: request.method,
          route: request.routeOptions.url ?? 'unknown',
          status: String(reply.statusCode),
        },
        reply.elapsedTime / 1000,
      );
    });
    fastify.get('/api/openapi.json', { config: { access: 'public' }, schema: { hide: true } }, () =>
      fastify.swagger(),
    );
    registerUserRoutes(fastify, context);
    registerSimpleResources(fastify, context);
    registerComponentRoutes(fastify, context);
    registerProtectionRoutes(fastify, context);
    registerOperationsRoutes(fastify, context);
    registerRecoveryRoutes(fastify, context);
    registerEventRoutes(fastify, context, options.eventPollMs);
    registerStatisticsRoutes(fastify, context);
    await fastify.ready();

    // SQLite has one vault process, so a job still `running` belongs to a vault that stopped.
    await runner.recoverOrphans(database.dialect === 'sqlite');
    runner.start();
    scheduler = new Scheduler(context);
    scheduler.start();
    // Deliveries a stopped vault left pending go out first.
    context.alerts.start();
    const address = await fastify.listen({ host: options.host, port: options.port });
    log.info({ address, database: database.dialect }, 'vault listening');
    const ctx = context;
    const sched = scheduler;
    const run = runner;
    let closed = false;
    return {
      url: address.replace('[::1]', '127.0.0.1'),
      app: fastify,
      context: ctx,
      scheduler: sched,
      routes,
      close: async () => {
        if (closed) return;
        closed = true;
        await fastify.close();
        await sched.stop();
        await run.stop();
        await ctx.history.close();
        await ctx.alerts.close();
        await database.close();
        await unlock?.();
      },
    };
  } catch (err) {
    await app?.close().catch(() => undefined);
    await scheduler?.stop();
    await runner?.stop();
    await database.close();
    await unlock?.();
    throw err;
  }
}

async function serverTls(
  options: ResolvedVaultOptions,
  ca: CertificateAuthority,
): Promise<
  | { key: string; cert: string; ca: string; requestCert: true; rejectUnauthorized: false }
  | undefined
> {
  if (options.tls === undefined) return undefined;
  let key: string;
  let cert: string;
  if (options.tls === 'internal') {
    const names = [options.host, 'localhost', '127.0.0.1', hostname()].filter(
      (n) => n !== '0.0.0.0' && n !== '::',
    );
    const issued = await ca.issue(`vault-${hostname()}`, names, undefined);
    key = issued.privateKey ?? '';
    cert = `${issued.certificate}${ca.certificate}`;
  } else {
    key = await readFile(options.tls.keyFile, 'utf8');
    cert = await readFile(options.tls.certFile, 'utf8');
  }
  // Client certificates are asked for but checked per route (components only), so browsers
  // and the CLI connect without one.
  return { key, cert, ca: ca.certificate, requestCert: true, rejectUnauthorized: false };
}

async function ensureAdmin(vault: VaultContext): Promise<void> {
  const any = await vault.db.selectFrom('users').select('id').limit(1).executeTakeFirst();
  if (any !== undefined) return;
  const given = vault.options.initialAdmin;
  const username = given?.username ?? 'admin';
  const password = given?.password ?? randomBytes(18).toString('base64url');
  await createUser(vault, { username, password, role: 'admin' });
  if (given === undefined) {
    const file = join(vault.options.dataDir, 'initial-admin-password');
    await writeFile(file, password + '\n', { mode: 0o600 });
    await chmod(file, 0o600);
    vault.log.warn(
      { file },
      `created user "admin"; its password is in ${file} (change it, then delete the file)`,
    );
  }
}
