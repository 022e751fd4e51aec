import { resolve } from 'node:path';
import type { Command } from 'commander';
import { LifeboatError } from '@lifeboat/protocol';
import type { CliContext } from '../cli-context.js';
import { runDemo } from '../up/demo.js';
import type { Demo, DemoOutput } from '../up/demo.js';
import { startLocalInstallation } from '../up/local-installation.js';
import { untilAborted } from './recovery.js';

// `lifeboat up`: the four roles in one process on embedded defaults, for a single-machine
// installation and for the README's first command (`--demo`).

function parseListen(value: string): { host: string; port: number } {
  const m = /^(?:(.*):)?(\d+)$/.exec(value);
  const port = Number(m?.[2]);
  if (m === null || !Number.isInteger(port) || port > 65535) {
    throw new LifeboatError('LB_CLI_BAD_OPTION', `--listen ${value}: give host:port or a port.`, {
      details: { option: '--listen', value },
    });
  }
  return {
    host: m[1] === undefined || m[1] === '' ? '127.0.0.1' : m[1].replace(/^\[|\]$/g, ''),
    port,
  };
}

function output(ctx: CliContext): DemoOutput & { flush(): void } {
  const tty = ctx.io.stdout.isTTY === true;
  let pending = false;
  const write = (s: string): void => void ctx.io.stdout.write(s);
  const endLive = (): void => {
    if (pending) write('\n');
    pending = false;
  };
  return {
    step: (text) => {
      endLive();
      write(`\n== ${text}\n`);
    },
    line: (text) => {
      endLive();
      write(`${text}\n`);
    },
    live: (text) => {
      // On a terminal one line updates in place; in a log every point is a line.
      if (tty) {
        write(`\r\x1b[K${text}`);
        pending = true;
      } else write(`${text}\n`);
    },
    flush: endLive,
    tty,
  };
}

/** Registers `lifeboat up`. */
export function registerUpCommands(program: Command, ctx: CliContext): void {
  program
    .command('up')
    .description(
      'Run the vault, a process server, an agent and a recovery host in this process (until Ctrl-C)',
    )
    .option('--data-dir <dir>', 'database, store, passphrase, journal and credentials', '.lifeboat')
    .option(
      '--listen <host:port>',
      'address of the vault API (port 0 = any free port)',
      '127.0.0.1:0',
    )
    .option(
      '--demo',
      'also build the test image, start a VM that writes, protect it, show the RPO, run a verified test failover',
    )
    .option('--log-level <level>', 'pino log level of the roles (JSON on stdout)', 'warn')
    .addHelpText(
      'after',
      '\nExamples:\n  lifeboat up --demo\n  lifeboat up --data-dir /var/lib/lifeboat --listen 127.0.0.1:9440\n',
    )
    .action(async (opts: { dataDir: string; listen: string; demo?: boolean; logLevel: string }) => {
      const { host, port } = parseListen(opts.listen);
      const dataDir = resolve(ctx.io.cwd, opts.dataDir);
      const out = output(ctx);
      const lastWarning = new Map<string, string>();
      const started = Date.now();
      const elapsed = (): string => `${((Date.now() - started) / 1000).toFixed(1)} s`;
      out.step(`Starting the vault, a process server, an agent and a recovery host in ${dataDir}`);
      const inst = await startLocalInstallation({
        dataDir,
        host,
        port,
        logLevel: opts.logLevel as 'warn',
        onError: (what, err) => {
          const text = `warning: ${what}: ${(err as { code?: string }).code ?? 'error'} ${(err as Error).message}`;
          // A condition retried every round is said once, until it changes.
          if (lastWarning.get(what) === text) return;
          lastWarning.set(what, text);
          out.line(text);
        },
      });
      ctx.cleanups.push(() => inst.close());
      if (inst.storeCreated) {
        out.line(
          `created the store ${inst.paths.store}; its passphrase is in ${inst.paths.passphraseFile} (mode 0600): keep a copy elsewhere`,
        );
      }
      out.line(`vault: ${inst.vault.url}`);
      out.line(`API docs: ${inst.vault.url}/api/docs`);
      out.line(`admin token: ${inst.adminToken}`);
      out.line(
        `process server: 127.0.0.1:${inst.processServer.port} (mutual TLS, certificate from the vault CA), health http://127.0.0.1:${inst.processServer.healthPort}/health`,
      );
      out.line(`recovery host: run directory ${inst.paths.recovery}`);
      let demo: Demo | undefined;
      if (opts.demo) {
        demo = await runDemo(inst, out, ctx.signal);
        ctx.cleanups.push(() => demo?.stop());
        out.line(`demo done in ${elapsed()}`);
      }
      const env = `LIFEBOAT_VAULT_URL=${inst.vault.url} LIFEBOAT_VAULT_TOKEN=${inst.adminToken}`;
      const store = `--store ${inst.paths.store} --passphrase-file ${inst.paths.passphraseFile}`;
      out.step('Lifeboat is running. Try, in another terminal:');
      out.line(`  export ${env}`);
      out.line('  npx lifeboat vault summary');
      out.line('  npx lifeboat vault item list');
      out.line('  npx lifeboat vault points list');
      out.line('  npx lifeboat vault jobs list');
      if (demo?.testFailoverJobId !== undefined)
        out.line(`  npx lifeboat vault jobs show ${demo.testFailoverJobId}`);
      out.line('  npx lifeboat vault alerts list');
      out.line(`  npx lifeboat ${store} store points`);
      out.line(`  open ${inst.vault.url}/api/docs`);
      out.line('Ctrl-C stops everything.');
      out.line(`ready in ${elapsed()}`);
      await untilAborted(ctx.signal);
      out.flush();
      out.line('stopping: agents, the demo VM, the process server, the recovery host, the vault');
      // Agents first, so none sees its VM vanish; then the VM; then the roles.
      await inst.link.stop();
      await demo?.stop();
      await inst.close();
      out.line('stopped');
    });
}
