import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { LifeboatError, isLifeboatError } from '@lifeboat/protocol';
import { QmpClient } from './qmp-client.js';

/** Options of {@link startQemuStorageDaemon}. */
export interface QemuStorageDaemonOptions {
  /** `--blockdev` definitions, in order (QAPI BlockdevOptions as JSON). @default [] */
  blockdevs?: Record<string, unknown>[];
  /** Start the built-in NBD server on this UNIX socket path (`--nbd-server`). @default none */
  nbdSocket?: string;
  /** `--export` definitions (QAPI BlockExportOptions as JSON); needs nbdSocket for NBD. @default [] */
  exports?: Record<string, unknown>[];
  /** Path of the QMP UNIX socket. @default a fresh temporary directory's `qmp.sock` */
  qmpSocket?: string;
  /** More command line arguments, appended as given. @default [] */
  extraArgs?: string[];
  /** The program to run. @default 'qemu-storage-daemon' */
  binary?: string;
  /** Give up when QMP does not answer within this long. @default 20000 */
  startTimeoutMs?: number;
}

/** A running qemu-storage-daemon, owned by whoever started it. */
export interface QemuStorageDaemon {
  /** A connected QMP client (capabilities negotiated). */
  readonly qmp: QmpClient;
  /** The QMP socket path. */
  readonly qmpSocket: string;
  /** The NBD server's socket, when one was asked for. */
  readonly nbdSocket: string | undefined;
  readonly pid: number;
  /** What the daemon wrote to stderr so far (for error messages). */
  stderr(): string;
  /** Asks the daemon to quit, kills it if it does not, and removes its temporary directory. */
  stop(): Promise<void>;
}

/** Every child a launcher started and nobody stopped yet: killed when this process exits. */
const live = new Set<ChildProcess>();
let exitHookInstalled = false;

/** Makes sure children die with the process that started them, even when a test fails. */
export function ownChild(child: ChildProcess): void {
  live.add(child);
  child.once('exit', () => live.delete(child));
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.once('exit', () => {
      for (const c of live) c.kill('SIGKILL');
    });
  }
}

/** util-linux's setpriv (Debian: essential), or undefined where it is missing. */
let setprivPath: string | null | undefined;
function setpriv(): string | undefined {
  if (setprivPath === undefined)
    setprivPath = ['/usr/bin/setpriv', '/bin/setpriv'].find((p) => existsSync(p)) ?? null;
  return setprivPath ?? undefined;
}

/**
 * Spawns a long-running child (QEMU, qemu-storage-daemon) that dies with this process however
 * this process dies, also by SIGKILL or a test runner's timeout, where no exit handler runs:
 * the child is started through `setpriv --pdeathsig SIGKILL`, so the kernel kills it when its
 * parent goes away (the parent death signal survives the exec of QEMU; the pid is QEMU's).
 * It is also {@link ownChild}ed. Without setpriv the child is started plainly (exit hook only).
 */
export function spawnOwned(
  command: string,
  args: readonly string[],
  options: SpawnOptions = {},
): ChildProcess {
  const sp = setpriv();
  const child =
    sp === undefined
      ? spawn(command, [...args], options)
      : spawn(sp, ['--pdeathsig', 'SIGKILL', '--', command, ...args], options);
  ownChild(child);
  return child;
}

/**
 * Starts qemu-storage-daemon with the given block nodes, exports and a QMP monitor, and waits
 * until QMP answers. The child is killed on `stop()`, and when this process dies (see
 * {@link spawnOwned}).
 */
export async function startQemuStorageDaemon(
  options: QemuStorageDaemonOptions = {},
): Promise<QemuStorageDaemon> {
  const startTimeoutMs = options.startTimeoutMs ?? 20_000;
  const binary = options.binary ?? 'qemu-storage-daemon';
  let tmp: string | undefined;
  let qmpSocket = options.qmpSocket;
  if (qmpSocket === undefined) {
    tmp = await mkdtemp(join(tmpdir(), 'lifeboat-qsd-'));
    qmpSocket = join(tmp, 'qmp.sock');
  }
  const args: string[] = [];
  for (const b of options.blockdevs ?? []) args.push('--blockdev', JSON.stringify(b));
  if (options.nbdSocket !== undefined) {
    args.push('--nbd-server', JSON.stringify({ addr: { type: 'unix', path: options.nbdSocket } }));
  }
  for (const e of options.exports ?? []) args.push('--export', JSON.stringify(e));
  args.push('--chardev', `socket,path=${qmpSocket},server=on,wait=off,id=lbqmp`);
  args.push('--monitor', 'chardev=lbqmp');
  args.push(...(options.extraArgs ?? []));

  const child = spawnOwned(binary, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr?.on('data', (d: Buffer) => {
    err += d.toString();
    if (err.length > 65536) err = err.slice(-65536);
  });
  let exitInfo: string | undefined;
  const exited = new Promise<void>((resolve) => {
    child.once('exit', (code, signal) => {
      exitInfo = `exit code ${code ?? 'none'}, signal ${signal ?? 'none'}`;
      resolve();
    });
    child.once('error', (e) => {
      exitInfo = e.message;
      resolve();
    });
  });
  const cleanup = async (): Promise<void> => {
    if (exitInfo === undefined) child.kill('SIGKILL');
    await exited;
    if (tmp !== undefined) await rm(tmp, { recursive: true, force: true });
  };

  const deadline = Date.now() + startTimeoutMs;
  let qmp: QmpClient | undefined;
  while (qmp === undefined) {
    if (exitInfo !== undefined) {
      await cleanup();
      throw new LifeboatError(
        'LB_QMP_START_FAILED',
        `qemu-storage-daemon exited at start (${exitInfo}): ${err.trim()}. Check the block device and export definitions.`,
        { details: { args, stderr: err } },
      );
    }
    try {
      qmp = await QmpClient.connect({ path: qmpSocket }, { connectTimeoutMs: 5000 });
    } catch (e) {
      // Not listening yet, or too slow to greet under load: retry until the deadline.
      const retriable =
        isLifeboatError(e, 'LB_QMP_CONNECT') ||
        isLifeboatError(e, 'LB_QMP_TIMEOUT') ||
        isLifeboatError(e, 'LB_QMP_CONNECTION_LOST');
      if (!retriable || Date.now() > deadline) {
        await cleanup();
        throw new LifeboatError(
          'LB_QMP_START_FAILED',
          `qemu-storage-daemon did not answer on QMP within ${startTimeoutMs} ms: ${err.trim()}`,
          { cause: e, details: { args, stderr: err } },
        );
      }
      await sleep(20);
    }
  }
  const client = qmp;
  const socketPath = qmpSocket;
  return {
    qmp: client,
    qmpSocket: socketPath,
    nbdSocket: options.nbdSocket,
    pid: child.pid ?? -1,
    stderr: () => err,
    stop: async () => {
      if (exitInfo === undefined) {
        // A clean quit lets QEMU write persistent bitmaps back to qcow2 images.
        await client.execute('quit', undefined, { timeoutMs: 5000 }).catch(() => undefined);
        await Promise.race([exited, sleep(5000)]);
      }
      await client.close().catch(() => undefined);
      await cleanup();
    },
  };
}
