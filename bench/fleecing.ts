// Benchmark of a consistent cut by image fleecing (@lifeboat/qmp startFleecing + release) on
// qemu-storage-daemon, against the bare bitmap transaction (add new, disable old) that any cut
// needs, in one run. The difference is what fleecing adds to every replication cycle.
//
//   npx tsx bench/fleecing.ts [--cycles 30] [--size-mib 1024]
//
// Images live in a temp dir under bench/out/ and are removed at the end.
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { cpus } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { startFleecing, startQemuStorageDaemon } from '@lifeboat/qmp';

const exec = promisify(execFile);
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const args = process.argv.slice(2);
const arg = (name: string, def: number): number => {
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1]) : def;
};
const CYCLES = arg('--cycles', 30);
const SIZE_MIB = arg('--size-mib', 1024);

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] ?? 0;
}

async function main(): Promise<void> {
  await mkdir(join(ROOT, 'bench/out'), { recursive: true });
  const dir = await mkdtemp(join(ROOT, 'bench/out/fleece-'));
  const image = join(dir, 'disk.qcow2');
  await exec('qemu-img', ['create', '-q', '-f', 'qcow2', image, `${SIZE_MIB}M`]);
  const qsd = await startQemuStorageDaemon({
    blockdevs: [
      { driver: 'file', 'node-name': 'f0', filename: image },
      { driver: 'qcow2', 'node-name': 'disk0', file: 'f0' },
    ],
    nbdSocket: join(dir, 'nbd.sock'),
  });
  try {
    const q = qsd.qmp;
    let gen = 0;
    await q.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'g0', persistent: true });
    const bare: number[] = [];
    for (let i = 0; i < CYCLES; i++) {
      const t = performance.now();
      await q.execute('transaction', {
        actions: [
          {
            type: 'block-dirty-bitmap-add',
            data: { node: 'disk0', name: `g${gen + 1}`, persistent: true },
          },
          { type: 'block-dirty-bitmap-disable', data: { node: 'disk0', name: `g${gen}` } },
        ],
      });
      await q.execute('block-dirty-bitmap-remove', { node: 'disk0', name: `g${gen}` });
      gen++;
      bare.push(performance.now() - t);
    }
    const cut: number[] = [];
    const release: number[] = [];
    for (let i = 0; i < CYCLES; i++) {
      const t = performance.now();
      const c = await startFleecing(q, {
        disks: [
          {
            node: 'disk0',
            oldBitmap: `g${gen}`,
            newBitmap: `g${gen + 1}`,
            overlayPath: join(dir, `o${i}.qcow2`),
            exportName: 'fleece',
          },
        ],
      });
      const t2 = performance.now();
      await c.release();
      gen++;
      cut.push(t2 - t);
      release.push(performance.now() - t2);
    }
    console.log(
      `Fleecing cut benchmark: ${SIZE_MIB} MiB qcow2, ${CYCLES} cycles, ${cpus().length} CPUs`,
    );
    console.log('| measure | p50 ms | p99 ms |');
    console.log('|---|---|---|');
    const row = (name: string, xs: number[]): void =>
      console.log(`| ${name} | ${pct(xs, 50).toFixed(1)} | ${pct(xs, 99).toFixed(1)} |`);
    row('bitmap transaction + remove (reference)', bare);
    row('startFleecing (overlay, transaction, export)', cut);
    row('release (export, job, node, bitmap)', release);
    const ratio = (pct(cut, 50) + pct(release, 50)) / pct(bare, 50);
    console.log(`Fleecing cycle vs bare bitmap cut (p50): ${ratio.toFixed(1)}x`);
  } finally {
    await qsd.stop();
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
