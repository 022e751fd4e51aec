import { spawn } from 'node:child_process';
import { LifeboatError } from '@lifeboat/protocol/errors';

/** Options of {@link runTool}. */
export interface RunToolOptions {
  /** Aborts the child (it is killed). */
  signal?: AbortSignal;
  /** Largest stdout accepted, in bytes. @default 268435456 */
  maxOutputBytes?: number;
}

/** What a finished tool printed. */
export interface ToolResult {
  stdout: string;
  stderr: string;
}

/**
 * Runs an external tool (qemu-img) to completion and returns its output. A missing tool is
 * LB_CLI_TOOL_MISSING; a non-zero exit is LB_CLI_TOOL_FAILED with the tool's stderr.
 */
export function runTool(
  command: string,
  args: readonly string[],
  options: RunToolOptions = {},
): Promise<ToolResult> {
  const max = options.maxOutputBytes ?? 256 * 1024 * 1024;
  return new Promise((resolvePromise, reject) => {
    const child = spawn(command, args, {
      stdio: ['ignore', 'pipe', 'pipe'],
      ...(options.signal === undefined ? {} : { signal: options.signal }),
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let outBytes = 0;
    let tooBig = false;
    child.stdout.on('data', (b: Buffer) => {
      outBytes += b.length;
      if (outBytes > max) {
        tooBig = true;
        child.kill('SIGKILL');
      } else out.push(b);
    });
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code === 'ENOENT') {
        reject(
          new LifeboatError(
            'LB_CLI_TOOL_MISSING',
            `${command} is not installed. Run "bash scripts/install-deps.sh" (or apt-get install qemu-utils).`,
            { cause: e, details: { command } },
          ),
        );
      } else reject(e);
    });
    child.on('close', (code, signal) => {
      const stdout = Buffer.concat(out).toString('utf8');
      const stderr = Buffer.concat(err).toString('utf8').trim();
      if (tooBig) {
        reject(
          new LifeboatError('LB_CLI_TOOL_FAILED', `${command} printed more than ${max} bytes.`, {
            details: { command, args },
          }),
        );
      } else if (code === 0) {
        resolvePromise({ stdout, stderr });
      } else {
        reject(
          new LifeboatError(
            'LB_CLI_TOOL_FAILED',
            `${command} ${args.join(' ')} failed (${code ?? signal}): ${stderr || 'no message'}`,
            { details: { command, args, exitCode: code, signal, stderr } },
          ),
        );
      }
    });
  });
}
