import { spawn, type ChildProcess } from 'node:child_process';
import { connect } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

/** A child process started by a test; `stop()` kills it and waits for it to exit. */
export interface TestChild {
  readonly child: ChildProcess;
  /** What the child wrote to stderr so far, for failure messages. */
  stderr(): string;
  stop(): Promise<void>;
}

/**
 * Starts `cmd` and waits until a UNIX socket at `socketPath` accepts connections. Used by this
 * package's tests only (the supported launchers live in @lifeboat/qmp); the child is killed if
 * it does not come up.
 */
export async function startUntilSocket(
  cmd: string,
  args: string[],
  socketPath: string,
  timeoutMs = 20_000,
): Promise<TestChild> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr?.on('data', (d: Buffer) => {
    err += d.toString();
  });
  let exited = false;
  const exit = new Promise<void>((resolve) => {
    child.once('exit', () => {
      exited = true;
      resolve();
    });
    child.once('error', (e) => {
      err += String(e);
      exited = true;
      resolve();
    });
  });
  const handle: TestChild = {
    child,
    stderr: () => err,
    stop: async () => {
      if (!exited) child.kill('SIGKILL');
      await exit;
    },
  };
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (exited) throw new Error(`${cmd} exited early: ${err}`);
    if (await canConnect(socketPath)) return handle;
    if (Date.now() > deadline) {
      await handle.stop();
      throw new Error(`${cmd} did not listen on ${socketPath} within ${timeoutMs} ms: ${err}`);
    }
    await sleep(25);
  }
}

function canConnect(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect({ path });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => {
      s.destroy();
      resolve(false);
    });
  });
}

/** Runs a command to completion; rejects with its stderr when it fails. */
export function run(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.once('error', reject);
    child.once('exit', (code) => {
      if (code === 0) resolve(out);
      else reject(new Error(`${cmd} ${args.join(' ')} failed (${code}): ${err}${out}`));
    });
  });
}
