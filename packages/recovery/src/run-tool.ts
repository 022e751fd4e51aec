import { spawn } from 'node:child_process';
import { LifeboatError } from '@lifeboat/protocol';

/** Output of a finished tool. */
export interface ToolResult {
  stdout: string;
  stderr: string;
}

/**
 * Runs a host tool (qemu-img, genisoimage) to completion; a missing tool or a non-zero exit
 * rejects with `code` and the tool's own message, so the operator sees what the tool said.
 */
export async function runTool(
  code: string,
  file: string,
  args: readonly string[],
  what: string,
): Promise<ToolResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', (cause) => {
      reject(
        new LifeboatError(
          code,
          `${what} failed: cannot run ${file} (${cause.message}). Install it (scripts/install-deps.sh).`,
          { cause, details: { tool: file } },
        ),
      );
    });
    child.on('close', (status, signal) => {
      if (status === 0) return resolve({ stdout, stderr });
      reject(
        new LifeboatError(
          code,
          `${what} failed: ${file} exited with ${status ?? signal}: ${stderr.trim() || stdout.trim()}`,
          { details: { tool: file, args: [...args], status, signal } },
        ),
      );
    });
  });
}
