import { LifeboatError, isLifeboatError } from '@lifeboat/protocol/errors';
import type { CliIo } from './cli-context.js';

/** How {@link reportError} prints. */
export interface ReportErrorOptions {
  /** Also print `{"error": {...}}` on stdout for scripts. */
  json: boolean;
  /** Print stack traces and causes (LIFEBOAT_DEBUG=1). */
  debug: boolean;
}

/**
 * Turns what ended a command into a LifeboatError: system errors (ENOENT, EACCES, ...) become
 * LB_CLI_IO with the path; anything else is a bug and becomes LB_CLI_UNEXPECTED.
 */
export function toLifeboatError(err: unknown): LifeboatError {
  if (isLifeboatError(err)) return err;
  const sys = err as NodeJS.ErrnoException | undefined;
  if (sys instanceof Error && typeof sys.code === 'string' && typeof sys.syscall === 'string') {
    const where = sys.path === undefined ? '' : ` on ${sys.path}`;
    return new LifeboatError(
      'LB_CLI_IO',
      `${sys.syscall} failed${where}: ${sys.code}. Check the path, free space and permissions.`,
      { cause: err, details: { errno: sys.code, syscall: sys.syscall, path: sys.path } },
    );
  }
  const message = err instanceof Error ? err.message : String(err);
  return new LifeboatError(
    'LB_CLI_UNEXPECTED',
    `${message} (this is a bug in Lifeboat: please report it with the command you ran)`,
    { cause: err },
  );
}

/**
 * Prints an error as `error LB_CODE: message` on stderr (and the JSON form on stdout with
 * --json). A LifeboatError never gets a stack trace: its message says what to do. Unexpected
 * errors show their stack, since they are bugs.
 */
export function reportError(err: unknown, io: CliIo, options: ReportErrorOptions): LifeboatError {
  const lbErr = toLifeboatError(err);
  io.stderr.write(`error ${lbErr.code}: ${lbErr.message}\n`);
  const showStack = options.debug || lbErr.code === 'LB_CLI_UNEXPECTED';
  if (showStack) {
    const cause: unknown = lbErr.code === 'LB_CLI_UNEXPECTED' ? lbErr.cause : lbErr;
    if (cause instanceof Error && cause.stack !== undefined) io.stderr.write(`${cause.stack}\n`);
  }
  if (options.json) {
    io.stdout.write(`${JSON.stringify({ error: jsonSafe(lbErr.toJSON()) }, null, 2)}\n`);
  }
  return lbErr;
}

// details may hold bigints, buffers or cycles from a library; JSON output must never throw.
function jsonSafe(value: unknown): unknown {
  const seen = new WeakSet<object>();
  return JSON.parse(
    JSON.stringify(value, (_key, v: unknown) => {
      if (typeof v === 'bigint') return v.toString();
      if (typeof v === 'object' && v !== null) {
        if (seen.has(v)) return '[circular]';
        seen.add(v);
      }
      return v;
    }),
  ) as unknown;
}
