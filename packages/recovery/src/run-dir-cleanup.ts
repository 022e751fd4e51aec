import { existsSync } from 'node:fs';
import { readFile, readdir, rm } from 'node:fs/promises';
import { connect } from 'node:net';
import { join } from 'node:path';
import { TAPS_FILE } from './recovery-machine.js';
import { runTool } from './run-tool.js';

/**
 * Removes what a recovery host that died left in its run directory: stops each QEMU whose
 * `qemu.pid` names a process whose command line names that machine's directory (never any
 * other process), removes the machines' overlays and sockets, and the export, segment and
 * control sockets nothing listens on any more, and the tap devices of bridge NICs the machines'
 * `taps` files list (only names `lbt-...`). Returns what it removed.
 */
export async function cleanupRunDir(runDir: string): Promise<string[]> {
  const removed: string[] = [];
  const machines = await readdir(join(runDir, 'm')).catch(() => [] as string[]);
  for (const m of machines) {
    const pid = Number(
      (await readFile(join(runDir, 'm', m, 'qemu.pid'), 'utf8').catch(() => '')).trim(),
    );
    const cmdline = pid > 0 ? await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '') : '';
    // Only a QEMU whose command line names this machine's directory is ours to stop.
    if (cmdline.includes(join(runDir, 'm', m))) {
      try {
        process.kill(pid, 'SIGKILL');
        removed.push(`machine ${m} (QEMU pid ${pid})`);
      } catch {
        // It exited meanwhile.
      }
    }
    const taps = (await readFile(join(runDir, 'm', m, TAPS_FILE), 'utf8').catch(() => ''))
      .split('\n')
      .filter((t) => /^lbt-[0-9a-f]{10}$/.test(t));
    for (const tap of taps) {
      if (!existsSync(`/sys/class/net/${tap}`)) continue;
      try {
        await runTool('LB_RECOVERY_TAP', 'ip', ['link', 'del', tap], `Removing tap ${tap}`);
        removed.push(`tap ${tap} of ${m}`);
      } catch {
        // Removed meanwhile, or not ours to remove (not root): nothing more to do here.
      }
    }
    await rm(join(runDir, 'm', m), { recursive: true, force: true });
    removed.push(`overlays and sockets of ${m}`);
  }
  // Export, segment and control sockets whose server is gone (nothing accepts on them).
  const sockets = [
    ...(await readdir(join(runDir, 'x')).catch(() => [] as string[])).map((n) =>
      join(runDir, 'x', n),
    ),
    join(runDir, 'control.sock'),
  ];
  for (const path of sockets) {
    if (!path.endsWith('.sock') || !existsSync(path)) continue;
    const alive = await new Promise<boolean>((r) => {
      const sock = connect(path);
      sock.once('connect', () => (sock.destroy(), r(true)));
      sock.once('error', () => r(false));
    });
    if (!alive) {
      await rm(path, { force: true });
      removed.push(`stale socket ${path}`);
    }
  }
  return removed;
}
