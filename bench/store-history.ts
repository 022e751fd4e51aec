// Benchmark of a store with a long history: what one small commit costs as points and index
// objects pile up (a process server commits a point per disk every few seconds), against the
// same commit on a store with 100 points, measured in the same run; then after one gc (which
// merges the index objects) and, as the second reference, after a fresh Store.open. Last, on
// another fresh open, the check a restarted process server makes per machine (is the cut it
// was committing in the store?): by the cut's name (findCutPoint) against a listing.
//
// Each commit is what a process server does per cut and disk: a write session on the point
// it committed last (named, not "latest"), one 64 KiB chunk of random data, a commit. 50
// machines of one disk each take turns, on a directory store on the repository's disk.
//
//   npx tsx bench/store-history.ts [--points 100,1000,3000] [--sample 100]
//
// Run after the README's setup (the packages must be built).
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readdir, rm } from 'node:fs/promises';
import { cpus } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DirectoryBackend, Store } from '@lifeboat/store';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const args = process.argv.slice(2);
const arg = (name: string, dflt: string): string => {
  const i = args.indexOf(name);
  return i >= 0 ? (args[i + 1] ?? dflt) : dflt;
};
const STEPS = arg('--points', '100,1000,3000')
  .split(',')
  .map(Number)
  .filter((n) => Number.isInteger(n) && n > 0)
  .sort((a, b) => a - b);
const SAMPLE = Number(arg('--sample', '100'));
const MACHINES = 50;
const CHUNK = 65_536;
const PASSPHRASE = 'bench-history';

async function main(): Promise<void> {
  await mkdir(join(ROOT, 'bench', 'out'), { recursive: true });
  const dir = await mkdtemp(join(ROOT, 'bench', 'out', 'history-'));
  console.log(
    `store history: ${cpus().length} CPUs, ${MACHINES} machines taking turns, one 64 KiB chunk per commit, ${SAMPLE} commits timed per step`,
  );
  try {
    let store = await Store.init({
      backend: new DirectoryBackend({ path: dir }),
      passphrase: PASSPHRASE,
    });
    const last = new Map<string, string>();
    let n = 0;
    const commit = async (): Promise<void> => {
      const machine = `m${n % MACHINES}`;
      const s = await store.beginWrite({
        machine,
        disk: 'vda',
        size: 1 << 30,
        base: last.get(machine) ?? null,
      });
      await s.write((n % 16_384) * CHUNK, randomBytes(CHUNK));
      last.set(machine, (await s.commit({ kind: 'crash', cut: `cut-${n}` })).id);
      n++;
    };
    /** Mean milliseconds of the next `SAMPLE` commits. */
    const timed = async (): Promise<number> => {
      const t = performance.now();
      for (let i = 0; i < SAMPLE; i++) await commit();
      return (performance.now() - t) / SAMPLE;
    };
    const rows: Array<{ what: string; ms: number }> = [];
    let reference: number | undefined;
    for (const target of STEPS) {
      while (n < target - SAMPLE) await commit();
      const ms = await timed();
      reference ??= ms;
      rows.push({ what: `${n} points, ${n} index objects`, ms });
    }
    const before = (await readdir(join(dir, 'index'))).length;
    let t = performance.now();
    await store.gc();
    const gcSeconds = (performance.now() - t) / 1000;
    const after = (await readdir(join(dir, 'index'))).length;
    rows.push({ what: `${n} points, ${after} index objects (after gc)`, ms: await timed() });
    await store.close();
    t = performance.now();
    store = await Store.open({
      backend: new DirectoryBackend({ path: dir }),
      passphrase: PASSPHRASE,
    });
    await commit();
    const reopenMs = performance.now() - t;
    rows.push({ what: `${n} points, after a fresh Store.open`, ms: await timed() });
    await store.close();

    // What a process server restarted after a crash asks first of each machine: is the cut it
    // was committing in the store already? By the cut's own name, and by a listing.
    store = await Store.open({
      backend: new DirectoryBackend({ path: dir }),
      passphrase: PASSPHRASE,
    });
    const cut = `cut-${n - 1}`;
    const machine = `m${(n - 1) % MACHINES}`;
    t = performance.now();
    const found = await store.findCutPoint(machine, 'vda', cut);
    const findMs = performance.now() - t;
    t = performance.now();
    const listed = await store.listPoints({ machine, disk: 'vda', cut });
    const listMs = performance.now() - t;
    await store.close();
    if (found?.id !== listed[0]?.id) throw new Error('findCutPoint and listPoints disagree');

    console.log(`gc: ${before} index objects merged into ${after} in ${gcSeconds.toFixed(1)} s`);
    console.log(
      `fresh Store.open + first commit: ${reopenMs.toFixed(0)} ms (key, index, point list)`,
    );
    console.log(
      `is cut ${cut} in the store (fresh open, ${n} points): findCutPoint ${findMs.toFixed(1)} ms, listPoints({ cut }) ${listMs.toFixed(1)} ms`,
    );
    console.log('');
    console.log('| store | ms per commit | vs the first row |');
    console.log('|---|---|---|');
    for (const r of rows) {
      console.log(
        `| ${r.what} | ${r.ms.toFixed(1)} | ${(r.ms / (reference ?? r.ms)).toFixed(2)} |`,
      );
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
