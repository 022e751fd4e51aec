import { X509Certificate } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { VaultClient, type ComponentIdentity } from '@lifeboat/protocol';
import {
  RecoveryHost,
  RecoveryHostLink,
  keepRecoveryHostCertificate,
  recoveryHostCredentials,
} from '@lifeboat/recovery';
import { makeTempDir, type TempDir } from '@lifeboat/testing';
import { startVault, type Vault } from '@lifeboat/vault';

// Issue 5: a component "gets its certificate (and renews it before it expires)". A recovery
// host runs for months: it renews while it runs, not only at start, and its link to the vault
// goes on with the renewed certificate.

let tmp: TempDir;
let vault: Vault;
let admin = '';

async function api<T = Record<string, unknown>>(method: string, path: string, body?: unknown) {
  const res = await fetch(`${vault.url}${path}`, {
    method,
    headers: {
      authorization: `Bearer ${admin}`,
      ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
    },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  return (await res.json()) as T;
}

beforeAll(async () => {
  tmp = await makeTempDir('lifeboat-rh-renewal-');
  vault = await startVault({
    dataDir: join(tmp.path, 'vault'),
    port: 0,
    logLevel: 'silent',
    passwordCost: 1024,
    initialAdmin: { username: 'admin', password: 'admin-password' },
    schedulerIntervalMs: 3_600_000,
  });
  const login = await fetch(`${vault.url}/api/auth/login`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ username: 'admin', password: 'admin-password' }),
  });
  admin = ((await login.json()) as { token: string }).token;
});

afterAll(async () => {
  await vault?.close();
  await tmp?.remove();
});

describe('recovery host certificate renewal', () => {
  it('renews the certificate of a running recovery host when due, saves it and hands the link a client with it', async () => {
    const key = await api<{ key: string }>('POST', '/api/registration-keys', {
      kind: 'recovery-host',
    });
    const dir = join(tmp.path, 'run');
    const anonymous = new VaultClient({ url: vault.url });
    const first = await recoveryHostCredentials({
      dir,
      vault: anonymous,
      name: 'rh-renew',
      registrationKey: () => Promise.resolve(key.key),
    });

    // Not due (a fresh 90-day certificate, a third of its life left is 30 days away).
    const notDue: ComponentIdentity[] = [];
    const idle = keepRecoveryHostCertificate({
      dir,
      vault: anonymous,
      identity: first,
      checkMs: 3_600_000,
      onRenewed: (_c, identity) => notDue.push(identity),
    });
    await idle.check();
    idle.stop();
    expect(notDue).toEqual([]);

    // The link starts with a client the vault refuses; the renewal hands it a working one.
    const host = await RecoveryHost.start({ runDir: join(tmp.path, 'host'), accel: 'tcg' });
    const link = new RecoveryHostLink({
      vault: anonymous.as('lbc_not-a-token'),
      host,
      openStore: () => Promise.reject(new Error('no store in this test')),
      hydrationDir: join(tmp.path, 'disks'),
    });
    try {
      const refused = (await link.sync().catch((e: unknown) => e)) as { code?: string };
      expect(refused.code).toBe('LB_VAULT_UNAUTHENTICATED');
      const renewed: ComponentIdentity[] = [];
      const keeper = keepRecoveryHostCertificate({
        dir,
        vault: anonymous,
        identity: first,
        checkMs: 3_600_000,
        fraction: 1, // always due
        onRenewed: (client, identity) => {
          link.setVault(client);
          renewed.push(identity);
        },
      });
      await keeper.check();
      keeper.stop();
      expect(renewed).toHaveLength(1);
      const ca = new X509Certificate(await (await fetch(`${vault.url}/api/ca.pem`)).text());
      const before = new X509Certificate(first.cert);
      const after = new X509Certificate(renewed[0]?.cert ?? '');
      expect(after.serialNumber).not.toBe(before.serialNumber);
      expect(after.verify(ca.publicKey)).toBe(true);
      expect(
        after.checkPrivateKey(
          (await import('node:crypto')).createPrivateKey(renewed[0]?.key ?? ''),
        ),
      ).toBe(true);
      // Saved, so a restart uses it.
      const saved = JSON.parse(await readFile(join(dir, 'identity.json'), 'utf8')) as {
        cert: string;
      };
      expect(saved.cert).toBe(renewed[0]?.cert);

      await link.sync();
      const hosts = await api<{ items: Array<{ id: string; status: string }> }>(
        'GET',
        '/api/recovery-hosts',
      );
      expect(hosts.items.find((h) => h.id === first.id)?.status).toBe('healthy');
      const audit = await api<{ items: Array<{ action: string }> }>(
        'GET',
        `/api/audit?targetId=${first.id}`,
      );
      expect(audit.items.map((a) => a.action)).toContain('recovery-host.renew-certificate');
    } finally {
      await link.stop();
      await host.close();
    }
  });
});
