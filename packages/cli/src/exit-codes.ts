import { isLifeboatError } from '@lifeboat/protocol/errors';

/** Process exit codes of the `lifeboat` command, stable for scripts. */
export const ExitCode = {
  /** The command did what was asked. */
  ok: 0,
  /** The command failed (the message says why). */
  failure: 1,
  /** The command line was wrong: unknown option, missing argument, bad value. */
  usage: 2,
  /** `verify` (or another check) found an integrity fault in the store. */
  integrityFault: 3,
} as const;

/** One of the values of {@link ExitCode}. */
export type ExitCodeValue = (typeof ExitCode)[keyof typeof ExitCode];

// Codes that mean "the command line is wrong", so scripts can tell them from runtime failures.
const USAGE_CODES = new Set([
  'LB_CLI_USAGE',
  'LB_CLI_NO_STORE',
  'LB_CLI_BAD_STORE_URL',
  'LB_CLI_BAD_OPTION',
]);

/** The exit code for an error that ended a command. */
export function exitCodeFor(err: unknown): ExitCodeValue {
  if (isLifeboatError(err) && USAGE_CODES.has(err.code)) return ExitCode.usage;
  return ExitCode.failure;
}
