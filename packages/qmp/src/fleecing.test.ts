import { execFile } from 'node:child_process';
import { access, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient, NBD } from '@lifeboat/nbd';
import { startFleecing } from './fleecing.js';
import { startQemuStorageDaemon, type QemuStorageDaemon } from './qemu-storage-daemon.js';

const exec = promisify(execFile);
const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 16 * MiB;
const GRANULE = 64 * KiB; // qcow2's default bitmap granularity for 64 KiB clusters

let dir: string;
let qsd: QemuStorageDaemon;
let nbdSocket: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lifeboat-fleece-'));
  const image = join(dir, 'disk.qcow2');
  nbdSocket = join(dir, 'nbd.sock');
  await exec('qemu-img', ['create', '-q', '-f', 'qcow2', image, String(SIZE)]);
  await exec('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x01 0 8M', image]);
  qsd = await startQemuStorageDaemon({
    blockdevs: [
      { driver: 'file', 'node-name': 'disk0-file', filename: image },
      { driver: 'qcow2', 'node-name': 'disk0', file: 'disk0-file' },
    ],
    nbdSocket,
    exports: [{ type: 'nbd', id: 'live', 'node-name': 'disk0', name: 'live', writable: true }],
  });
});
afterAll(async () => {
  await qsd?.stop();
  await rm(dir, { recursive: true, force: true });
});

/** A writer on the live export that keeps an exact model of the disk and of dirty granules. */
class Writer {
  readonly model = Buffer.alloc(SIZE);
  dirty = new Set<number>();
  private seed = 12345;
  constructor(readonly nbd: NbdClient) {}
  private rand(n: number): number {
    this.seed = (this.seed * 1103515245 + 12345) & 0x7fffffff;
    return this.seed % n;
  }
  async writeOne(): Promise<void> {
    const len = (1 + this.rand(16)) * 4 * KiB; // 4..64 KiB
    const off = this.rand((SIZE - len) / (4 * KiB)) * 4 * KiB;
    const data = Buffer.alloc(len, 1 + this.rand(250));
    data.writeUInt32LE(off, 0); // no two writes look alike
    await this.nbd.write(off, data);
    data.copy(this.model, off);
    for (let g = Math.floor(off / GRANULE); g * GRANULE < off + len; g++) this.dirty.add(g);
  }
}

function granulesOf(extents: { offset: number; length: number; flags: number }[]): number[] {
  const out: number[] = [];
  for (const e of extents) {
    if (!(e.flags & NBD.STATE_DIRTY)) continue;
    for (let o = e.offset; o < e.offset + e.length; o += GRANULE) out.push(o / GRANULE);
  }
  return out.sort((a, b) => a - b);
}

describe('image fleecing on qemu-storage-daemon (QEMU 7.2)', () => {
  it('exports the point-in-time view and its dirty extents while the live disk keeps changing', async () => {
    const qmp = qsd.qmp;
    await qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'b0', persistent: true });
    const live = await NbdClient.connect({ path: nbdSocket }, { exportName: 'live' });
    const w = new Writer(live);
    w.model.fill(0x01, 0, 8 * MiB);
    expect((await live.readAt(0, SIZE)).equals(w.model)).toBe(true);
    for (let i = 0; i < 60; i++) await w.writeOne();

    for (const [cycle, oldB, newB] of [
      [1, 'b0', 'b1'],
      [2, 'b1', 'b2'],
    ] as const) {
      // The cut: the writer is idle at this instant, so the expected content is exact.
      const atCut = Buffer.from(w.model);
      const dirtyAtCut = [...w.dirty].sort((a, b) => a - b);
      w.dirty = new Set();
      const overlayPath = join(dir, `fleece-${cycle}.qcow2`);
      const cut = await startFleecing(qmp, {
        disks: [
          {
            node: 'disk0',
            oldBitmap: oldB,
            newBitmap: newB,
            overlayPath,
            exportName: `fleece${cycle}`,
          },
        ],
      });
      const disk = cut.disks[0];
      if (disk === undefined) throw new Error('no disk in the cut');
      expect(disk.bitmapContext).toBe(`qemu:dirty-bitmap:${oldB}`);

      // The guest keeps writing, also over the dirty extents, while the view is read.
      let stop = false;
      const writing = (async () => {
        let n = 0;
        while (!stop || n < 40) {
          await w.writeOne();
          n++;
        }
      })();

      const view = await NbdClient.connect(
        { path: nbdSocket },
        { exportName: disk.exportName, metaContexts: [disk.bitmapContext] },
      );
      expect(view.readOnly).toBe(true);
      const extents = [];
      for await (const e of view.extents(disk.bitmapContext)) extents.push(e);
      expect(granulesOf(extents)).toEqual(dirtyAtCut);
      for (const e of extents) {
        if (!(e.flags & NBD.STATE_DIRTY)) continue;
        const got = await view.readAt(e.offset, e.length);
        expect(got.equals(atCut.subarray(e.offset, e.offset + e.length))).toBe(true);
      }
      // The whole view, read after the writer has moved on, is still the disk at the cut.
      stop = true;
      await writing;
      expect((await view.readAt(0, SIZE)).equals(atCut)).toBe(true);
      expect(w.model.equals(atCut)).toBe(false);
      await view.close();
      await cut.release();
      await expect(access(overlayPath)).rejects.toThrow();
    }
    // The live disk holds every write, and only the newest bitmap is left.
    expect((await live.readAt(0, SIZE)).equals(w.model)).toBe(true);
    const nodes = await qmp.execute<
      { 'node-name': string; 'dirty-bitmaps'?: { name: string }[] }[]
    >('query-named-block-nodes', { flat: true });
    expect(nodes.map((n) => n['node-name']).filter((n) => n.startsWith('lbfleece'))).toEqual([]);
    const bitmaps = nodes.find((n) => n['node-name'] === 'disk0')?.['dirty-bitmaps'] ?? [];
    expect(bitmaps.map((b) => b.name)).toEqual(['b2']);
    await live.close();
  });

  it('cuts two disks at one instant while a writer stamps a counter on both', async () => {
    const qmp = qsd.qmp;
    const second = join(dir, 'disk1.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', second, String(SIZE)]);
    await qmp.execute('blockdev-add', {
      driver: 'qcow2',
      'node-name': 'disk1',
      file: { driver: 'file', filename: second },
    });
    await qmp.execute('block-export-add', {
      type: 'nbd',
      id: 'live1',
      'node-name': 'disk1',
      name: 'live1',
      writable: true,
    });
    for (const node of ['disk0', 'disk1']) {
      await qmp.execute('block-dirty-bitmap-add', { node, name: 'm0' });
    }
    const a = await NbdClient.connect({ path: nbdSocket }, { exportName: 'live' });
    const b = await NbdClient.connect({ path: nbdSocket }, { exportName: 'live1' });
    // The writer stamps n on disk0, then on disk1, and never waits for the cut.
    let n = 0;
    let stop = false;
    const stamp = (v: number): Buffer => {
      const buf = Buffer.alloc(4096);
      buf.writeUInt32LE(v, 0);
      return buf;
    };
    const writer = (async () => {
      while (!stop) {
        n++;
        await a.write(12 * MiB, stamp(n));
        await b.write(12 * MiB, stamp(n));
      }
    })();
    while (n < 20) await new Promise((r) => setTimeout(r, 5));
    const cut = await startFleecing(qmp, {
      disks: ['disk0', 'disk1'].map((node) => ({
        node,
        oldBitmap: 'm0',
        newBitmap: 'm1',
        persistent: false,
        overlayPath: join(dir, `m-${node}.qcow2`),
        exportName: `m-${node}`,
      })),
    });
    const atCut = n;
    const counters: number[] = [];
    for (const d of cut.disks) {
      const v = await NbdClient.connect({ path: nbdSocket }, { exportName: d.exportName });
      counters.push((await v.readAt(12 * MiB, 4)).readUInt32LE(0));
      await v.close();
    }
    const [c0, c1] = counters as [number, number];
    // The writer went on after the cut (wait for it rather than assume it).
    while (n <= c0 + 2) await new Promise((r) => setTimeout(r, 5));
    stop = true;
    await writer;
    // One instant: disk1 holds the same stamp as disk0, or the one before (disk0 is written first).
    expect(c0 - c1 === 0 || c0 - c1 === 1).toBe(true);
    expect(c0).toBeGreaterThan(0);
    expect(c0).toBeLessThanOrEqual(atCut);
    await cut.release();
    await a.close();
    await b.close();
    for (const node of ['disk0', 'disk1']) {
      await qmp.execute('block-dirty-bitmap-remove', { node, name: 'm1' });
    }
  });

  it('undoes a cut that fails after the transaction, losing no change', async () => {
    const qmp = qsd.qmp;
    await qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 'r0' });
    const live = await NbdClient.connect({ path: nbdSocket }, { exportName: 'live' });
    await live.write(3 * MiB, Buffer.alloc(4096, 7));
    // The export name is taken, so block-export-add fails after the bitmaps were switched.
    const err = await startFleecing(qmp, {
      disks: [
        {
          node: 'disk0',
          oldBitmap: 'r0',
          newBitmap: 'r1',
          overlayPath: join(dir, 'r.qcow2'),
          exportName: 'live',
        },
      ],
    }).catch((e: unknown) => e);
    expect(String(err)).toMatch(/live/);
    const nodes = await qmp.execute<
      { 'node-name': string; 'dirty-bitmaps'?: { name: string; recording: boolean }[] }[]
    >('query-named-block-nodes', { flat: true });
    const bitmaps = nodes.find((n) => n['node-name'] === 'disk0')?.['dirty-bitmaps'] ?? [];
    expect(bitmaps.find((b) => b.name === 'r0')?.recording).toBe(true);
    expect(bitmaps.find((b) => b.name === 'r1')).toBeUndefined();
    await live.write(9 * MiB, Buffer.alloc(4096, 8));
    const cut = await startFleecing(qmp, {
      disks: [
        { node: 'disk0', oldBitmap: 'r0', overlayPath: join(dir, 'r2.qcow2'), exportName: 'r' },
      ],
    });
    const view = await NbdClient.connect(
      { path: nbdSocket },
      { exportName: 'r', metaContexts: ['qemu:dirty-bitmap:r0'] },
    );
    const ext = [];
    for await (const e of view.extents('qemu:dirty-bitmap:r0')) ext.push(e);
    expect(granulesOf(ext)).toEqual([(3 * MiB) / GRANULE, (9 * MiB) / GRANULE]);
    await view.close();
    await cut.release();
    await live.close();
  });

  it('rolls back cleanly when the cut cannot be taken', async () => {
    const overlayPath = join(dir, 'bad.qcow2');
    const err = await startFleecing(qsd.qmp, {
      disks: [{ node: 'disk0', oldBitmap: 'does-not-exist', overlayPath, exportName: 'bad' }],
    }).catch((e: unknown) => e);
    expect(String(err)).toMatch(/does-not-exist/);
    await expect(access(overlayPath)).rejects.toThrow();
    const nodes = await qsd.qmp.execute<{ 'node-name': string }[]>('query-named-block-nodes', {
      flat: true,
    });
    expect(nodes.map((n) => n['node-name']).filter((n) => n.startsWith('lbfleece'))).toEqual([]);
  });

  it('freezes for the transaction alone: beforeTransaction once the overlays exist, afterTransaction before any export, also after a refused transaction', async () => {
    const qmp = qsd.qmp;
    await qmp.execute('block-dirty-bitmap-add', { node: 'disk0', name: 't0' });
    const fleeceNodes = async (): Promise<string[]> =>
      (await qmp.execute<{ 'node-name': string }[]>('query-named-block-nodes', { flat: true }))
        .map((n) => n['node-name'])
        .filter((n) => n.startsWith('lbfleece'));
    const jobs = async (): Promise<number> =>
      (await qmp.execute<unknown[]>('query-block-jobs')).length;
    const exported = async (): Promise<string[]> =>
      (await NbdClient.listExports({ path: nbdSocket })).map((e) => e.name);
    const overlayPath = join(dir, 't.qcow2');
    const seen: string[] = [];
    const cut = await startFleecing(qmp, {
      disks: [{ node: 'disk0', oldBitmap: 't0', newBitmap: 't1', overlayPath, exportName: 't' }],
      beforeTransaction: async () => {
        await access(overlayPath);
        seen.push(`before: ${(await fleeceNodes()).length} overlay node, ${await jobs()} job`);
      },
      afterTransaction: async () => {
        const t = (await exported()).includes('t');
        seen.push(`after: ${await jobs()} job, ${t ? 'exported' : 'not exported'}`);
      },
    });
    expect(seen).toEqual(['before: 1 overlay node, 0 job', 'after: 1 job, not exported']);
    expect(await exported()).toContain('t');
    await cut.release();

    // QEMU refuses the transaction: afterTransaction still runs (a frozen guest is thawed),
    // nothing is left behind and QEMU's error is the one thrown.
    seen.length = 0;
    const refused = await startFleecing(qmp, {
      disks: [{ node: 'disk0', oldBitmap: 'nope', overlayPath, exportName: 't' }],
      beforeTransaction: async () => void seen.push('before'),
      afterTransaction: async () => void seen.push('after'),
    }).catch((e: unknown) => e);
    expect(String(refused)).toMatch(/nope/);
    expect(seen).toEqual(['before', 'after']);
    expect(await fleeceNodes()).toEqual([]);

    // A failing afterTransaction fails the cut, which is undone: the old bitmap records again.
    const failed = await startFleecing(qmp, {
      disks: [{ node: 'disk0', oldBitmap: 't1', newBitmap: 't2', overlayPath, exportName: 't' }],
      afterTransaction: () => Promise.reject(new Error('thaw failed')),
    }).catch((e: unknown) => e);
    expect(String(failed)).toMatch(/thaw failed/);
    const nodes = await qmp.execute<
      { 'node-name': string; 'dirty-bitmaps'?: { name: string; recording: boolean }[] }[]
    >('query-named-block-nodes', { flat: true });
    const bitmaps = nodes.find((n) => n['node-name'] === 'disk0')?.['dirty-bitmaps'] ?? [];
    expect(bitmaps.find((b) => b.name === 't1')?.recording).toBe(true);
    expect(bitmaps.find((b) => b.name === 't2')).toBeUndefined();
    expect(await fleeceNodes()).toEqual([]);
    expect(await jobs()).toBe(0);
    await qmp.execute('block-dirty-bitmap-remove', { node: 'disk0', name: 't1' });
  });
});
