import { readFile } from 'node:fs/promises';
import { isAbsolute, resolve } from 'node:path';
import { LifeboatError } from '@lifeboat/protocol/errors';
import { prefetchDirectoryStoreKeys } from '@lifeboat/store/key-prefetch';
import type { CliIo } from './cli-context.js';
import { promptHidden } from './prompt-hidden.js';

// This is the ONLY module of Lifeboat that reads process.env and configuration files
// (passphrase files included): everything else receives a validated, frozen CliConfig.

/** The command-line options every command accepts (see main.ts). */
export interface GlobalCliOptions {
  /** A directory path or an Azure Blob container URL. @default $LIFEBOAT_STORE */
  store?: string;
  /** Azure connection string. @default $AZURE_STORAGE_CONNECTION_STRING or $LIFEBOAT_AZURE_CONNECTION_STRING */
  azureConnectionString?: string;
  /** File whose first line is the passphrase. @default $LIFEBOAT_PASSPHRASE, else a prompt on a terminal */
  passphraseFile?: string;
  /** File whose first line is the new passphrase (passwd). @default $LIFEBOAT_NEW_PASSPHRASE, else a prompt */
  newPassphraseFile?: string;
  /** Machine-readable output on stdout, no progress bar. @default false */
  json?: boolean;
  /** Show the progress bar even when stderr is not a terminal. @default only on a terminal */
  progress?: boolean;
}

/** Where the target store lives. */
export type StoreLocation =
  | { kind: 'directory'; path: string }
  | {
      kind: 'azure';
      /** The URL as given, for messages. */
      url: string;
      account: string;
      container: string;
      connectionString: string;
    };

/** Where a passphrase comes from; read only when a command needs it. */
export type PassphraseSource =
  | { kind: 'value'; value: string; origin: string }
  | { kind: 'file'; path: string; origin: string }
  | { kind: 'prompt' }
  | { kind: 'none' };

/** The validated configuration of one CLI invocation (frozen). */
export interface CliConfig {
  /** Undefined when neither --store nor LIFEBOAT_STORE is given (see {@link requireStore}). */
  readonly store: StoreLocation | undefined;
  readonly passphrase: PassphraseSource;
  readonly newPassphrase: PassphraseSource;
  readonly json: boolean;
  /** Draw a progress bar on stderr. */
  readonly progress: boolean;
  /** LIFEBOAT_DEBUG=1 prints stack traces of unexpected errors. */
  readonly debug: boolean;
}

/** The environment of this process, for {@link CliIo.env}. */
export function processEnvironment(): Readonly<Record<string, string | undefined>> {
  return Object.freeze({ ...process.env });
}

/** True when LIFEBOAT_DEBUG asks for stack traces (set and not `0`). */
export function debugEnabled(io: CliIo): boolean {
  const value = io.env['LIFEBOAT_DEBUG'];
  return value !== undefined && value !== '' && value !== '0';
}

function nonEmpty(value: string | undefined): string | undefined {
  return value === undefined || value === '' ? undefined : value;
}

/** Validates the global options and environment once into a frozen {@link CliConfig}. */
export function resolveConfig(options: GlobalCliOptions, io: CliIo): CliConfig {
  const env = io.env;
  const json = options.json === true;
  const storeArg = nonEmpty(options.store) ?? nonEmpty(env['LIFEBOAT_STORE']);
  const connectionString =
    nonEmpty(options.azureConnectionString) ??
    nonEmpty(env['LIFEBOAT_AZURE_CONNECTION_STRING']) ??
    nonEmpty(env['AZURE_STORAGE_CONNECTION_STRING']);
  const store =
    storeArg === undefined ? undefined : parseStoreLocation(storeArg, connectionString, io.cwd);
  const passphrase = passphraseSource(
    options.passphraseFile,
    '--passphrase-file',
    env['LIFEBOAT_PASSPHRASE'],
    'LIFEBOAT_PASSPHRASE',
    io,
  );
  const newPassphrase = passphraseSource(
    options.newPassphraseFile,
    '--new-passphrase-file',
    env['LIFEBOAT_NEW_PASSPHRASE'],
    'LIFEBOAT_NEW_PASSPHRASE',
    io,
  );
  const progress = !json && (options.progress === true || io.stderr.isTTY === true);
  const debug = debugEnabled(io);
  return Object.freeze({
    store: store === undefined ? undefined : Object.freeze(store),
    passphrase: Object.freeze(passphrase),
    newPassphrase: Object.freeze(newPassphrase),
    json,
    progress,
    debug,
  });
}

/** The `vault` commands' options that say where the vault is and who calls it. */
export interface VaultCliOptions {
  /** @default $LIFEBOAT_VAULT_URL, else http://127.0.0.1:9440 */
  vaultUrl?: string;
  /** @default $LIFEBOAT_VAULT_TOKEN */
  token?: string;
}

/** Where the vault is and the bearer token to call it with (frozen). */
export interface VaultCliConfig {
  /** Base URL without a trailing slash. */
  readonly url: string;
  /** Undefined when neither --token nor LIFEBOAT_VAULT_TOKEN is given. */
  readonly token: string | undefined;
}

/** Resolves the vault's URL and token from the options, then the environment. */
export function resolveVaultConfig(options: VaultCliOptions, io: CliIo): VaultCliConfig {
  const url = (
    nonEmpty(options.vaultUrl) ??
    nonEmpty(io.env['LIFEBOAT_VAULT_URL']) ??
    'http://127.0.0.1:9440'
  ).replace(/\/+$/, '');
  const token = nonEmpty(options.token) ?? nonEmpty(io.env['LIFEBOAT_VAULT_TOKEN']);
  return Object.freeze({ url, token });
}

function passphraseSource(
  file: string | undefined,
  fileOrigin: string,
  envValue: string | undefined,
  envName: string,
  io: CliIo,
): PassphraseSource {
  // An explicit flag wins over the environment, as restic users expect.
  if (nonEmpty(file) !== undefined) {
    return { kind: 'file', path: resolve(io.cwd, file as string), origin: fileOrigin };
  }
  if (nonEmpty(envValue) !== undefined) {
    return { kind: 'value', value: envValue as string, origin: envName };
  }
  return io.stdin.isTTY === true ? { kind: 'prompt' } : { kind: 'none' };
}

/** The store location, or a usage error saying how to give one. */
export function requireStore(config: CliConfig): StoreLocation {
  if (config.store === undefined) {
    throw new LifeboatError(
      'LB_CLI_NO_STORE',
      'No store given. Pass --store <directory or Azure container URL>, or set LIFEBOAT_STORE.',
    );
  }
  return config.store;
}

const AZURE_HOST = /^([a-z0-9]{3,24})\.blob\.core\.windows\.net$/;
const CONTAINER = /^[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}$/;

/**
 * Parses `--store`: a directory path, or an Azure Blob container URL
 * (`https://<account>.blob.core.windows.net/<container>`, or Azurite's path-style
 * `http://127.0.0.1:<port>/<account>/<container>`).
 */
export function parseStoreLocation(
  value: string,
  connectionString: string | undefined,
  cwd: string,
): StoreLocation {
  if (!/^https?:\/\//i.test(value)) {
    const path = value.startsWith('dir:') ? value.slice(4) : value;
    return { kind: 'directory', path: isAbsolute(path) ? path : resolve(cwd, path) };
  }
  const bad = (why: string): LifeboatError =>
    new LifeboatError(
      'LB_CLI_BAD_STORE_URL',
      `Store URL ${value} is not an Azure Blob container URL: ${why}. Use https://<account>.blob.core.windows.net/<container> or, for Azurite, http://127.0.0.1:<port>/<account>/<container>.`,
      { details: { store: value } },
    );
  let url: URL;
  try {
    url = new URL(value);
  } catch (cause) {
    throw new LifeboatError('LB_CLI_BAD_STORE_URL', `Store URL ${value} cannot be parsed.`, {
      cause,
      details: { store: value },
    });
  }
  if (url.search !== '' || url.hash !== '') throw bad('it has a query or fragment');
  const segments = url.pathname.split('/').filter((s) => s !== '');
  const host = AZURE_HOST.exec(url.hostname);
  let account: string;
  let container: string;
  if (host !== null) {
    if (segments.length !== 1) throw bad('the path must be exactly /<container>');
    account = host[1] as string;
    container = segments[0] as string;
  } else {
    if (segments.length !== 2) throw bad('a path-style URL must end in /<account>/<container>');
    account = segments[0] as string;
    container = segments[1] as string;
  }
  if (!CONTAINER.test(container)) {
    throw bad(`"${container}" is not a valid container name (3-63 lowercase letters, digits, -)`);
  }
  if (connectionString === undefined) {
    throw new LifeboatError(
      'LB_CLI_NO_AZURE_CREDENTIALS',
      `Store ${value} is an Azure container but no connection string is given. Pass --azure-connection-string or set AZURE_STORAGE_CONNECTION_STRING.`,
      { details: { store: value } },
    );
  }
  const named = /(?:^|;)\s*AccountName=([^;]+)/i.exec(connectionString)?.[1]?.trim();
  if (named !== undefined && named !== account) {
    throw new LifeboatError(
      'LB_CLI_AZURE_MISMATCH',
      `The connection string is for account "${named}" but the store URL names account "${account}". Give the connection string of the account in the URL.`,
      { details: { store: value, urlAccount: account, connectionStringAccount: named } },
    );
  }
  return { kind: 'azure', url: value, account, container, connectionString };
}

/** What {@link readPassphrase} asks for, in prompts and messages. */
export interface PassphraseRequest {
  /** Prompt text, e.g. `passphrase for /srv/store: `. */
  prompt: string;
  /** Ask twice and compare (new passphrases). @default false */
  confirm?: boolean;
}

/** Reads a passphrase from its source: a file, the environment, or a no-echo prompt. */
export async function readPassphrase(
  source: PassphraseSource,
  request: PassphraseRequest,
  io: CliIo,
  missing: { code: string; message: string },
): Promise<string> {
  switch (source.kind) {
    case 'value':
      return source.value;
    case 'file':
      return readPassphraseFile(source.path, source.origin);
    case 'prompt': {
      const first = await promptHidden(request.prompt, io);
      if (first === '') {
        throw new LifeboatError('LB_CLI_EMPTY_PASSPHRASE', 'The passphrase is empty. Type one.');
      }
      if (request.confirm === true) {
        const second = await promptHidden('repeat to confirm: ', io);
        if (second !== first) {
          throw new LifeboatError(
            'LB_CLI_PASSPHRASE_MISMATCH',
            'The two passphrases typed differ. Run the command again.',
          );
        }
      }
      return first;
    }
    case 'none':
      throw new LifeboatError(missing.code, missing.message);
  }
}

/** Reads the first line of a passphrase file (a trailing newline is not part of it). */
export async function readPassphraseFile(
  path: string,
  origin = '--passphrase-file',
): Promise<string> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (cause) {
    throw new LifeboatError(
      'LB_CLI_PASSPHRASE_FILE',
      `Cannot read the passphrase file ${path} (${origin}): ${(cause as Error).message}. Check the path and its permissions.`,
      { cause, details: { path } },
    );
  }
  const line = text.split(/\r?\n/, 1)[0] ?? '';
  if (line === '') {
    throw new LifeboatError(
      'LB_CLI_EMPTY_PASSPHRASE',
      `The passphrase file ${path} (${origin}) is empty. Put the passphrase on its first line.`,
      { details: { path } },
    );
  }
  return line;
}

// `lifeboat store <one of these>` opens the store with its passphrase.
const OPENS_STORE = new Set(['import', 'points', 'restore', 'verify', 'prune', 'gc', 'stats']);

/**
 * Called by bin/lifeboat.js before the CLI's modules load: when this invocation is a store
 * command on a directory store whose passphrase comes from LIFEBOAT_PASSPHRASE or
 * --passphrase-file (never a prompt), starts deriving the key-encryption key now, so scrypt
 * runs on the thread pool while the modules load and the command starts. A cheap scan of the
 * arguments, not their real parse: when it guesses wrong, the work is merely not used.
 */
export async function prefetchStoreKey(args: readonly string[]): Promise<void> {
  try {
    const env = processEnvironment();
    const value = (name: string): string | undefined => {
      for (let i = 0; i < args.length; i++) {
        const a = args[i] as string;
        if (a === name) return args[i + 1];
        if (a.startsWith(`${name}=`)) return a.slice(name.length + 1);
      }
      return undefined;
    };
    const words = args.filter(
      (a, i) =>
        !a.startsWith('-') &&
        !['--store', '--passphrase-file', '--azure-connection-string'].includes(args[i - 1] ?? ''),
    );
    if (words[0] !== 'store' || !OPENS_STORE.has(words[1] ?? '')) return;
    const store = nonEmpty(value('--store')) ?? nonEmpty(env['LIFEBOAT_STORE']);
    if (store === undefined || /^https?:\/\//i.test(store)) return;
    const dir = resolve(process.cwd(), store.startsWith('dir:') ? store.slice(4) : store);
    const file = nonEmpty(value('--passphrase-file'));
    const passphrase =
      file !== undefined
        ? await readPassphraseFile(resolve(process.cwd(), file))
        : nonEmpty(env['LIFEBOAT_PASSPHRASE']);
    if (passphrase === undefined) return;
    await prefetchDirectoryStoreKeys(dir, passphrase);
  } catch {
    // The command itself reports whatever is wrong.
  }
}

/** How the CLI reaches a vault as a user (not as a component). */
export interface VaultAccess {
  /** Base URL without a trailing slash. */
  readonly url: string;
  /** A session token (`lifeboat vault login`) or an API token. */
  readonly token: string;
}

/**
 * The vault a user command talks to, or undefined for the store-only mode: `--vault` (with
 * `--token` or LIFEBOAT_VAULT_TOKEN), else LIFEBOAT_VAULT_TOKEN (a user who logged in, with
 * LIFEBOAT_VAULT_URL or the local default) unless `--store` was given on the command line.
 */
export function resolveVaultAccess(
  flags: { vault?: string; token?: string; store?: string; required?: boolean },
  io: CliIo,
): VaultAccess | undefined {
  const envToken = nonEmpty(io.env['LIFEBOAT_VAULT_TOKEN']);
  const token = nonEmpty(flags.token) ?? envToken;
  if (
    flags.required !== true &&
    flags.vault === undefined &&
    (token === undefined || nonEmpty(flags.store) !== undefined)
  ) {
    return undefined;
  }
  if (token === undefined) {
    throw new LifeboatError(
      'LB_CLI_USAGE',
      `No vault token for ${flags.vault ?? 'the vault'}: run "lifeboat vault login" and export LIFEBOAT_VAULT_TOKEN, or pass --token.`,
    );
  }
  const url = (
    flags.vault ??
    nonEmpty(io.env['LIFEBOAT_VAULT_URL']) ??
    'http://127.0.0.1:9440'
  ).replace(/\/+$/, '');
  return Object.freeze({ url, token });
}
