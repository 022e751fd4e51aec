import { spawn } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { kvmAvailable } from './kvm.js';

describe('kvmAvailable', () => {
  it('agrees with whether a machine booting its firmware under KVM keeps running', async () => {
    // The reference: a machine as the recovery host starts it, given two seconds. Where
    // /dev/kvm is missing, or QEMU aborts on the first vCPU run, it is gone by then.
    const qemu = spawn(
      'qemu-system-x86_64',
      [
        ...['-accel', 'kvm', '-machine', 'q35', '-cpu', 'host', '-m', '64', '-nodefaults'],
        ...['-display', 'none', '-no-reboot'],
      ],
      { stdio: 'ignore' },
    );
    const exited = new Promise<void>((resolve) => qemu.once('exit', () => resolve()));
    await Promise.race([exited, new Promise((r) => setTimeout(r, 2000))]);
    const runs = qemu.exitCode === null && qemu.signalCode === null;
    qemu.kill('SIGKILL');
    await exited;
    expect(await kvmAvailable()).toBe(runs);
  });
});
