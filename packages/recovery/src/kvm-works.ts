import { spawn } from 'node:child_process';
import { access, constants } from 'node:fs/promises';

// TEMPORARY until @lifeboat/qmp's kvmAvailable() lands.

/** True when /dev/kvm exists, is usable and QEMU can really start a KVM machine. */
export async function kvmWorks(): Promise<boolean> {
  try {
    await access('/dev/kvm', constants.R_OK | constants.W_OK);
  } catch {
    return false;
  }
  return new Promise((resolve) => {
    const child = spawn(
      'qemu-system-x86_64',
      ['-machine', 'none,accel=kvm', '-display', 'none', '-nodefaults', '-S', '-qmp', 'stdio'],
      { stdio: ['pipe', 'pipe', 'pipe'] },
    );
    let out = '';
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('"QMP"'))
        child.stdin.end('{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n');
    });
    child.on('error', () => resolve(false));
    child.on('close', () => {
      clearTimeout(timer);
      resolve(out.includes('"QMP"'));
    });
  });
}
