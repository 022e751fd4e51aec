import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';

export { until } from './poll.js';

// The built `lifeboat` as a user runs it: commands in child processes from one working
// directory with one environment (LIFEBOAT_VAULT_URL/TOKEN once logged in), and long-running
// roles (vault, process server, agent, recovery host) as daemons the session stops at the end.

const root = join(import.meta.dirname, '..', '..', '..');
/** The built CLI's entry point (run `npx tsc -b` before a test that uses it). */
export const lifeboatBin = join(root, 'packages', 'cli', 'bin', 'lifeboat.js');

/** What one `lifeboat` command printed and how it exited. */
export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** A long-running `lifeboat` command (a role), watched through its output. */
export interface CliDaemon {
  readonly child: ChildProcess;
  /** Its stdout so far. */
  out(): string;
  /** Its stderr so far. */
  err(): string;
  readonly exited: Promise<number | null>;
  /** Waits for `pattern` in its stderr or stdout; fails when it exits first or after `ms`. */
  wait(pattern: RegExp, ms?: number): Promise<RegExpMatchArray>;
  /** SIGTERM, then its exit code (SIGKILL after 30 s). */
  stop(): Promise<number | null>;
}

/** A JSON object as `--json` prints it. */
export type Row = Record<string, unknown>;

/** Commands and daemons of one user session in one working directory. */
export class CliSession {
  /** Environment added to every command (e.g. LIFEBOAT_VAULT_URL and LIFEBOAT_VAULT_TOKEN). */
  readonly env: Record<string, string> = {};
  private readonly daemons: CliDaemon[] = [];

  constructor(
    /** The working directory every command runs in. */
    readonly cwd: string,
  ) {}

  /** Starts a long-running command; {@link stopAll} stops it at the latest. */
  daemon(args: string[]): CliDaemon {
    const child = spawn(process.execPath, [lifeboatBin, ...args], {
      cwd: this.cwd,
      env: { ...process.env, ...this.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    child.stdout?.on('data', (c: Buffer) => (out += c.toString()));
    child.stderr?.on('data', (c: Buffer) => (err += c.toString()));
    const exited = new Promise<number | null>((resolve) =>
      child.once('exit', (code) => resolve(code)),
    );
    const d: CliDaemon = {
      child,
      out: () => out,
      err: () => err,
      exited,
      wait: async (pattern, ms = 60_000) => {
        const deadline = Date.now() + ms;
        for (;;) {
          const m = err.match(pattern) ?? out.match(pattern);
          if (m) return m;
          if (child.exitCode !== null)
            throw new Error(`lifeboat ${args.join(' ')} exited ${child.exitCode}:\n${err}\n${out}`);
          if (Date.now() > deadline) throw new Error(`no ${pattern} in:\n${err}\n${out}`);
          await new Promise((r) => setTimeout(r, 100));
        }
      },
      stop: async () => {
        if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
        const t = setTimeout(() => child.kill('SIGKILL'), 30_000);
        const code = await exited;
        clearTimeout(t);
        return code;
      },
    };
    this.daemons.push(d);
    return d;
  }

  /** Runs one command to its end; `env` is added to the session's for this one. */
  run(args: string[], env: Record<string, string> = {}): Promise<CliResult> {
    return new Promise((resolve) => {
      const child = spawn(process.execPath, [lifeboatBin, ...args], {
        cwd: this.cwd,
        env: { ...process.env, ...this.env, ...env },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let stdout = '';
      let stderr = '';
      child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
      child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
      child.once('exit', (code) => resolve({ code, stdout, stderr }));
    });
  }

  /** Runs a command with --json that must succeed, and parses what it prints. */
  async json<T = Row>(args: string[]): Promise<T> {
    const r = await this.run([...args, '--json']);
    if (r.code !== 0) throw new Error(`lifeboat ${args.join(' ')} exited ${r.code}:\n${r.stderr}`);
    return JSON.parse(r.stdout) as T;
  }

  /** Stops every daemon still running, newest first. */
  async stopAll(): Promise<void> {
    for (const d of this.daemons.splice(0).reverse()) await d.stop();
  }
}

/**
 * Step 7's start: `lifeboat vault start` on loopback in `dataDir` (with `args`, e.g.
 * `--tls-internal`), then `vault login` as its first admin; the session's commands then go to
 * that vault as that admin, trusting the vault's CA (NODE_EXTRA_CA_CERTS) when it serves HTTPS.
 */
export async function startVaultAndLogIn(
  s: CliSession,
  options: { dataDir?: string; args?: string[] } = {},
): Promise<CliDaemon> {
  const dataDir = options.dataDir ?? 'vault';
  const vault = s.daemon([
    ...['vault', 'start', '--data-dir', dataDir, '--listen', '127.0.0.1:0'],
    ...['--log-level', 'warn', ...(options.args ?? [])],
  ]);
  const url = (await vault.wait(/vault listening on (https?:\S+) /))[1] ?? '';
  s.env['LIFEBOAT_VAULT_URL'] = url;
  if (url.startsWith('https:')) {
    const ca = (await vault.wait(/vault CA certificate in (\S+) /))[1] ?? '';
    s.env['NODE_EXTRA_CA_CERTS'] = ca;
  }
  const login = await s.run([
    ...['vault', 'login', '--username', 'admin'],
    ...['--password-file', join(dataDir, 'initial-admin-password')],
  ]);
  if (login.code !== 0) throw new Error(`vault login exited ${login.code}:\n${login.stderr}`);
  s.env['LIFEBOAT_VAULT_TOKEN'] = login.stdout.trim();
  return vault;
}

/** `lifeboat vault key create --kind <kind>`, saved as `<kind>.key` for a --registration-key-file. */
export async function createKeyFile(s: CliSession, kind: string): Promise<string> {
  const k = await s.json(['vault', 'key', 'create', '--kind', kind, '--expires-in', '600']);
  const file = `${kind}.key`;
  await writeFile(join(s.cwd, file), `${String(k['key'])}\n`);
  return file;
}

/**
 * Step 5 with a directory store: `lifeboat store init` in `<cwd>/store` with a passphrase
 * file, `vault store add` and `vault store check`. Returns the vault's id of it and the global
 * options that open it from the CLI.
 */
export async function addDirectoryStore(
  s: CliSession,
  passphrase: string,
): Promise<{ storeId: string; storeArgs: string[]; check: Row }> {
  await writeFile(join(s.cwd, 'store-passphrase'), `${passphrase}\n`);
  const storeArgs = ['--store', 'store', '--passphrase-file', 'store-passphrase'];
  const init = await s.run([...storeArgs, 'store', 'init']);
  if (init.code !== 0) throw new Error(`store init exited ${init.code}:\n${init.stderr}`);
  const ts = await s.json([
    ...['vault', 'store', 'add', 'dr', '--kind', 'directory', '--path', join(s.cwd, 'store')],
    ...['--store-passphrase-file', 'store-passphrase'],
  ]);
  const storeId = String(ts['id']);
  return { storeId, storeArgs, check: await s.json(['vault', 'store', 'check', storeId]) };
}

/** Seconds each part of a walk took, for the log at its end. */
export class StepTimer {
  private readonly steps: Array<[string, number]> = [];
  private last = Date.now();
  private readonly start = this.last;

  /** Ends the current part, named `what`. */
  mark(what: string): void {
    const now = Date.now();
    this.steps.push([what, (now - this.last) / 1000]);
    this.last = now;
  }

  /** One line per part, then the total. */
  report(): string {
    return [
      ...this.steps.map(([w, t]) => `${t.toFixed(1).padStart(6)} s  ${w}`),
      `${((this.last - this.start) / 1000).toFixed(1).padStart(6)} s  total`,
    ].join('\n');
  }
}
