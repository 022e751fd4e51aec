/**
 * A process server in a child process, for tests that kill it (`kill -9`). Run as
 * `node --conditions=source --import tsx process-server-child.ts '<json>'`; prints one JSON line
 * `{"ready":true,"port":N,"healthPort":N}` once it listens.
 */
import { readFileSync } from 'node:fs';
import { ProcessServer } from '@lifeboat/process-server';
import { DirectoryBackend, Store } from '@lifeboat/store';
import type { ObjectBackend } from '@lifeboat/store';

/** What the parent passes. */
export interface ChildConfig {
  store: { dir: string } | { azureConnectionString: string; container: string };
  passphrase: string;
  journalDir: string;
  port: number;
  tls: { certPath: string; keyPath: string; caPath: string };
  journalMaxBytes?: number;
  overflowTimeoutMs?: number;
  /** Store work on this many worker threads (directory stores only), as `lifeboat process-server start` does. */
  storeWorkers?: number;
}

async function main(): Promise<void> {
  const cfg = JSON.parse(process.argv[2] ?? '{}') as ChildConfig;
  // The Azure SDK is loaded only when used: it doubles the start time, which the kill loop repeats.
  const backend: ObjectBackend =
    'dir' in cfg.store
      ? new DirectoryBackend({ path: cfg.store.dir })
      : new (await import('@lifeboat/store-azure')).AzureBlobBackend({
          connectionString: cfg.store.azureConnectionString,
          container: cfg.store.container,
          retry: { maxAttempts: 2 },
        });
  const store = await Store.open({ backend, passphrase: cfg.passphrase });
  const options: Parameters<typeof ProcessServer.start>[0] = {
    ...(cfg.storeWorkers !== undefined && 'dir' in cfg.store
      ? {
          storeWorkers: {
            count: cfg.storeWorkers,
            spec: { kind: 'directory' as const, path: cfg.store.dir, passphrase: cfg.passphrase },
          },
        }
      : { store }),
    journalDir: cfg.journalDir,
    tls: {
      cert: readFileSync(cfg.tls.certPath),
      key: readFileSync(cfg.tls.keyPath),
      ca: readFileSync(cfg.tls.caPath),
    },
    host: '127.0.0.1',
    port: cfg.port,
    healthPort: 0,
    logLevel: 'warn',
    storeRetryInitialMs: 100,
    storeRetryMaxMs: 1000,
  };
  if (cfg.journalMaxBytes !== undefined) options.journalMaxBytes = cfg.journalMaxBytes;
  if (cfg.overflowTimeoutMs !== undefined) options.overflowTimeoutMs = cfg.overflowTimeoutMs;
  const server = await ProcessServer.start(options);
  process.stdout.write(
    `${JSON.stringify({ ready: true, port: server.port, healthPort: server.healthPort })}\n`,
  );
  const stop = (): void => {
    void server
      .stop()
      .then(() => store.close())
      .finally(() => process.exit(0));
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((err: unknown) => {
  process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
  process.exit(1);
});
