import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { chown, mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { LifeboatError } from '@lifeboat/protocol';

const execFileAsync = promisify(execFile);

/** Options for {@link startPostgres}. */
export interface PostgresOptions {
  /** Directory of Debian's server binaries. @default the newest `/usr/lib/postgresql/<ver>/bin` */
  binDir?: string;
  /** Milliseconds to wait for the server to accept connections. @default 60000 */
  startTimeoutMs?: number;
}

/** A private PostgreSQL server for one test file. */
export interface PostgresServer {
  /** Connection URL of the `postgres` database as superuser `postgres` (trust auth, TCP). */
  readonly url: string;
  /** TCP port on 127.0.0.1. */
  readonly port: number;
  /** Creates a fresh database and returns its connection URL. */
  createDatabase(name: string): Promise<string>;
  /** Stops the server and removes its data directory; safe to call twice. */
  stop(): Promise<void>;
}

function findBinDir(): string {
  const root = '/usr/lib/postgresql';
  const versions = existsSync(root)
    ? readdirSync(root)
        .filter((v) => existsSync(join(root, v, 'bin', 'postgres')))
        .sort((a, b) => Number(b) - Number(a))
    : [];
  const newest = versions[0];
  if (newest === undefined) {
    throw new LifeboatError(
      'LB_TESTING_POSTGRES_MISSING',
      'PostgreSQL server binaries not found under /usr/lib/postgresql. Install Debian\'s "postgresql" package (scripts/install-deps.sh does).',
    );
  }
  return join(root, newest, 'bin');
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address !== null ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

// PostgreSQL refuses to run as root: as root, run its binaries as the `postgres` user.
const asRoot = process.getuid?.() === 0;
function command(bin: string, args: string[]): [string, string[]] {
  return asRoot ? ['runuser', ['-u', 'postgres', '--', bin, ...args]] : [bin, args];
}

/**
 * Starts a private PostgreSQL server (Debian's binaries) in a fresh temporary directory, on
 * 127.0.0.1 and a free port, with its unix socket in that directory and fsync off (tests only:
 * a crash of the machine loses the data, which a test never needs). Start one per test file.
 */
export async function startPostgres(options: PostgresOptions = {}): Promise<PostgresServer> {
  const binDir = options.binDir ?? findBinDir();
  const startTimeoutMs = options.startTimeoutMs ?? 60_000;
  const dir = await mkdtemp(join(tmpdir(), 'lifeboat-pg-'));
  const dataDir = join(dir, 'data');
  let child: ChildProcess | undefined;
  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    if (child !== undefined && child.exitCode === null && child.signalCode === null) {
      const exited = new Promise<void>((resolve) => child?.once('exit', () => resolve()));
      // runuser forwards signals, but signal the postmaster itself too: it is the one that must end.
      const postmasterPid = await readPostmasterPid(dataDir);
      signal(postmasterPid, 'SIGINT');
      child.kill('SIGINT');
      const timer = setTimeout(() => {
        signal(postmasterPid, 'SIGKILL');
        child?.kill('SIGKILL');
      }, 10_000);
      await exited;
      clearTimeout(timer);
    }
    await rm(dir, { recursive: true, force: true, maxRetries: 3 });
  };
  try {
    if (asRoot) {
      const { stdout } = await execFileAsync('id', ['-u', 'postgres']);
      const uid = Number(stdout.trim());
      const { stdout: gidOut } = await execFileAsync('id', ['-g', 'postgres']);
      await chown(dir, uid, Number(gidOut.trim()));
    }
    const [initCmd, initArgs] = command(join(binDir, 'initdb'), [
      '-D',
      dataDir,
      '-U',
      'postgres',
      '--auth=trust',
      '--no-sync',
      '-E',
      'UTF8',
      '--locale=C',
    ]);
    await execFileAsync(initCmd, initArgs);
    // A port found free can be taken before the server binds it: try a few.
    let lastError: unknown;
    for (let attempt = 0; attempt < 3; attempt++) {
      const port = await freePort();
      const [cmd, args] = command(join(binDir, 'postgres'), [
        '-D',
        dataDir,
        '-h',
        '127.0.0.1',
        '-p',
        String(port),
        '-k',
        dir,
        '-c',
        'fsync=off',
        '-c',
        'synchronous_commit=off',
        '-c',
        'full_page_writes=off',
        '-c',
        'max_connections=200',
      ]);
      child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
      try {
        await waitReady(child, startTimeoutMs);
        const url = `postgres://postgres@127.0.0.1:${port}/postgres`;
        return {
          url,
          port,
          stop,
          createDatabase: async (name: string) => {
            if (!/^[a-z_][a-z0-9_]*$/.test(name)) {
              throw new LifeboatError(
                'LB_TESTING_BAD_NAME',
                `Database name "${name}" is not a plain lower-case identifier. Use [a-z0-9_].`,
              );
            }
            const [c, a] = command(join(binDir, 'createdb'), [
              '-h',
              dir,
              '-p',
              String(port),
              '-U',
              'postgres',
              name,
            ]);
            await execFileAsync(c, a);
            return `postgres://postgres@127.0.0.1:${port}/${name}`;
          },
        };
      } catch (err) {
        lastError = err;
        child.kill('SIGKILL');
        child = undefined;
      }
    }
    throw lastError;
  } catch (err) {
    await stop();
    throw err;
  }
}

async function readPostmasterPid(dataDir: string): Promise<number | undefined> {
  try {
    const text = await readFile(join(dataDir, 'postmaster.pid'), 'utf8');
    const pid = Number(text.split('\n')[0]);
    return Number.isInteger(pid) && pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

function signal(pid: number | undefined, sig: NodeJS.Signals): void {
  if (pid === undefined) return;
  try {
    process.kill(pid, sig);
  } catch {
    // Already gone.
  }
}

function waitReady(child: ChildProcess, timeoutMs: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let log = '';
    const timer = setTimeout(() => {
      cleanup();
      reject(
        new LifeboatError(
          'LB_TESTING_POSTGRES_START',
          `PostgreSQL did not start within ${timeoutMs} ms. Its log: ${log.slice(-2000)}`,
        ),
      );
    }, timeoutMs);
    const onData = (chunk: Buffer): void => {
      log += chunk.toString();
      if (log.includes('ready to accept connections')) {
        cleanup();
        // Keep draining stderr so the server never blocks on a full pipe.
        child.stderr?.resume();
        resolve();
      }
    };
    const onExit = (code: number | null): void => {
      cleanup();
      reject(
        new LifeboatError(
          'LB_TESTING_POSTGRES_START',
          `PostgreSQL exited (code ${code}) before accepting connections. Its log: ${log.slice(-2000)}`,
        ),
      );
    };
    const cleanup = (): void => {
      clearTimeout(timer);
      child.stderr?.off('data', onData);
      child.off('exit', onExit);
    };
    child.stderr?.on('data', onData);
    child.once('exit', onExit);
  });
}
