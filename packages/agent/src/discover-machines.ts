import { QmpClient } from '@lifeboat/qmp';
import { discoverDisks } from './disk-discovery.js';

/** A machine found behind a KVM host's QMP endpoint, as the vault's inventory takes it. */
export interface InventoryMachine {
  /** The endpoint's name (the machine's name on its host). */
  externalId: string;
  name: string;
  /** Its QMP socket. */
  endpoint: string;
  disks: Array<{ name: string; sizeBytes: number }>;
}

/** Options of {@link discoverMachines}. */
export interface DiscoverMachinesOptions {
  /** Give up on one endpoint after this long (a monitor busy with another client). @default 10000 */
  timeoutMs?: number;
  /** Machines already known (an agent running on the endpoint holds its only monitor). */
  known?: ReadonlyMap<string, InventoryMachine>;
  /** Called for an endpoint that cannot be read; it is left out of the inventory. */
  onError?: (endpoint: { name: string; qmp: string }, err: unknown) => void;
}

/** Reads the machines and disks behind QMP endpoints (a KVM host's inventory). */
export async function discoverMachines(
  endpoints: ReadonlyArray<{ name: string; qmp: string }>,
  options: DiscoverMachinesOptions = {},
): Promise<InventoryMachine[]> {
  const machines: InventoryMachine[] = [];
  const timeoutMs = options.timeoutMs ?? 10_000;
  for (const e of endpoints) {
    const known = options.known?.get(e.qmp);
    if (known !== undefined) {
      machines.push({ ...known, externalId: e.name, name: e.name });
      continue;
    }
    try {
      const qmp = await QmpClient.connect(
        { path: e.qmp },
        { connectTimeoutMs: timeoutMs, commandTimeoutMs: timeoutMs },
      );
      try {
        const disks = await discoverDisks(qmp);
        machines.push({
          externalId: e.name,
          name: e.name,
          endpoint: e.qmp,
          disks: disks.map((d) => ({ name: d.name, sizeBytes: d.size })),
        });
      } finally {
        await qmp.close();
      }
    } catch (err) {
      if (options.onError === undefined) throw err;
      options.onError(e, err);
    }
  }
  return machines;
}
