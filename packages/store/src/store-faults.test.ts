import { readFile, readdir, truncate, unlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { isLifeboatError } from '@lifeboat/protocol';
import type { LifeboatError } from '@lifeboat/protocol';
import { DirectoryBackend } from './directory-backend.js';
import type { ObjectBackend, ObjectWriter, PutOptions } from './object-backend.js';
import { packKey } from './object-format.js';
import { BlobType } from './store-crypto.js';
import { Store } from './store.js';
import type { PointInfo } from './store-types.js';
import type { TempStore } from './test-support.js';
import { TEST_PASSPHRASE, pseudoRandom, tempStore } from './test-support.js';

const CS = 4096;
const SIZE = CS * 64;
let t: TempStore | undefined;
afterEach(async () => {
  await t?.cleanup();
  t = undefined;
});

/** A store with two points of one disk; the second changes chunks 8..15. */
async function twoPoints(): Promise<{
  t: TempStore;
  p1: PointInfo;
  p2: PointInfo;
  d1: Buffer;
  d2: Buffer;
}> {
  const ts = await tempStore({ chunkSize: CS, packSize: 64 * 1024 });
  const d1 = pseudoRandom(SIZE, 7);
  const s1 = await ts.store.beginWrite({ machine: 'm', disk: 'vda', size: SIZE });
  await s1.write(0, d1);
  const p1 = await s1.commit();
  const d2 = Buffer.from(d1);
  pseudoRandom(CS * 8, 8).copy(d2, CS * 8);
  const s2 = await ts.store.beginWrite({ machine: 'm', disk: 'vda', size: SIZE });
  await s2.write(CS * 8, d2.subarray(CS * 8, CS * 16));
  const p2 = await s2.commit();
  return { t: ts, p1, p2, d1, d2 };
}

function code(c: string): (e: unknown) => boolean {
  return (e) => isLifeboatError(e, c);
}

async function caught(p: Promise<unknown>): Promise<LifeboatError> {
  try {
    await p;
  } catch (err) {
    if (isLifeboatError(err)) return err;
    throw err;
  }
  throw new Error('expected a rejection');
}

async function flipByte(file: string, at: number): Promise<void> {
  const buf = await readFile(file);
  buf[at] = (buf[at] ?? 0) ^ 0x40;
  await writeFile(file, buf);
}

/** Where data chunk `j` of a point lives (via its chunk id). */
async function chunkLocation(
  store: Store,
  point: string,
  j: number,
): Promise<{ key: string; offset: number }> {
  const r = await store.openPoint(point);
  for await (const c of r.chunkIds()) {
    if (c.offset === j * CS && c.id !== null) {
      const loc = store.index.get(Buffer.from(c.id, 'hex'));
      if (loc === undefined) throw new Error('chunk not indexed');
      return { key: packKey(loc.pack), offset: loc.offset };
    }
  }
  throw new Error('no such chunk');
}

describe('bad input and faults give a coded error naming what is affected', () => {
  it('wrong passphrase', async () => {
    t = await tempStore();
    const err = await caught(t.reopen('not the passphrase'));
    expect(err.code).toBe('LB_STORE_WRONG_PASSPHRASE');
    expect(err.message).toMatch(/passphrase/);
  });

  it('no store, and init over an existing store', async () => {
    t = await tempStore();
    await expect(
      Store.open({
        backend: new DirectoryBackend({ path: join(t.dir, 'empty') }),
        passphrase: 'x',
      }),
    ).rejects.toSatisfy(code('LB_STORE_NOT_FOUND'));
    await expect(
      Store.init({
        backend: new DirectoryBackend({ path: t.dir }),
        passphrase: 'x',
        kdfCost: 1024,
      }),
    ).rejects.toSatisfy(code('LB_STORE_EXISTS'));
  });

  it('unknown format version of the config, an index and a point object', async () => {
    const f = await twoPoints();
    t = f.t;
    const point = join(t.dir, 'points', f.p1.id);
    const pbuf = await readFile(point);
    pbuf[3] = 9;
    await writeFile(point, pbuf);
    const s = await t.reopen();
    const perr = await caught(s.openPoint(f.p1.id));
    expect(perr.code).toBe('LB_STORE_UNSUPPORTED_VERSION');
    expect(perr.details['object']).toBe(`points/${f.p1.id}`);
    const [index] = await readdir(join(t.dir, 'index'));
    const ifile = join(t.dir, 'index', index as string);
    const ibuf = await readFile(ifile);
    ibuf[3] = 7;
    await writeFile(ifile, ibuf);
    const s2 = await t.reopen();
    const ierr = await caught((await s2.openPoint(f.p2.id)).readAt(0, CS));
    expect(ierr.code).toBe('LB_STORE_UNSUPPORTED_VERSION');
    expect(ierr.details['object']).toBe(`index/${index as string}`);
    const cfgFile = join(t.dir, 'config');
    const cfg = JSON.parse(await readFile(cfgFile, 'utf8')) as Record<string, unknown>;
    await writeFile(cfgFile, JSON.stringify({ ...cfg, version: 2 }));
    const err = await caught(t.reopen());
    expect(err.code).toBe('LB_STORE_UNSUPPORTED_VERSION');
    expect(err.message).toMatch(/version 2/);
  });

  it('a changed config field fails its MAC', async () => {
    t = await tempStore();
    const cfgFile = join(t.dir, 'config');
    const cfg = JSON.parse(await readFile(cfgFile, 'utf8')) as Record<string, unknown>;
    await writeFile(cfgFile, JSON.stringify({ ...cfg, chunkSize: 8192 }));
    await expect(t.reopen()).rejects.toSatisfy(code('LB_STORE_CORRUPT_CONFIG'));
  });

  it('a damaged key object is told apart from a wrong passphrase', async () => {
    t = await tempStore();
    const [key] = await readdir(join(t.dir, 'keys'));
    const file = join(t.dir, 'keys', key as string);
    const k = JSON.parse(await readFile(file, 'utf8')) as Record<string, unknown>;
    await writeFile(file, JSON.stringify({ ...k, salt: Buffer.alloc(16, 1).toString('base64') }));
    await expect(t.reopen()).rejects.toSatisfy(code('LB_STORE_CORRUPT_KEY'));
  });

  it('a flipped byte in a pack: reads of that chunk fail naming point, offset and pack; verify lists the points', async () => {
    const f = await twoPoints();
    t = f.t;
    // Chunk 2 is shared by both points.
    const loc = await chunkLocation(t.store, f.p2.id, 2);
    await flipByte(join(t.dir, ...loc.key.split('/')), loc.offset + 20);
    const s = await t.reopen();
    const r = await s.openPoint(f.p2.id);
    const err = await caught(r.readAt(CS * 2 + 100, 10));
    expect(err.code).toBe('LB_STORE_CORRUPT_CHUNK');
    expect(err.details).toMatchObject({ point: f.p2.id, offset: CS * 2, object: loc.key });
    const serr = await caught(
      (async () => {
        for await (const _ of r.stream()) void _;
      })(),
    );
    expect(serr.code).toBe('LB_STORE_CORRUPT_CHUNK');
    // Other ranges still read byte-exact.
    expect((await r.readAt(CS * 8, CS * 8)).equals(f.d2.subarray(CS * 8, CS * 16))).toBe(true);
    const report = await s.verify();
    expect(report.ok).toBe(false);
    expect(report.faults).toHaveLength(1);
    expect(report.faults[0]).toMatchObject({ code: 'LB_STORE_CORRUPT_CHUNK', object: loc.key });
    expect(report.faults[0]?.points.sort()).toEqual([f.p1.id, f.p2.id].sort());
  });

  it('a flipped byte in a tree node', async () => {
    const f = await twoPoints();
    t = f.t;
    const tree = [...t.store.index.entries()].filter(([, l]) => l.type === BlobType.Tree);
    expect(tree.length).toBeGreaterThan(0);
    for (const [, l] of tree)
      await flipByte(join(t.dir, ...packKey(l.pack).split('/')), l.offset + 15);
    const s = await t.reopen();
    const r = await s.openPoint(f.p1.id);
    const err = await caught(r.readAt(0, CS));
    expect(err.code).toBe('LB_STORE_CORRUPT_TREE');
    expect(err.details['point']).toBe(f.p1.id);
    expect(String(err.details['object'])).toMatch(/^packs\//);
    const report = await s.verify();
    expect(report.faults.map((x) => x.code)).toContain('LB_STORE_CORRUPT_TREE');
    expect(report.faults.flatMap((x) => x.points).sort()).toEqual([f.p1.id, f.p2.id].sort());
  });

  it('a flipped byte in a point object: that point fails, the others list and read', async () => {
    const f = await twoPoints();
    t = f.t;
    await flipByte(join(t.dir, 'points', f.p1.id), 30);
    const s = await t.reopen();
    const err = await caught(s.openPoint(f.p1.id));
    expect(err.code).toBe('LB_STORE_CORRUPT_POINT');
    expect(err.details).toMatchObject({ point: f.p1.id, object: `points/${f.p1.id}` });
    expect((await s.listPoints()).map((p) => p.id)).toEqual([f.p2.id]);
    expect(s.damagedPointObjects().map((d) => d.id)).toEqual([f.p1.id]);
    expect((await (await s.openPoint(f.p2.id)).readAt(0, SIZE)).equals(f.d2)).toBe(true);
    const report = await s.verify();
    expect(report.faults).toEqual([
      expect.objectContaining({ code: 'LB_STORE_CORRUPT_POINT', points: [f.p1.id] }),
    ]);
    await expect(s.gc()).rejects.toSatisfy(code('LB_STORE_CORRUPT_POINT'));
  });

  it('a flipped byte in an index object: reads name the index; gc rebuilds it from the packs', async () => {
    const f = await twoPoints();
    t = f.t;
    const indexes = await readdir(join(t.dir, 'index'));
    expect(indexes.length).toBe(2);
    for (const i of indexes) await flipByte(join(t.dir, 'index', i), 40);
    const s = await t.reopen();
    const r = await s.openPoint(f.p2.id);
    const err = await caught(r.readAt(0, CS));
    expect(err.code).toBe('LB_STORE_CORRUPT_INDEX');
    expect(String(err.details['object'])).toMatch(/^index\//);
    expect(err.details['point']).toBe(f.p2.id);
    const report = await s.verify();
    expect(report.faults.map((x) => x.code)).toContain('LB_STORE_CORRUPT_INDEX');
    await s.gc();
    const s2 = await t.reopen();
    expect((await s2.verify()).ok).toBe(true);
    expect((await (await s2.openPoint(f.p1.id)).readAt(0, SIZE)).equals(f.d1)).toBe(true);
    expect((await (await s2.openPoint(f.p2.id)).readAt(0, SIZE)).equals(f.d2)).toBe(true);
  });

  it('a missing pack and a truncated pack', async () => {
    const f = await twoPoints();
    t = f.t;
    // Chunk 20 is shared by both points; its pack holds no tree node (those come last).
    const gone = await chunkLocation(t.store, f.p1.id, 20);
    const short = await chunkLocation(t.store, f.p1.id, 0);
    expect(gone.key).not.toBe(short.key);
    await unlink(join(t.dir, ...gone.key.split('/')));
    await truncate(join(t.dir, ...short.key.split('/')), short.offset + 10);
    const s = await t.reopen();
    const r2 = await s.openPoint(f.p2.id);
    const e1 = await caught(r2.readAt(CS * 20, CS));
    expect(e1.code).toBe('LB_STORE_MISSING_OBJECT');
    expect(e1.details).toMatchObject({ point: f.p2.id, offset: CS * 20, object: gone.key });
    const r1 = await s.openPoint(f.p1.id);
    const e2 = await caught(r1.readAt(0, CS));
    expect(e2.code).toBe('LB_STORE_TRUNCATED_OBJECT');
    expect(e2.details).toMatchObject({ point: f.p1.id, offset: 0, object: short.key });
    const report = await s.verify();
    const byCode = new Map(report.faults.map((x) => [x.code, x]));
    expect(byCode.get('LB_STORE_MISSING_OBJECT')?.object).toBe(gone.key);
    expect(byCode.get('LB_STORE_MISSING_OBJECT')?.points).toEqual([f.p1.id, f.p2.id].sort());
    expect(byCode.get('LB_STORE_TRUNCATED_OBJECT')?.object).toBe(short.key);
  });

  it('a write that fails half-way fails the session: no point can be committed from it', async () => {
    const f = await twoPoints();
    t = f.t;
    // Damage the base chunk a partial write must merge with.
    const loc = await chunkLocation(t.store, f.p2.id, 3);
    await flipByte(join(t.dir, ...loc.key.split('/')), loc.offset + 20);
    const s = await t.reopen();
    const w = await s.beginWrite({ machine: 'm', disk: 'vda', size: SIZE });
    await expect(w.write(CS * 3 + 10, Buffer.alloc(10, 1))).rejects.toSatisfy(
      code('LB_STORE_CORRUPT_CHUNK'),
    );
    await expect(w.commit()).rejects.toSatisfy(code('LB_STORE_SESSION_CLOSED'));
    await w.abort();
    expect((await s.listPoints()).map((p) => p.id)).toEqual([f.p1.id, f.p2.id]);
    // Bad arguments do not fail the session.
    const w2 = await s.beginWrite({ machine: 'm', disk: 'vda', size: SIZE });
    await expect(w2.write(SIZE, Buffer.alloc(1))).rejects.toSatisfy(code('LB_STORE_OUT_OF_RANGE'));
    await w2.write(0, Buffer.alloc(CS, 2));
    await w2.commit();
  });

  it('a truncated point object', async () => {
    const f = await twoPoints();
    t = f.t;
    await truncate(join(t.dir, 'points', f.p2.id), 20);
    const s = await t.reopen();
    await expect(s.getPoint(f.p2.id)).rejects.toSatisfy(code('LB_STORE_CORRUPT_POINT'));
    await expect(s.getPoint('0'.repeat(32))).rejects.toSatisfy(code('LB_STORE_POINT_NOT_FOUND'));
  });

  it('a backend failing mid-commit: no point, earlier points intact, gc removes the garbage', async () => {
    for (const failAfter of [0, 2, 4, 5, 6]) {
      const f = await twoPoints();
      t = f.t;
      const before = await listFiles(t.dir);
      const backend = new FailingBackend(new DirectoryBackend({ path: t.dir }), failAfter);
      const s = await Store.open({ backend, passphrase: TEST_PASSPHRASE });
      const w = await s.beginWrite({ machine: 'm', disk: 'vda', size: SIZE });
      // 4 packs fill during the write, then commit puts a pack (tree), the index, the point.
      backend.arm();
      await expect(
        (async () => {
          await w.write(0, pseudoRandom(SIZE, 99));
          await w.commit();
        })(),
      ).rejects.toThrow(/injected/);
      await w.abort();
      backend.disarm();
      await s.close();
      await expectOnlyEarlierPoints(f, before);
      await t.cleanup();
      t = undefined;
    }
  });
  it('a streamed pack failing at any append or at its commit: no point, no file left over', async () => {
    // Every operation of the session in turn fails, until one run has none left to fail.
    for (let failAt = 0; ; failAt++) {
      expect(failAt).toBeLessThan(200);
      const f = await twoPoints();
      t = f.t;
      const before = await listFiles(t.dir);
      const backend = new FailingBackend(new DirectoryBackend({ path: t.dir }), failAt, true);
      const s = await Store.open({ backend, passphrase: TEST_PASSPHRASE });
      const w = await s.beginWrite({ machine: 'm', disk: 'vda', size: SIZE });
      const d3 = pseudoRandom(SIZE, 99);
      backend.arm();
      const committed = await (async () => {
        await w.write(0, d3);
        return w.commit();
      })().catch((err: unknown) => {
        expect(String(err)).toMatch(/injected/);
        return undefined;
      });
      backend.disarm();
      if (committed === undefined) await w.abort();
      await s.close();
      // No temporary file of a streamed pack is left behind, committed or not.
      expect((await allNames(t.dir)).filter((n) => n.includes('.tmp-'))).toEqual([]);
      if (committed !== undefined) {
        // The run with nothing left to fail: the streamed packs read back byte-exact.
        const s2 = await t.reopen();
        expect((await s2.listPoints()).map((p) => p.id)).toEqual([f.p1.id, f.p2.id, committed.id]);
        expect((await (await s2.openPoint(f.p1.id)).readAt(0, SIZE)).equals(f.d1)).toBe(true);
        expect((await (await s2.openPoint(f.p2.id)).readAt(0, SIZE)).equals(f.d2)).toBe(true);
        expect((await (await s2.openPoint(committed.id)).readAt(0, SIZE)).equals(d3)).toBe(true);
        expect(backend.done).toBeGreaterThan(8);
        expect((await s2.verify()).ok).toBe(true);
        break;
      }
      await expectOnlyEarlierPoints(f, before);
      await t.cleanup();
      t = undefined;
    }
  });
});

/**
 * After a session that failed on top of {@link twoPoints}: only the two earlier points list,
 * both read byte-exact, and after gc every pack left is one that existed before the session
 * (`before`), no lock is left, and verify passes.
 */
async function expectOnlyEarlierPoints(
  f: Awaited<ReturnType<typeof twoPoints>>,
  before: string[],
): Promise<void> {
  const s2 = await f.t.reopen();
  expect((await s2.listPoints()).map((p) => p.id)).toEqual([f.p1.id, f.p2.id]);
  expect((await (await s2.openPoint(f.p1.id)).readAt(0, SIZE)).equals(f.d1)).toBe(true);
  expect((await (await s2.openPoint(f.p2.id)).readAt(0, SIZE)).equals(f.d2)).toBe(true);
  await s2.gc();
  const after = (await listFiles(f.t.dir)).filter((k) => !k.startsWith('index/'));
  expect(after.filter((k) => k.startsWith('packs/')).every((k) => before.includes(k))).toBe(true);
  expect(after.filter((k) => k.startsWith('locks/'))).toEqual([]);
  expect((await s2.verify()).ok).toBe(true);
}

/** Every file name under `dir`, temporary ones too, relative to it. */
async function allNames(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { recursive: true, withFileTypes: true });
  return entries
    .filter((e) => e.isFile())
    .map((e) => join(e.parentPath, e.name).slice(dir.length + 1));
}

async function listFiles(dir: string): Promise<string[]> {
  const b = new DirectoryBackend({ path: dir });
  const out: string[] = [];
  for await (const o of b.list('')) out.push(o.key);
  return out.sort();
}

/**
 * Wraps a backend; once armed, puts (other than locks) fail after `n` succeeded. With
 * `streamed`, it also writes objects in pieces (`openWrite`), and each append and commit of
 * such an object counts as one more operation that may fail.
 */
class FailingBackend implements ObjectBackend {
  readonly location: string;
  openWrite?: (key: string) => Promise<ObjectWriter>;
  private armed = false;
  private left = 0;
  /** Operations that went through while armed. */
  done = 0;
  constructor(
    private readonly inner: ObjectBackend,
    private readonly n: number,
    streamed = false,
  ) {
    this.location = inner.location;
    const openWrite = inner.openWrite?.bind(inner);
    if (streamed && openWrite !== undefined) {
      this.openWrite = async (key) => {
        const w = await openWrite(key);
        return {
          append: async (data) => {
            this.step(`append to ${key}`);
            await w.append(data);
          },
          commit: async () => {
            this.step(`commit of ${key}`);
            await w.commit();
          },
          abort: () => w.abort(),
        };
      };
    }
  }
  private step(what: string): void {
    if (!this.armed) return;
    if (this.left === 0) throw new Error(`injected failure on ${what}`);
    this.left--;
    this.done++;
  }
  arm(): void {
    this.armed = true;
    this.left = this.n;
  }
  disarm(): void {
    this.armed = false;
  }
  async put(key: string, data: Uint8Array, options?: PutOptions): Promise<void> {
    if (!key.startsWith('locks/')) this.step(`put ${key}`);
    return this.inner.put(key, data, options);
  }
  get(key: string, signal?: AbortSignal): Promise<Buffer> {
    return this.inner.get(key, signal);
  }
  getRange(key: string, offset: number, length: number, signal?: AbortSignal): Promise<Buffer> {
    return this.inner.getRange(key, offset, length, signal);
  }
  stat(key: string): ReturnType<ObjectBackend['stat']> {
    return this.inner.stat(key);
  }
  list(prefix: string): AsyncIterable<{ key: string; size: number }> {
    return this.inner.list(prefix);
  }
  delete(key: string): Promise<void> {
    return this.inner.delete(key);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}
