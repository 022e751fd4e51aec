// Benchmark of issue 2 (the store): import, changed-extents import, growth, restore, dedup of
// ten similar images and peak RSS, each against a reference measured in the same run (`cp` and
// restic). Run after the README's setup (the CLI must be built):
//
//   npx tsx bench/store-import.ts [--size-mib 2048] [--repeat 3] [--keep]
//
// Every timed contender runs once per round (--repeat rounds, 3 by default), a lifeboat step and
// its restic counterpart back to back, in turn which goes first; each ratio is taken within a
// round and the median over the rounds is the figure, printed with its spread. One round of
// each is a coin toss on a noisy VM: the same code swung across its targets from run to run.
//
// The image and all stores live in a temp dir under bench/out/ (on the repository's disk, not
// tmpfs) and are removed at the end unless --keep is given.
import { spawn } from 'node:child_process';
import { randomBytes, randomFillSync, randomInt } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, open, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { cpus, freemem, loadavg, totalmem } from 'node:os';
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
const repeatArg = args.indexOf('--repeat');
/** Rounds of every timed contender (interleaved: one of each per round); the median counts. */
const REPEAT = repeatArg >= 0 ? Number(args[repeatArg + 1]) : 3;
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

/** One round's timings: every contender once, on the same image, in fresh repositories. */
interface Round {
  cp: Timed;
  resticBackup1: Timed;
  lbImport1: Timed;
  lbImport2: Timed;
  resticBackup2: Timed;
  lbRestore: Timed;
  resticRestore: Timed;
  storeGrowth: number;
  resticGrowth: number;
  storeSize1: number;
  resticSize1: number;
  bytesRead: number;
}

/**
 * Runs `pair` in the order given on even rounds and reversed on odd ones, so neither contender
 * always goes first (on this VM whoever runs right after a big deletion or allocation pays for it).
 */
async function inTurn<A, B>(
  round: number,
  a: () => Promise<A>,
  b: () => Promise<B>,
): Promise<[A, B]> {
  if (round % 2 === 0) {
    const ra = await a();
    return [ra, await b()];
  }
  const rb = await b();
  return [await a(), rb];
}

async function oneRound(
  dir: string,
  image: string,
  round: number,
  log: (s: string) => void,
): Promise<Round> {
  const at = join(dir, `round-${round}`);
  await mkdir(at);
  try {
    log(`round ${round + 1}: cp`);
    await recyclePages(dir);
    const cp = await timed('sh', [
      '-c',
      `cp --sparse=never "$0" "$1" && sync "$1"`,
      image,
      join(at, 'copy.raw'),
    ]);
    await rm(join(at, 'copy.raw'));

    const repo = join(at, 'restic');
    const store = join(at, 'store');
    await restic(repo, ['init']);
    await lifeboat(store, ['store', 'init']);
    const [resticBackup1, lbImport1] = await inTurn(
      round,
      async () => {
        log(`round ${round + 1}: restic backup (1)`);
        await recyclePages(dir);
        return restic(repo, ['backup', image]);
      },
      async () => {
        log(`round ${round + 1}: lifeboat store import (1)`);
        await recyclePages(dir);
        return lifeboat(store, ['store', 'import', image, '--disk', 'vda', '--json']);
      },
    );
    const resticSize1 = await dirBytes(repo);
    const storeSize1 = await dirBytes(store);

    log(`round ${round + 1}: changing 1% of the chunks`);
    const changes = await changeOnePercent(image);
    const extents = join(at, 'changed-extents.txt');
    await writeFile(extents, changes.map((c) => `${c.offset} ${CHUNK}\n`).join(''));
    const [lbImport2, resticBackup2] = await inTurn(
      round,
      async () => {
        log(`round ${round + 1}: lifeboat store import --changed-extents (2)`);
        await recyclePages(dir);
        return lifeboat(store, [
          'store',
          'import',
          image,
          '--disk',
          'vda',
          '--changed-extents',
          extents,
          '--json',
        ]);
      },
      async () => {
        log(`round ${round + 1}: restic backup (2)`);
        await recyclePages(dir);
        return restic(repo, ['backup', image]);
      },
    );
    const storeGrowth = (await dirBytes(store)) - storeSize1;
    const resticGrowth = (await dirBytes(repo)) - resticSize1;

    const restored = join(at, 'restored.raw');
    const [lbRestore, resticRestore] = await inTurn(
      round,
      async () => {
        log(`round ${round + 1}: lifeboat store restore`);
        await recyclePages(dir);
        const r = await lifeboat(store, ['store', 'restore', 'latest', restored, '--disk', 'vda']);
        await timed('cmp', [image, restored]);
        await rm(restored);
        return r;
      },
      async () => {
        log(`round ${round + 1}: restic restore`);
        await recyclePages(dir);
        // With a sync of what it wrote, as cp's reference has: Lifeboat's restore fsyncs its
        // output before it says done, restic's does not, and an unsynced restore is not yet a disk.
        const r = await timed(
          'sh',
          [
            '-c',
            'restic --repo "$0" --quiet restore latest --target "$1" && find "$1" -type f -exec sync {} +',
            repo,
            join(at, 'restic-restore'),
          ],
          { RESTIC_PASSWORD: PASSWORD },
        );
        await rm(join(at, 'restic-restore'), { recursive: true, force: true });
        return r;
      },
    );
    // The next round starts from the same image.
    await undoChanges(image, changes);
    const first = JSON.parse(lbImport1.stdout) as { bytesRead: number };
    return {
      cp,
      resticBackup1,
      lbImport1,
      lbImport2,
      resticBackup2,
      lbRestore,
      resticRestore,
      storeGrowth,
      resticGrowth,
      storeSize1,
      resticSize1,
      bytesRead: first.bytesRead,
    };
  } finally {
    await rm(at, { recursive: true, force: true });
  }
}

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
}

async function main(): Promise<void> {
  if (!existsSync(join(ROOT, 'packages/cli/dist/main.js'))) {
    throw new Error(
      'The CLI is not built: run "bash scripts/install-deps.sh" (or npx tsc -b) first.',
    );
  }
  if (!Number.isInteger(REPEAT) || REPEAT < 1)
    throw new Error('--repeat wants a whole number >= 1');
  await mkdir(join(ROOT, 'bench/out'), { recursive: true });
  const dir = await mkdtemp(join(ROOT, 'bench/out/store-import-'));
  const log = (s: string): void => void process.stderr.write(`${s}\n`);
  const loadStart = loadavg()[0] as number;
  try {
    const image = join(dir, 'disk.raw');
    log(`making a ${SIZE / MiB} MiB image in ${dir}`);
    await writeImage(image);

    const rounds: Round[] = [];
    for (let r = 0; r < REPEAT; r++) rounds.push(await oneRound(dir, image, r, log));

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

    // Each ratio is taken within a round (both contenders back to back), then the median over
    // the rounds is the figure and the spread is shown beside it.
    const per = (f: (r: Round) => number): number[] => rounds.map(f);
    const rows: Array<[string, string, string, string, boolean]> = [];
    const spread = (xs: number[], digits = 2): string =>
      xs.length < 2 ? '' : ` (${fmt(Math.min(...xs), digits)}-${fmt(Math.max(...xs), digits)})`;
    const ratioRow = (
      what: string,
      measured: string,
      ratios: number[],
      target: string,
      ok: (m: number) => boolean,
    ): void => {
      const m = median(ratios);
      rows.push([what, measured, `${fmt(m, 2)}${spread(ratios)}`, target, ok(m)]);
    };
    const importRates = per((r) => mbps(SIZE, r.lbImport1.seconds));
    ratioRow(
      'import vs restic backup',
      `${fmt(median(importRates))} vs ${fmt(median(per((r) => mbps(SIZE, r.resticBackup1.seconds))))} MB/s`,
      per((r) => r.resticBackup1.seconds / r.lbImport1.seconds),
      '>= 2',
      (m) => m >= 2,
    );
    ratioRow(
      'import vs cp',
      `${fmt(median(importRates))} vs ${fmt(median(per((r) => mbps(SIZE, r.cp.seconds))))} MB/s`,
      per((r) => r.cp.seconds / r.lbImport1.seconds),
      '>= 0.5',
      (m) => m >= 0.5,
    );
    ratioRow(
      'changed-extents import vs restic backup (2nd)',
      `${fmt(median(per((r) => r.lbImport2.seconds)), 2)} vs ${fmt(median(per((r) => r.resticBackup2.seconds)), 2)} s`,
      per((r) => r.resticBackup2.seconds / r.lbImport2.seconds),
      '>= 20x faster',
      (m) => m >= 20,
    );
    ratioRow(
      'store growth vs restic repo growth (2nd)',
      `${fmt(median(per((r) => r.storeGrowth)) / MiB, 2)} vs ${fmt(median(per((r) => r.resticGrowth)) / MiB, 2)} MiB`,
      per((r) => r.storeGrowth / r.resticGrowth),
      '<= 0.1',
      (m) => m <= 0.1,
    );
    ratioRow(
      'restore vs restic restore',
      `${fmt(median(per((r) => mbps(SIZE, r.lbRestore.seconds))))} vs ${fmt(median(per((r) => mbps(SIZE, r.resticRestore.seconds))))} MB/s`,
      per((r) => r.resticRestore.seconds / r.lbRestore.seconds),
      '>= 2',
      (m) => m >= 2,
    );
    const ten = tenImages / oneImage;
    rows.push([
      'ten images (1% apart) vs one',
      `${fmt(tenImages / MiB)} vs ${fmt(oneImage / MiB)} MiB`,
      fmt(ten, 2),
      '<= 1.2',
      ten <= 1.2,
    ]);
    // Memory: the worst round counts, not the median.
    const rssImport = Math.max(...per((r) => r.lbImport1.maxRssMiB));
    const rssRestore = Math.max(...per((r) => r.lbRestore.maxRssMiB));
    rows.push([
      'peak RSS of import (largest)',
      `${fmt(rssImport)} MiB`,
      fmt(rssImport / 256, 2),
      '< 256 MiB',
      rssImport < 256,
    ]);
    rows.push([
      'peak RSS of restore (largest)',
      `${fmt(rssRestore)} MiB`,
      fmt(rssRestore / 256, 2),
      '< 256 MiB',
      rssRestore < 256,
    ]);

    const cpu = cpus()[0]?.model ?? 'unknown CPU';
    const s = (t: Timed): string => fmt(t.seconds, 2);
    const lines = [
      `store-import benchmark, ${new Date().toISOString()}, ${REPEAT} round(s), load ${fmt(loadStart, 2)} -> ${fmt(loadavg()[0] as number, 2)}`,
      `machine: ${cpus().length} x ${cpu}, ${fmt(totalmem() / 1024 ** 3)} GiB RAM (${fmt(freemem() / 1024 ** 3)} GiB free at the end), node ${process.version}`,
      `image: ${SIZE / MiB} MiB raw (1/2 random, 1/4 zeros, 1/4 copy of the first 1/4); page cache warm for every contender`,
      '',
      `| measure | measured (median) | ratio: median${REPEAT > 1 ? ' (min-max)' : ''} | target | met |`,
      '|---|---|---|---|---|',
      ...rows.map(
        ([what, measured, ratio, target, ok]) =>
          `| ${what} | ${measured} | ${ratio} | ${target} | ${ok ? 'yes' : 'NO'} |`,
      ),
      '',
      'seconds per round (lifeboat import / 2nd import / restore; restic backup / 2nd backup / restore + sync; cp):',
      ...rounds.map(
        (r, i) =>
          `  round ${i + 1}${i % 2 === 1 ? ' (lifeboat first)' : ''}: ${s(r.lbImport1)} / ${s(r.lbImport2)} / ${s(r.lbRestore)}; ${s(r.resticBackup1)} / ${s(r.resticBackup2)} / ${s(r.resticRestore)}; ${s(r.cp)}`,
      ),
      `lifeboat: 9 more whole imports ${fmt(tenSeconds, 1)} s; store after 1st import ${fmt(median(per((r) => r.storeSize1)) / MiB)} MiB (read ${fmt(median(per((r) => r.bytesRead)) / MiB)} MiB of the image)`,
      `restic: repo after 1st backup ${fmt(median(per((r) => r.resticSize1)) / MiB)} MiB, peak RSS ${fmt(Math.max(...per((r) => r.resticBackup1.maxRssMiB)))} MiB`,
      'cp: cp --sparse=never + sync of the copy',
    ];
    process.stdout.write(`${lines.join('\n')}\n`);
  } finally {
    if (KEEP) log(`kept ${dir}`);
    else await rm(dir, { recursive: true, force: true });
  }
}

await main();
