import { spawn } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { kvmAvailable } from '@lifeboat/qmp';

const probes = new Map<string, Promise<boolean>>();

/**
 * True when KVM really runs `kernel`: `@lifeboat/qmp`'s kvmAvailable (QEMU starts with KVM)
 * and the kernel prints its banner under `-accel kvm` within 15 s. Nested virtualisation can
 * start QEMU and run the firmware yet hang on the first long-mode code, so only a boot proves
 * it. Asked once per kernel and process.
 */
export function kvmBootsKernel(
  kernel: string,
  qemuBinary = 'qemu-system-x86_64',
): Promise<boolean> {
  let p = probes.get(kernel);
  if (!p) {
    p = probe(kernel, qemuBinary);
    probes.set(kernel, p);
  }
  return p;
}

async function probe(kernel: string, qemuBinary: string): Promise<boolean> {
  if (!(await kvmAvailable(qemuBinary))) return false;
  const dir = await mkdtemp(join(tmpdir(), 'lb-kvm-'));
  const log = join(dir, 'console');
  const child = spawn(
    qemuBinary,
    [
      '-accel',
      'kvm',
      '-machine',
      'q35',
      '-cpu',
      'host',
      '-m',
      '128',
      '-nodefaults',
      '-display',
      'none',
      '-no-reboot',
      '-serial',
      `file:${log}`,
      '-kernel',
      kernel,
      '-append',
      'console=ttyS0 panic=-1',
    ],
    { stdio: 'ignore' },
  );
  let exited = false;
  child.on('exit', () => (exited = true));
  child.on('error', () => (exited = true));
  try {
    const deadline = Date.now() + 15_000;
    while (Date.now() < deadline && !exited) {
      const text = await readFile(log, 'latin1').catch(() => '');
      if (text.includes('Linux version')) return true;
      await new Promise((r) => setTimeout(r, 200));
    }
    return false;
  } finally {
    if (!exited) child.kill('SIGKILL');
    await new Promise((r) => (exited ? r(undefined) : child.once('exit', r)));
    await rm(dir, { recursive: true, force: true });
  }
}
