import { constants } from 'node:fs';
import { access } from 'node:fs/promises';
import { spawnOwned } from './qemu-storage-daemon.js';

let cached: Promise<boolean> | undefined;

/**
 * True when KVM really works here: /dev/kvm is usable AND a tiny `qemu-system-x86_64 -accel kvm`
 * starts and reports KVM enabled over QMP. /dev/kvm alone is not enough (it exists in many
 * containers without working). Asked once per process.
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
        '-accel',
        'kvm',
        '-machine',
        'none',
        '-nodefaults',
        '-display',
        'none',
        '-S',
        '-qmp',
        'stdio',
      ],
      { stdio: ['pipe', 'pipe', 'ignore'] },
    );
    let out = '';
    let answered = false;
    const finish = (ok: boolean): void => {
      clearTimeout(timer);
      if (child.exitCode === null) child.kill('SIGKILL');
      resolve(ok);
    };
    const timer = setTimeout(() => finish(false), 15_000);
    child.once('error', () => finish(false));
    child.once('exit', () => finish(answered && /"enabled":\s*true/.test(out)));
    child.stdout?.on('data', (d: Buffer) => {
      out += d.toString();
      if (!answered && out.includes('"QMP"')) {
        answered = true;
        child.stdin?.write('{"execute":"qmp_capabilities"}\n{"execute":"query-kvm"}\n');
      }
      if (/"enabled":\s*(true|false)/.test(out)) {
        child.stdin?.end('{"execute":"quit"}\n');
        finish(/"enabled":\s*true/.test(out));
      }
    });
  });
}
