// Benchmark of issue 2 (the store): import, changed-extents import, growth, restore, dedup of
// ten similar images and peak RSS, each against a reference measured in the same run (`cp` and
// restic). Run after the README's setup (the CLI must be built):
//
//   npx tsx bench/store-import.ts [--size-mib 2048] [--keep]
//
// The image and all stores live in a temp dir under bench/out/ (on the repository's disk, not
// tmpfs) and are removed at the end unless --keep is given.
import { spawn } from 'node:child_process';
import { randomBytes, randomFillSync, randomInt } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, open, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { cpus, freemem, totalmem } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const CLI = join(ROOT, 'packages/cli/bin/lifeboat.js');
const MiB = 1024 * 1024;
const CHUNK = 64 * 1024;

const args = process.argv.slice(2);
const sizeArg = args.indexOf('--size-mib');
const SIZE = (sizeArg >= 0 ? Number(args[sizeArg + 1]) : 2048) * MiB;
const KEEP = args.includes('--keep');
const PASSWORD = randomBytes(16).toString('hex');

interface Timed {
  seconds: number;
  stdout: string;
  stderr: string;
  /** Peak resident set size of the child, from /usr/bin/time -v. */
  maxRssMiB: number;
}

/** Runs a command under /usr/bin/time -v and measures wall time and peak RSS. */
function timed(cmd: string, argv: string[], env: Record<string, string> = {}): Promise<Timed> {
  return new Promise((resolve, reject) => {
    const start = performance.now();
    const child = spawn('/usr/bin/time', ['-v', cmd, ...argv], {
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    child.on('error', reject);
    child.on('close', (code) => {
      const seconds = (performance.now() - start) / 1000;
      const rss = /Maximum resident set size \(kbytes\): (\d+)/.exec(stderr);
      if (code !== 0) {
        reject(new Error(`${cmd} ${argv.join(' ')} exited ${code}:\n${stderr}`));
        return;
      }
      resolve({ seconds, stdout, stderr, maxRssMiB: rss ? Number(rss[1]) / 1024 : NaN });
    });
  });
}

async function dirBytes(dir: string): Promise<number> {
  let total = 0;
  for (const e of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile()) total += (await stat(join(e.parentPath, e.name))).size;
  }
  return total;
}

async function writeImage(path: string): Promise<void> {
  const fh = await open(path, 'w+');
  const block = 64 * MiB;
  const buf = Buffer.alloc(block);
  const quarter = SIZE / 4;
  try {
    // First half random, third quarter zeros (written, not holes), last quarter = first quarter.
    for (let pos = 0; pos < SIZE; pos += block) {
      const len = Math.min(block, SIZE - pos);
      const view = buf.subarray(0, len);
      if (pos < SIZE / 2) randomFillSync(view);
      else if (pos < 3 * quarter) view.fill(0);
      else await fh.read(view, 0, len, pos - 3 * quarter);
      await fh.write(view, 0, len, pos);
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Rewrites 1% of the chunks at random; returns their offsets and old contents. */
async function changeOnePercent(path: string): Promise<Array<{ offset: number; old: Buffer }>> {
  const chunks = SIZE / CHUNK;
  const picked = new Set<number>();
  while (picked.size < Math.round(chunks / 100)) picked.add(randomInt(chunks));
  const fh = await open(path, 'r+');
  const changes: Array<{ offset: number; old: Buffer }> = [];
  try {
    for (const n of [...picked].sort((a, b) => a - b)) {
      const old = Buffer.alloc(CHUNK);
      await fh.read(old, 0, CHUNK, n * CHUNK);
      await fh.write(randomBytes(CHUNK), 0, CHUNK, n * CHUNK);
      changes.push({ offset: n * CHUNK, old });
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
  return changes;
}

async function undoChanges(
  path: string,
  changes: Array<{ offset: number; old: Buffer }>,
): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    for (const c of changes) await fh.write(c.old, 0, CHUNK, c.offset);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Before every timed step: write and delete a file as large as the image. On this VM, memory
 * the guest has not touched yet costs a host fault per page the first time a file's data
 * lands in it (a 2 GiB restore into never-used memory took 4.5 s, 2.7 s right after), so
 * whichever contender wrote first paid for the others. Recycling pages first gives every
 * contender the same start. Not timed.
 */
async function recyclePages(dir: string): Promise<void> {
  const file = join(dir, 'recycle.tmp');
  const fh = await open(file, 'w');
  const buf = Buffer.alloc(64 * MiB);
  try {
    for (let pos = 0; pos < SIZE; pos += buf.length) await fh.write(buf, 0, buf.length, pos);
  } finally {
    await fh.close();
  }
  await rm(file);
}

function lifeboat(store: string, argv: string[]): Promise<Timed> {
  return timed(process.execPath, [CLI, ...argv], {
    LIFEBOAT_STORE: store,
    LIFEBOAT_PASSPHRASE: PASSWORD,
  });
}

function restic(repo: string, argv: string[]): Promise<Timed> {
  return timed('restic', ['--repo', repo, '--quiet', ...argv], { RESTIC_PASSWORD: PASSWORD });
}

const mbps = (bytes: number, seconds: number): number => bytes / 1e6 / seconds;
const fmt = (n: number, digits = 1): string => (Number.isFinite(n) ? n.toFixed(digits) : 'n/a');

async function main(): Promise<void> {
  if (!existsSync(join(ROOT, 'packages/cli/dist/main.js'))) {
    throw new Error(
      'The CLI is not built: run "bash scripts/install-deps.sh" (or npx tsc -b) first.',
    );
  }
  await mkdir(join(ROOT, 'bench/out'), { recursive: true });
  const dir = await mkdtemp(join(ROOT, 'bench/out/store-import-'));
  const log = (s: string): void => void process.stderr.write(`${s}\n`);
  try {
    const image = join(dir, 'disk.raw');
    log(`making a ${SIZE / MiB} MiB image in ${dir}`);
    await writeImage(image);

    log('cp');
    await recyclePages(dir);
    const cpRun = await timed('sh', [
      '-c',
      `cp --sparse=never "$0" "$1" && sync "$1"`,
      image,
      join(dir, 'copy.raw'),
    ]);
    await rm(join(dir, 'copy.raw'));

    log('restic backup (1)');
    await recyclePages(dir);
    const repo = join(dir, 'restic');
    await restic(repo, ['init']);
    const resticBackup1 = await restic(repo, ['backup', image]);
    const resticSize1 = await dirBytes(repo);

    log('lifeboat store import (1)');
    await recyclePages(dir);
    const store = join(dir, 'store');
    await lifeboat(store, ['store', 'init']);
    const lbImport1 = await lifeboat(store, ['store', 'import', image, '--disk', 'vda', '--json']);
    const storeSize1 = await dirBytes(store);

    log('changing 1% of the chunks');
    const changes = await changeOnePercent(image);
    const extents = join(dir, 'changed-extents.txt');
    await writeFile(extents, changes.map((c) => `${c.offset} ${CHUNK}\n`).join(''));

    log('lifeboat store import --changed-extents (2)');
    await recyclePages(dir);
    const lbImport2 = await lifeboat(store, [
      'store',
      'import',
      image,
      '--disk',
      'vda',
      '--changed-extents',
      extents,
      '--json',
    ]);
    const storeGrowth = (await dirBytes(store)) - storeSize1;
    log('restic backup (2)');
    await recyclePages(dir);
    const resticBackup2 = await restic(repo, ['backup', image]);
    const resticGrowth = (await dirBytes(repo)) - resticSize1;

    log('lifeboat store restore');
    await recyclePages(dir);
    const restored = join(dir, 'restored.raw');
    const lbRestore = await lifeboat(store, [
      'store',
      'restore',
      'latest',
      restored,
      '--disk',
      'vda',
    ]);
    await timed('cmp', [image, restored]);
    await rm(restored);
    log('restic restore');
    await recyclePages(dir);
    // With a sync of what it wrote, as cp's reference has: Lifeboat's restore fsyncs its
    // output before it says done, restic's does not, and an unsynced restore is not yet a disk.
    const resticRestore = await timed(
      'sh',
      [
        '-c',
        'restic --repo "$0" --quiet restore latest --target "$1" && find "$1" -type f -exec sync {} +',
        repo,
        join(dir, 'restic-restore'),
      ],
      { RESTIC_PASSWORD: PASSWORD },
    );
    await rm(join(dir, 'restic-restore'), { recursive: true, force: true });
    await rm(repo, { recursive: true, force: true });

    log('ten images differing in 1% of chunks, each imported whole into a fresh store');
    const store10 = join(dir, 'store10');
    await lifeboat(store10, ['store', 'init']);
    await lifeboat(store10, ['store', 'import', image, '--disk', 'img0']);
    const oneImage = await dirBytes(store10);
    let tenSeconds = 0;
    for (let k = 1; k < 10; k++) {
      const variant = await changeOnePercent(image);
      const r = await lifeboat(store10, ['store', 'import', image, '--disk', `img${k}`]);
      tenSeconds += r.seconds;
      await undoChanges(image, variant);
    }
    const tenImages = await dirBytes(store10);

    const importRate = mbps(SIZE, lbImport1.seconds);
    const resticRate = mbps(SIZE, resticBackup1.seconds);
    const cpRate = mbps(SIZE, cpRun.seconds);
    const rows: Array<[string, string, string, string, boolean]> = [];
    const row = (
      what: string,
      measured: string,
      ratio: number,
      target: string,
      ok: boolean,
    ): void => {
      rows.push([what, measured, fmt(ratio, 2), target, ok]);
    };
    row(
      'import vs restic backup',
      `${fmt(importRate)} vs ${fmt(resticRate)} MB/s`,
      importRate / resticRate,
      '>= 2',
      importRate / resticRate >= 2,
    );
    row(
      'import vs cp',
      `${fmt(importRate)} vs ${fmt(cpRate)} MB/s`,
      importRate / cpRate,
      '>= 0.5',
      importRate / cpRate >= 0.5,
    );
    const speedup = resticBackup2.seconds / lbImport2.seconds;
    row(
      'changed-extents import vs restic backup (2nd)',
      `${fmt(lbImport2.seconds, 2)} vs ${fmt(resticBackup2.seconds, 2)} s`,
      speedup,
      '>= 20x faster',
      speedup >= 20,
    );
    const growth = storeGrowth / resticGrowth;
    row(
      'store growth vs restic repo growth (2nd)',
      `${fmt(storeGrowth / MiB, 2)} vs ${fmt(resticGrowth / MiB, 2)} MiB`,
      growth,
      '<= 0.1',
      growth <= 0.1,
    );
    const restoreRate = mbps(SIZE, lbRestore.seconds);
    const resticRestoreRate = mbps(SIZE, resticRestore.seconds);
    row(
      'restore vs restic restore',
      `${fmt(restoreRate)} vs ${fmt(resticRestoreRate)} MB/s`,
      restoreRate / resticRestoreRate,
      '>= 2',
      restoreRate / resticRestoreRate >= 2,
    );
    const ten = tenImages / oneImage;
    row(
      'ten images (1% apart) vs one',
      `${fmt(tenImages / MiB)} vs ${fmt(oneImage / MiB)} MiB`,
      ten,
      '<= 1.2',
      ten <= 1.2,
    );
    row(
      'peak RSS of import',
      `${fmt(lbImport1.maxRssMiB)} MiB`,
      lbImport1.maxRssMiB / 256,
      '< 256 MiB',
      lbImport1.maxRssMiB < 256,
    );
    row(
      'peak RSS of restore',
      `${fmt(lbRestore.maxRssMiB)} MiB`,
      lbRestore.maxRssMiB / 256,
      '< 256 MiB',
      lbRestore.maxRssMiB < 256,
    );

    const cpu = cpus()[0]?.model ?? 'unknown CPU';
    const lines = [
      `store-import benchmark, ${new Date().toISOString()}`,
      `machine: ${cpus().length} x ${cpu}, ${fmt(totalmem() / 1024 ** 3)} GiB RAM (${fmt(freemem() / 1024 ** 3)} GiB free at the end), node ${process.version}`,
      `image: ${SIZE / MiB} MiB raw (1/2 random, 1/4 zeros, 1/4 copy of the first 1/4); page cache warm for every contender`,
      '',
      '| measure | measured | ratio | target | met |',
      '|---|---|---|---|---|',
      ...rows.map(
        ([what, measured, ratio, target, ok]) =>
          `| ${what} | ${measured} | ${ratio} | ${target} | ${ok ? 'yes' : 'NO'} |`,
      ),
      '',
      `lifeboat: import ${fmt(lbImport1.seconds, 2)} s, 2nd import ${fmt(lbImport2.seconds, 2)} s, restore ${fmt(lbRestore.seconds, 2)} s, 9 more whole imports ${fmt(tenSeconds, 1)} s; store after 1st import ${fmt(storeSize1 / MiB)} MiB`,
      `restic: backup ${fmt(resticBackup1.seconds, 2)} s (peak RSS ${fmt(resticBackup1.maxRssMiB)} MiB), 2nd backup ${fmt(resticBackup2.seconds, 2)} s, restore + sync ${fmt(resticRestore.seconds, 2)} s; repo after 1st backup ${fmt(resticSize1 / MiB)} MiB`,
      `cp: ${fmt(cpRun.seconds, 2)} s (cp --sparse=never + sync of the copy)`,
    ];
    process.stdout.write(`${lines.join('\n')}\n`);
    const first = JSON.parse(lbImport1.stdout) as { bytesRead: number };
    log(`(lifeboat read ${fmt(first.bytesRead / MiB)} MiB of the image in the 1st import)`);
  } finally {
    if (KEEP) log(`kept ${dir}`);
    else await rm(dir, { recursive: true, force: true });
  }
}

await main();
