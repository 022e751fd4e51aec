import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NbdClient } from '@lifeboat/nbd';
import { LifeboatError } from '@lifeboat/protocol/errors';

/** Options of {@link QemuNbdReader.start}. */
export interface QemuNbdReaderOptions {
  /** The image file. */
  path: string;
  /** Its format (never probed by qemu-nbd). */
  format: 'raw' | 'qcow2';
  /** Stops waiting for qemu-nbd to come up. */
  signal?: AbortSignal;
  /** Give up when qemu-nbd has not opened its socket after this long. @default 30000 */
  startTimeoutMs?: number;
}

/**
 * Reads a disk image through QEMU's block layer: a read-only, private `qemu-nbd` export on a
 * UNIX socket in a fresh temp directory, read with Lifeboat's NBD client. Used for what cannot
 * be read from the file directly (compressed or encrypted clusters, backing files).
 */
export class QemuNbdReader {
  private closed = false;

  private constructor(
    private readonly child: ChildProcess,
    private readonly client: NbdClient,
    private readonly dir: string,
  ) {}

  /** Starts qemu-nbd and connects to it. */
  static async start(options: QemuNbdReaderOptions): Promise<QemuNbdReader> {
    const dir = await mkdtemp(join(tmpdir(), 'lifeboat-qemu-nbd-'));
    const socket = join(dir, 'nbd.sock');
    // Without --persistent qemu-nbd exits once its one client disconnects; --shared=1 keeps
    // anyone else off the export.
    const child = spawn(
      'qemu-nbd',
      [
        '--read-only',
        `--socket=${socket}`,
        `--format=${options.format}`,
        '--shared=1',
        options.path,
      ],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    let stderr = '';
    child.stderr?.setEncoding('utf8');
    child.stderr?.on('data', (s: string) => {
      if (stderr.length < 4096) stderr += s;
    });
    let exited: { code: number | null; signal: NodeJS.Signals | null } | undefined;
    let spawnError: NodeJS.ErrnoException | undefined;
    child.on('exit', (code, signal) => (exited = { code, signal }));
    child.on('error', (err) => (spawnError = err));
    const fail = async (err: LifeboatError): Promise<never> => {
      await stopChild(child);
      await rm(dir, { recursive: true, force: true });
      throw err;
    };
    const deadline = Date.now() + (options.startTimeoutMs ?? 30_000);
    for (;;) {
      if (spawnError !== undefined) {
        return fail(
          spawnError.code === 'ENOENT'
            ? new LifeboatError(
                'LB_CLI_TOOL_MISSING',
                'qemu-nbd is not installed. Run "bash scripts/install-deps.sh" (or apt-get install qemu-utils).',
                { cause: spawnError, details: { command: 'qemu-nbd' } },
              )
            : new LifeboatError(
                'LB_CLI_TOOL_FAILED',
                `qemu-nbd failed to start: ${spawnError.message}`,
                {
                  cause: spawnError,
                  details: { command: 'qemu-nbd' },
                },
              ),
        );
      }
      if (exited !== undefined) {
        return fail(
          new LifeboatError(
            'LB_CLI_IMAGE_UNREADABLE',
            `qemu-nbd could not open ${options.path}: ${stderr.trim() || `exit ${exited.code ?? exited.signal}`}`,
            { details: { path: options.path, stderr } },
          ),
        );
      }
      if (options.signal?.aborted === true) {
        return fail(new LifeboatError('LB_CLI_ABORTED', 'Interrupted while starting qemu-nbd.'));
      }
      const ready = await stat(socket).then(
        (s) => s.isSocket(),
        () => false,
      );
      if (ready) break;
      if (Date.now() > deadline) {
        return fail(
          new LifeboatError(
            'LB_CLI_TOOL_FAILED',
            `qemu-nbd did not open its socket within ${options.startTimeoutMs ?? 30_000} ms.`,
            { details: { command: 'qemu-nbd', stderr } },
          ),
        );
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    let client: NbdClient;
    try {
      client = await NbdClient.connect({ path: socket }, { structuredReplies: true });
    } catch (err) {
      await stopChild(child);
      await rm(dir, { recursive: true, force: true });
      throw err;
    }
    return new QemuNbdReader(child, client, dir);
  }

  /** Guest-visible size of the export. */
  get size(): number {
    return this.client.size;
  }

  /** Reads `length` bytes at guest `offset`. */
  readAt(offset: number, length: number): Promise<Buffer> {
    return this.client.readAt(offset, length);
  }

  /** Disconnects, stops qemu-nbd and removes the socket directory. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.client.close();
    } finally {
      await stopChild(this.child);
      await rm(this.dir, { recursive: true, force: true });
    }
  }
}

// qemu-nbd exits by itself when its client disconnects; TERM (then KILL) covers the rest.
async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise<void>((r) => child.once('exit', () => r()));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  await gone;
  clearTimeout(timer);
}
