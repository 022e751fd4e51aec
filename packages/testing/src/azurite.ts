import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { makeTempDir } from './temp-dir.js';

/** The Azurite development account; its key is public (documented by Microsoft) and only works against emulators. */
export const AZURITE_ACCOUNT = 'devstoreaccount1';
/** The public key of {@link AZURITE_ACCOUNT}. */
export const AZURITE_ACCOUNT_KEY =
  'Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==';

/** Options for {@link startAzurite}. */
export interface AzuriteOptions {
  /** How long to wait for Azurite to listen, in ms. @default 60000 */
  startTimeoutMs?: number;
}

/** A running Azurite blob service, private to one test file. */
export interface Azurite {
  /** Connection string for the development account on this instance. */
  readonly connectionString: string;
  /** `http://127.0.0.1:PORT/devstoreaccount1` (path-style, as Azurite serves it). */
  readonly blobEndpoint: string;
  /** The TCP port; the same across {@link Azurite.restart}. */
  readonly port: number;
  /** Azurite's private data directory (removed by stop). */
  readonly location: string;
  /** True while the process runs (false after kill or stop). */
  readonly running: boolean;
  /** Stops Azurite for good and removes its data directory; safe to call twice. */
  stop(): Promise<void>;
  /**
   * A store outage: ends the process (gracefully, so Azurite keeps every blob it acknowledged,
   * as the real service does) and leaves the port closed until {@link Azurite.restart}.
   */
  kill(): Promise<void>;
  /** Starts Azurite again on the same port and data directory (ends it first if it runs). */
  restart(): Promise<void>;
  /** A hung service: freezes the process (SIGSTOP); connections stay open but nothing answers. */
  pause(): void;
  /** Thaws a paused process (SIGCONT). */
  resume(): void;
}

const LISTEN_LINE = /successfully listens on (https?:\/\/[^\s]+)/;

/** Path of the `azurite-blob` entry point of the installed npm package. */
function azuriteBlobBin(): string {
  const require = createRequire(import.meta.url);
  return join(dirname(require.resolve('azurite/package.json')), 'dist', 'src', 'blob', 'main.js');
}

/**
 * Preloaded into Azurite: when the test process dies without stopping it (SIGKILL, a worker
 * killed on timeout, where no exit handler runs), Azurite notices it was orphaned, ends itself
 * and removes its directory, so no test run leaves an emulator behind.
 */
function watchParentScript(parentPid: number, dir: string): string {
  return `'use strict';
const { rmSync } = require('node:fs');
const parent = ${parentPid};
let orphaned = false;
setInterval(() => {
  if (orphaned || process.ppid === parent) return;
  orphaned = true;
  process.on('exit', () => rmSync(${JSON.stringify(dir)}, { recursive: true, force: true }));
  process.kill(process.pid, 'SIGTERM');
  setTimeout(() => process.exit(1), 10000).unref();
}, 1000).unref();
`;
}

/** A child process that ended before listening, with what it said. */
class AzuriteStartError extends Error {
  constructor(
    message: string,
    readonly output: string,
  ) {
    super(`${message}\n${output}`);
  }
}

/** Spawns azurite-blob on `port` (0: any free port) and resolves with the port it listens on. */
async function spawnAzurite(
  location: string,
  preload: string,
  port: number,
  timeoutMs: number,
): Promise<{ child: ChildProcess; port: number }> {
  const child = spawn(
    process.execPath,
    [
      '--require',
      preload,
      azuriteBlobBin(),
      '--blobHost',
      '127.0.0.1',
      '--blobPort',
      String(port),
      '--location',
      location,
      '--silent',
      '--skipApiVersionCheck',
      '--disableTelemetry',
      // The SDK may send headers newer than this Azurite knows; loose mode ignores them.
      '--loose',
    ],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let output = '';
  const collect = (chunk: Buffer): void => {
    // Keep only the tail: it is for error messages, and the pipes must keep draining.
    output = (output + chunk.toString('utf8')).slice(-8192);
  };
  child.stdout?.on('data', collect);
  child.stderr?.on('data', collect);
  try {
    const listening = await new Promise<number>((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(new AzuriteStartError(`Azurite did not listen within ${timeoutMs} ms`, output));
      }, timeoutMs);
      const onData = (): void => {
        const m = LISTEN_LINE.exec(output);
        if (m?.[1] !== undefined) {
          done();
          resolve(Number(new URL(m[1]).port));
        }
      };
      const onExit = (code: number | null, sig: string | null): void => {
        done();
        reject(new AzuriteStartError(`Azurite exited (code ${code}, signal ${sig})`, output));
      };
      const onError = (err: Error): void => {
        done();
        reject(err);
      };
      const done = (): void => {
        clearTimeout(timer);
        child.stdout?.off('data', onData);
        child.off('exit', onExit);
        child.off('error', onError);
      };
      child.stdout?.on('data', onData);
      child.once('exit', onExit);
      child.once('error', onError);
    });
    return { child, port: listening };
  } catch (err) {
    await endProcess(child, 'SIGKILL', 0);
    throw err;
  }
}

/** Sends `signal`, waits for exit, and escalates to SIGKILL after `graceMs`. */
async function endProcess(
  child: ChildProcess,
  signal: NodeJS.Signals,
  graceMs: number,
): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  // A stopped process cannot handle SIGTERM until it is continued.
  child.kill('SIGCONT');
  child.kill(signal);
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
  try {
    await exited;
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Starts Azurite's blob service from the npm package on 127.0.0.1 with an ephemeral port and a
 * private data directory. Call `stop()` in `afterAll`; the process is also killed if the test
 * process exits without it.
 */
export async function startAzurite(options: AzuriteOptions = {}): Promise<Azurite> {
  const timeoutMs = options.startTimeoutMs ?? 60_000;
  const dir = await makeTempDir('lifeboat-azurite-');
  const dataDir = join(dir.path, 'data');
  const preload = join(dir.path, 'watch-parent.cjs');
  await mkdir(dataDir);
  await writeFile(preload, watchParentScript(process.pid, dir.path));
  let child: ChildProcess | undefined;
  let port = 0;
  // Last resort so a crashed test run leaves no Azurite behind (exit handlers must be sync).
  const onExit = (): void => {
    child?.kill('SIGKILL');
  };
  process.once('exit', onExit);

  const launch = async (): Promise<void> => {
    // The port of a previous run may be taken by someone else for a moment: retry.
    for (let attempt = 1; ; attempt++) {
      try {
        const started = await spawnAzurite(dataDir, preload, port, timeoutMs);
        child = started.child;
        port = started.port;
        return;
      } catch (err) {
        const inUse = err instanceof AzuriteStartError && err.output.includes('EADDRINUSE');
        if (!inUse || port === 0 || attempt >= 40) throw err;
        await sleep(250);
      }
    }
  };

  try {
    await launch();
  } catch (err) {
    process.off('exit', onExit);
    await dir.remove();
    throw err;
  }

  const blobEndpoint = `http://127.0.0.1:${port}/${AZURITE_ACCOUNT}`;
  let stopped = false;
  const kill = async (): Promise<void> => {
    if (child === undefined) return;
    const c = child;
    await endProcess(c, 'SIGTERM', 10_000);
    if (child === c) child = undefined;
  };
  return {
    connectionString:
      `DefaultEndpointsProtocol=http;AccountName=${AZURITE_ACCOUNT};` +
      `AccountKey=${AZURITE_ACCOUNT_KEY};BlobEndpoint=${blobEndpoint};`,
    blobEndpoint,
    port,
    location: dataDir,
    get running() {
      return child !== undefined && child.exitCode === null && child.signalCode === null;
    },
    kill,
    async restart() {
      if (stopped) throw new Error('Azurite was stopped; start a new one');
      await kill();
      await launch();
    },
    pause() {
      child?.kill('SIGSTOP');
    },
    resume() {
      child?.kill('SIGCONT');
    },
    async stop() {
      if (stopped) return;
      stopped = true;
      try {
        if (child !== undefined) await endProcess(child, 'SIGKILL', 0);
        child = undefined;
      } finally {
        process.off('exit', onExit);
        await dir.remove();
      }
    },
  };
}
