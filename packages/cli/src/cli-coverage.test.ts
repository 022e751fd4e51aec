import { EventEmitter } from 'node:events';
import type { IncomingMessage } from 'node:http';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Command } from 'commander';
import { startVault, type Vault } from '@lifeboat/vault';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { CliContext, CliInput, CliIo } from './cli-context.js';
import { buildProgram, runCli } from './main.js';

// Issue 5: "the CLI covers every API capability" and "--help with examples on every command".
// Both are checked over what exists, so a route or a command added later is held to them too.

// Routes no CLI command needs to call, and why. Component-only routes (what a process server,
// agent or recovery host calls with its own token) are left out by their access.
const NOT_FOR_THE_CLI: Record<string, string> = {
  'GET /api/protected-items/:id/points':
    'the same list as GET /api/recovery-points?protectedItemId= ("vault points list --protected-item-id")',
};

let dir = '';
let vault: Vault | undefined;
let token = '';

function io(env: Record<string, string>): { io: CliIo; out: () => string } {
  let stdout = '';
  const stdin = Object.assign(new EventEmitter(), {
    isTTY: false,
    resume: () => undefined,
    pause: () => undefined,
  }) as CliInput;
  return {
    io: {
      stdout: { write: (s: string) => (stdout += s) },
      stderr: { write: () => true, isTTY: false },
      stdin,
      env,
      cwd: dir,
    },
    out: () => stdout,
  };
}

function leaves(cmd: Command, path: string[] = []): Array<{ path: string[]; cmd: Command }> {
  return cmd.commands.flatMap((sub) => {
    const p = [...path, sub.name()];
    return sub.commands.length === 0 ? [{ path: p, cmd: sub }] : leaves(sub, p);
  });
}

async function program(): Promise<Command> {
  const ctx: CliContext = {
    io: io({}).io,
    exitCode: 0,
    cleanups: [],
    signal: new AbortController().signal,
  };
  return buildProgram(ctx);
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lifeboat-cli-coverage-'));
  // A file that is a password (its first line) and JSON (an array) at once.
  await writeFile(join(dir, 'input'), '["password-123"]\n');
  vault = await startVault({
    dataDir: join(dir, 'vault'),
    port: 0,
    logLevel: 'silent',
    passwordCost: 1024,
    initialAdmin: { username: 'admin', password: 'admin-password' },
    schedulerIntervalMs: 3_600_000,
  });
  token = await adminSession();
});

async function adminSession(): Promise<string> {
  const login = await fetch(`${vault?.url}/api/auth/login`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ username: 'admin', password: 'admin-password' }),
  });
  return ((await login.json()) as { token: string }).token;
}

afterAll(async () => {
  await vault?.close();
  await rm(dir, { recursive: true, force: true });
});

describe('the lifeboat CLI as a whole', () => {
  it('calls every route of the vault API from some command', async () => {
    const v = vault as Vault;
    const routes = v.routes.filter((r) => {
      const access = Array.isArray(r.access) ? r.access : [r.access];
      return !(access.length === 1 && access[0] === 'component');
    });
    const patterns = routes.map((r) => ({
      key: `${r.method} ${r.url}`,
      method: r.method,
      re: new RegExp(`^${r.url.replace(/:\w+/g, '[^/]+')}$`),
    }));
    // What the vault was asked, whichever HTTP client a command uses.
    const called = new Set<string>();
    // The query parameters each route was given, as "GET /api/x ?name".
    const queried = new Set<string>();
    const onRequest = (req: IncomingMessage): void => {
      const url = new URL(req.url ?? '/', 'http://x');
      const hit = patterns.find((p) => p.method === req.method && p.re.test(url.pathname));
      if (hit === undefined) return;
      called.add(hit.key);
      for (const name of url.searchParams.keys()) queried.add(`${hit.key} ?${name}`);
    };
    v.app.server.on('request', onRequest);
    try {
      // A session of its own: "vault logout" ends it.
      const env = { LIFEBOAT_VAULT_URL: v.url, LIFEBOAT_VAULT_TOKEN: await adminSession() };
      // Every command that talks to the vault, with made-up ids and values: an answer of 400
      // or 404 still proves which route the command calls. Each optional option is given
      // once on its own, since commands send only what they are given.
      const commands = leaves(await program()).filter(
        ({ path }) => (path[0] === 'vault' && path[1] !== 'start') || path[0] === 'failover',
      );
      expect(commands.length).toBeGreaterThan(80);
      const dummy = (flag: string): string =>
        flag === '--out' || flag.endsWith('-out')
          ? 'output'
          : flag.endsWith('-file') || flag === '--file'
            ? 'input'
            : /hours|count|limit/.test(flag)
              ? '2'
              : 'nope';
      for (const { path, cmd } of commands) {
        const optional = cmd.options.filter(
          (o) => !o.mandatory && !o.negate && o.long !== '--help',
        );
        const base = [
          ...path,
          ...cmd.registeredArguments.filter((a) => a.required).map(() => 'nope'),
          ...cmd.options
            .filter((o) => o.mandatory)
            .flatMap((o) => [o.long ?? '', dummy(o.long ?? '')]),
          ...(cmd.options.some((o) => o.long === '--no-wait') ? ['--no-wait'] : []),
        ];
        const given = (o: (typeof optional)[number]): string[] => [
          o.long ?? '',
          ...(o.required || o.optional ? [dummy(o.long ?? '')] : []),
        ];
        // A switch can change the route (`failover list --test`): each option with it too.
        const switches = optional.filter((o) => !o.required && !o.optional);
        const variants = [
          base,
          ...optional.map((o) => [...base, ...given(o)]),
          ...switches.flatMap((b) =>
            optional.filter((o) => o !== b).map((o) => [...base, ...given(b), ...given(o)]),
          ),
        ];
        // `failover show` tells a test failover from a failover by its id.
        if (path.join(' ') === 'failover show') variants.push([...path, 'tf_nope']);
        for (const args of variants) {
          await runCli(args, { io: io(env).io, signal: AbortSignal.timeout(1_000) });
        }
      }
    } finally {
      v.app.server.off('request', onRequest);
    }
    const missing = patterns
      .map((p) => p.key)
      .filter((k) => !called.has(k) && NOT_FOR_THE_CLI[k] === undefined);
    expect(missing, 'routes no lifeboat command calls').toEqual([]);

    // Every filter of every list is an option of its list command. Paging is the commands'
    // own (--limit, --all); `all` of the tokens is an admin's view of everyone's tokens.
    const doc = (await (await fetch(`${v.url}/api/openapi.json`)).json()) as {
      paths: Record<string, Record<string, { parameters?: Array<{ in: string; name: string }> }>>;
    };
    const filters = routes
      .filter((r) => r.method === 'GET' && NOT_FOR_THE_CLI[`GET ${r.url}`] === undefined)
      .flatMap((r) => {
        const op = doc.paths[r.url.replace(/:(\w+)/g, '{$1}')]?.['get'];
        const names = (op?.parameters ?? []).filter((x) => x.in === 'query').map((x) => x.name);
        if (!names.includes('limit')) return [];
        return names
          .filter((n) => !['limit', 'cursor', 'offset'].includes(n))
          .filter((n) => !(r.url === '/api/tokens' && n === 'all'))
          .map((n) => `GET ${r.url} ?${n}`);
      });
    expect(filters.length).toBeGreaterThan(50);
    expect(
      filters.filter((f) => !queried.has(f)),
      'list filters no command passes',
    ).toEqual([]);
  });

  it('has --help with an example on every command', async () => {
    const without: string[] = [];
    for (const { path } of leaves(await program())) {
      const x = io({});
      expect(await runCli([...path, '--help'], { io: x.io })).toBe(0);
      if (!/^Examples?:$/m.test(x.out())) without.push(path.join(' '));
    }
    expect(without).toEqual([]);
    const top = io({});
    expect(await runCli(['--help'], { io: top.io })).toBe(0);
    expect(top.out()).toMatch(/^Exit codes[^\n]*:\n {2}0 .*\n {2}1 .*\n {2}2 .*\n {2}3 /m);
  });
  it('the commands added for coverage do what they say', async () => {
    const v = vault as Vault;
    const env = { LIFEBOAT_VAULT_URL: v.url, LIFEBOAT_VAULT_TOKEN: token };
    const run = async (args: string[], as: Record<string, string> = env) => {
      const x = io(as);
      const code = await runCli([...args, '--json'], { io: x.io });
      // The answers of many commands, read field by field below.
      // eslint-disable-next-line @typescript-eslint/no-explicit-any
      return { code, body: x.out() === '' ? {} : (JSON.parse(x.out()) as Record<string, any>) };
    };
    const ok = async (args: string[], as?: Record<string, string>) => {
      const r = await run(args, as);
      expect(r.code, `${args.join(' ')}: ${JSON.stringify(r.body)}`).toBe(0);
      return r.body;
    };
    await writeFile(join(dir, 'pw1'), 'password-one\n');
    await writeFile(join(dir, 'pw2'), 'password-two\n');

    // Users: show, update (role, disabled), and their own password, logout.
    const user = await ok([
      'vault',
      'user',
      'add',
      'carol',
      '--role',
      'operator',
      '--password-file',
      'pw1',
    ]);
    expect((await ok(['vault', 'user', 'show', user['id']]))['username']).toBe('carol');
    expect((await ok(['vault', 'user', 'update', user['id'], '--role', 'viewer']))['role']).toBe(
      'viewer',
    );
    const carol = {
      ...env,
      LIFEBOAT_VAULT_TOKEN: (
        await ok(['vault', 'login', '--username', 'carol', '--password-file', 'pw1'])
      )['token'],
    };
    await ok(
      ['vault', 'password', '--current-password-file', 'pw1', '--new-password-file', 'pw2'],
      carol,
    );
    expect(
      (await run(['vault', 'login', '--username', 'carol', '--password-file', 'pw1'])).code,
    ).toBe(1);
    const again = {
      ...env,
      LIFEBOAT_VAULT_TOKEN: (
        await ok(['vault', 'login', '--username', 'carol', '--password-file', 'pw2'])
      )['token'],
    };
    await ok(['vault', 'logout'], again);
    expect((await run(['vault', 'whoami'], again)).body['error']?.code).toBe(
      'LB_VAULT_UNAUTHENTICATED',
    );
    await ok(['vault', 'user', 'update', user['id'], '--disabled', 'yes']);
    expect(
      (await run(['vault', 'login', '--username', 'carol', '--password-file', 'pw2'])).code,
    ).toBe(1);
    expect((await run(['vault', 'user', 'update', user['id'], '--disabled', 'maybe'])).code).toBe(
      2,
    );

    // Tokens and keys are revoked.
    const apiToken = await ok(['vault', 'token', 'create', 'ci']);
    await ok(['vault', 'token', 'remove', apiToken['id']]);
    expect(
      (await run(['vault', 'whoami'], { ...env, LIFEBOAT_VAULT_TOKEN: apiToken['token'] })).code,
    ).toBe(1);
    const key = await ok(['vault', 'key', 'create', '--kind', 'process-server']);
    await ok(['vault', 'key', 'remove', key['id']]);
    expect((await ok(['vault', 'key', 'list']))['items']).toEqual([]);

    // Sites, credentials, mappings, components: update and remove.
    const site = await ok(['vault', 'site', 'add', 'paris', '--kind', 'recovery']);
    expect(
      (await ok(['vault', 'site', 'update', site['id'], '--description', 'rack 4']))['description'],
    ).toBe('rack 4');
    const cred = await ok([
      'vault',
      'credential',
      'add',
      'root',
      '--kind',
      'ssh-password',
      '--username',
      'root',
      '--secret-file',
      'pw1',
    ]);
    expect(
      (
        await ok([
          'vault',
          'credential',
          'update',
          cred['id'],
          '--username',
          'admin',
          '--secret-file',
          'pw2',
        ])
      )['username'],
    ).toBe('admin');
    await ok(['vault', 'credential', 'remove', cred['id']]);
    expect((await ok(['vault', 'credential', 'list']))['total']).toBe(0);
    const mapping = await ok([
      'vault',
      'mapping',
      'add',
      'lan',
      '--source-network',
      'br0',
      '--target-network',
      'dr',
      '--target-site',
      site['id'],
    ]);
    expect(mapping['targetSiteId']).toBe(site['id']);
    const changed = await ok([
      'vault',
      'mapping',
      'update',
      mapping['id'],
      '--test-network',
      'dr-test',
      '--target-site',
      'none',
    ]);
    expect([changed['testNetwork'], changed['targetSiteId']]).toEqual(['dr-test', null]);
    const psKey = await ok(['vault', 'key', 'create', '--kind', 'process-server']);
    const reg = await ok([
      'vault',
      'register',
      '--key',
      psKey['key'],
      '--kind',
      'process-server',
      '--name',
      'ps1',
      '--out',
      'ps1',
    ]);
    const psId = reg['component']['id'] as string;
    expect(
      (
        await ok([
          'vault',
          'process-server',
          'update',
          psId,
          '--name',
          'ps-one',
          '--site',
          site['id'],
        ])
      )['siteId'],
    ).toBe(site['id']);

    // A host's inventory by hand, a store's stats, the catalogue, a protected item's history.
    const host = await ok(['vault', 'host', 'add', 'kvm1', '--process-server', psId]);
    await writeFile(
      join(dir, 'inventory.json'),
      JSON.stringify({
        machines: [
          { externalId: 'vm1', name: 'vm1', disks: [{ name: 'vda', sizeBytes: 1 << 20 }] },
        ],
      }),
    );
    await ok(['vault', 'host', 'inventory', host['id'], '--file', 'inventory.json']);
    const machines = (await ok(['vault', 'machine', 'list', '--source-host-id', host['id']]))[
      'items'
    ] as Array<{ id: string }>;
    expect(machines).toHaveLength(1);
    // The list filters the API has are options: a search, the site.
    expect((await ok(['vault', 'machine', 'list', '--search', 'VM1']))['total']).toBe(1);
    expect((await ok(['vault', 'machine', 'list', '--search', 'web']))['total']).toBe(0);
    expect((await ok(['vault', 'process-server', 'list', '--site-id', site['id']]))['total']).toBe(
      1,
    );
    await writeFile(join(dir, 'pp'), 'store-passphrase\n');
    await ok(['--store', join(dir, 'store'), '--passphrase-file', 'pp', 'store', 'init']);
    const store = await ok([
      'vault',
      'store',
      'add',
      'dr',
      '--kind',
      'directory',
      '--path',
      join(dir, 'store'),
      '--store-passphrase-file',
      'pp',
    ]);
    expect((await ok(['vault', 'store', 'update', store['id'], '--name', 'dr-1']))['name']).toBe(
      'dr-1',
    );
    expect((await ok(['vault', 'store', 'stats', store['id']]))['stats']).toBeNull();
    const measured = await ok(['vault', 'store', 'stats', store['id'], '--refresh']);
    expect(measured['stats']).not.toBeNull();
    const collected = await ok(['vault', 'store', 'gc', store['id']]);
    expect(collected['state']).toBe('succeeded');
    expect(collected['bytesFreed']).toBe(0);
    const policy = await ok(['vault', 'policy', 'add', 'gold', '--rpo', '60', '--keep', '24h']);
    const item = await ok([
      'vault',
      'protect',
      machines[0]?.id ?? '',
      '--policy',
      policy['id'],
      '--process-server',
      psId,
      '--target-store',
      store['id'],
      '--no-wait',
    ]);
    const time = new Date().toISOString();
    await writeFile(
      join(dir, 'points.json'),
      JSON.stringify([
        {
          id: 'pt-1',
          machine: machines[0]?.id,
          disk: 'vda',
          time,
          committedAt: time,
          kind: 'crash',
          size: 1 << 20,
        },
      ]),
    );
    expect(
      (
        await ok([
          'vault',
          'points',
          'upsert',
          '--target-store',
          store['id'],
          '--file',
          'points.json',
        ])
      )['matched'],
    ).toBe(1);
    expect((await ok(['vault', 'points', 'show', store['id'], 'pt-1']))['protectedItemId']).toBe(
      item['id'],
    );
    expect(
      (await ok(['vault', 'item', 'history', item['id'], '--hours', '1']))['buckets'],
    ).toBeInstanceOf(Array);
    expect((await ok(['vault', 'jobs', 'artifacts', item['jobId']]))['items']).toEqual([]);
    await ok(['vault', 'item', 'disable', item['id']]);
    await ok(['vault', 'item', 'remove', item['id']]);
    expect((await run(['vault', 'item', 'show', item['id']])).body['error']?.code).toBe(
      'LB_VAULT_NOT_FOUND',
    );
    const ps2Key = await ok(['vault', 'key', 'create', '--kind', 'process-server']);
    const ps2 = await ok([
      'vault',
      'register',
      '--key',
      ps2Key['key'],
      '--kind',
      'process-server',
      '--name',
      'ps2',
      '--out',
      'ps2',
    ]);
    await ok(['vault', 'process-server', 'remove', ps2['component']['id']]);
    expect((await ok(['vault', 'process-server', 'list']))['total']).toBe(1);

    // Failovers (none yet), health, metrics, the OpenAPI document, the event stream.
    expect((await ok(['failover', 'list', '--test']))['total']).toBe(0);
    expect((await run(['failover', 'show', 'tf_nope'])).body['error']?.code).toBe(
      'LB_VAULT_NOT_FOUND',
    );
    expect((await ok(['vault', 'health'], { LIFEBOAT_VAULT_URL: v.url }))['status']).toBeDefined();
    expect(String((await ok(['vault', 'metrics']))['metrics'])).toContain('# TYPE');
    await ok(['vault', 'openapi', '--out', 'openapi.json'], { LIFEBOAT_VAULT_URL: v.url });
    const x = io(env);
    const events = runCli(['vault', 'events', '--count', '1', '--json'], {
      io: x.io,
      signal: AbortSignal.timeout(20_000),
    });
    // A job changing is an event: a store-stats job, once the stream is open.
    await new Promise((r) => setTimeout(r, 300));
    await ok(['vault', 'store', 'stats', store['id'], '--refresh']);
    expect(await events).toBe(0);
    const lines = x.out().trim().split('\n');
    expect(lines).toHaveLength(1);
    expect(JSON.parse(lines[0] ?? '')).toMatchObject({
      event: 'job',
      data: { id: expect.any(String), state: expect.any(String) },
    });
  });
});
