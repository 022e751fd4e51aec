import type { QmpClient } from '@lifeboat/qmp';
import { isLifeboatError } from '@lifeboat/protocol';
import type { DiscoveredDisk } from './disk-discovery.js';

/** The protected machine's hardware as QEMU runs it, recorded on its points. */
export interface MachineHardware {
  /** Virtual CPUs (`query-cpus-fast`). */
  cpus?: number;
  /** Guest memory in MiB, base plus hot-plugged (`query-memory-size-summary`). */
  memoryMiB?: number;
  /** `uefi` when a flash firmware (OVMF) is attached or the firmware file names one, else `bios`. */
  firmware?: 'bios' | 'uefi';
  /** The bus of the first (boot) disk, from its device's QOM type: `nvme` or `virtio`. */
  diskBus?: 'nvme' | 'virtio';
  /**
   * `kernel` when QEMU boots a kernel file directly (`-kernel`): the disks then may hold no
   * boot loader, so the firmware alone does not boot the point. @default absent (firmware boots the disk)
   */
  boot?: 'kernel';
}

/**
 * Point label names of {@link MachineHardware}: the recovery host reads the same names
 * (`@lifeboat/recovery`'s `MACHINE_LABELS`, docs/architecture.md "Recorded hardware") to boot
 * the machine like its source from the store alone.
 */
export const HARDWARE_LABELS = {
  cpus: 'machine.cpus',
  memoryMiB: 'machine.memory-mib',
  firmware: 'machine.firmware',
  diskBus: 'machine.disk-bus',
  boot: 'machine.boot',
} as const;

interface BlockInfo {
  device: string;
  qdev?: string;
  inserted?: { 'node-name': string };
}

/**
 * True for QEMU's refusal of a read-only query: this QEMU has no such thing (qemu-storage-daemon
 * has no CPUs, another machine type no such property). A lost connection is not that.
 */
function absent(err: unknown): boolean {
  return isLifeboatError(err, 'LB_QMP_COMMAND');
}

async function optional<T>(f: () => Promise<T>): Promise<T | undefined> {
  try {
    return await f();
  } catch (err) {
    if (absent(err)) return undefined;
    throw err;
  }
}

/** True when a `query-block` entry is a firmware flash (OVMF code or variables), not a disk. */
export function isFirmwareFlash(b: { device: string; qdev?: string }): boolean {
  return /^pflash\d+$/.test(b.device) || (b.qdev ?? '').startsWith('/machine/system.flash');
}

/**
 * Reads the machine's hardware from the running QEMU over QMP. What this QEMU does not have
 * (qemu-storage-daemon has no CPUs, memory or devices) is left out, not guessed.
 */
export async function readMachineHardware(
  qmp: QmpClient,
  disks: readonly DiscoveredDisk[],
): Promise<MachineHardware> {
  const out: MachineHardware = {};
  const cpus = await optional(() => qmp.execute<unknown[]>('query-cpus-fast'));
  if (Array.isArray(cpus) && cpus.length > 0) out.cpus = cpus.length;
  const mem = await optional(() =>
    qmp.execute<{ 'base-memory': number; 'plugged-memory'?: number }>('query-memory-size-summary'),
  );
  if (mem && mem['base-memory'] > 0)
    out.memoryMiB = Math.round((mem['base-memory'] + (mem['plugged-memory'] ?? 0)) / (1024 * 1024));
  const blocks = (await optional(() => qmp.execute<BlockInfo[]>('query-block'))) ?? [];
  // Only a machine with CPUs has firmware; qemu-storage-daemon answers the QOM query too.
  if (out.cpus !== undefined) {
    const file = await optional(() =>
      qmp.execute<string>('qom-get', { path: '/machine', property: 'firmware' }),
    );
    const flash = blocks.some((b) => isFirmwareFlash(b) && b.inserted !== undefined);
    out.firmware = flash || /ovmf|edk2|uefi/i.test(file ?? '') ? 'uefi' : 'bios';
    const kernel = await optional(() =>
      qmp.execute<string>('qom-get', { path: '/machine', property: 'kernel' }),
    );
    if (typeof kernel === 'string' && kernel !== '') out.boot = 'kernel';
  }
  const first = disks[0];
  const dev = first
    ? blocks.find((b) => b.inserted?.['node-name'] === first.node)?.qdev
    : undefined;
  if (dev) {
    const path = dev.startsWith('/') ? dev : `/machine/peripheral/${dev}`;
    const type = await optional(() => qmp.execute<string>('qom-get', { path, property: 'type' }));
    if (type !== undefined && /^nvme/.test(type)) out.diskBus = 'nvme';
    else if (type !== undefined && /^virtio-blk/.test(type)) out.diskBus = 'virtio';
  }
  return out;
}

/** The point labels of a machine's hardware (only what is known). */
export function hardwareLabels(h: MachineHardware): Record<string, string> {
  const labels: Record<string, string> = {};
  if (h.cpus !== undefined) labels[HARDWARE_LABELS.cpus] = String(h.cpus);
  if (h.memoryMiB !== undefined) labels[HARDWARE_LABELS.memoryMiB] = String(h.memoryMiB);
  if (h.firmware !== undefined) labels[HARDWARE_LABELS.firmware] = h.firmware;
  if (h.diskBus !== undefined) labels[HARDWARE_LABELS.diskBus] = h.diskBus;
  if (h.boot !== undefined) labels[HARDWARE_LABELS.boot] = h.boot;
  return labels;
}
