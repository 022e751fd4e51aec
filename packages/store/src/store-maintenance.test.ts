import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { isLifeboatError } from '@lifeboat/protocol';
import type { TempStore } from './test-support.js';
import { TEST_PASSPHRASE, pseudoRandom, tempStore, writeLockObject } from './test-support.js';
import type { Store } from './store.js';

const CS = 4096;
let t: TempStore | undefined;
afterEach(async () => {
  await t?.cleanup();
  t = undefined;
});
const code = (c: string) => (e: unknown) => isLifeboatError(e, c);

async function commitDisk(store: Store, disk: string, data: Buffer, time?: Date): Promise<string> {
  const s = await store.beginWrite({ machine: 'm', disk, size: data.length });
  await s.write(0, data);
  return (await s.commit(time === undefined ? {} : { time })).id;
}

async function files(dir: string, sub: string): Promise<string[]> {
  try {
    const out: string[] = [];
    for (const e of await readdir(join(dir, sub), { recursive: true, withFileTypes: true })) {
      if (e.isFile()) out.push(e.name);
    }
    return out.sort();
  } catch {
    return [];
  }
}

describe('stats, prune, gc, passphrase, locks, concurrent writers', () => {
  it('stats count deduplicated data once', async () => {
    t = await tempStore({ chunkSize: CS, packSize: 64 * 1024 });
    const data = Buffer.concat([pseudoRandom(CS * 16, 1), Buffer.alloc(CS * 16)]);
    await commitDisk(t.store, 'a', data);
    await commitDisk(t.store, 'b', data);
    const st = await t.store.stats();
    expect(st).toMatchObject({
      points: 2,
      machines: 1,
      disks: 2,
      logicalBytes: 2 * data.length,
      uniqueBytes: CS * 16,
      chunks: 16,
    });
    expect(st.storedBytes).toBeGreaterThan(CS * 16);
    expect(st.storedBytes).toBeLessThan(CS * 16 * 1.5);
    expect(st.dedupRatio).toBeGreaterThan(3);
    expect(st.packs).toBeGreaterThan(0);
  });

  it('prune removes points by policy; gc frees their data and repacks sparse packs', async () => {
    t = await tempStore({ chunkSize: CS, packSize: 64 * 1024 });
    const store = t.store;
    const t0 = Date.UTC(2026, 0, 1);
    const ids: string[] = [];
    for (let i = 0; i < 6; i++)
      ids.push(
        await commitDisk(
          store,
          'vda',
          pseudoRandom(CS * 32, 100 + i),
          new Date(t0 + i * 3_600_000),
        ),
      );
    const dry = await store.prune({ rules: [{ for: '90m' }] }, { dryRun: true });
    expect(dry.removed.map((p) => p.id)).toEqual(ids.slice(0, 4));
    expect((await store.listPoints()).length).toBe(6);
    const before = (await store.stats()).storedBytes;
    const report = await store.prune({ rules: [{ for: '90m' }] });
    expect(report.kept.map((p) => p.id).sort()).toEqual(ids.slice(4).sort());
    const gc = await store.gc();
    expect(gc.packsDeleted).toBeGreaterThan(0);
    expect(gc.bytesFreed).toBeGreaterThan(CS * 32 * 3);
    expect((await store.stats()).storedBytes).toBeLessThan(before / 2);
    expect((await store.verify()).ok).toBe(true);
    const r = await store.openPoint(ids[5] as string);
    expect((await r.readAt(0, CS * 32)).equals(pseudoRandom(CS * 32, 105))).toBe(true);
    // Overwrite most of the last point in a new one, delete the old: its packs become sparse.
    const s = await store.beginWrite({ machine: 'm', disk: 'vda', size: CS * 32 });
    await s.write(0, pseudoRandom(CS * 28, 7));
    const last = await s.commit({ time: new Date(t0 + 7 * 3_600_000) });
    await store.deletePoints([ids[4] as string, ids[5] as string]);
    const gc2 = await store.gc();
    expect(gc2.packsRepacked + gc2.packsDeleted).toBeGreaterThan(0);
    const want = Buffer.concat([
      pseudoRandom(CS * 28, 7),
      pseudoRandom(CS * 32, 105).subarray(CS * 28),
    ]);
    const again = await t.reopen();
    expect((await (await again.openPoint(last.id)).readAt(0, CS * 32)).equals(want)).toBe(true);
    expect((await again.verify()).ok).toBe(true);
  });

  it('changes the passphrase without rewriting data', async () => {
    t = await tempStore({ chunkSize: CS });
    const id = await commitDisk(t.store, 'vda', pseudoRandom(CS * 8, 3));
    const packs = await files(t.dir, 'packs');
    await t.store.changePassphrase('new secret');
    await expect(t.reopen(TEST_PASSPHRASE)).rejects.toSatisfy(code('LB_STORE_WRONG_PASSPHRASE'));
    const s = await t.reopen('new secret');
    expect((await (await s.openPoint(id)).readAt(0, CS * 8)).equals(pseudoRandom(CS * 8, 3))).toBe(
      true,
    );
    expect(await files(t.dir, 'packs')).toEqual(packs);
    expect((await files(t.dir, 'keys')).length).toBe(1);
  });

  it('gc waits for no writer: a writer blocks gc, gc blocks writers, dead holders expire', async () => {
    t = await tempStore({ chunkSize: CS, locks: { sharedWaitMs: 300 } });
    const w = await t.store.beginWrite({ machine: 'm', disk: 'vda', size: CS * 4 });
    await w.write(0, pseudoRandom(CS * 4, 1));
    const other = await t.reopen(TEST_PASSPHRASE, {
      locks: { sharedWaitMs: 300, exclusiveWaitMs: 300 },
    });
    await expect(other.gc()).rejects.toSatisfy(code('LB_STORE_LOCKED'));
    await w.commit();
    await other.gc();
    // gc waits for a running writer; meanwhile a new writer waits for gc, then proceeds.
    const patient = await t.reopen(TEST_PASSPHRASE, {
      locks: { exclusiveWaitMs: 60_000, sharedWaitMs: 60_000 },
    });
    const running = await t.store.beginWrite({ machine: 'm', disk: 'vda', size: CS * 4 });
    const gcDone = patient.gc();
    let gcFinished = false;
    void gcDone.then(() => (gcFinished = true));
    await new Promise((r) => setTimeout(r, 300));
    expect(gcFinished).toBe(false);
    await running.write(0, pseudoRandom(CS * 4, 2));
    const p = await running.commit();
    await gcDone;
    const after = await patient.beginWrite({ machine: 'm', disk: 'vda', size: CS * 4 });
    await after.abort();
    expect(
      (await (await patient.openPoint(p.id)).readAt(0, CS * 4)).equals(pseudoRandom(CS * 4, 2)),
    ).toBe(true);
    // A lock left by a dead process on this host does not block; gc removes it.
    await writeLockObject(t.dir, 'ffffffffffffffffffffffffffffffff', {
      host: (await import('node:os')).hostname(),
      pid: 2 ** 22 + 12345,
    });
    const w2 = await t.store.beginWrite({ machine: 'm', disk: 'vda', size: CS * 4 });
    await w2.abort();
    // A live exclusive lock (an old time makes it stale; a fresh one from another host is live).
    await writeLockObject(t.dir, 'eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee');
    await expect(t.store.beginWrite({ machine: 'm', disk: 'vda', size: CS * 4 })).rejects.toSatisfy(
      code('LB_STORE_LOCKED'),
    );
    await writeLockObject(t.dir, 'eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee', {
      created: '2020-01-01T00:00:00Z',
      time: '2020-01-01T00:00:00Z',
    });
    const w3 = await t.store.beginWrite({ machine: 'm', disk: 'vda', size: CS * 4 });
    await w3.abort();
    await other.gc();
    expect(await files(t.dir, 'locks')).toEqual([]);
  });

  it('a writer whose lock was removed commits nothing', async () => {
    t = await tempStore({ chunkSize: CS });
    const w = await t.store.beginWrite({ machine: 'm', disk: 'vda', size: CS * 4 });
    await w.write(0, pseudoRandom(CS * 4, 1));
    for (const f of await files(t.dir, 'locks'))
      await (await import('node:fs/promises')).unlink(join(t.dir, 'locks', f));
    await expect(w.commit()).rejects.toSatisfy(code('LB_STORE_LOCK_LOST'));
    expect(await t.store.listPoints()).toEqual([]);
    await expect(w.write(0, Buffer.alloc(512))).rejects.toSatisfy(code('LB_STORE_SESSION_CLOSED'));
    // A writer that stalled past the stale time never revives its lock.
    const slow = await t.reopen(TEST_PASSPHRASE, { locks: { staleMs: 200, refreshMs: 60_000 } });
    const w2 = await slow.beginWrite({ machine: 'm', disk: 'vda', size: CS * 4 });
    await w2.write(0, pseudoRandom(CS * 4, 2));
    await new Promise((r) => setTimeout(r, 400));
    await expect(w2.commit()).rejects.toSatisfy(code('LB_STORE_LOCK_LOST'));
    expect(await slow.listPoints()).toEqual([]);
  });

  it('several writers on different disks at once, from two store handles, interleaved', async () => {
    t = await tempStore({ chunkSize: CS, packSize: 32 * 1024 });
    const a = t.store;
    const b = await t.reopen();
    const shared = pseudoRandom(CS * 8, 42);
    const sessions = await Promise.all([
      a.beginWrite({ machine: 'm1', disk: 'vda', size: CS * 24 }),
      a.beginWrite({ machine: 'm1', disk: 'vdb', size: CS * 24 }),
      b.beginWrite({ machine: 'm2', disk: 'vda', size: CS * 24 }),
    ]);
    const want = sessions.map((_, i) => Buffer.concat([shared, pseudoRandom(CS * 16, i + 1)]));
    for (let off = 0; off < CS * 24; off += CS * 4) {
      await Promise.all(
        sessions.map((s, i) => s.write(off, (want[i] as Buffer).subarray(off, off + CS * 4))),
      );
    }
    // Nothing is visible before commit.
    expect(await a.listPoints()).toEqual([]);
    const points = await Promise.all(sessions.map((s) => s.commit()));
    const c = await t.reopen();
    expect((await c.listPoints()).length).toBe(3);
    for (let i = 0; i < 3; i++) {
      const r = await c.openPoint((points[i] as { id: string }).id);
      expect((await r.readAt(0, CS * 24)).equals(want[i] as Buffer)).toBe(true);
    }
    await c.gc();
    expect((await c.verify()).ok).toBe(true);
    expect((await c.listPoints()).length).toBe(3);
  });

  it("a writer whose index is not listed again per session still notices another handle's gc: it never deduplicates against data gc deleted", async () => {
    t = await tempStore({ chunkSize: CS });
    const a = t.store;
    const data = pseudoRandom(16 * CS, 77);
    const w1 = await a.beginWrite({ machine: 'm', disk: 'd', size: 16 * CS });
    await w1.write(0, data);
    const p1 = await w1.commit();
    // A second session of this handle: it took gc's mark and its listing just now.
    const w2 = await a.beginWrite({ machine: 'm', disk: 'e', size: 16 * CS });
    await w2.write(0, pseudoRandom(16 * CS, 78));
    await w2.commit();
    const b = await t.reopen();
    await b.deletePoints([p1.id]);
    const gc = await b.gc();
    expect(gc.packsDeleted + gc.packsRepacked).toBeGreaterThan(0);
    // The same bytes again through the first handle, whose index listed p1's chunks.
    const w3 = await a.beginWrite({ machine: 'm', disk: 'f', size: 16 * CS });
    await w3.write(0, data);
    const p3 = await w3.commit();
    const c = await t.reopen();
    const reader = await c.openPoint(p3.id);
    expect(Buffer.from(await reader.readAt(0, 16 * CS)).equals(data)).toBe(true);
    const report = await c.verify();
    expect(report.ok).toBe(true);
  });

  it('a store opened earlier reads points committed later by another handle, and after its gc', async () => {
    t = await tempStore({ chunkSize: CS, packSize: 16 * 1024 });
    const reader = await t.reopen();
    expect(await reader.listPoints()).toEqual([]);
    const id1 = await commitDisk(t.store, 'vda', pseudoRandom(CS * 16, 5));
    const r1 = await reader.openPoint((await reader.listPoints())[0]?.id ?? '');
    expect((await r1.readAt(0, CS * 16)).equals(pseudoRandom(CS * 16, 5))).toBe(true);
    // A second point replaces most data; gc by the writer repacks what the reader indexed.
    const s = await t.store.beginWrite({ machine: 'm', disk: 'vda', size: CS * 16 });
    await s.write(0, pseudoRandom(CS * 14, 6));
    const p2 = await s.commit();
    await t.store.deletePoints([id1]);
    const report = await t.store.gc();
    expect(report.packsDeleted + report.packsRepacked).toBeGreaterThan(0);
    const want = Buffer.concat([
      pseudoRandom(CS * 14, 6),
      pseudoRandom(CS * 16, 5).subarray(CS * 14),
    ]);
    const r2 = await reader.openPoint(p2.id);
    expect((await r2.readAt(0, CS * 16)).equals(want)).toBe(true);
    const parts: Buffer[] = [];
    for await (const c of r2.stream()) parts.push(c as Buffer);
    expect(Buffer.concat(parts).equals(want)).toBe(true);
  });

  it('rejects bad arguments with coded errors', async () => {
    t = await tempStore({ chunkSize: CS });
    await expect(t.store.beginWrite({ machine: 'm', disk: 'd', size: 1000 })).rejects.toSatisfy(
      code('LB_STORE_INVALID_ARGUMENT'),
    );
    await expect(t.store.beginWrite({ machine: '', disk: 'd', size: 1024 })).rejects.toSatisfy(
      code('LB_STORE_INVALID_ARGUMENT'),
    );
    const w = await t.store.beginWrite({ machine: 'm', disk: 'd', size: 1024 });
    await expect(w.write(1000, Buffer.alloc(100))).rejects.toSatisfy(code('LB_STORE_OUT_OF_RANGE'));
    await expect(w.write(-1, Buffer.alloc(1))).rejects.toSatisfy(code('LB_STORE_INVALID_ARGUMENT'));
    await expect(w.commit({ time: new Date('nonsense') })).rejects.toSatisfy(
      code('LB_STORE_INVALID_ARGUMENT'),
    );
    const p = await w.commit();
    const r = await t.store.openPoint(p.id);
    await expect(r.readAt(512, 1024)).rejects.toSatisfy(code('LB_STORE_OUT_OF_RANGE'));
    expect((await r.readAt(0, 1024)).equals(Buffer.alloc(1024))).toBe(true);
    await expect(t.store.prune({ rules: [{ for: 'forever' }] })).rejects.toSatisfy(
      code('LB_STORE_INVALID_POLICY'),
    );
    await expect(t.store.openPoint('xyz')).rejects.toSatisfy(code('LB_STORE_POINT_NOT_FOUND'));
    expect(() => t?.store.chunkIdOf(Buffer.alloc(10))).toThrow();
    await t.store.close();
    await expect(t.store.listPoints()).rejects.toSatisfy(code('LB_STORE_CLOSED'));
  });
});
