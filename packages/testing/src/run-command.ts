import { spawn } from 'node:child_process';
import { LifeboatError } from '@lifeboat/protocol';

/** Options for {@link runCommand}. */
export interface RunCommandOptions {
  /** Working directory. @default process's current directory */
  cwd?: string;
  /** Bytes written to the command's stdin, then stdin is closed. @default none */
  input?: string | Buffer;
  /** Kills the command after this many milliseconds. @default 300000 */
  timeoutMs?: number;
  /** Exit statuses that count as success (e2fsck uses 1 for "fixed"). @default [0] */
  okExitCodes?: number[];
}

/** Output of a command that exited with status 0. */
export interface CommandResult {
  stdout: string;
  stderr: string;
  /** The exit status (one of `okExitCodes`). */
  exitCode: number;
}

/**
 * Runs a command to completion and returns its output; another exit status, a signal or a timeout
 * rejects with `LB_TESTING_COMMAND_FAILED` carrying the command line and its stderr.
 */
export function runCommand(
  command: string,
  args: readonly string[],
  options: RunCommandOptions = {},
): Promise<CommandResult> {
  const timeoutMs = options.timeoutMs ?? 300_000;
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, {
      cwd: options.cwd,
      stdio: [options.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout?.on('data', (b: Buffer) => out.push(b));
    child.stderr?.on('data', (b: Buffer) => err.push(b));
    if (options.input !== undefined && child.stdin) child.stdin.end(options.input);
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    const fail = (reason: string, cause?: unknown): void => {
      reject(
        new LifeboatError(
          'LB_TESTING_COMMAND_FAILED',
          `${command} ${args.join(' ')} failed (${reason}): ${Buffer.concat(err).toString().trim()}`,
          { cause, details: { command, args: [...args], reason } },
        ),
      );
    };
    child.on('error', (e) => {
      clearTimeout(timer);
      fail(e.message, e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (code !== null && (options.okExitCodes ?? [0]).includes(code)) {
        resolve({
          stdout: Buffer.concat(out).toString(),
          stderr: Buffer.concat(err).toString(),
          exitCode: code,
        });
      } else if (timedOut) fail(`timed out after ${timeoutMs} ms`);
      else fail(signal ? `killed by ${signal}` : `exit status ${code}`);
    });
  });
}
