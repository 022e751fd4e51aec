import { connect, type Socket } from 'node:net';
import { LifeboatError } from '@lifeboat/protocol';

/** Result of a program run in the guest. */
export interface GuestExecResult {
  exitCode: number;
  stdout: string;
  stderr: string;
}

/**
 * A connection to the QEMU guest agent of a recovered machine (virtio-serial channel,
 * socket `<machine dir>/qga.sock`): runs programs in the guest, e.g. to check from inside a
 * test failover which addresses a machine reaches. Also the channel a planned failover's
 * quiesce would use.
 */
export class GuestAgent {
  private buffer = '';
  private waiting: ((line: string) => void) | undefined;
  private syncId = Math.floor(Math.random() * 1e9);

  private constructor(private readonly socket: Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => {
      this.buffer += d;
      this.flush();
    });
    socket.on('error', () => undefined);
  }

  /** Connects to the agent's socket (QEMU's end of the channel). */
  static async connect(socketPath: string): Promise<GuestAgent> {
    const socket = connect(socketPath);
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', (cause) =>
        reject(
          new LifeboatError(
            'LB_RECOVERY_GUEST_AGENT',
            `Cannot reach the guest agent at ${socketPath}: ${cause.message}.`,
            {
              cause,
            },
          ),
        ),
      );
    });
    return new GuestAgent(socket);
  }

  private flush(): void {
    let nl: number;
    while (this.waiting && (nl = this.buffer.indexOf('\n')) >= 0) {
      // guest-sync-delimited's 0xFF marker arrives as U+FFFD after UTF-8 decoding.
      const line = this.buffer
        .slice(0, nl)
        .replace(/^[\xff\ufffd]+/, '')
        .trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line) {
        const w = this.waiting;
        this.waiting = undefined;
        w(line);
      }
    }
  }

  private async request(
    command: string,
    args: Record<string, unknown> | undefined,
    timeoutMs: number,
  ): Promise<unknown> {
    const line = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting = undefined;
        reject(
          new LifeboatError(
            'LB_RECOVERY_GUEST_AGENT',
            `The guest agent did not answer ${command} within ${timeoutMs} ms.`,
          ),
        );
      }, timeoutMs);
      this.waiting = (l) => {
        clearTimeout(timer);
        resolve(l);
      };
      this.socket.write(
        `${JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}) })}\n`,
      );
      this.flush();
    });
    const msg = JSON.parse(line) as { return?: unknown; error?: { desc?: string } };
    if (msg.error) {
      throw new LifeboatError(
        'LB_RECOVERY_GUEST_AGENT',
        `The guest agent refused ${command}: ${msg.error.desc ?? ''}`,
      );
    }
    return msg.return;
  }

  /** Waits until the agent answers (it starts late in the guest's boot), discarding stale replies. */
  async sync(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const id = ++this.syncId;
      try {
        // guest-sync-delimited makes the agent send 0xFF first, so a half-read stale reply is skipped.
        const got = await this.request('guest-sync-delimited', { id }, 3000);
        if (got === id) return;
      } catch (err) {
        if (Date.now() > deadline) throw err;
      }
      this.buffer = '';
    }
  }

  /** Runs `path args...` in the guest and waits for it to end. */
  async exec(path: string, args: string[], timeoutMs = 30_000): Promise<GuestExecResult> {
    const { pid } = (await this.request(
      'guest-exec',
      { path, arg: args, 'capture-output': true },
      10_000,
    )) as {
      pid: number;
    };
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const s = (await this.request('guest-exec-status', { pid }, 10_000)) as {
        exited: boolean;
        exitcode?: number;
        'out-data'?: string;
        'err-data'?: string;
      };
      if (s.exited) {
        return {
          exitCode: s.exitcode ?? -1,
          stdout: Buffer.from(s['out-data'] ?? '', 'base64').toString('utf8'),
          stderr: Buffer.from(s['err-data'] ?? '', 'base64').toString('utf8'),
        };
      }
      if (Date.now() > deadline) {
        throw new LifeboatError(
          'LB_RECOVERY_GUEST_AGENT',
          `${path} did not end in the guest within ${timeoutMs} ms.`,
        );
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  /** Closes the connection. */
  close(): void {
    this.socket.destroy();
  }
}
