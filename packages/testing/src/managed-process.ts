import type { ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { LifeboatError } from '@lifeboat/protocol';
import { spawnOwned } from '@lifeboat/qmp';

/** How to end a {@link ManagedProcess}. */
export interface StopOptions {
  /**
   * `true` kills at once with SIGKILL, as a crash would (QEMU writes no persistent bitmap);
   * `false` asks for a clean exit with SIGTERM and kills only after `graceMs`.
   * @default false
   */
  kill?: boolean;
  /** Milliseconds to wait for a clean exit before SIGKILL. @default 15000 */
  graceMs?: number;
}

/**
 * A long-running child process (QEMU, qemu-storage-daemon) whose stderr is kept for error
 * messages and which a test must stop. Exits are recorded so waiters fail fast.
 */
export class ManagedProcess {
  /** The child; its pid is `child.pid`. */
  readonly child: ChildProcess;
  /** Last 64 KiB of stderr (and stdout), for error messages. */
  output = '';
  /** Set once the process has exited. */
  exit: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  private readonly exited: Promise<void>;
  private readonly name: string;

  constructor(name: string, command: string, args: readonly string[]) {
    this.name = name;
    // Killed when this process exits or dies (even by SIGKILL or a test timeout), even if a
    // test forgets stop().
    this.child = spawnOwned(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const keep = (b: Buffer): void => {
      this.output = (this.output + b.toString()).slice(-65536);
    };
    this.child.stdout?.on('data', keep);
    this.child.stderr?.on('data', keep);
    this.exited = new Promise((resolve) => {
      this.child.on('error', (err) => {
        this.output += `\n${err.message}`;
        this.exit ??= { code: null, signal: null };
        resolve();
      });
      this.child.on('exit', (code, signal) => {
        this.exit = { code, signal };
        resolve();
      });
    });
  }

  /** Resolves when the process has exited (for any reason). */
  waitExit(): Promise<void> {
    return this.exited;
  }

  /** Rejects with `LB_TESTING_PROCESS_EXITED` when the process is no longer running. */
  assertRunning(): void {
    if (this.exit) {
      throw new LifeboatError(
        'LB_TESTING_PROCESS_EXITED',
        `${this.name} exited (code ${this.exit.code}, signal ${this.exit.signal}): ${this.output.trim().slice(-2000)}`,
        { details: { name: this.name, ...this.exit } },
      );
    }
  }

  /** Waits until `path` exists (a socket the process creates), failing if the process exits. */
  async waitForPath(path: string, timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!existsSync(path)) {
      this.assertRunning();
      if (Date.now() > deadline) {
        throw new LifeboatError(
          'LB_TESTING_TIMEOUT',
          `${this.name} did not create ${path} within ${timeoutMs} ms: ${this.output.trim().slice(-2000)}`,
        );
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** Ends the process (cleanly unless `kill`) and waits for it; safe to call twice. */
  async stop(options: StopOptions = {}): Promise<void> {
    if (this.exit) return;
    this.child.kill(options.kill ? 'SIGKILL' : 'SIGTERM');
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      this.exited,
      new Promise<void>((resolve) => {
        timer = setTimeout(() => {
          this.child.kill('SIGKILL');
          resolve();
        }, options.graceMs ?? 15_000);
      }),
    ]);
    clearTimeout(timer);
    await this.exited;
  }
}
