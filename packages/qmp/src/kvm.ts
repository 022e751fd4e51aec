import { constants } from 'node:fs';
import { access } from 'node:fs/promises';
import { spawnOwned } from './qemu-storage-daemon.js';

let cached: Promise<boolean> | undefined;

/**
 * True when KVM really works here: /dev/kvm is usable AND a small `qemu-system-x86_64 -accel kvm`
 * machine (q35, `-cpu host`, its firmware running) reports KVM enabled over QMP and is still
 * running a second later. /dev/kvm alone is not enough (it exists in many containers without
 * working), nor is a QEMU that only starts: under some nested hypervisors QEMU aborts as soon as
 * a vCPU first runs ("failed to set MSR"). Asked once per process.
 */
export function kvmAvailable(binary = 'qemu-system-x86_64'): Promise<boolean> {
  cached ??= probe(binary);
  return cached;
}

/** `'kvm'` when {@link kvmAvailable}, otherwise `'tcg'` (software emulation). */
export async function qemuAccelerator(): Promise<'kvm' | 'tcg'> {
  return (await kvmAvailable()) ? 'kvm' : 'tcg';
}

async function probe(binary: string): Promise<boolean> {
  try {
    await access('/dev/kvm', constants.R_OK | constants.W_OK);
  } catch {
    return false;
  }
  return new Promise<boolean>((resolve) => {
    const child = spawnOwned(
      binary,
      [
        ...['-accel', 'kvm', '-machine', 'q35', '-cpu', 'host', '-m', '64', '-nodefaults'],
        ...['-display', 'none', '-no-reboot', '-qmp', 'stdio'],
      ],
      { stdio: ['pipe', 'pipe', 'ignore'] },
    );
    let out = '';
    let greeted = false;
    let settled = false;
    const finish = (ok: boolean): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      clearTimeout(later);
      if (child.exitCode === null) child.kill('SIGKILL');
      resolve(ok);
    };
    const timer = setTimeout(() => finish(false), 15_000);
    let later: NodeJS.Timeout | undefined;
    child.once('error', () => finish(false));
    // An exit before the last answer is the abort this probe looks for.
    child.once('exit', () => finish(false));
    child.stdout?.on('data', (d: Buffer) => {
      out += d.toString();
      if (!greeted && out.includes('"QMP"')) {
        greeted = true;
        child.stdin?.write('{"execute":"qmp_capabilities"}\n{"execute":"query-kvm"}\n');
      }
      if (/"enabled":\s*false/.test(out)) finish(false);
      else if (later === undefined && /"enabled":\s*true/.test(out)) {
        // The firmware runs on the vCPU meanwhile; a broken KVM has aborted QEMU by then.
        later = setTimeout(() => child.stdin?.write('{"execute":"query-status"}\n'), 1000);
      }
      if (/"running":\s*true/.test(out)) finish(true);
      else if (/"running":\s*false/.test(out)) finish(false);
    });
  });
}
