import { join } from 'node:path';
import { QmpClient } from '@lifeboat/qmp';
import { ManagedProcess, makeTempDir, runCommand } from '@lifeboat/testing';
import type { TempDir } from '@lifeboat/testing';
import { afterEach, describe, expect, it } from 'vitest';
import { discoverDisks } from './disk-discovery.js';
import { hardwareLabels, readMachineHardware } from './machine-hardware.js';

describe('readMachineHardware (QEMU stopped before its first instruction, -S)', () => {
  let dir: TempDir | undefined;
  let qemu: ManagedProcess | undefined;
  let qmp: QmpClient | undefined;
  afterEach(async () => {
    await qmp?.close();
    await qemu?.stop({ kill: true });
    await dir?.remove();
  });

  it('reads CPUs, memory, UEFI flash firmware and a virtio boot disk; the flash is not a disk', async () => {
    dir = await makeTempDir('lb-hw-');
    const disk = join(dir.path, 'd.qcow2');
    const flash = join(dir.path, 'flash.img');
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', disk, '1M']);
    await runCommand('truncate', ['-s', '2M', flash]);
    const sock = join(dir.path, 'qmp.sock');
    qemu = new ManagedProcess('qemu-system-x86_64', 'qemu-system-x86_64', [
      ...['-machine', 'q35,accel=tcg', '-S', '-nodefaults', '-display', 'none'],
      ...['-smp', '3', '-m', '384', '-qmp', `unix:${sock},server=on,wait=off`],
      // A flash firmware image as OVMF is attached (its content does not matter under -S).
      ...['-drive', `if=pflash,format=raw,readonly=on,file=${flash}`],
      ...['-blockdev', `driver=file,filename=${disk},node-name=d0-file`],
      ...['-blockdev', 'driver=qcow2,file=d0-file,node-name=d0'],
      ...['-device', 'virtio-blk-pci,drive=d0,id=d0-dev'],
    ]);
    await qemu.waitForPath(sock);
    qmp = await QmpClient.connect({ path: sock });
    const disks = await discoverDisks(qmp);
    expect(disks.map((d) => d.name)).toEqual(['d0']);
    const hw = await readMachineHardware(qmp, disks);
    expect(hw).toEqual({ cpus: 3, memoryMiB: 384, firmware: 'uefi', diskBus: 'virtio' });
    expect(hardwareLabels(hw)).toEqual({
      'machine.cpus': '3',
      'machine.memory-mib': '384',
      'machine.firmware': 'uefi',
      'machine.disk-bus': 'virtio',
    });
  });
});
