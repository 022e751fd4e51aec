import { connect } from 'node:net';
import type { Socket } from 'node:net';
import { LifeboatError } from '@lifeboat/protocol';

/** Result of a program run in the guest by {@link GuestAgentClient.exec}. */
export interface GuestExecResult {
  exitCode: number;
  stdout: string;
  stderr: string;
}

/**
 * A minimal client of the QEMU guest agent (qemu-ga) over the host side of its virtio-serial
 * port (a UNIX socket), used by the agent (fsfreeze for app-consistent points) and the
 * recovery host (checks from inside a recovered machine). Each call opens the socket,
 * synchronises with `guest-sync-delimited` (the stream may hold a stale reply from an earlier,
 * timed-out caller), runs one command and closes. Every step has a time limit: a guest without
 * an agent never answers.
 */
export class GuestAgentClient {
  constructor(
    private readonly socketPath: string,
    private readonly timeoutMs: number,
  ) {}

  /** Freezes the guest's file systems; resolves with how many were frozen. */
  async freeze(): Promise<number> {
    return (await this.call('guest-fsfreeze-freeze')) as number;
  }

  /** Thaws the guest's file systems; resolves with how many were thawed. */
  async thaw(): Promise<number> {
    return (await this.call('guest-fsfreeze-thaw')) as number;
  }

  /** Waits until the guest agent answers (it starts late in a guest's boot). */
  async waitUntilReady(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        await this.call('guest-ping');
        return;
      } catch (err) {
        if (Date.now() > deadline) throw err;
        await new Promise((r) => setTimeout(r, 500));
      }
    }
  }

  /** Runs `path args...` in the guest, waits for it to end, and returns its exit code and output. */
  async exec(path: string, args: string[], timeoutMs = 30_000): Promise<GuestExecResult> {
    const { pid } = (await this.call('guest-exec', {
      path,
      arg: args,
      'capture-output': true,
    })) as { pid: number };
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const s = (await this.call('guest-exec-status', { pid })) as {
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
          'LB_QMP_GUEST_AGENT',
          `${path} did not end in the guest within ${timeoutMs} ms.`,
          { details: { path, args, timeoutMs } },
        );
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  /** Runs one guest agent command and returns its `return` value. */
  async call(command: string, args?: Record<string, unknown>): Promise<unknown> {
    const socket = await this.open();
    try {
      const syncId = Math.floor(Math.random() * 2 ** 31);
      // 0xFF makes the agent drop any partial input; the reply to guest-sync-delimited is
      // preceded by 0xFF too, so anything before it is a stale reply to skip.
      socket.write(Buffer.from([0xff]));
      socket.write(
        JSON.stringify({ execute: 'guest-sync-delimited', arguments: { id: syncId } }) + '\n',
      );
      const lines = lineReader(socket, this.timeoutMs, command);
      for (;;) {
        const msg = await lines.next();
        if ((msg as { return?: unknown }).return === syncId) break;
      }
      socket.write(
        JSON.stringify(args ? { execute: command, arguments: args } : { execute: command }) + '\n',
      );
      const reply = (await lines.next()) as {
        return?: unknown;
        error?: { class: string; desc: string };
      };
      if (reply.error) {
        throw new LifeboatError(
          'LB_QMP_GUEST_AGENT',
          `The guest agent refused ${command}: ${reply.error.desc}.`,
          { details: { command, errorClass: reply.error.class, desc: reply.error.desc } },
        );
      }
      return reply.return;
    } finally {
      socket.destroy();
    }
  }

  private open(): Promise<Socket> {
    return new Promise((resolve, reject) => {
      const s = connect({ path: this.socketPath });
      const timer = setTimeout(() => {
        s.destroy();
        reject(noAnswer('connect', this.timeoutMs));
      }, this.timeoutMs);
      s.once('connect', () => {
        clearTimeout(timer);
        resolve(s);
      });
      s.once('error', (err) => {
        clearTimeout(timer);
        s.destroy();
        reject(
          new LifeboatError(
            'LB_QMP_GUEST_AGENT',
            `Cannot connect to the guest agent socket ${this.socketPath}: ${err.message}.`,
            { cause: err, details: { path: this.socketPath } },
          ),
        );
      });
    });
  }
}

function noAnswer(what: string, timeoutMs: number): LifeboatError {
  return new LifeboatError(
    'LB_QMP_GUEST_AGENT',
    `The guest agent did not answer ${what} within ${timeoutMs} ms (is qemu-guest-agent running in the guest?).`,
    { details: { command: what, timeoutMs } },
  );
}

/** Reads JSON lines from a socket, each within the time limit. */
function lineReader(
  socket: Socket,
  timeoutMs: number,
  command: string,
): { next(): Promise<unknown> } {
  let buffered = '';
  const queue: unknown[] = [];
  let waiter: { resolve: (v: unknown) => void; reject: (e: unknown) => void } | undefined;
  let failure: unknown;
  const fail = (err: unknown): void => {
    failure ??= err;
    waiter?.reject(failure);
    waiter = undefined;
  };
  socket.on('data', (b: Buffer) => {
    // Drop the 0xFF delimiter bytes; they are not JSON.
    buffered += b.toString('latin1').replace(/\xff/g, '');
    let nl: number;
    while ((nl = buffered.indexOf('\n')) >= 0) {
      const line = buffered.slice(0, nl).trim();
      buffered = buffered.slice(nl + 1);
      if (!line) continue;
      try {
        queue.push(JSON.parse(line));
      } catch {
        continue; // a partial stale reply cut by the 0xFF reset
      }
    }
    if (waiter && queue.length) {
      const w = waiter;
      waiter = undefined;
      w.resolve(queue.shift());
    }
  });
  socket.on('close', () =>
    fail(
      new LifeboatError(
        'LB_QMP_GUEST_AGENT',
        `The guest agent connection closed during ${command}.`,
        { details: { command } },
      ),
    ),
  );
  socket.on('error', fail);
  return {
    next() {
      if (queue.length) return Promise.resolve(queue.shift());
      if (failure) return Promise.reject(failure);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          waiter = undefined;
          reject(noAnswer(command, timeoutMs));
        }, timeoutMs);
        waiter = {
          resolve: (v) => {
            clearTimeout(timer);
            resolve(v);
          },
          reject: (e) => {
            clearTimeout(timer);
            reject(e);
          },
        };
      });
    },
  };
}
