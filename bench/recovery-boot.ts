// Benchmark of the recovery host (@lifeboat/recovery), in one run:
//   - time from a test failover's start to the guest's boot marker, for points of a 1 GiB and
//     a 64 GiB disk (sparse, the same root file system), against the copy-first reference:
//     `qemu-img convert` of the same point (read over NBD) to a local qcow2, then a boot of it;
//   - NBD sequential read MB/s and 4 KiB random-read IOPS of a point export (Lifeboat's NBD
//     server over the store, through the recovery host's chunk cache) against qemu-nbd serving
//     a local raw copy of the same image.
// Run after the README's setup (packages built):
//
//   npx tsx bench/recovery-boot.ts [--seconds 5]
//
// Everything lives in a temp dir under bench/out/ and is removed at the end.
import { execFile, spawn } from 'node:child_process';
import { randomInt } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, open, rm, stat } from 'node:fs/promises';
import { cpus, loadavg } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { NbdClient, type NbdTarget } from '@lifeboat/nbd';
import { kvmBootsKernel } from '@lifeboat/qmp';
import { RecoveryHost, exportUri, runTestFailover } from '@lifeboat/recovery';
import { DirectoryBackend, Store, type PointInfo } from '@lifeboat/store';
import { buildTestImage, startVm, testImageAppend } from '@lifeboat/testing';

const run = promisify(execFile);
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const args = process.argv.slice(2);
const SECONDS = Number(args[args.indexOf('--seconds') + 1] ?? 5) || 5;
const PASS = 'bench';

async function importRaw(
  store: Store,
  path: string,
  machine: string,
  size: number,
): Promise<PointInfo> {
  const s = await store.beginWrite({ machine, disk: 'root', size, base: null });
  const fh = await open(path, 'r');
  const buf = Buffer.alloc(store.chunkSize);
  const len = (await stat(path)).size;
  for (let off = 0; off < len; off += buf.length) {
    const { bytesRead } = await fh.read(buf, 0, buf.length, off);
    const c = buf.subarray(0, bytesRead);
    if (c.some((b) => b !== 0)) await s.write(off, Buffer.from(c));
  }
  await fh.close();
  return s.commit();
}

async function sequential(target: NbdTarget, name: string, bytes: number): Promise<number> {
  const c = await NbdClient.connect(target, { exportName: name });
  const piece = 4 * MiB;
  let next = 0;
  const start = performance.now();
  await Promise.all(
    Array.from({ length: 8 }, async () => {
      while (next < bytes) {
        const at = next;
        next += piece;
        await c.readAt(at, Math.min(piece, bytes - at));
      }
    }),
  );
  const s = (performance.now() - start) / 1000;
  await c.close();
  return bytes / MiB / s;
}

async function randomIops(target: NbdTarget, name: string, bytes: number): Promise<number> {
  const c = await NbdClient.connect(target, { exportName: name });
  const end = performance.now() + SECONDS * 1000;
  let done = 0;
  await Promise.all(
    Array.from({ length: 16 }, async () => {
      while (performance.now() < end) {
        await c.readAt(randomInt(0, bytes / 4096) * 4096, 4096);
        done++;
      }
    }),
  );
  await c.close();
  return done / SECONDS;
}

await mkdir(join(ROOT, 'bench', 'out'), { recursive: true });
const dir = await mkdtemp(join(ROOT, 'bench', 'out', 'rb-'));
const image = await buildTestImage();
const rootBytes = (await stat(image.rootImage)).size;
const storeDir = join(dir, 'store');
let store = await Store.init({
  backend: new DirectoryBackend({ path: storeDir }),
  passphrase: PASS,
  kdfCost: 1024,
});
const points = {
  '1 GiB': await importRaw(store, image.rootImage, 'small', 1 * GiB),
  '64 GiB': await importRaw(store, image.rootImage, 'big', 64 * GiB),
};
const host = await RecoveryHost.start({ runDir: join(dir, 'run') });
const append = testImageAppend();
// The accelerator the recovery host really uses for this kernel (KVM only if it boots it).
const accel = host.accel === 'kvm' && (await kvmBootsKernel(image.kernel)) ? 'kvm' : 'tcg';
const marker = /LIFEBOAT-READY/;
console.log(
  `recovery-boot benchmark: ${cpus().length} CPUs, load ${loadavg()[0]!.toFixed(1)}, accelerator ${accel}`,
);

const rows: Array<[string, number, number]> = [];
try {
  for (const [label, p] of Object.entries(points)) {
    // Lifeboat: boot straight from the point through the NBD export and an overlay.
    const t0 = performance.now();
    const tf = await runTestFailover(host, store, {
      machines: [
        {
          name: 'b',
          points: { pointIds: [p.id] },
          boot: { kernel: image.kernel, append },
          memoryMiB: 256,
        },
      ],
      verify: { console: marker, screenshot: false },
    });
    const lifeboatS = (performance.now() - t0) / 1000;
    console.log(
      `${label} steps: ${tf.job.steps.map((st) => `${st.name} ${((st.durationMs ?? 0) / 1000).toFixed(1)} s`).join(', ')}`,
    );
    await tf.cleanup();

    // Reference: copy the point to a local file first (over the same NBD export), then boot.
    const r0 = performance.now();
    const e = await host.exportPoint(store, p.id);
    const local = join(dir, `copy-${p.machine}.qcow2`);
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', exportUri(e), local]);
    await host.closeExport(e);
    await mkdir(join(dir, `vm-${p.machine}`), { recursive: true });
    const vm = await startVm({
      kernel: image.kernel,
      append,
      disks: [{ path: local, format: 'qcow2' }],
      accel,
      dir: join(dir, `vm-${p.machine}`),
    });
    try {
      await vm.waitForConsole(marker, 600_000);
    } finally {
      await vm.stop({ kill: true });
    }
    const copyS = (performance.now() - r0) / 1000;
    await rm(local, { force: true });
    rows.push([label, lifeboatS, copyS]);
    console.log(
      `${label}: test failover to boot marker ${lifeboatS.toFixed(1)} s; convert+boot ${copyS.toFixed(1)} s; ratio ${(copyS / lifeboatS).toFixed(1)}x`,
    );
  }

  // NBD throughput over the root file system's range: a fresh store (cold caches) against
  // qemu-nbd serving a local raw copy of the same bytes.
  await host.close();
  await store.close();
  store = await Store.open({ backend: new DirectoryBackend({ path: storeDir }), passphrase: PASS });
  const host2 = await RecoveryHost.start({ runDir: join(dir, 'run2') });
  const e = await host2.exportPoint(store, points['1 GiB'].id);
  const qsock = join(dir, 'q.sock');
  const q = spawn(
    'qemu-nbd',
    ['-r', '-f', 'raw', '-x', 'q', '-k', qsock, '--shared=4', '--persistent', image.rootImage],
    { stdio: 'ignore' },
  );
  while (!existsSync(qsock)) await new Promise((r) => setTimeout(r, 50));
  try {
    const seqL = await sequential({ path: e.socketPath }, e.name, rootBytes);
    const seqQ = await sequential({ path: qsock }, 'q', rootBytes);
    const iopsL = await randomIops({ path: e.socketPath }, e.name, rootBytes);
    const iopsQ = await randomIops({ path: qsock }, 'q', rootBytes);
    console.log(
      `NBD sequential read (${rootBytes / MiB} MiB, cold store cache): Lifeboat point export ${seqL.toFixed(0)} MB/s, qemu-nbd local raw ${seqQ.toFixed(0)} MB/s, ratio ${(seqL / seqQ).toFixed(2)}`,
    );
    console.log(
      `NBD 4 KiB random read, QD16, ${SECONDS} s: Lifeboat ${iopsL.toFixed(0)} IOPS, qemu-nbd ${iopsQ.toFixed(0)} IOPS, ratio ${(iopsL / iopsQ).toFixed(2)}`,
    );
    console.log(`chunk cache: ${e.source.hits} hits, ${e.source.misses} misses`);
  } finally {
    q.kill();
    await host2.close();
  }
} finally {
  await host.close();
  await store.close();
  await rm(dir, { recursive: true, force: true });
}
console.log(
  'summary:',
  JSON.stringify(
    rows.map(([l, a, b]) => ({ disk: l, lifeboatS: +a.toFixed(1), copyThenBootS: +b.toFixed(1) })),
  ),
);
