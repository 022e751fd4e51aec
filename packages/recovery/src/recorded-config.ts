import { LifeboatError } from '@lifeboat/protocol';
import type { PointInfo } from '@lifeboat/store';

/** The protected machine's hardware, as recorded in its points' labels. */
export interface RecordedMachineConfig {
  cpus?: number;
  memoryMiB?: number;
  firmware?: 'bios' | 'uefi';
  diskBus?: 'nvme' | 'virtio';
  /** The source boots a kernel file directly: its firmware alone may not boot the disk. */
  kernelBoot?: boolean;
}

/** Label names of {@link RecordedMachineConfig} on a point (set by whoever writes the point). */
export const MACHINE_LABELS = {
  cpus: 'machine.cpus',
  memoryMiB: 'machine.memory-mib',
  firmware: 'machine.firmware',
  diskBus: 'machine.disk-bus',
  boot: 'machine.boot',
} as const;

/**
 * Reads the machine's recorded configuration from a point's labels, so the recovery site can
 * boot it like the source with the store alone (no vault). Absent labels stay absent; a label
 * with a bad value is an error naming the point, never silently ignored.
 */
export function recordedMachineConfig(point: PointInfo): RecordedMachineConfig {
  const out: RecordedMachineConfig = {};
  const bad = (label: string, value: string): LifeboatError =>
    new LifeboatError(
      'LB_RECOVERY_BAD_MACHINE',
      `Point ${point.id} has label ${label}=${value}, which is not a valid value. Relabel the point or give the value on the command line.`,
      { details: { point: point.id, label, value } },
    );
  for (const key of ['cpus', 'memoryMiB'] as const) {
    const v = point.labels[MACHINE_LABELS[key]];
    if (v === undefined) continue;
    const n = Number(v);
    if (!Number.isSafeInteger(n) || n <= 0) throw bad(MACHINE_LABELS[key], v);
    out[key] = n;
  }
  const fw = point.labels[MACHINE_LABELS.firmware];
  if (fw !== undefined) {
    if (fw !== 'bios' && fw !== 'uefi') throw bad(MACHINE_LABELS.firmware, fw);
    out.firmware = fw;
  }
  const bus = point.labels[MACHINE_LABELS.diskBus];
  if (bus !== undefined) {
    if (bus !== 'nvme' && bus !== 'virtio') throw bad(MACHINE_LABELS.diskBus, bus);
    out.diskBus = bus;
  }
  if (point.labels[MACHINE_LABELS.boot] === 'kernel') out.kernelBoot = true;
  return out;
}
