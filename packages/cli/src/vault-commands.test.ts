import { EventEmitter } from 'node:events';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { CliInput } from './cli-context.js';
import { runCli } from './main.js';

interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

let dir: string;
let url = '';
let token = '';
const stopVault = new AbortController();
let vaultDone: Promise<number> | undefined;

function io(env: Record<string, string>, onStderr?: (s: string) => void) {
  let stdout = '';
  let stderr = '';
  const stdin = Object.assign(new EventEmitter(), {
    isTTY: false,
    resume: () => undefined,
    pause: () => undefined,
  }) as CliInput;
  return {
    io: {
      stdout: { write: (s: string) => (stdout += s) },
      stderr: {
        write: (s: string) => {
          stderr += s;
          onStderr?.(stderr);
        },
        isTTY: false,
      },
      stdin,
      env,
      cwd: dir,
    },
    out: () => ({ stdout, stderr }),
  };
}

async function lifeboat(args: string[], env: Record<string, string> = {}): Promise<RunResult> {
  const x = io({
    LIFEBOAT_VAULT_URL: url,
    ...(token !== '' ? { LIFEBOAT_VAULT_TOKEN: token } : {}),
    ...env,
  });
  const code = await runCli(args, { io: x.io });
  return { code, ...x.out() };
}

async function json<T = Record<string, unknown>>(
  args: string[],
  env?: Record<string, string>,
): Promise<T> {
  const r = await lifeboat([...args, '--json'], env);
  expect(r.stderr, args.join(' ')).toBe('');
  expect(r.code, args.join(' ')).toBe(0);
  return JSON.parse(r.stdout) as T;
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lifeboat-cli-vault-'));
  await writeFile(join(dir, 'admin.txt'), 'admin-password-1\n');
  let listening: (u: string) => void = () => undefined;
  const started = new Promise<string>((resolve) => (listening = resolve));
  const x = io({}, (text) => {
    const m = /vault listening on (\S+)/.exec(text);
    if (m?.[1] !== undefined) listening(m[1]);
  });
  vaultDone = runCli(
    [
      'vault',
      'start',
      '--data-dir',
      join(dir, 'vault'),
      '--listen',
      '127.0.0.1:0',
      '--admin-password-file',
      'admin.txt',
      '--log-level',
      'silent',
    ],
    { io: x.io, signal: stopVault.signal },
  );
  url = await Promise.race([
    started,
    vaultDone.then((code) =>
      Promise.reject(new Error(`vault start exited ${code}: ${x.out().stderr}`)),
    ),
  ]);
});

afterAll(async () => {
  stopVault.abort();
  await vaultDone;
  await rm(dir, { recursive: true, force: true });
});

describe('lifeboat vault (CLI over the vault API)', () => {
  it('logs in, registers a process server with a key, and sets up sites, policies, stores and hosts', async () => {
    const noToken = await lifeboat(['vault', 'site', 'list']);
    expect(noToken.code).toBe(2);
    expect(noToken.stderr).toContain('LB_CLI_USAGE');
    const wrong = await lifeboat([
      'vault',
      'login',
      '--username',
      'admin',
      '--password-file',
      'missing.txt',
    ]);
    expect(wrong.code).toBe(1);
    await writeFile(join(dir, 'bad.txt'), 'nope-nope\n');
    const badLogin = await lifeboat([
      'vault',
      'login',
      '--username',
      'admin',
      '--password-file',
      'bad.txt',
    ]);
    expect(badLogin.stderr).toContain('LB_VAULT_LOGIN_FAILED');
    const login = await lifeboat([
      'vault',
      'login',
      '--username',
      'admin',
      '--password-file',
      'admin.txt',
    ]);
    expect(login.code).toBe(0);
    token = login.stdout.trim();
    expect(token).toMatch(/^lbs_/);
    expect((await json(['vault', 'whoami']))['role']).toBe('admin');

    const key = await json([
      'vault',
      'key',
      'create',
      '--kind',
      'process-server',
      '--expires-in',
      '600',
    ]);
    const reg = await json<{ component: { id: string } }>([
      'vault',
      'register',
      '--key',
      String(key['key']),
      '--kind',
      'process-server',
      '--name',
      'ps1',
      '--out',
      'ps1',
    ]);
    expect((await stat(join(dir, 'ps1', 'key.pem'))).mode & 0o777).toBe(0o600);
    const psToken = (await readFile(join(dir, 'ps1', 'token'), 'utf8')).trim();
    const reused = await lifeboat([
      'vault',
      'register',
      '--key',
      String(key['key']),
      '--kind',
      'process-server',
      '--name',
      'ps2',
      '--out',
      'ps2',
    ]);
    expect(reused.code).toBe(1);
    expect(reused.stderr).toContain('LB_VAULT_REGISTRATION_KEY_USED');

    const site = await json(['vault', 'site', 'add', 'london', '--kind', 'source']);
    expect(site['name']).toBe('london');
    const policy = await json([
      'vault',
      'policy',
      'add',
      'gold',
      '--rpo',
      '60',
      '--crash-interval',
      '15',
      '--keep',
      '24h,7d/1h',
    ]);
    expect(policy['retention']).toEqual({ rules: [{ for: '24h' }, { for: '7d', every: '1h' }] });
    const badPolicy = await lifeboat([
      'vault',
      'policy',
      'add',
      'bad',
      '--rpo',
      '60',
      '--keep',
      'forever',
    ]);
    expect(badPolicy.code).toBe(1);
    expect(badPolicy.stderr).toContain('LB_VAULT_INVALID_INPUT');
    await writeFile(join(dir, 'pp.txt'), 'store-passphrase\n');
    const store = await json([
      'vault',
      'store',
      'add',
      'dr',
      '--kind',
      'directory',
      '--path',
      join(dir, 'store'),
      '--store-passphrase-file',
      'pp.txt',
    ]);
    await writeFile(join(dir, 'key.txt'), '-----BEGIN KEY-----\nabc\n-----END KEY-----\n');
    const cred = await json([
      'vault',
      'credential',
      'add',
      'root',
      '--kind',
      'ssh-key',
      '--username',
      'root',
      '--secret-file',
      'key.txt',
    ]);
    expect(JSON.stringify(cred)).not.toContain('BEGIN KEY');
    const host = await json([
      'vault',
      'host',
      'add',
      'kvm1',
      '--process-server',
      reg.component.id,
      '--qmp',
      'web=/run/web.qmp',
    ]);
    await json(['vault', 'host', 'discover', String(host['id'])]);

    // The process server (here, its token over the API) reports what it discovered.
    const inv = await fetch(`${url}/api/source-hosts/${String(host['id'])}/inventory`, {
      method: 'PUT',
      headers: { authorization: `Bearer ${psToken}`, 'content-type': 'application/json' },
      body: JSON.stringify({
        machines: [
          { externalId: 'web', name: 'web', disks: [{ name: 'vda', sizeBytes: 1 << 20 }] },
        ],
      }),
    });
    expect(inv.status).toBe(200);
    const machines = await json<{ items: Array<{ id: string; name: string }> }>([
      'vault',
      'machine',
      'list',
    ]);
    expect(machines.items.map((m) => m.name)).toEqual(['web']);
    // Where the machine lands on failover: a network of the recovery host.
    const mapping = await json([
      ...['vault', 'network-mapping', 'add', 'lan', '--source-network', 'br0'],
      ...['--target-network', 'dr-lan'],
    ]);
    expect(mapping).toMatchObject({ targetNetwork: 'dr-lan', testNetwork: null });
    const protect = await json([
      'vault',
      'protect',
      machines.items[0]?.id ?? '',
      '--policy',
      String(policy['id']),
      '--process-server',
      reg.component.id,
      '--target-store',
      String(store['id']),
      '--network-mapping',
      String(mapping['id']),
      '--no-wait',
    ]);
    expect(protect['state']).toBe('enabling');
    expect(protect['networkMappingId']).toBe(mapping['id']);
    const unmapped = await json([
      ...['vault', 'item', 'update', String(protect['id']), '--network-mapping', 'none'],
    ]);
    expect(unmapped['networkMappingId']).toBeNull();

    // The KVM host gets its agent; the policy new settings; the store is checked.
    const agentKey = await json(['vault', 'key', 'create', '--kind', 'agent']);
    const agentReg = await json<{ component: { id: string } }>([
      ...['vault', 'register', '--key', String(agentKey['key']), '--kind', 'agent'],
      ...['--name', 'kvm1-agent', '--out', 'agent'],
    ]);
    const updated = await json([
      ...['vault', 'host', 'update', String(host['id']), '--agent', agentReg.component.id],
      ...['--qmp', 'web=/run/web.qmp,db=/run/db.qmp'],
    ]);
    expect(updated['agentId']).toBe(agentReg.component.id);
    expect(updated['endpoints']).toEqual([
      { name: 'web', qmp: '/run/web.qmp' },
      { name: 'db', qmp: '/run/db.qmp' },
    ]);
    const agents = await json<{ items: Array<{ id: string }> }>(['vault', 'agent', 'list']);
    expect(agents.items.map((a) => a.id)).toContain(agentReg.component.id);
    expect(
      (await json(['vault', 'host', 'update', String(host['id']), '--agent', 'none']))['agentId'],
    ).toBeNull();
    const changed = await json([
      ...['vault', 'policy', 'update', String(policy['id']), '--crash-interval', '30'],
      ...['--keep', '48h'],
    ]);
    expect(changed).toMatchObject({
      crashConsistentIntervalSeconds: 30,
      retention: { rules: [{ for: '48h' }] },
    });
    // No store was created at that path: the check fails, and says why, with exit code 1.
    const check = await lifeboat(['vault', 'store', 'check', String(store['id']), '--json']);
    expect(check.code).toBe(1);
    expect(JSON.parse(check.stdout)).toMatchObject({ ok: false, error: { code: /^LB_STORE_/ } });
    const ca = await lifeboat(['vault', 'ca']);
    expect(ca.stdout).toMatch(/^-----BEGIN CERTIFICATE-----/);
    const items = await json<{ items: Array<{ state: string }> }>([
      'vault',
      'item',
      'list',
      '--state',
      'enabling',
    ]);
    expect(items.items).toHaveLength(1);
    const jobs = await json<{ items: Array<{ id: string; kind: string }> }>([
      'vault',
      'jobs',
      'list',
      '--kind',
      'enable-replication',
    ]);
    expect(jobs.items).toHaveLength(1);
    const show = await lifeboat(['vault', 'jobs', 'show', jobs.items[0]?.id ?? '']);
    expect(show.stdout).toContain('wait-for-process-server');
    const summary = await lifeboat(['vault', 'summary']);
    expect(summary.stdout).toContain('protected items: 1 (enabling 1)');
    expect(summary.stdout).toContain('ps1');
    const audit = await json<{ items: Array<{ action: string }> }>([
      'vault',
      'audit',
      '--limit',
      '50',
    ]);
    expect(audit.items.map((a) => a.action)).toContain('protected-item.create');

    // A viewer reads but may not change anything; the exit code says it failed.
    await writeFile(join(dir, 'viewer.txt'), 'viewer-password-1\n');
    await json([
      'vault',
      'user',
      'add',
      'vera',
      '--role',
      'viewer',
      '--password-file',
      'viewer.txt',
    ]);
    const vlogin = await lifeboat([
      'vault',
      'login',
      '--username',
      'vera',
      '--password-file',
      'viewer.txt',
    ]);
    const asViewer = { LIFEBOAT_VAULT_TOKEN: vlogin.stdout.trim() };
    expect((await lifeboat(['vault', 'site', 'list'], asViewer)).stdout).toContain('london');
    const denied = await lifeboat(
      ['vault', 'site', 'add', 'paris', '--kind', 'recovery', '--json'],
      asViewer,
    );
    expect(denied.code).toBe(1);
    expect((JSON.parse(denied.stdout) as { error: { code: string } }).error.code).toBe(
      'LB_VAULT_FORBIDDEN',
    );
  });

  it('has --help with an example on its commands', async () => {
    const help = await lifeboat(['vault', 'policy', 'add', '--help']);
    expect(help.code).toBe(0);
    expect(help.stdout).toContain('Example:');
    for (const cmd of [
      ['vault', 'whoami'],
      ['vault', 'item', 'disable'],
      ['vault', 'jobs', 'show'],
      ['vault', 'alerts', 'ack'],
      ['vault', 'machine', 'list'],
      ['vault', 'summary'],
    ]) {
      const h = await lifeboat([...cmd, '--help']);
      expect(h.stdout, cmd.join(' ')).toContain('Example:');
    }
    const unreachable = await lifeboat(['vault', 'site', 'list'], {
      LIFEBOAT_VAULT_URL: 'http://127.0.0.1:1',
    });
    expect(unreachable.stderr).toContain('LB_CLI_VAULT_UNREACHABLE');
  });
});
