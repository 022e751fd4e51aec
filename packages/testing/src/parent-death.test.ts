import { spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** The pid's parent, from /proc (undefined once it is gone). */
async function parentOf(pid: number): Promise<number | undefined> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined);
  // Fields after the command name (which may hold spaces) start at the last ')'.
  return stat === undefined
    ? undefined
    : Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
}

describe('QEMU started by the fixtures dies with the test process', () => {
  it('kills qemu-storage-daemon and a QEMU VM when their parent is killed with SIGKILL (no exit handler runs)', async () => {
    // A parent like a vitest worker: it starts both through @lifeboat/testing, reports their
    // pids, and is then killed as a test timeout would kill it.
    const here = import.meta.dirname;
    const script = `import { startStorageDaemon, ManagedProcess, makeTempDir } from ${JSON.stringify(join(here, 'index.ts'))};
import { runCommand } from ${JSON.stringify(join(here, 'run-command.ts'))};
const dir = await makeTempDir('lb-pdeath-');
const img = dir.path + '/d.qcow2';
await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', img, '1M']);
const qsd = await startStorageDaemon({ disks: [{ path: img }] });
// startVm's process: a QEMU machine that runs until it is stopped.
const vm = new ManagedProcess('qemu-system-x86_64', 'qemu-system-x86_64',
  ['-machine', 'none', '-nodefaults', '-display', 'none', '-monitor', 'none', '-serial', 'none', '-S']);
await new Promise((r) => setTimeout(r, 500));
vm.assertRunning();
console.log(JSON.stringify({ qsd: qsd.daemon.pid, vm: vm.child.pid }));
setInterval(() => {}, 1000);`;
    const parent = spawn(
      process.execPath,
      ['--conditions', 'source', '--import', 'tsx', '--input-type=module', '-e', script],
      {
        stdio: ['ignore', 'pipe', 'inherit'],
      },
    );
    let pids: { qsd: number; vm: number } | undefined;
    try {
      const line = await new Promise<string>((resolve, reject) => {
        let out = '';
        parent.stdout?.on('data', (c: Buffer) => {
          out += c.toString();
          if (out.includes('\n')) resolve(out.split('\n')[0] ?? '');
        });
        parent.once('exit', (code) =>
          reject(new Error(`parent exited (${code}) before reporting: ${out}`)),
        );
      });
      pids = JSON.parse(line) as { qsd: number; vm: number };
      // Both run, as children of the parent (the pid is QEMU's own, not a wrapper's).
      expect(alive(pids.qsd) && alive(pids.vm)).toBe(true);
      expect(await parentOf(pids.qsd)).toBe(parent.pid);
      expect(await parentOf(pids.vm)).toBe(parent.pid);
      parent.kill('SIGKILL');
      const deadline = Date.now() + 30_000;
      while (alive(pids.qsd) || alive(pids.vm)) {
        // A zombie waiting for its new parent to reap it is dead too.
        const zombies = await Promise.all(
          [pids.qsd, pids.vm].map(async (p) =>
            (await readFile(`/proc/${p}/stat`, 'utf8').catch(() => ') Z')).includes(') Z'),
          ),
        );
        if (zombies.every(Boolean)) break;
        if (Date.now() > deadline) throw new Error('QEMU outlived its parent');
        await new Promise((r) => setTimeout(r, 100));
      }
    } finally {
      parent.kill('SIGKILL');
      for (const p of [pids?.qsd, pids?.vm])
        if (p !== undefined && alive(p)) process.kill(p, 'SIGKILL');
    }
  });
});
