/** @lifeboat/cli: the `lifeboat` command, runnable in-process (tests, `lifeboat up`). */
export { buildProgram, main, runCli } from './main.js';
export type { CommandGroup, RunCliOptions } from './main.js';
export type { CliContext, CliInput, CliIo, CliOutput } from './cli-context.js';
export { ExitCode } from './exit-codes.js';
export type { ExitCodeValue } from './exit-codes.js';
export { startLocalInstallation } from './up/local-installation.js';
export type { LocalInstallation, LocalInstallationOptions } from './up/local-installation.js';
export { runDemo } from './up/demo.js';
export type { Demo, DemoOutput } from './up/demo.js';
