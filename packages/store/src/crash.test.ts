import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { applyToBuffer, deltaOps } from './crash-model.js';
import { DirectoryBackend } from './directory-backend.js';
import { packKey } from './object-format.js';
import type { Store } from './store.js';
import type { PointInfo } from './store-types.js';
import type { TempStore } from './test-support.js';
import { TEST_PASSPHRASE, tempStore } from './test-support.js';

const CS = 4096;
const SIZE = CS * 128;
const ITERATIONS = 15;
const repoRoot = fileURLToPath(new URL('../../..', import.meta.url));
const writerScript = fileURLToPath(new URL('./crash-writer.ts', import.meta.url));

let t: TempStore | undefined;
const children = new Set<ChildProcess>();
afterEach(async () => {
  for (const c of children) c.kill('SIGKILL');
  children.clear();
  await t?.cleanup();
  t = undefined;
});

/** Starts a writer, waits until it has opened the store, kills it after a random delay. */
async function runAndKill(dir: string, disk = 'vda', minCommits = 0): Promise<string[]> {
  const child = spawn(
    process.execPath,
    [
      '--conditions=source',
      '--import',
      'tsx',
      writerScript,
      dir,
      TEST_PASSPHRASE,
      String(SIZE),
      disk,
    ],
    { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  children.add(child);
  const committed: string[] = [];
  let out = '';
  let err = '';
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  await new Promise<void>((resolve, reject) => {
    child.stdout?.on('data', (d: Buffer) => {
      out += d.toString();
      // Wait for the store to be open (and, if asked, for some commits), not for a time.
      if (out.includes('READY\n') && out.split('COMMITTED ').length > minCommits) resolve();
    });
    child.stderr?.on('data', (d: Buffer) => (err += d.toString()));
    child.once('exit', (code) => reject(new Error(`writer exited early (${code}): ${err}`)));
  });
  // Random instants, so kills land in every phase of a commit (packs, index, point).
  await new Promise((r) => setTimeout(r, 20 + Math.floor(Math.random() * 600)));
  child.kill('SIGKILL');
  await exited;
  children.delete(child);
  for (const line of out.split('\n'))
    if (line.startsWith('COMMITTED ')) committed.push(line.slice(10));
  return committed;
}

/** Rebuilds each point's expected content from its seed label and its parent. */
function expected(points: PointInfo[], cache: Map<string, Buffer>): (p: PointInfo) => Buffer {
  const byId = new Map(points.map((p) => [p.id, p]));
  const build = (p: PointInfo): Buffer => {
    const hit = cache.get(p.id);
    if (hit !== undefined) return hit;
    const parent = p.parent === undefined ? undefined : byId.get(p.parent);
    if (p.parent !== undefined && parent === undefined)
      throw new Error(`parent ${p.parent} of ${p.id} not visible`);
    const disk = parent === undefined ? Buffer.alloc(SIZE) : Buffer.from(build(parent));
    applyToBuffer(disk, deltaOps(Number(p.labels['seed']), SIZE, CS));
    cache.set(p.id, disk);
    return disk;
  };
  return build;
}

async function checkAll(
  store: Store,
  acknowledged: Set<string>,
  cache: Map<string, Buffer>,
): Promise<PointInfo[]> {
  const points = await store.listPoints();
  const ids = new Set(points.map((p) => p.id));
  // Every commit that resolved is durable.
  for (const id of acknowledged) expect(ids.has(id), `acknowledged point ${id} missing`).toBe(true);
  expect(store.damagedPointObjects()).toEqual([]);
  const build = expected(points, cache);
  for (const p of points) {
    const r = await store.openPoint(p.id);
    expect((await r.readAt(0, SIZE)).equals(build(p)), `point ${p.id} differs`).toBe(true);
  }
  return points;
}

describe('kill -9 of a writer at random instants', () => {
  it('two writer processes on different disks at once: every point of both is byte-exact', async () => {
    t = await tempStore({ chunkSize: CS, packSize: 32 * 1024 });
    const acknowledged = new Set<string>();
    const cache = new Map<string, Buffer>();
    const ids = await Promise.all([runAndKill(t.dir, 'vda', 3), runAndKill(t.dir, 'vdb', 3)]);
    for (const id of ids.flat()) acknowledged.add(id);
    const store = await t.reopen();
    const points = await checkAll(store, acknowledged, cache);
    expect(new Set(points.map((p) => p.disk))).toEqual(new Set(['vda', 'vdb']));
    await store.gc();
    await checkAll(store, acknowledged, cache);
    expect((await store.verify()).ok).toBe(true);
  }, 60_000);

  it('keeps every earlier point byte-exact, shows no partial point, and gc removes the garbage', async () => {
    t = await tempStore({ chunkSize: CS, packSize: 32 * 1024 });
    const acknowledged = new Set<string>();
    const cache = new Map<string, Buffer>();
    let maxPoints = 0;
    for (let i = 0; i < ITERATIONS; i++) {
      for (const id of await runAndKill(t.dir)) acknowledged.add(id);
      const store = await t.reopen();
      maxPoints = Math.max(maxPoints, (await checkAll(store, acknowledged, cache)).length);
      await store.close();
      if (i === Math.floor(ITERATIONS / 2)) {
        // A gc in the middle: later writers build on what it left.
        const s = await t.reopen();
        await s.gc();
        await s.close();
      }
    }
    expect(acknowledged.size).toBeGreaterThan(0);
    const store = await t.reopen();
    await store.gc();
    await checkAll(store, acknowledged, cache);
    expect((await store.verify()).ok).toBe(true);
    // No pack is left that the index does not list, and no lock of a dead writer remains.
    const indexed = new Set<string>();
    for (const [, loc] of store.index.entries()) indexed.add(packKey(loc.pack));
    const backend = new DirectoryBackend({ path: t.dir });
    for await (const o of backend.list('packs/'))
      expect(indexed.has(o.key), `orphan ${o.key}`).toBe(true);
    for await (const o of backend.list('locks/')) expect.fail(`lock left behind: ${o.key}`);
    const again = await store.gc();
    expect(again.packsDeleted).toBe(0);
    expect(maxPoints).toBeGreaterThan(0);
  }, 120_000);
});
