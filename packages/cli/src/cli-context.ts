import type { ExitCodeValue } from './exit-codes.js';

/** A writable stream the CLI prints to, with the terminal facts node gives for TTYs. */
export interface CliOutput {
  write(chunk: string): unknown;
  /** True when the stream is a terminal. */
  readonly isTTY?: boolean;
  /** Terminal width in columns, when known. */
  readonly columns?: number;
}

/** The standard input, as far as the passphrase prompt needs it. */
export interface CliInput extends NodeJS.EventEmitter {
  /** True when stdin is a terminal: only then may the CLI prompt. */
  readonly isTTY?: boolean;
  setRawMode?(mode: boolean): unknown;
  resume(): unknown;
  pause(): unknown;
  setEncoding?(encoding: BufferEncoding): unknown;
}

/**
 * Everything the CLI takes from the process: streams, environment, working directory. Tests
 * pass their own, so commands run in-process without touching the test runner's globals.
 */
export interface CliIo {
  stdout: CliOutput;
  stderr: CliOutput;
  stdin: CliInput;
  /** The environment; only config.ts looks into it. */
  env: Readonly<Record<string, string | undefined>>;
  /** Directory relative paths are resolved against. */
  cwd: string;
}

/** State shared by the commands of one CLI invocation. */
export interface CliContext {
  readonly io: CliIo;
  /** What the process exits with once the command returns; commands raise it (verify sets 3). */
  exitCode: ExitCodeValue;
  /** Cleanups run when the invocation ends, also on failure or Ctrl-C (newest first). */
  readonly cleanups: Array<() => Promise<void> | void>;
  /** Aborted on SIGINT/SIGTERM so long work stops and cleans up. */
  readonly signal: AbortSignal;
}
