/** @lifeboat/cli: the `lifeboat` command, runnable in-process (tests, `lifeboat up`). */
export { buildProgram, main, runCli } from './main.js';
export type { CommandGroup, RunCliOptions } from './main.js';
export type { CliContext, CliInput, CliIo, CliOutput } from './cli-context.js';
export { ExitCode } from './exit-codes.js';
export type { ExitCodeValue } from './exit-codes.js';
