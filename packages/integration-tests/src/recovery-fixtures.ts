import { execFile } from 'node:child_process';
import { mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { VaultClient } from '@lifeboat/protocol';
import { RecoveryHost, RecoveryHostLink, type RecoveryHostOptions } from '@lifeboat/recovery';
import { DirectoryBackend, Store, type PointInfo, type StoreApi } from '@lifeboat/store';
import { buildTestImage, importRaw, testImageAppend, type TestImage } from '@lifeboat/testing';
import { startVault, type Vault, type VaultOptions } from '@lifeboat/vault';

export { importRaw };

const run = promisify(execFile);

/** Calls the vault's API as JSON; fails with the answer's body on a status of 300 or more. */
export async function api<T = Record<string, unknown>>(
  base: string,
  token: string | null,
  method: string,
  path: string,
  body?: unknown,
): Promise<T> {
  const res = await fetch(base + path, {
    method,
    headers: {
      ...(token !== null ? { authorization: `Bearer ${token}` } : {}),
      ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
    },
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${text}`);
  return (text === '' ? {} : JSON.parse(text)) as T;
}

/** Logs in as the vault's admin; returns the session token. */
export async function adminLogin(base: string, password = 'admin-password'): Promise<string> {
  const r = await api<{ token: string }>(base, null, 'POST', '/api/auth/login', {
    username: 'admin',
    password,
  });
  return r.token;
}

/** A copy of the test image's root with `text` in /var/lifeboat/marker (what the source wrote). */
export async function markedRoot(image: TestImage, dir: string, text: string): Promise<string> {
  const path = join(dir, `root-${text}.raw`);
  await run('cp', ['--sparse=always', image.rootImage, path]);
  const marker = join(dir, `marker-${text}`);
  await writeFile(marker, `${text}\n`);
  await run('debugfs', ['-w', '-R', `write ${marker} /var/lifeboat/marker`, path]);
  return path;
}

/** A protected machine the vault knows, with points in a real store and its catalogue. */
export interface SeededMachine {
  itemId: string;
  machineId: string;
  points: PointInfo[];
}

/** What {@link seedVault} set up: a process server (played here) and a target store. */
export interface SeededVault {
  processServerId: string;
  processServerToken: string;
  targetStoreId: string;
  /** Protects a machine whose disk `root` holds `rootImage`, as the process server would. */
  protect(
    name: string,
    rootImage: string,
    options?: { consistencyGroup?: string },
  ): Promise<SeededMachine>;
  /** Commits another point of a protected machine and upserts it into the catalogue. */
  addPoint(machine: SeededMachine, rootImage: string): Promise<PointInfo>;
}

/**
 * Seeds a vault the way a process server fills it: registered with a key, a KVM host's
 * inventory, a policy, the target store, and per machine a protected item whose point is
 * imported into the real store (machine = the vault's machine id) and upserted into the
 * catalogue with the process server's token. The recovery host then works only from what the
 * vault hands it.
 */
export async function seedVault(
  base: string,
  adminToken: string,
  store: StoreApi,
  storePath: string,
  passphrase: string,
): Promise<SeededVault> {
  const a = <T = Record<string, unknown>>(method: string, path: string, body?: unknown) =>
    api<T>(base, adminToken, method, path, body);
  const key = await a<{ key: string }>('POST', '/api/registration-keys', {
    kind: 'process-server',
  });
  const reg = await api<{ token: string; component: { id: string } }>(
    base,
    null,
    'POST',
    '/api/register',
    { key: key.key, kind: 'process-server', name: 'ps-seed' },
  );
  const ps = (method: string, path: string, body?: unknown) =>
    api(base, reg.token, method, path, body);
  await ps('POST', '/api/components/self/heartbeat', {});
  const host = await a<{ id: string }>('POST', '/api/source-hosts', {
    name: 'kvm-seed',
    kind: 'kvm',
    processServerId: reg.component.id,
    endpoints: [],
  });
  const targetStore = await a<{ id: string }>('POST', '/api/target-stores', {
    name: 'seed-store',
    kind: 'directory',
    path: storePath,
    passphrase,
  });
  const policy = await a<{ id: string }>('POST', '/api/policies', {
    name: 'seed-policy',
    rpoThresholdSeconds: 86_400,
    crashConsistentIntervalSeconds: 60,
    retention: { rules: [{ for: '1d' }] },
  });
  const inventory: Array<Record<string, unknown>> = [];
  const upsert = (point: PointInfo) =>
    ps('PUT', '/api/recovery-points', {
      targetStoreId: targetStore.id,
      points: [
        {
          id: point.id,
          machine: point.machine,
          disk: point.disk,
          time: point.time.toISOString(),
          committedAt: point.committedAt.toISOString(),
          kind: point.kind,
          size: point.size,
          ...(point.cut !== undefined ? { cut: point.cut } : {}),
        },
      ],
    });
  return {
    processServerId: reg.component.id,
    processServerToken: reg.token,
    targetStoreId: targetStore.id,
    async protect(name, rootImage, options = {}) {
      const size = (await stat(rootImage)).size;
      inventory.push({
        externalId: name,
        name,
        cpus: 1,
        memoryBytes: 256 * 1048576,
        disks: [{ name: 'root', sizeBytes: size }],
      });
      await ps('PUT', `/api/source-hosts/${host.id}/inventory`, { machines: inventory });
      const machines = await a<{ items: Array<{ id: string; name: string }> }>(
        'GET',
        `/api/machines?sourceHostId=${host.id}&limit=1000`,
      );
      const machineId = machines.items.find((m) => m.name === name)!.id;
      const item = await a<{ id: string }>('POST', '/api/protected-items', {
        machineId,
        policyId: policy.id,
        processServerId: reg.component.id,
        targetStoreId: targetStore.id,
        ...(options.consistencyGroup !== undefined
          ? { consistencyGroup: options.consistencyGroup }
          : {}),
      });
      await ps('POST', '/api/components/self/heartbeat', {
        items: [{ id: item.id, state: 'initial-replication' }],
      });
      const point = await importRaw(store, rootImage, machineId, 'root', {
        cut: `cut-${name}-1`,
      });
      await upsert(point);
      return { itemId: item.id, machineId, points: [point] };
    },
    async addPoint(machine, rootImage) {
      const point = await importRaw(store, rootImage, machine.machineId, 'root', {
        cut: `cut-${machine.machineId}-${machine.points.length + 1}`,
      });
      machine.points.push(point);
      await upsert(point);
      return point;
    },
  };
}

/** Polls a vault job until it ends; returns it. */
export async function waitForJob(
  base: string,
  token: string,
  jobId: string,
  timeoutMs = 240_000,
): Promise<Record<string, unknown>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const job = await api(base, token, 'GET', `/api/jobs/${jobId}`);
    if (['succeeded', 'failed', 'cancelled'].includes(String(job['state']))) return job;
    if (Date.now() > deadline) throw new Error(`job ${jobId} still ${String(job['state'])}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** Running QEMU processes whose command line names `dir` (what a test must leave none of). */
export async function qemuUnder(dir: string): Promise<string[]> {
  const { stdout } = await run('pgrep', ['-af', 'qemu-system']).catch(() => ({ stdout: '' }));
  return stdout.split('\n').filter((l) => l.includes(dir));
}

/** A recovery site for a test: a temporary directory, the test image, a store and a seeded vault. */
export interface RecoverySite {
  dir: string;
  image: TestImage;
  store: Store;
  vault: Vault;
  /** The initial admin's token. */
  admin: string;
  seed: SeededVault;
  /**
   * Registers a recovery host with a one-time key and links it to the vault (polling every
   * 300 ms). Its default boot is the test image's kernel (the image has no boot loader) unless
   * `defaultBoot` is false.
   */
  addRecoveryHost(
    name: string,
    options?: { networks?: RecoveryHostOptions['networks']; defaultBoot?: boolean },
  ): Promise<{ host: RecoveryHost; link: RecoveryHostLink }>;
  /**
   * Stops the recovery hosts, the vault and the store; returns the QEMU processes still running
   * under the directory (a test expects none) and removes the directory only when there are none.
   */
  close(): Promise<string[]>;
}

/** Starts a {@link RecoverySite}: store (cheap key derivation), vault (SQLite) and its seed. */
export async function startRecoverySite(
  prefix: string,
  passphrase: string,
  vaultOptions: Partial<VaultOptions> = {},
): Promise<RecoverySite> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  const image = await buildTestImage();
  const store = await Store.init({
    backend: new DirectoryBackend({ path: join(dir, 'store') }),
    passphrase,
    kdfCost: 1024,
  });
  const vault = await startVault({
    dataDir: join(dir, 'vault'),
    port: 0,
    logLevel: 'silent',
    passwordCost: 1024,
    initialAdmin: { username: 'admin', password: 'admin-password' },
    ...vaultOptions,
  });
  const admin = await adminLogin(vault.url);
  const seed = await seedVault(vault.url, admin, store, join(dir, 'store'), passphrase);
  const hosts: Array<{ host: RecoveryHost; link: RecoveryHostLink }> = [];
  return {
    dir,
    image,
    store,
    vault,
    admin,
    seed,
    async addRecoveryHost(name, options = {}) {
      const key = await api<{ key: string }>(vault.url, admin, 'POST', '/api/registration-keys', {
        kind: 'recovery-host',
      });
      const reg = await api<{ token: string }>(vault.url, null, 'POST', '/api/register', {
        key: key.key,
        kind: 'recovery-host',
        name,
      });
      const host = await RecoveryHost.start({
        runDir: join(dir, hosts.length === 0 ? 'run' : `run-${name}`),
        ...(options.networks !== undefined ? { networks: options.networks } : {}),
      });
      const link = new RecoveryHostLink({
        vault: new VaultClient({ url: vault.url, token: reg.token }),
        host,
        openStore: async (s) =>
          Store.open({
            backend: new DirectoryBackend({ path: s.path! }),
            passphrase: s.passphrase,
          }),
        hydrationDir: join(dir, hosts.length === 0 ? 'disks' : `disks-${name}`),
        kernelDirs: [dirname(image.kernel)],
        ...(options.defaultBoot !== false
          ? {
              defaultBoot: {
                kernel: image.kernel,
                append: testImageAppend({ hostname: 'recovered' }),
              },
            }
          : {}),
        intervalMs: 300,
      });
      hosts.push({ host, link });
      link.start();
      await link.sync();
      return { host, link };
    },
    async close() {
      for (const { host, link } of hosts) {
        await link.stop();
        await host.close();
      }
      await vault.close();
      await store.close();
      const left = await qemuUnder(dir);
      if (left.length === 0) await rm(dir, { recursive: true, force: true });
      return left;
    },
  };
}
