#!/usr/bin/env node
// The `lifeboat` command: runs the CLI that `tsc -b` builds into dist/ (see the README's setup).
let cli;
try {
  // Before the command modules load: a store command may start unwrapping its key already
  // (scrypt on the thread pool overlaps loading them). Best effort; never fails the command.
  const config = await import('../dist/config.js');
  void config.prefetchStoreKey(process.argv.slice(2));
  cli = await import('../dist/main.js');
} catch (err) {
  if (err?.code !== 'ERR_MODULE_NOT_FOUND') throw err;
  process.stderr.write(
    'error LB_CLI_NOT_BUILT: the lifeboat command is not built. Run "bash scripts/install-deps.sh" (or "npx tsc -b") in the repository first.\n',
  );
  process.exit(1);
}
await cli.main();
