import { createHash } from 'node:crypto';
import { constants, readFileSync } from 'node:fs';
import { access, readFile, rename, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawnOwned } from './qemu-storage-daemon.js';

const probes = new Map<string, Promise<boolean>>();

/**
 * True when KVM really runs a Linux guest here (stronger than `kvmAvailable`, which only checks that QEMU starts with KVM enabled): `/dev/kvm` opens read-write and `kernel`
 * boots under `-accel kvm` to its "no root file system" panic. `/dev/kvm` can exist, let
 * QEMU start and still fail on the first real kernel code (nested virtualisation reports a
 * "KVM internal error"), so only a kernel boot proves it. The answer is kept per boot of the
 * host (in the temporary directory, keyed by the boot id and kernel) and per process.
 */
export function kvmBootsKernel(
  kernel: string,
  qemuBinary = 'qemu-system-x86_64',
): Promise<boolean> {
  const id = `${qemuBinary}\n${kernel}`;
  let probe = probes.get(id);
  if (!probe) {
    probe = cachedProbe(kernel, qemuBinary);
    probes.set(id, probe);
  }
  return probe;
}

async function cachedProbe(kernel: string, qemuBinary: string): Promise<boolean> {
  try {
    await access('/dev/kvm', constants.R_OK | constants.W_OK);
  } catch {
    return false;
  }
  let bootId = 'unknown';
  try {
    bootId = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    // No boot id: the cache file is then shared only until the name changes; harmless.
  }
  const key = createHash('sha256')
    .update(`${bootId}\n${qemuBinary}\n${kernel}`)
    .digest('hex')
    .slice(0, 16);
  const file = join(tmpdir(), `lifeboat-kvm-probe-${key}.json`);
  try {
    return (JSON.parse(await readFile(file, 'utf8')) as { kvm: boolean }).kvm;
  } catch {
    // Not probed yet on this boot.
  }
  const kvm = await probeKvm(kernel, qemuBinary);
  const tmp = `${file}.${process.pid}`;
  await writeFile(tmp, JSON.stringify({ kvm, kernel, at: new Date().toISOString() }));
  await rename(tmp, file);
  return kvm;
}

function probeKvm(kernel: string, qemuBinary: string): Promise<boolean> {
  return new Promise((resolve) => {
    const child = spawnOwned(
      qemuBinary,
      [
        ...['-accel', 'kvm', '-M', 'q35', '-cpu', 'host', '-m', '128', '-nodefaults'],
        ...['-display', 'none', '-no-reboot', '-serial', 'stdio', '-kernel', kernel],
        ...['-append', 'console=ttyS0 panic=-1 loglevel=4'],
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let out = '';
    let settled = false;
    const done = (ok: boolean): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      child.kill('SIGKILL');
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), 15_000);
    const check = (b: Buffer): void => {
      out += b.toString();
      if (/Kernel panic|VFS: /.test(out)) done(true);
      else if (/KVM internal error|emulation failure|Could not access KVM/i.test(out)) done(false);
    };
    child.stdout?.on('data', check);
    child.stderr?.on('data', check);
    child.on('error', () => done(false));
    child.on('exit', () => done(/Kernel panic|VFS: /.test(out)));
  });
}
