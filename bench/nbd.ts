// Benchmark of the NBD layer (@lifeboat/nbd): Lifeboat's NBD server against qemu-nbd serving the
// same raw file, and Lifeboat's NBD client against libnbd's nbdcopy, in one run:
//   - sequential read MB/s of the whole image (our client, 4 MiB requests, 8 in flight; nbdcopy)
//   - 4 KiB random-read IOPS at queue depth 16 for a fixed time (our client)
// Run after the README's setup (packages built):
//
//   npx tsx bench/nbd.ts [--size-mib 512] [--seconds 5]
//
// The image lives in a temp dir under bench/out/ and is removed at the end. Both servers read
// the same file, so both are served from the page cache after the first pass: this compares
// protocol and server overhead, not disks.
import { spawn, type ChildProcess } from 'node:child_process';
import { randomFillSync, randomInt } from 'node:crypto';
import { mkdir, mkdtemp, open, rm } from 'node:fs/promises';
import { connect } from 'node:net';
import { cpus } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { NbdClient, NbdServer, type NbdTarget } from '@lifeboat/nbd';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const MiB = 1024 * 1024;
const args = process.argv.slice(2);
const arg = (name: string, def: number): number => {
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1]) : def;
};
const SIZE = arg('--size-mib', 512) * MiB;
const SECONDS = arg('--seconds', 5);

async function waitForSocket(path: string): Promise<void> {
  for (let i = 0; i < 400; i++) {
    const ok = await new Promise<boolean>((r) => {
      const s = connect({ path });
      s.once('connect', () => (s.destroy(), r(true)));
      s.once('error', () => (s.destroy(), r(false)));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`nothing listens on ${path}`);
}

function run(cmd: string, argv: string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const start = performance.now();
    const c = spawn(cmd, argv, { stdio: ['ignore', 'ignore', 'inherit'] });
    c.once('error', reject);
    c.once('exit', (code) =>
      code === 0 ? resolve((performance.now() - start) / 1000) : reject(new Error(`${cmd} failed`)),
    );
  });
}

async function sequential(target: NbdTarget, name: string): Promise<number> {
  const c = await NbdClient.connect(target, { exportName: name });
  const piece = 4 * MiB;
  let next = 0;
  const start = performance.now();
  await Promise.all(
    Array.from({ length: 8 }, async () => {
      while (next < SIZE) {
        const at = next;
        next += piece;
        await c.readAt(at, Math.min(piece, SIZE - at));
      }
    }),
  );
  const s = (performance.now() - start) / 1000;
  await c.close();
  return SIZE / MiB / s;
}

async function randomIops(target: NbdTarget, name: string): Promise<number> {
  const c = await NbdClient.connect(target, { exportName: name });
  const end = performance.now() + SECONDS * 1000;
  let done = 0;
  await Promise.all(
    Array.from({ length: 16 }, async () => {
      while (performance.now() < end) {
        await c.readAt(randomInt(SIZE / 4096) * 4096, 4096);
        done++;
      }
    }),
  );
  await c.close();
  return done / SECONDS;
}

/** `--serve IMAGE SOCKET`: only serve, in its own process (and so its own event loop). */
async function serve(image: string, sock: string): Promise<void> {
  const fh = await open(image, 'r');
  const { size } = await fh.stat();
  const server = new NbdServer();
  server.addExport('d', {
    size,
    readAt: async (offset, length) => {
      const b = Buffer.allocUnsafe(length);
      const { bytesRead } = await fh.read(b, 0, length, offset);
      if (bytesRead !== length) throw new Error(`short read at ${offset}`);
      return b;
    },
  });
  await server.listen({ path: sock });
  process.once('SIGTERM', () => {
    void server
      .close()
      .then(() => fh.close())
      .then(() => process.exit(0));
  });
}

async function main(): Promise<void> {
  await mkdir(join(ROOT, 'bench/out'), { recursive: true });
  const dir = await mkdtemp(join(ROOT, 'bench/out/nbd-'));
  const children: ChildProcess[] = [];
  try {
    const image = join(dir, 'disk.raw');
    const fh = await open(image, 'w+');
    const block = Buffer.alloc(MiB);
    for (let o = 0; o < SIZE; o += MiB) {
      randomFillSync(block);
      await fh.write(block, 0, MiB, o);
    }
    const qsock = join(dir, 'qemu.sock');
    const lsock = join(dir, 'lifeboat.sock');
    const q = spawn(
      'qemu-nbd',
      ['--persistent', '--shared=8', '-r', '-f', 'raw', '-x', 'd', '-k', qsock, image],
      {
        stdio: 'ignore',
      },
    );
    children.push(q);
    // The Lifeboat server runs in its own process, like qemu-nbd, so client and server do not
    // share one event loop.
    const l = spawn(
      process.execPath,
      [...process.execArgv, fileURLToPath(import.meta.url), '--serve', image, lsock],
      {
        stdio: ['ignore', 'ignore', 'inherit'],
      },
    );
    children.push(l);
    await waitForSocket(qsock);
    await waitForSocket(lsock);

    // Warm the page cache so both servers read from memory.
    await run('nbdcopy', [`nbd+unix:///d?socket=${qsock}`, 'null:']);
    const rows: [string, number, number][] = [];
    const measure = async (label: string, f: (t: NbdTarget) => Promise<number>): Promise<void> => {
      const ref = await f({ path: qsock });
      const ours = await f({ path: lsock });
      rows.push([label, ref, ours]);
    };
    await measure('sequential read MB/s, Lifeboat client', (t) => sequential(t, 'd'));
    await measure('sequential read MB/s, nbdcopy client', async (t) => {
      const s = await run('nbdcopy', [
        `nbd+unix:///d?socket=${'path' in t ? t.path : ''}`,
        'null:',
      ]);
      return SIZE / MiB / s;
    });
    await measure('4 KiB random read IOPS (QD16), Lifeboat client', (t) => randomIops(t, 'd'));

    console.log(
      `NBD benchmark: ${SIZE / MiB} MiB raw image, ${SECONDS} s random phase, ${cpus().length} CPUs`,
    );
    console.log('| measure | qemu-nbd (reference) | Lifeboat NbdServer | ratio |');
    console.log('|---|---|---|---|');
    for (const [label, ref, ours] of rows) {
      console.log(
        `| ${label} | ${ref.toFixed(0)} | ${ours.toFixed(0)} | ${(ours / ref).toFixed(2)} |`,
      );
    }
    const clientRatio = (rows[0]?.[1] ?? 0) / (rows[1]?.[1] ?? 1);
    console.log(
      `Lifeboat client vs nbdcopy, both on qemu-nbd (sequential): ${clientRatio.toFixed(2)}`,
    );
    await fh.close();
  } finally {
    for (const c of children) c.kill('SIGKILL');
    await rm(dir, { recursive: true, force: true });
  }
}

const serveAt = args.indexOf('--serve');
if (serveAt >= 0) await serve(args[serveAt + 1] ?? '', args[serveAt + 2] ?? '');
else await main();
