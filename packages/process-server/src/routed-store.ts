import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { LifeboatError } from '@lifeboat/protocol';
import type {
  PointFilter,
  PointInfo,
  StoreApi,
  WriteSession,
  WriteSessionOptions,
} from '@lifeboat/store';
import type { Logger } from 'pino';
import { computePointDigests } from './point-digests.js';
import type { PointDigests } from './point-digests.js';
import type { ProcessServerStore } from './process-server-options.js';
import { StoreWorkerPool } from './store-worker-pool.js';
import type { MachineStore, StoreWorkerPoolHealth } from './store-worker-pool.js';
import type { AssignedStore } from './vault-link.js';
import { openWorkerStore } from './worker-store-opener.js';
import type { WorkerStoreSpec } from './worker-store-opener.js';

/** Options of {@link RoutedStore}. */
export interface RoutedStoreOptions {
  /** Where it keeps which machine goes to which store, and the stores' specs (0600). */
  stateDir: string;
  /** Worker threads per store (0: store work on the ingest thread). @default 2 */
  workers?: number;
  logger: Logger;
}

interface Opened {
  spec: WorkerStoreSpec;
  location: string;
  store: StoreApi | ((machine: string) => MachineStore);
  close: () => Promise<void>;
  pool?: StoreWorkerPool;
}

interface Persisted {
  stores: Record<string, WorkerStoreSpec>;
  machines: Record<string, string>;
}

function specOf(s: AssignedStore): WorkerStoreSpec {
  return s.kind === 'directory'
    ? { kind: 'directory', path: s.path ?? '', passphrase: s.passphrase }
    : {
        kind: 'azure',
        connectionString: s.connectionString ?? '',
        ...(s.container !== null ? { container: s.container } : {}),
        passphrase: s.passphrase,
      };
}

function locationOf(spec: WorkerStoreSpec): string {
  return spec.kind === 'directory' ? `dir:${spec.path}` : `azure:${spec.container ?? ''}`;
}

/**
 * The target stores of a process server managed by the vault: each machine's points go to the
 * store its protected item names (`targetStoreId` in the assignments). The mapping and the
 * stores' specs (with their passphrases, as the assignments carry them) are kept in the state
 * directory, mode 0600, so a restart while the vault is unreachable still commits the journal
 * it replays. A machine whose store is not known yet fails its store calls with
 * `LB_PS_STORE_UNKNOWN`; the replicator retries them as it does a store outage, so nothing
 * acknowledged is dropped while the assignments are on their way.
 */
export class RoutedStore implements ProcessServerStore {
  private readonly opened = new Map<string, Opened>();
  private state: Persisted = { stores: {}, machines: {} };
  private readonly file: string;

  constructor(private readonly options: RoutedStoreOptions) {
    this.file = join(options.stateDir, 'stores.json');
  }

  /** Loads the stores and machines known from earlier runs and opens those stores. */
  async load(): Promise<void> {
    try {
      this.state = JSON.parse(await readFile(this.file, 'utf8')) as Persisted;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
        throw new LifeboatError(
          'LB_PS_STATE_UNREADABLE',
          `Cannot read ${this.file}: ${(err as Error).message}. It maps machines to their target stores; restore it from a backup, or move it away while the vault is reachable (the vault's assignments rebuild it).`,
          { cause: err, details: { path: this.file } },
        );
      }
    }
    for (const [id, spec] of Object.entries(this.state.stores)) await this.open(id, spec);
  }

  /** Follows the assignments: opens new stores, records which machine goes where. */
  async update(
    stores: readonly AssignedStore[],
    items: ReadonlyArray<{ storeMachine: string; targetStoreId: string; desired: string }>,
  ): Promise<void> {
    let changed = false;
    for (const s of stores) {
      const spec = specOf(s);
      const before = this.state.stores[s.id];
      if (before === undefined || JSON.stringify(before) !== JSON.stringify(spec)) {
        this.state.stores[s.id] = spec;
        changed = true;
      }
      const open = this.opened.get(s.id);
      if (open !== undefined && JSON.stringify(open.spec) !== JSON.stringify(spec)) {
        // A changed passphrase or connection string: new sessions use the new store; the old
        // instance finishes what it has (its master key is the same).
        this.opened.delete(s.id);
        const old = open;
        setTimeout(() => void old.close().catch(() => undefined), 60_000).unref();
      }
      if (!this.opened.has(s.id)) await this.open(s.id, spec);
    }
    for (const i of items) {
      if (i.desired !== 'replicate') continue;
      if (this.state.machines[i.storeMachine] !== i.targetStoreId) {
        this.state.machines[i.storeMachine] = i.targetStoreId;
        changed = true;
      }
    }
    if (changed) await this.save();
  }

  /** The vault's id of the store a machine's points go to, when known. */
  storeIdOf(machine: string): string | undefined {
    return this.state.machines[machine];
  }

  get location(): string {
    const parts = [...this.opened].map(([id, o]) => `${id}=${o.location}`);
    return parts.length === 0 ? 'vault-assigned (none yet)' : parts.join(', ');
  }

  async beginWrite(options: WriteSessionOptions): Promise<WriteSession> {
    return this.forMachine(options.machine).beginWrite(options);
  }

  async listPoints(filter?: PointFilter): Promise<PointInfo[]> {
    if (filter?.machine === undefined) {
      throw new LifeboatError(
        'LB_PS_STORE_UNKNOWN',
        'A routed store lists points of one machine at a time.',
      );
    }
    return this.forMachine(filter.machine).listPoints(filter);
  }

  async findCutPoint(machine: string, disk: string, cut: string): Promise<PointInfo | undefined> {
    return this.forMachine(machine).findCutPoint(machine, disk, cut);
  }

  /** The resync digests of a machine's point, from the machine's store (on its worker thread). */
  async pointDigests(machine: string, point: string, key: Uint8Array): Promise<PointDigests> {
    const open = this.openFor(machine);
    return typeof open.store === 'function'
      ? open.store(machine).pointDigests(point, key)
      : computePointDigests(open.store, point, key);
  }

  /** The worker threads of all its stores together (null when it runs none). */
  workerHealth(): StoreWorkerPoolHealth | null {
    const all = [...this.opened.values()].flatMap((o) => (o.pool ? [o.pool.health()] : []));
    if (all.length === 0) return null;
    const last = all
      .filter((h) => h.lastErrorAt !== null)
      .sort((a, b) => (a.lastErrorAt ?? '').localeCompare(b.lastErrorAt ?? ''))
      .pop();
    return {
      count: all.reduce((n, h) => n + h.count, 0),
      alive: all.reduce((n, h) => n + h.alive, 0),
      restarts: all.reduce((n, h) => n + h.restarts, 0),
      lastError: last?.lastError ?? null,
      lastErrorAt: last?.lastErrorAt ?? null,
    };
  }

  /** Closes every store it opened. */
  async close(): Promise<void> {
    for (const o of this.opened.values()) await o.close().catch(() => undefined);
    this.opened.clear();
  }

  private forMachine(machine: string): MachineStore | StoreApi {
    const open = this.openFor(machine);
    return typeof open.store === 'function' ? open.store(machine) : open.store;
  }

  private openFor(machine: string): Opened {
    const id = this.state.machines[machine];
    const open = id === undefined ? undefined : this.opened.get(id);
    if (open === undefined) {
      throw new LifeboatError(
        'LB_PS_STORE_UNKNOWN',
        id === undefined
          ? `No target store is known for machine ${machine} yet: its points wait in the journal until the vault's assignments name its store.`
          : `Target store ${id} of machine ${machine} is not open yet: its points wait in the journal.`,
        { details: { machine, targetStoreId: id } },
      );
    }
    return open;
  }

  private async open(id: string, spec: WorkerStoreSpec): Promise<void> {
    const workers = this.options.workers ?? 2;
    try {
      if (workers > 0) {
        const pool = new StoreWorkerPool({ spec, count: workers });
        this.opened.set(id, {
          spec,
          location: locationOf(spec),
          store: (machine) => pool.forMachine(machine),
          close: () => pool.close(),
          pool,
        });
      } else {
        const store: StoreApi = await openWorkerStore(spec);
        this.opened.set(id, {
          spec,
          location: store.location,
          store,
          close: () => store.close(),
        });
      }
    } catch (err) {
      // Retried at the next assignments; meanwhile its machines wait in the journal.
      this.options.logger.error(
        { err: (err as Error).message, targetStoreId: id },
        'cannot open a target store',
      );
    }
  }

  private async save(): Promise<void> {
    await mkdir(this.options.stateDir, { recursive: true, mode: 0o700 });
    const tmp = `${this.file}.${process.pid}.tmp`;
    await writeFile(tmp, `${JSON.stringify(this.state, null, 1)}\n`, { mode: 0o600 });
    await rename(tmp, this.file);
  }
}
