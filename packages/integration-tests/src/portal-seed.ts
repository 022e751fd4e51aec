/**
 * Seeds a vault through its HTTP API with what the portal shows: a process server and a
 * recovery host (registered with keys, heartbeating), a KVM host's inventory, a policy, a
 * target store, protected machines in several states, recovery points and running jobs. The
 * process server's part (heartbeats, catalogue upserts) is played here with its own token, as
 * the real one would call the same routes.
 */

import { DirectoryBackend, Store } from '@lifeboat/store';

/** What {@link seedPortal} created, for the checks. */
export interface PortalSeed {
  adminToken: string;
  processServerToken: string;
  /** The recovery host's component token (the tests play its part of a test failover). */
  recoveryHostToken: string;
  /** Protected item ids by intended state. */
  items: Record<'protected' | 'resync-needed' | 'initial-replication' | 'enabling', string[]>;
  /** Machine name by protected item id. */
  names: Record<string, string>;
  /** The item with many points (crash and app) and the counts of each kind. */
  pointsItem: { id: string; name: string; crash: number; app: number };
  /** The item whose newest point is hours old (it raises an RPO alert). */
  staleItem: string;
  /** Names of discovered machines that are not protected. */
  spares: string[];
  /** What the seed's recovery host reports in its heartbeats (a test may add `networks`). */
  recoveryHostHealth: Record<string, unknown>;
  /** Stops the heartbeats the seed keeps sending for its process server and recovery host. */
  stop(): void;
}

/** Calls the vault's API and fails with its error body on a status other than `expect`. */
export async function call<T = Record<string, unknown>>(
  base: string,
  token: string | null,
  method: string,
  path: string,
  body?: unknown,
): Promise<T> {
  const headers: Record<string, string> = {};
  if (token !== null) headers['authorization'] = `Bearer ${token}`;
  if (body !== undefined) headers['content-type'] = 'application/json';
  const res = await fetch(base + path, {
    method,
    headers,
    ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${text}`);
  return (text === '' ? {} : JSON.parse(text)) as T;
}

/**
 * Seeds `count` machines (at least 6): 1 enabling, 1 in initial replication, 2 needing a
 * resync, the rest protected. The first protected item gets 24 points over the last two hours
 * (every fourth app-consistent); the second's only point is two hours old.
 */
export async function seedPortal(
  base: string,
  admin: { username: string; password: string },
  storePath: string,
  count: number,
): Promise<PortalSeed> {
  if (count < 6) throw new Error('seedPortal needs at least 6 machines');
  const login = await call<{ token: string }>(base, null, 'POST', '/api/auth/login', admin);
  const adminToken = login.token;
  const a = <T = Record<string, unknown>>(method: string, path: string, body?: unknown) =>
    call<T>(base, adminToken, method, path, body);

  const register = async (kind: 'process-server' | 'recovery-host', name: string) => {
    const key = await a<{ key: string }>('POST', '/api/registration-keys', { kind });
    const reg = await call<{ token: string; component: { id: string } }>(
      base,
      null,
      'POST',
      '/api/register',
      { key: key.key, kind, name },
    );
    return { token: reg.token, id: reg.component.id };
  };
  const ps = await register('process-server', 'ps-east-1');
  const rh = await register('recovery-host', 'rh-west-1');
  const p = <T = Record<string, unknown>>(method: string, path: string, body?: unknown) =>
    call<T>(base, ps.token, method, path, body);
  const health = {
    journalUsedBytes: 2 * 2 ** 30,
    journalCapacityBytes: 64 * 2 ** 30,
    storeReachable: true,
  };
  await p('POST', '/api/components/self/heartbeat', { health });
  await call(base, rh.token, 'POST', '/api/components/self/heartbeat', { health: {} });

  const east = await a<{ id: string }>('POST', '/api/sites', { name: 'east', kind: 'source' });
  await a('POST', '/api/sites', { name: 'west', kind: 'recovery' });
  const host = await a<{ id: string }>('POST', '/api/source-hosts', {
    name: 'kvm-east-1',
    kind: 'kvm',
    siteId: east.id,
    processServerId: ps.id,
    endpoints: [],
  });
  const machines = Array.from({ length: count }, (_, i) => ({
    externalId: `vm-${i}`,
    name: `app-${String(i).padStart(5, '0')}`,
    cpus: 2,
    memoryBytes: 4 * 2 ** 30,
    os: 'Debian 12',
    disks:
      i % 3 === 0
        ? [
            { name: 'vda', sizeBytes: 20 * 2 ** 30 },
            { name: 'vdb', sizeBytes: 100 * 2 ** 30 },
          ]
        : [{ name: 'vda', sizeBytes: 20 * 2 ** 30 }],
  }));
  // Two more machines are discovered but not protected (for the enable-replication wizard).
  const spares = ['spare-0', 'spare-1'].map((name) => ({
    externalId: name,
    name,
    cpus: 1,
    memoryBytes: 2 ** 30,
    os: 'Alpine 3.20',
    disks: [{ name: 'vda', sizeBytes: 8 * 2 ** 30 }],
  }));
  await a('PUT', `/api/source-hosts/${host.id}/inventory`, {
    machines: [...machines, ...spares],
  });
  // A real store: the vault's scheduled retention and store-stats jobs open it. The points
  // the portal lists are catalogue entries only; the store itself holds three points of one
  // 1 MiB disk with the same data (what the dashboard's store figures measure).
  const passphrase = 'portal-test-passphrase';
  const real = await Store.init({
    backend: new DirectoryBackend({ path: storePath }),
    passphrase,
    kdfCost: 1024,
  });
  try {
    const data = Buffer.alloc(1 << 20);
    for (let i = 0; i < data.length; i += 512) data[i] = (i / 512) % 251;
    for (let k = 0; k < 3; k++) {
      const w = await real.beginWrite({ machine: 'seed-vm', disk: 'vda', size: 1 << 20 });
      await w.write(0, data);
      await w.commit();
    }
  } finally {
    await real.close();
  }
  const store = await a<{ id: string }>('POST', '/api/target-stores', {
    name: 'east-store',
    kind: 'directory',
    path: storePath,
    passphrase,
  });
  const policy = await a<{ id: string }>('POST', '/api/policies', {
    name: 'gold',
    rpoThresholdSeconds: 300,
    crashConsistentIntervalSeconds: 30,
    appConsistentIntervalSeconds: 600,
    retention: { rules: [{ for: '7d' }] },
  });

  const listed = await a<{ items: Array<{ id: string; name: string; externalId: string }> }>(
    'GET',
    `/api/machines?limit=1000&sourceHostId=${host.id}`,
  );
  const byName = new Map(listed.items.map((m) => [m.name, m.id]));
  const items: PortalSeed['items'] = {
    protected: [],
    'resync-needed': [],
    'initial-replication': [],
    enabling: [],
  };
  const names: Record<string, string> = {};
  const itemMachine = new Map<string, { machineId: string; disks: string[] }>();
  for (const [i, m] of machines.entries()) {
    const machineId = byName.get(m.name);
    if (machineId === undefined) throw new Error(`machine ${m.name} not listed`);
    const item = await a<{ id: string }>('POST', '/api/protected-items', {
      machineId,
      policyId: policy.id,
      processServerId: ps.id,
      targetStoreId: store.id,
    });
    names[item.id] = m.name;
    itemMachine.set(item.id, { machineId, disks: m.disks.map((d) => d.name) });
    const state =
      i === count - 1
        ? 'enabling'
        : i === count - 2
          ? 'initial-replication'
          : i === count - 3 || i === count - 4
            ? 'resync-needed'
            : 'protected';
    items[state].push(item.id);
  }

  // The process server takes every item but the enabling one, and commits points.
  const taken = [...items.protected, ...items['resync-needed'], ...items['initial-replication']];
  await p('POST', '/api/components/self/heartbeat', {
    health,
    items: taken.map((id) => ({ id, state: 'initial-replication', appliedGeneration: 1 })),
  });
  const now = Date.now();
  const points: Array<Record<string, unknown>> = [];
  const pointsItem = items.protected[0] ?? '';
  const staleItem = items.protected[1] ?? '';
  let crash = 0;
  let app = 0;
  for (const id of [...items.protected, ...items['resync-needed']]) {
    const { machineId, disks } = itemMachine.get(id) ?? { machineId: '', disks: [] };
    const times =
      id === pointsItem
        ? Array.from({ length: 24 }, (_, k) => now - (23 - k) * 5 * 60_000)
        : id === staleItem
          ? [now - 2 * 3600_000]
          : [now - 20_000];
    for (const [k, t] of times.entries()) {
      const kind = id === pointsItem && k % 4 === 3 ? 'app' : 'crash';
      for (const disk of disks) {
        if (id === pointsItem) {
          if (kind === 'app') app++;
          else crash++;
        }
        points.push({
          id: `pt-${id}-${k}-${disk}`,
          machine: machineId,
          disk,
          time: new Date(t).toISOString(),
          committedAt: new Date(t + 500).toISOString(),
          kind,
          size: 4 * 2 ** 20 * (k + 1),
          cut: `cut-${k}`,
        });
      }
    }
  }
  await p('PUT', '/api/recovery-points', { targetStoreId: store.id, points });
  // The enable jobs of items with points end once their items are protected; wait for that
  // before marking two of them for resync, or the order would decide which jobs still run.
  const done = items.protected.length + items['resync-needed'].length;
  const deadline = Date.now() + 60_000;
  while (
    (await a<{ total: number }>('GET', '/api/jobs?kind=enable-replication&state=succeeded&limit=1'))
      .total < done
  ) {
    if (Date.now() > deadline) throw new Error('enable jobs did not finish');
    await new Promise((r) => setTimeout(r, 100));
  }
  await p('POST', '/api/components/self/heartbeat', {
    health,
    items: [
      ...items['resync-needed'].map((id) => ({
        id,
        state: 'resync-needed',
        reason: 'bitmap lost after an unclean stop',
      })),
      ...items.protected.map((id) => ({ id, throughputBps: 3 * 2 ** 20, backlogBytes: 2 ** 20 })),
    ],
  });
  // Like the real components, keep heartbeating so neither turns unhealthy during a long test.
  const recoveryHostHealth: Record<string, unknown> = {};
  const timer = setInterval(() => {
    void p('POST', '/api/components/self/heartbeat', { health }).catch(() => undefined);
    void call(base, rh.token, 'POST', '/api/components/self/heartbeat', {
      health: recoveryHostHealth,
    }).catch(() => undefined);
  }, 10_000);
  return {
    stop: () => clearInterval(timer),
    recoveryHostHealth,
    spares: spares.map((m) => m.name),
    adminToken,
    processServerToken: ps.token,
    recoveryHostToken: rh.token,
    items,
    names,
    pointsItem: { id: pointsItem, name: names[pointsItem] ?? '', crash, app },
    staleItem,
  };
}

/** An operation a recovery host finds in its assignments (a test failover, a cleanup, …). */
export interface RecoveryOperation {
  jobId: string;
  kind: string;
  state: string;
  runId: string;
  spec: Record<string, unknown>;
}

/**
 * Plays a recovery host over its component routes, as the real one calls them: reads its
 * operations, reports on their jobs, uploads their artifacts.
 */
export function recoveryHostPlayer(base: string, token: string) {
  return {
    operations: async (): Promise<RecoveryOperation[]> =>
      (
        await call<{ operations: RecoveryOperation[] }>(
          base,
          token,
          'GET',
          '/api/components/self/assignments',
        )
      ).operations,
    /** Waits for the queued operation of a run (of a kind). */
    async operation(runId: string, kind: string): Promise<RecoveryOperation> {
      const deadline = Date.now() + 20_000;
      for (;;) {
        const op = (await this.operations()).find((o) => o.runId === runId && o.kind === kind);
        if (op !== undefined) return op;
        if (Date.now() > deadline) throw new Error(`no ${kind} operation for run ${runId}`);
        await new Promise((r) => setTimeout(r, 200));
      }
    },
    report: (jobId: string, body: Record<string, unknown>) =>
      call(base, token, 'PUT', `/api/components/self/jobs/${jobId}`, { steps: [], ...body }),
    artifact: (jobId: string, name: string, contentType: string, data: Buffer) =>
      call(base, token, 'PUT', `/api/components/self/jobs/${jobId}/artifacts/${name}`, {
        contentType,
        data: data.toString('base64'),
      }),
  };
}
