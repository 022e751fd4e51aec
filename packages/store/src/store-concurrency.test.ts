import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { DirectoryBackend } from './directory-backend.js';
import type { ObjectBackend, ObjectInfo } from './object-backend.js';
import { Store } from './store.js';
import type { PointInfo } from './store-types.js';
import type { TempStore } from './test-support.js';
import { TEST_PASSPHRASE, pseudoRandom, tempStore } from './test-support.js';

// Writer processes commit for this long while readers read everything they can see.
const WRITE_MS = 8_000;
const CS = 4096;
const repoRoot = fileURLToPath(new URL('../../..', import.meta.url));
const writerScript = fileURLToPath(new URL('./stress-writer.ts', import.meta.url));

let t: TempStore | undefined;
const children = new Set<ChildProcess>();
afterEach(async () => {
  for (const c of children) c.kill('SIGKILL');
  children.clear();
  await t?.cleanup();
  t = undefined;
});

interface Writer {
  /** Points committed so far, id → expected SHA-256, in commit order. */
  committed: Map<string, string>;
  done: Promise<void>;
}

/** Starts a writer process; resolves once its store is open. */
async function startWriter(
  dir: string,
  machine: string,
  disks: string[],
  onCommit: (id: string, sha: string) => void,
): Promise<Writer> {
  const child = spawn(
    process.execPath,
    [
      '--conditions=source',
      '--import',
      'tsx',
      writerScript,
      dir,
      TEST_PASSPHRASE,
      machine,
      String(WRITE_MS),
      ...disks,
    ],
    { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  children.add(child);
  const w: Writer = { committed: new Map(), done: Promise.resolve() };
  let out = '';
  let err = '';
  let ready!: () => void;
  const readyP = new Promise<void>((r) => (ready = r));
  child.stderr?.on('data', (d: Buffer) => (err += d.toString()));
  child.stdout?.on('data', (d: Buffer) => {
    out += d.toString();
    const lines = out.split('\n');
    out = lines.pop() ?? '';
    for (const line of lines) {
      if (line === 'READY') ready();
      const m = /^COMMITTED ([0-9a-f]{32}) ([0-9a-f]{64})$/.exec(line);
      if (m !== null) {
        w.committed.set(m[1] as string, m[2] as string);
        onCommit(m[1] as string, m[2] as string);
      }
    }
  });
  w.done = new Promise<void>((resolve, reject) => {
    child.once('exit', (code) => {
      children.delete(child);
      if (code === 0) resolve();
      else reject(new Error(`writer ${machine} exited with ${code}: ${err}`));
    });
  });
  w.done.catch(() => undefined);
  await Promise.race([readyP, w.done]);
  return w;
}

/** Reads a whole point and checks it against its `sha` label; the large path too when big. */
async function checkPoint(store: Store, p: PointInfo | string, sha?: string): Promise<void> {
  const reader = await store.openPoint(typeof p === 'string' ? p : p.id);
  const data = await reader.readAt(0, reader.size);
  const want = sha ?? reader.point.labels['sha'];
  expect(createHash('sha256').update(data).digest('hex'), `point ${reader.point.id}`).toBe(want);
}

/** Checks points with a few reads in flight at once (as NBD clients and restores do). */
async function checkAll(store: Store, points: PointInfo[]): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: 4 }, async () => {
      while (next < points.length) await checkPoint(store, points[next++] as PointInfo);
    }),
  );
}

describe('concurrent readers and writers: index reloads', () => {
  it('every point a reader can see reads back byte-exact, fresh and long-lived readers alike', async () => {
    // Tiny packs and fanout 4: many packs, index objects and tree nodes per commit.
    t = await tempStore({ chunkSize: CS, packSize: 16 * 1024, treeFanout: 4 });
    // Opened before any commit: must find every later point by reloading its index.
    const longLived = await t.reopen();
    const byId = await t.reopen();
    // Each point as soon as its writer reports it, by id, without listing first.
    const direct: Array<Promise<void>> = [];
    const onCommit = (id: string, sha: string): void => {
      const p = checkPoint(byId, id, sha);
      p.catch(() => undefined); // awaited below
      direct.push(p);
    };
    const writers = await Promise.all([
      startWriter(t.dir, 'm1', ['vda:262144', 'vdb:1097728'], onCommit),
      startWriter(t.dir, 'm2', ['vda:262144', 'vdb:131072'], onCommit),
    ]);
    let stop = false;
    const done = Promise.all(writers.map((w) => w.done)).finally(() => (stop = true));
    let freshRounds = 0;
    let longRounds = 0;
    const fresh = (async () => {
      while (!stop) {
        const s = await t!.reopen();
        await checkAll(s, await s.listPoints());
        await s.close();
        freshRounds++;
      }
    })();
    const long = (async () => {
      while (!stop) {
        await checkAll(longLived, await longLived.listPoints());
        longRounds++;
      }
    })();
    await Promise.all([done, fresh, long]);
    await Promise.all(direct);
    // Afterwards every committed point is listed and byte-exact from a fresh instance.
    const last = await t.reopen();
    const points = await last.listPoints();
    const committed = new Map(writers.flatMap((w) => [...w.committed]));
    expect(points.length).toBe(committed.size);
    for (const p of points) expect(p.labels['sha']).toBe(committed.get(p.id));
    await checkAll(last, points);
    expect(committed.size).toBeGreaterThanOrEqual(4);
    expect(direct.length).toBe(committed.size);
    expect(freshRounds).toBeGreaterThan(0);
    expect(longRounds).toBeGreaterThan(0);
    expect((await last.verify()).ok).toBe(true);
  }, 90_000);

  it('a reader whose index reload is already running when a point appears reloads again for it', async () => {
    t = await tempStore({ chunkSize: CS });
    const writer = t.store;
    const first = await writer.beginWrite({ machine: 'm', disk: 'vda', size: 8 * CS });
    await first.write(0, pseudoRandom(8 * CS, 1));
    const p1 = await first.commit();
    // The reader's listing of index/ is taken, then held until the test releases it.
    const gated = new GatedBackend(new DirectoryBackend({ path: t.dir }));
    const reader = await Store.open({ backend: gated, passphrase: TEST_PASSPHRASE });
    try {
      const held = gated.holdNextIndexListing();
      const firstRead = (await reader.openPoint(p1.id)).readAt(0, 8 * CS);
      await held.listed;
      // Committed after the running reload listed index/: that listing cannot contain it.
      const second = await writer.beginWrite({ machine: 'm', disk: 'vdb', size: 8 * CS });
      await second.write(0, pseudoRandom(8 * CS, 2));
      const p2 = await second.commit();
      const secondRead = (await reader.openPoint(p2.id)).readAt(0, 8 * CS);
      held.release();
      expect((await firstRead).equals(pseudoRandom(8 * CS, 1))).toBe(true);
      expect((await secondRead).equals(pseudoRandom(8 * CS, 2))).toBe(true);
    } finally {
      await reader.close();
    }
  });

  it("a full index reload keeps the index objects this process's own session published meanwhile", async () => {
    t = await tempStore({ chunkSize: CS, packSize: CS });
    const gated = new GatedBackend(new DirectoryBackend({ path: t.dir }));
    const store = await Store.open({
      backend: gated,
      passphrase: TEST_PASSPHRASE,
      indexEveryBlobs: 1,
    });
    try {
      const session = await store.beginWrite({ machine: 'm', disk: 'vda', size: 4 * CS });
      const held = gated.holdNextIndexListing();
      const reload = store.refreshIndex(true);
      await held.listed;
      // One chunk fills a pack; its upload publishes an index object while the reload waits.
      const data = pseudoRandom(CS, 3);
      await session.write(0, data);
      const id = store.crypto.chunkId(data);
      for (let i = 0; i < 500 && !store.index.has(id); i++)
        await new Promise((r) => setTimeout(r, 10));
      expect(store.index.has(id)).toBe(true);
      held.release();
      await reload;
      expect(store.index.has(id), 'published blob dropped by the reload').toBe(true);
      await session.commit();
    } finally {
      await store.close();
    }
  });
});

/** A backend whose next listing of index/ can be held after it was taken (tests a race). */
class GatedBackend implements ObjectBackend {
  readonly location: string;
  private gate: { listed: () => void; wait: Promise<void> } | undefined;

  constructor(private readonly inner: ObjectBackend) {
    this.location = inner.location;
  }

  holdNextIndexListing(): { listed: Promise<void>; release: () => void } {
    let listed!: () => void;
    let release!: () => void;
    const listedP = new Promise<void>((r) => (listed = r));
    const wait = new Promise<void>((r) => (release = r));
    this.gate = { listed, wait };
    return { listed: listedP, release };
  }

  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    const items: ObjectInfo[] = [];
    for await (const o of this.inner.list(prefix)) items.push(o);
    const gate = prefix === 'index/' ? this.gate : undefined;
    if (gate !== undefined) {
      this.gate = undefined;
      gate.listed();
      await gate.wait;
    }
    yield* items;
  }

  put(...a: Parameters<ObjectBackend['put']>): Promise<void> {
    return this.inner.put(...a);
  }
  get(...a: Parameters<ObjectBackend['get']>): Promise<Buffer> {
    return this.inner.get(...a);
  }
  getRange(...a: Parameters<ObjectBackend['getRange']>): Promise<Buffer> {
    return this.inner.getRange(...a);
  }
  stat(key: string): Promise<ObjectInfo | undefined> {
    return this.inner.stat(key);
  }
  delete(key: string): Promise<void> {
    return this.inner.delete(key);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}
