import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import { afterEach, describe, expect, it } from 'vitest';
import { isLifeboatError } from '@lifeboat/protocol';
import { DirectoryBackend } from './directory-backend.js';
import { Store } from './store.js';
import type { TempStore } from './test-support.js';
import { TEST_PASSPHRASE, pseudoRandom, tempStore, writeLockObject } from './test-support.js';

const CS = 4096;
const repoRoot = fileURLToPath(new URL('../../..', import.meta.url));
const holderScript = fileURLToPath(new URL('./disk-holder.ts', import.meta.url));

let t: TempStore | undefined;
const children = new Set<ChildProcess>();
afterEach(async () => {
  for (const c of children) c.kill('SIGKILL');
  children.clear();
  await t?.cleanup();
  t = undefined;
});
const code = (c: string) => (e: unknown) => isLifeboatError(e, c);

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

describe('one writer per disk, and gc of packs no index lists', () => {
  it('a second writer of a disk fails clearly, in this process, in another store instance and in another process', async () => {
    t = await tempStore({ chunkSize: CS });
    const w = await t.store.beginWrite({ machine: 'm', disk: 'vda', size: CS * 8 });
    await expect(t.store.beginWrite({ machine: 'm', disk: 'vda', size: CS * 8 })).rejects.toSatisfy(
      code('LB_STORE_DISK_BUSY'),
    );
    const other = await t.reopen();
    const err = await other
      .beginWrite({ machine: 'm', disk: 'vda', size: CS * 8 })
      .catch((e: unknown) => e);
    expect(isLifeboatError(err, 'LB_STORE_DISK_BUSY')).toBe(true);
    expect((err as Error).message).toMatch(
      /Disk vda of machine m is being written by another session/,
    );
    // Other disks, and the same disk name of another machine, are free.
    await (await other.beginWrite({ machine: 'm', disk: 'vdb', size: CS })).abort();
    await (await other.beginWrite({ machine: 'n', disk: 'vda', size: CS })).abort();
    await w.write(0, pseudoRandom(CS * 8, 1));
    const p = await w.commit();
    // Once the first writer is done, the disk is free again.
    const next = await other.beginWrite({ machine: 'm', disk: 'vda', size: CS * 8 });
    expect(next.size).toBe(CS * 8);
    await next.abort();
    expect((await other.listPoints()).map((x) => x.id)).toEqual([p.id]);

    // Another process holds the disk: refused while it lives, free once it is killed.
    const child = spawn(
      process.execPath,
      ['--conditions=source', '--import', 'tsx', holderScript, t.dir, TEST_PASSPHRASE, 'm', 'vda'],
      { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    children.add(child);
    let stderr = '';
    child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
    await new Promise<void>((resolve, reject) => {
      child.stdout?.on('data', (d: Buffer) => {
        if (d.toString().includes('HOLDING')) resolve();
      });
      child.once('exit', (c) => reject(new Error(`holder exited (${c}): ${stderr}`)));
    });
    const busy = await t.store
      .beginWrite({ machine: 'm', disk: 'vda', size: CS })
      .catch((e: unknown) => e);
    expect(isLifeboatError(busy, 'LB_STORE_DISK_BUSY')).toBe(true);
    expect((busy as { details: { holder: { pid: number } } }).details.holder.pid).toBe(child.pid);
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGKILL');
    await exited;
    children.delete(child);
    // A dead holder on this host does not count.
    const after = await t.store.beginWrite({ machine: 'm', disk: 'vda', size: CS * 8 });
    await after.write(0, pseudoRandom(CS * 8, 2));
    await after.commit();
  }, 60_000);

  it('a writer in another thread of this process holds its disk while it lives, not after it died', async () => {
    t = await tempStore({ chunkSize: CS });
    // A store worker thread (as in the process server) that holds the disk, then dies.
    const boot = `import('tsx/esm/api').then((api) => { api.register(); return import(${JSON.stringify(pathToFileURL(holderScript).href)}); })`;
    const worker = new Worker(boot, {
      eval: true,
      argv: [t.dir, TEST_PASSPHRASE, 'm', 'vda'],
    });
    try {
      await new Promise<void>((resolve, reject) => {
        worker.once('message', () => resolve());
        worker.once('error', reject);
        worker.once('exit', (c) => reject(new Error(`holder thread exited (${c})`)));
      });
      const busy = await t.store
        .beginWrite({ machine: 'm', disk: 'vda', size: CS })
        .catch((e: unknown) => e);
      expect(isLifeboatError(busy, 'LB_STORE_DISK_BUSY')).toBe(true);
    } finally {
      await worker.terminate();
    }
    // Its lock object is still there (same host, same pid), but no live thread holds it.
    const w = await t.store.beginWrite({ machine: 'm', disk: 'vda', size: CS * 4 });
    await w.write(0, pseudoRandom(CS * 4, 9));
    await w.commit();
  }, 60_000);

  it("a writer reads each other writer's lock once, and still sees a rival on its disk and a gc that comes later", async () => {
    t = await tempStore({ chunkSize: CS });
    // Six writers of other disks hold their locks throughout, as a process server's do.
    const held = await Promise.all(
      ['a', 'b', 'c', 'd', 'e', 'f'].map((d) =>
        t!.store.beginWrite({ machine: 'm', disk: d, size: CS }),
      ),
    );
    let lockReads = 0;
    const inner = new DirectoryBackend({ path: t.dir });
    const counting = new Proxy(inner, {
      get(target, prop, receiver) {
        const v = Reflect.get(target, prop, receiver) as unknown;
        if (prop === 'get' && typeof v === 'function') {
          return (key: string, ...rest: unknown[]) => {
            if (key.startsWith('locks/')) lockReads++;
            return (v as (...a: unknown[]) => unknown).call(target, key, ...rest);
          };
        }
        return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
      },
    });
    const s = await Store.open({ backend: counting, passphrase: TEST_PASSPHRASE });
    try {
      let base: string | null = null;
      for (let cut = 0; cut < 5; cut++) {
        const w = await s.beginWrite({ machine: 'm', disk: 'x', size: CS * 4, base });
        await w.write(0, pseudoRandom(CS * 4, cut));
        base = (await w.commit()).id;
      }
      // Each of the six read once, not at every begin and commit (that was 6 x 3 x 5 = 90).
      expect(lockReads).toBe(6);
      expect(
        (await (await s.openPoint(base!)).readAt(0, CS * 4)).equals(pseudoRandom(CS * 4, 4)),
      ).toBe(true);

      // A disk whose writer's lock this handle has read before is still refused.
      await expect(s.beginWrite({ machine: 'm', disk: 'c', size: CS })).rejects.toSatisfy(
        code('LB_STORE_DISK_BUSY'),
      );
      // A gc lock that appears while a session is open fails its commit, and the next begin.
      const w = await s.beginWrite({ machine: 'm', disk: 'x', size: CS * 4, base });
      await w.write(0, pseudoRandom(CS * 4, 99));
      await writeLockObject(t.dir, 'dddddddddddddddddddddddddddddddd');
      await expect(w.commit()).rejects.toSatisfy(code('LB_STORE_LOCK_LOST'));
      const noWait = await t.reopen(TEST_PASSPHRASE, { locks: { sharedWaitMs: 0 } });
      await expect(noWait.beginWrite({ machine: 'm', disk: 'x', size: CS * 4 })).rejects.toSatisfy(
        code('LB_STORE_LOCKED'),
      );
      expect((await s.listPoints()).filter((p) => p.disk === 'x')).toHaveLength(5);
    } finally {
      for (const h of held) await h.abort();
      await s.close();
    }
  });

  it('writers racing for one disk: exactly one gets it', async () => {
    t = await tempStore({ chunkSize: CS });
    const stores = await Promise.all(Array.from({ length: 6 }, () => t!.reopen()));
    for (let round = 0; round < 3; round++) {
      const results = await Promise.allSettled(
        stores.map((s) => s.beginWrite({ machine: 'm', disk: 'vda', size: CS * 4 })),
      );
      const won = results.filter((r) => r.status === 'fulfilled');
      expect(won.length).toBe(1);
      for (const r of results) {
        if (r.status === 'rejected')
          expect(isLifeboatError(r.reason, 'LB_STORE_DISK_BUSY')).toBe(true);
      }
      const w = (won[0] as PromiseFulfilledResult<Awaited<ReturnType<typeof t.store.beginWrite>>>)
        .value;
      await w.write(0, pseudoRandom(CS * 4, round));
      await w.commit();
    }
    expect(await t.store.listPoints()).toHaveLength(3);
  }, 60_000);

  it('gc keeps and re-indexes data whose index object is lost, and deletes the unindexed packs of a crashed writer', async () => {
    t = await tempStore({ chunkSize: CS, packSize: 16 * CS });
    const data = pseudoRandom(CS * 64, 3);
    const w = await t.store.beginWrite({ machine: 'm', disk: 'vda', size: data.length });
    await w.write(0, data);
    const p = await w.commit();
    // The index objects are lost: the point's packs are listed by none.
    await rm(join(t.dir, 'index'), { recursive: true });
    // A writer that crashed after uploading packs and before writing their index.
    const crashed = await t.reopen();
    const c = await crashed.beginWrite({ machine: 'm', disk: 'vdb', size: CS * 64 });
    await c.write(0, pseudoRandom(CS * 64, 4));
    await c.abort();
    const packsBefore = await files(t.dir, 'packs');
    expect(packsBefore.length).toBeGreaterThan(4);
    const s = await t.reopen();
    const report = await s.gc();
    // The crashed writer's packs are gone, the point's are kept and listed again.
    expect(report.packsDeleted).toBeGreaterThanOrEqual(4);
    expect((await files(t.dir, 'index')).length).toBeGreaterThan(0);
    const fresh = await t.reopen();
    expect((await (await fresh.openPoint(p.id)).readAt(0, data.length)).equals(data)).toBe(true);
    expect((await fresh.verify()).ok).toBe(true);
    const packsAfter = await files(t.dir, 'packs');
    expect(packsAfter.length).toBeLessThan(packsBefore.length);
    // A second gc finds nothing more to do.
    expect((await fresh.gc()).packsDeleted).toBe(0);
  }, 60_000);
});
