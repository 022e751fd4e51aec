import { describe, expect, it } from 'vitest';
import type { PointInfo } from '@lifeboat/store';
import { recordedMachineConfig } from './recorded-config.js';

const point = (labels: Record<string, string>): PointInfo => ({
  id: 'p1',
  machine: 'web',
  disk: 'root',
  time: new Date(0),
  committedAt: new Date(0),
  kind: 'crash',
  size: 65536,
  labels,
});

describe('recordedMachineConfig', () => {
  it('reads CPUs, memory, firmware and disk bus from the labels', () => {
    expect(
      recordedMachineConfig(
        point({
          'machine.cpus': '2',
          'machine.memory-mib': '2048',
          'machine.firmware': 'uefi',
          'machine.disk-bus': 'virtio',
        }),
      ),
    ).toEqual({ cpus: 2, memoryMiB: 2048, firmware: 'uefi', diskBus: 'virtio' });
    expect(recordedMachineConfig(point({}))).toEqual({});
  });

  it('refuses a bad value, naming the point and label', () => {
    for (const labels of [
      { 'machine.cpus': 'two' },
      { 'machine.memory-mib': '-1' },
      { 'machine.firmware': 'efi' },
    ]) {
      expect(() => recordedMachineConfig(point(labels))).toThrow(
        expect.objectContaining({
          code: 'LB_RECOVERY_BAD_MACHINE',
          details: expect.objectContaining({ point: 'p1' }),
        }),
      );
    }
  });
});
