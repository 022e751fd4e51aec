import { randomBytes } from 'node:crypto';
import { copyFile, mkdtemp, readdir, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NbdClient } from '@lifeboat/nbd';
import { LifeboatError } from '@lifeboat/protocol';
import { DirectoryBackend, Store } from '@lifeboat/store';
import { runCommand, startStorageDaemon } from '@lifeboat/testing';
import type { StorageDaemon } from '@lifeboat/testing';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Agent } from './agent.js';
import type { CutReport, SyncProgressReport } from './agent.js';
import { StoreSink } from './store-sink.js';

const MiB = 1024 * 1024;

/** A "guest" writing through a second NBD export of the same node the agent tracks. */
class Writer {
  readonly model: Buffer;
  writes = 0;
  private paused = false;
  private running = false;
  private loop: Promise<void> | undefined;
  private inFlight: Promise<void> = Promise.resolve();

  constructor(
    private readonly nbd: NbdClient,
    size: number,
  ) {
    this.model = Buffer.alloc(size);
  }

  async write(offset: number, data: Buffer): Promise<void> {
    await this.nbd.write(offset, data);
    data.copy(this.model, offset);
    this.writes++;
  }

  start(): void {
    this.running = true;
    this.loop = (async () => {
      while (this.running) {
        if (this.paused) {
          await new Promise((r) => setTimeout(r, 5));
          continue;
        }
        const len = 4096 * (1 + Math.floor(Math.random() * 16));
        const offset = 4096 * Math.floor(Math.random() * ((this.model.length - len) / 4096));
        const op = this.write(offset, randomBytes(len));
        this.inFlight = op;
        await op;
      }
    })();
  }

  /** Stops issuing writes and waits for the one in flight: the model is then the disk. */
  async pause(): Promise<void> {
    this.paused = true;
    await this.inFlight;
  }

  resume(): void {
    this.paused = false;
  }

  async stop(): Promise<void> {
    this.running = false;
    await this.loop;
  }
}

/** Retries an operation that fails while the agent's cut views hold the node (a second or two). */
async function retry(op: () => Promise<unknown>): Promise<void> {
  for (let i = 0; ; i++) {
    try {
      await op();
      return;
    } catch (err) {
      if (i > 200) throw err;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

async function readAll(store: Store, pointId: string): Promise<Buffer> {
  const r = await store.openPoint(pointId);
  return r.readAt(0, r.size);
}

function waitFor<T>(
  agent: Agent,
  event: string,
  pred: (v: T) => boolean,
  ms = 120_000,
): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      agent.off(event, on);
      agent.off('failed', onFail);
      reject(new Error(`timed out waiting for ${event}; status ${JSON.stringify(agent.status())}`));
    }, ms);
    const on = (v: T): void => {
      if (!pred(v)) return;
      clearTimeout(timer);
      agent.off(event, on);
      agent.off('failed', onFail);
      resolve(v);
    };
    const onFail = (e: Error): void => {
      clearTimeout(timer);
      agent.off(event, on);
      reject(e);
    };
    agent.on(event, on);
    agent.on('failed', onFail);
  });
}

/**
 * A guest agent's host socket (guest-sync-delimited, fsfreeze) whose freeze and thaw run the
 * test's checks first: when the agent freezes and thaws, seen from QEMU's side.
 */
async function fakeGuestAgent(
  path: string,
  on: { freeze: () => Promise<void>; thaw: () => Promise<void> },
): Promise<{ close: () => Promise<void> }> {
  const server = createServer((c) => {
    let buf = '';
    c.on('error', () => undefined);
    c.on('data', (d: Buffer) => {
      buf += d.toString('latin1').replace(/\xff/g, '');
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const msg = JSON.parse(buf.slice(0, nl)) as { execute: string; arguments?: { id: number } };
        buf = buf.slice(nl + 1);
        const reply = (r: unknown): void =>
          void c.write(`\xff${JSON.stringify({ return: r })}\n`, 'latin1');
        if (msg.execute === 'guest-sync-delimited') reply(msg.arguments?.id);
        else if (msg.execute === 'guest-fsfreeze-freeze') void on.freeze().then(() => reply(1));
        else if (msg.execute === 'guest-fsfreeze-thaw') void on.thaw().then(() => reply(1));
      }
    });
  });
  await new Promise<void>((r) => server.listen(path, r));
  return { close: () => new Promise<void>((r) => server.close(() => r())) };
}

describe('agent against qemu-storage-daemon', () => {
  let dir: string;
  let store: Store;
  const cleanups: Array<() => Promise<unknown>> = [];

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'lifeboat-agent-'));
    store = await Store.init({
      backend: new DirectoryBackend({ path: join(dir, 'store') }),
      passphrase: 'test',
      kdfCost: 1024,
    });
  });
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c().catch(() => undefined);
    await store.close();
    await rm(dir, { recursive: true, force: true });
  });

  async function daemon(
    images: Array<{ path: string; format?: 'qcow2' | 'raw' }>,
  ): Promise<StorageDaemon> {
    const qsd = await startStorageDaemon({
      disks: images.map((d, i) => ({ ...d, exportName: `guest${i}` })),
    });
    cleanups.push(() => qsd.stop());
    return qsd;
  }

  async function guest(qsd: StorageDaemon, i: number): Promise<NbdClient> {
    const nbd = await NbdClient.connect(
      { path: qsd.nbdSocket as string },
      { exportName: `guest${i}` },
    );
    cleanups.push(() => nbd.close());
    return nbd;
  }

  function agentFor(
    qsd: StorageDaemon,
    sink: StoreSink,
    extra: Partial<ConstructorParameters<typeof Agent>[0]> = {},
  ): Agent {
    const agent = new Agent({
      qmpSocket: qsd.qmpSocket,
      nbdSocket: qsd.nbdSocket as string,
      machine: 'vm1',
      sink,
      stateDir: join(dir, 'agent'),
      intervalMs: 1000,
      ...extra,
    });
    cleanups.push(() => agent.stop());
    return agent;
  }

  it('replicates initially (allocated ranges only), then every committed point is byte-exact at its cut while the guest writes', async () => {
    const img = join(dir, 'disk.qcow2');
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', img, '32M']);
    const qsd = await daemon([{ path: img }]);
    const writer = new Writer(await guest(qsd, 0), 32 * MiB);
    // 3 MiB of data before protection starts; the rest of the disk is never written.
    for (let i = 0; i < 6; i++) await writer.write(i * 5 * MiB, randomBytes(MiB / 2));
    await writer.write(31 * MiB, randomBytes(MiB));

    const sink = new StoreSink(store, 'vm1');
    const snapshots = new Map<string, Buffer>();
    const progress: SyncProgressReport[] = [];
    const agent = agentFor(qsd, sink, {
      hooks: {
        // The test's way to know the disk at each cut: hold the guest for the transaction only.
        beforeCut: async (cutId) => {
          await writer.pause();
          snapshots.set(cutId, Buffer.from(writer.model));
        },
        afterCut: () => writer.resume(),
      },
    });
    agent.on('progress', (p: SyncProgressReport) => progress.push(p));
    // The guest starts writing once the initial scan of allocated ranges is done.
    agent.once('progress', () => writer.start());
    await agent.start();
    await waitFor<CutReport>(agent, 'cut', () => sink.committed.length >= 4);
    await writer.stop();
    await agent.stop();

    const last = progress[progress.length - 1] as SyncProgressReport;
    expect(last.kind).toBe('initial');
    expect(last.totalBytes).toBe(4 * MiB);
    expect(last.doneBytes).toBe(4 * MiB);
    expect(writer.writes).toBeGreaterThan(20);
    for (const cut of sink.committed) {
      const point = cut.points[0];
      expect(point?.cut).toBe(cut.cutId);
      const expected = snapshots.get(cut.cutId) as Buffer;
      const actual = await readAll(store, point?.id as string);
      expect(
        actual.equals(expected),
        `point of cut ${cut.cutId} differs from the disk at the cut`,
      ).toBe(true);
    }
    // Later cuts carried only changes, not the disk.
    expect(agent.bytesSent).toBeLessThan(4 * MiB + writer.writes * 64 * 1024 + 8 * MiB);
  });

  it('resumes an interrupted initial replication, and after agent and QEMU are killed resyncs only what differs', async () => {
    const img = join(dir, 'disk.qcow2');
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', img, '48M']);
    let qsd = await daemon([{ path: img }]);
    let nbd = await guest(qsd, 0);
    const model = Buffer.alloc(48 * MiB);
    const put = async (offset: number, data: Buffer): Promise<void> => {
      await nbd.write(offset, data);
      data.copy(model, offset);
    };
    await put(0, randomBytes(40 * MiB));
    const sink = new StoreSink(store, 'vm1');
    const opts = { readBytes: MiB, checkpointBytes: 4 * MiB };

    const first = agentFor(qsd, sink, opts);
    const reports: SyncProgressReport[] = [];
    first.on('progress', (p: SyncProgressReport) => reports.push(p));
    let initialOffsets: number[] | undefined = [];
    const sinkWrite = sink.write.bind(sink);
    sink.write = async (disk, offset, data) => {
      initialOffsets?.push(offset);
      await sinkWrite(disk, offset, data);
    };
    await first.start();
    await waitFor<SyncProgressReport>(first, 'progress', (p) => p.doneBytes >= 16 * MiB);
    await first.stop({ crash: true });
    const sentBefore = first.bytesSent;
    // Progress in bytes of the allocated ranges, with a rate and an ETA from that rate; the
    // ranges go out in disk order.
    const midway = reports.filter((p) => p.doneBytes > 0 && p.doneBytes < p.totalBytes);
    expect(midway.length).toBeGreaterThan(3);
    for (const p of midway) {
      expect(p).toMatchObject({ kind: 'initial', disk: 'disk0', totalBytes: 40 * MiB });
      expect(p.bytesPerSecond).toBeGreaterThan(0);
      expect(p.etaSeconds).toBeCloseTo((p.totalBytes - p.doneBytes) / p.bytesPerSecond, 6);
    }
    expect(initialOffsets.length).toBeGreaterThan(0);
    expect(initialOffsets).toEqual([...initialOffsets].sort((a, b) => a - b));
    initialOffsets = undefined;

    const second = agentFor(qsd, sink, opts);
    const resumedAt: number[] = [];
    second.on('progress', (p: SyncProgressReport) => resumedAt.push(p.doneBytes));
    await second.start();
    await waitFor<CutReport>(second, 'cut', () => true);
    await second.stop();
    // It went on from a checkpoint instead of starting over.
    expect(resumedAt[0]).toBeGreaterThanOrEqual(12 * MiB);
    expect(sentBefore + second.bytesSent).toBeLessThan(40 * MiB + 8 * MiB);
    const point1 = sink.committed[0]?.points[0];
    expect((await readAll(store, point1?.id as string)).equals(model)).toBe(true);

    // Changes the agent never cut, then kill everything.
    await put(3 * 65536, randomBytes(65536));
    await put(100 * 65536, randomBytes(65536));
    // A guest flushes what it needs durable; unflushed qcow2 metadata dies with QEMU.
    await nbd.flush();
    await nbd.close();
    await qsd.stop({ kill: true });
    qsd = await daemon([{ path: img }]);
    nbd = await guest(qsd, 0);
    await put(200 * 65536, randomBytes(2 * 65536));

    const third = agentFor(qsd, sink, opts);
    const sentAt: number[] = [];
    const origWrite = sink.write.bind(sink);
    sink.write = async (disk, offset, data) => {
      sentAt.push(offset / 65536);
      await origWrite(disk, offset, data);
    };
    const warnings: string[] = [];
    third.on('warning', (w: { code: string }) => warnings.push(w.code));
    await third.start();
    await waitFor<CutReport>(third, 'cut', () => true);
    await third.stop();
    expect(warnings).toContain('LB_AGENT_RESYNC');
    const point2 = sink.committed[sink.committed.length - 1]?.points[0];
    expect((await readAll(store, point2?.id as string)).equals(model)).toBe(true);
    expect(sentAt).toEqual([3, 100, 200, 201]);
    // qemu-storage-daemon has no CPUs, memory or devices: no hardware is recorded, none guessed.
    expect(Object.keys(point2?.labels ?? {}).filter((k) => k.startsWith('machine.'))).toEqual([]);
    // Four chunks differ from the latest point; nothing else is sent.
    expect(third.bytesSent).toBe(4 * 65536);
  });

  it('cuts both disks of a machine at one instant, follows a resize and an added disk, and stops clearly when a disk vanishes', async () => {
    const imgs = [join(dir, 'a.qcow2'), join(dir, 'b.qcow2')];
    for (const p of imgs) await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', p, '16M']);
    const qsd = await daemon(imgs.map((path) => ({ path })));
    const a = await guest(qsd, 0);
    const b = await guest(qsd, 1);
    const stamp = (n: number): Buffer => {
      const buf = Buffer.alloc(4096);
      buf.write(`STAMP ${n}\n`);
      return buf;
    };
    const readStamp = (buf: Buffer): number =>
      Number(/STAMP (\d+)/.exec(buf.toString('latin1'))?.[1] ?? 0);
    // The writer stamps the same counter on disk a, then on disk b, one write at a time.
    let running = true;
    let n = 0;
    const writing = (async () => {
      while (running) {
        n++;
        await a.write(0, stamp(n));
        await b.write(0, stamp(n));
      }
    })();
    const sink = new StoreSink(store, 'vm1');
    const agent = agentFor(qsd, sink);
    const failed = new Promise<Error>((resolve) => agent.once('failed', resolve));
    await agent.start();
    await waitFor<CutReport>(agent, 'cut', () => sink.committed.length >= 4);
    running = false;
    await writing;

    let previous = -1;
    for (const cut of sink.committed) {
      const pa = cut.points.find((p) => p.disk === 'disk0');
      const pb = cut.points.find((p) => p.disk === 'disk1');
      expect(pa?.cut).toBe(cut.cutId);
      expect(pb?.cut).toBe(cut.cutId);
      const sa = readStamp(await (await store.openPoint(pa?.id as string)).readAt(0, 4096));
      const sb = readStamp(await (await store.openPoint(pb?.id as string)).readAt(0, 4096));
      // Disk b is stamped after disk a: at one instant it shows a's counter or the one before.
      expect([sa - 1, sa]).toContain(sb);
      expect(sa).toBeGreaterThanOrEqual(previous);
      previous = sa;
    }
    expect(previous).toBeGreaterThan(0);

    // Grow disk a: the next point has the new size and the same bytes.
    // (An NBD export forbids resizing its node: the guest's export goes away meanwhile, and
    // the agent's short-lived cut views may make a try fail.)
    await a.close();
    await qsd.daemon.qmp.execute('block-export-del', { id: 'export-0' });
    await retry(() =>
      qsd.daemon.qmp.execute('block_resize', { 'node-name': 'disk0', size: 24 * MiB }),
    );
    await qsd.daemon.qmp.execute('block-export-add', {
      type: 'nbd',
      id: 'export-0b',
      'node-name': 'disk0',
      name: 'guest0b',
      writable: true,
    });
    const a2 = await NbdClient.connect(
      { path: qsd.nbdSocket as string },
      { exportName: 'guest0b' },
    );
    cleanups.push(() => a2.close());
    const tail = randomBytes(65536);
    await a2.write(20 * MiB, tail);
    const before = sink.committed.length;
    await waitFor<CutReport>(agent, 'cut', () => sink.committed.length > before + 1);
    const grown = sink.committed[sink.committed.length - 1]?.points.find((p) => p.disk === 'disk0');
    expect(grown?.size).toBe(24 * MiB);
    expect(
      (await (await store.openPoint(grown?.id as string)).readAt(20 * MiB, 65536)).equals(tail),
    ).toBe(true);

    // Add a disk: it is replicated and joins the cuts.
    const c = join(dir, 'c.qcow2');
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', c, '8M']);
    await runCommand('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 0 1M', c]);
    await qsd.daemon.qmp.execute('blockdev-add', {
      driver: 'qcow2',
      'node-name': 'disk2',
      file: { driver: 'file', filename: c },
    });
    await waitFor<CutReport>(
      agent,
      'cut',
      () => (sink.committed[sink.committed.length - 1]?.points.length ?? 0) === 3,
    );
    const added = sink.committed[sink.committed.length - 1]?.points.find((p) => p.disk === 'disk2');
    expect(
      (await (await store.openPoint(added?.id as string)).readAt(0, MiB)).equals(
        Buffer.alloc(MiB, 0x5a),
      ),
    ).toBe(true);

    // Disk b vanishes: replication stops with a clear error; the points already made stay.
    await b.close();
    await qsd.daemon.qmp.execute('block-export-del', { id: 'export-1' });
    const pointsOfB = (await store.listPoints({ machine: 'vm1', disk: 'disk1' })).length;
    await retry(() => qsd.daemon.qmp.execute('blockdev-del', { 'node-name': 'disk1' }));
    const err = (await failed) as Error & { code?: string };
    expect(err.code).toBe('LB_AGENT_DISK_VANISHED');
    expect(err.message).toContain('disk1');
    expect(agent.status().phase).toBe('failed');
    const kept = await store.listPoints({ machine: 'vm1', disk: 'disk1' });
    expect(kept.length).toBeGreaterThanOrEqual(pointsOfB);
    await store.openPoint(kept[kept.length - 1]?.id as string);
  });

  it('tracks a raw disk with a non-persistent bitmap, resyncs it after a clean QEMU restart, and reports lag when a cycle overruns', async () => {
    const img = join(dir, 'disk.raw');
    await runCommand('qemu-img', ['create', '-q', '-f', 'raw', img, '8M']);
    let qsd = await daemon([{ path: img, format: 'raw' }]);
    let nbd = await guest(qsd, 0);
    const model = Buffer.alloc(8 * MiB);
    const put = async (offset: number, data: Buffer): Promise<void> => {
      await nbd.write(offset, data);
      data.copy(model, offset);
    };
    await put(0, randomBytes(2 * MiB));
    const sink = new StoreSink(store, 'vm1');
    const slow = agentFor(qsd, sink, {
      // A cut hook that takes longer than the interval: the next cycle starts late.
      hooks: { beforeCut: () => new Promise((r) => setTimeout(r, 1300)) },
    });
    await slow.start();
    const late = await waitFor<CutReport>(slow, 'cut', () => true);
    expect(late.lagMs).toBeGreaterThan(0);
    // The next cycle starts when the late one ends, not an interval (1 s) after it.
    const next = await waitFor<CutReport>(slow, 'cut', () => true);
    expect(next.time - late.time).toBeLessThan(late.durationMs + 600);
    expect(slow.status().lagMs).toBeGreaterThan(0);
    expect(slow.status().disks[0]?.persistentBitmaps).toBe(false);
    await slow.stop();
    expect((await readAll(store, sink.committed[0]?.points[0]?.id as string)).equals(model)).toBe(
      true,
    );

    await put(MiB, randomBytes(65536));
    await nbd.flush();
    await nbd.close();
    await qsd.stop();
    qsd = await daemon([{ path: img, format: 'raw' }]);
    nbd = await guest(qsd, 0);
    const again = agentFor(qsd, sink);
    const warnings: string[] = [];
    again.on('warning', (w: { code: string; message: string }) => warnings.push(w.message));
    await again.start();
    await waitFor<CutReport>(again, 'cut', () => true);
    await again.stop();
    expect(warnings.join('\n')).toMatch(/bitmaps on raw disks do not survive a restart/);
    expect(again.bytesSent).toBe(65536);
    const last = sink.committed[sink.committed.length - 1]?.points[0];
    expect((await readAll(store, last?.id as string)).equals(model)).toBe(true);
  });

  it('resyncs when its bitmap counts from an older point than the latest (image and state restored from a backup)', async () => {
    const img = join(dir, 'disk.qcow2');
    const stateFile = join(dir, 'agent', 'agent-state.json');
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', img, '8M']);
    const sink = new StoreSink(store, 'vm1');
    const session = async (
      work: (put: (offset: number, data: Buffer) => Promise<void>) => Promise<void>,
    ): Promise<{ warnings: string[] }> => {
      const qsd = await startStorageDaemon({ disks: [{ path: img, exportName: 'guest0' }] });
      const nbd = await NbdClient.connect(
        { path: qsd.nbdSocket as string },
        { exportName: 'guest0' },
      );
      const agent = agentFor(qsd, sink);
      const warnings: string[] = [];
      agent.on('warning', (w: { message: string }) => warnings.push(w.message));
      try {
        await work((offset, data) => nbd.write(offset, data));
        await nbd.flush();
        await agent.start();
        await waitFor<CutReport>(agent, 'cut', () => true);
        await agent.stop();
      } finally {
        await nbd.close();
        await qsd.stop();
      }
      return { warnings };
    };
    const base = randomBytes(2 * MiB);
    await session((put) => put(0, base));
    // A backup of the machine (image with its persistent bitmap) and of the agent's state.
    await copyFile(img, `${img}.bak`);
    await copyFile(stateFile, `${stateFile}.bak`);
    await session((put) => put(4 * MiB, randomBytes(MiB)));
    // Restored from the backup, then the guest writes again.
    await copyFile(`${img}.bak`, img);
    await copyFile(`${stateFile}.bak`, stateFile);
    const after = randomBytes(65536);
    const { warnings } = await session((put) => put(MiB, after));
    expect(warnings.join('\n')).toMatch(/older than the last committed point/);
    const expected = Buffer.alloc(8 * MiB);
    base.copy(expected, 0);
    after.copy(expected, MiB);
    const last = sink.committed[sink.committed.length - 1]?.points[0];
    expect((await readAll(store, last?.id as string)).equals(expected)).toBe(true);
  });

  it('resyncs on request (process server dropped its backlog), sending only what differs', async () => {
    const img = join(dir, 'disk.qcow2');
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', img, '4M']);
    const qsd = await daemon([{ path: img }]);
    const nbd = await guest(qsd, 0);
    const model = Buffer.alloc(4 * MiB);
    const put = async (offset: number, data: Buffer): Promise<void> => {
      await nbd.write(offset, data);
      data.copy(model, offset);
    };
    await put(0, randomBytes(MiB));
    const sink = new StoreSink(store, 'vm1');
    const agent = agentFor(qsd, sink);
    const warnings: string[] = [];
    agent.on('warning', (w: { message: string }) => warnings.push(w.message));
    await agent.start();
    await waitFor<CutReport>(agent, 'cut', () => true);
    const before = agent.bytesSent;
    await put(2 * MiB, randomBytes(65536));
    agent.requestResync('the process server dropped this machine’s backlog');
    await waitFor<CutReport>(agent, 'cut', () => warnings.some((w) => /dropped/.test(w)));
    await agent.stop();
    expect(agent.bytesSent - before).toBe(65536);
    const last = sink.committed[sink.committed.length - 1]?.points[0];
    expect((await readAll(store, last?.id as string)).equals(model)).toBe(true);
  });

  it('loses no change when a cycle fails before its cut is acknowledged', async () => {
    const img = join(dir, 'disk.qcow2');
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', img, '4M']);
    const qsd = await daemon([{ path: img }]);
    const nbd = await guest(qsd, 0);
    const model = Buffer.alloc(4 * MiB);
    const put = async (offset: number, data: Buffer): Promise<void> => {
      await nbd.write(offset, data);
      data.copy(model, offset);
    };
    await put(0, randomBytes(MiB));
    // A sink that refuses one cut marker, as a process server that goes away would.
    let refuse = false;
    class FlakySink extends StoreSink {
      override async cut(options: Parameters<StoreSink['cut']>[0]): Promise<void> {
        if (refuse) {
          refuse = false;
          throw new LifeboatError('LB_TEST_SINK_DOWN', 'The sink is down.');
        }
        await super.cut(options);
      }
    }
    const sink = new FlakySink(store, 'vm1');
    const agent = agentFor(qsd, sink);
    const warnings: string[] = [];
    agent.on('warning', (w: { code: string }) => warnings.push(w.code));
    await agent.start();
    await waitFor<CutReport>(agent, 'cut', () => true);
    await put(MiB, randomBytes(65536));
    refuse = true;
    while (!warnings.includes('LB_TEST_SINK_DOWN')) await new Promise((r) => setTimeout(r, 50));
    await put(2 * MiB, randomBytes(65536));
    await waitFor<CutReport>(agent, 'cut', () => true);
    await agent.stop();
    const last = sink.committed[sink.committed.length - 1]?.points[0];
    expect((await readAll(store, last?.id as string)).equals(model)).toBe(true);
  });

  it('stops within its grace period when the sink never acknowledges, and the next run loses nothing', async () => {
    const img = join(dir, 'disk.qcow2');
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', img, '4M']);
    const qsd = await daemon([{ path: img }]);
    const nbd = await guest(qsd, 0);
    const model = Buffer.alloc(4 * MiB);
    const put = async (offset: number, data: Buffer): Promise<void> => {
      await nbd.write(offset, data);
      data.copy(model, offset);
    };
    await put(0, randomBytes(MiB));
    let silent = false;
    class SilentSink extends StoreSink {
      override waitForAck(): Promise<void> {
        // A process server that went away: acknowledgements stop coming.
        return silent ? new Promise<void>(() => undefined) : super.waitForAck();
      }
    }
    const first = agentFor(qsd, new SilentSink(store, 'vm1'), { stopGraceMs: 500 });
    await first.start();
    await waitFor<CutReport>(first, 'cut', () => true);
    silent = true;
    await put(MiB, randomBytes(65536));
    await new Promise((r) => setTimeout(r, 1500));
    await first.stop();
    expect(first.status().phase).toBe('stopped');

    await put(2 * MiB, randomBytes(65536));
    const sink = new StoreSink(store, 'vm1');
    const second = agentFor(qsd, sink);
    const warnings: string[] = [];
    second.on('warning', (w: { code: string }) => warnings.push(w.code));
    await second.start();
    await waitFor<CutReport>(second, 'cut', () => true);
    await second.stop();
    // The cut the first agent gave up on was committed by the sink: adopted, no resync.
    expect(warnings).not.toContain('LB_AGENT_RESYNC');
    const last = sink.committed[sink.committed.length - 1]?.points[0];
    expect((await readAll(store, last?.id as string)).equals(model)).toBe(true);
  });
  it('freezes the guest for the transaction alone: after its overlays exist, thawed before the views are exported', async () => {
    const img = join(dir, 'disk.qcow2');
    await runCommand('qemu-img', ['create', '-q', '-f', 'qcow2', img, '4M']);
    const qsd = await daemon([{ path: img }]);
    const nbd = await guest(qsd, 0);
    await nbd.write(0, randomBytes(MiB));
    const sink = new StoreSink(store, 'vm1');
    let cutId = '';
    const seen: string[] = [];
    const frozenAt = new Map<string, number>();
    const qga = await fakeGuestAgent(join(dir, 'qga.sock'), {
      freeze: async () => {
        frozenAt.set(cutId, Date.now());
        const overlays = await readdir(join(dir, 'agent', 'overlays')).catch((): string[] => []);
        seen.push(
          `freeze: overlay ${overlays.includes(`0-${cutId}.qcow2`) ? 'created' : 'missing'}`,
        );
      },
      thaw: async () => {
        const exports = await NbdClient.listExports({ path: qsd.nbdSocket as string });
        const view = exports.some((e) => e.name === 'lb-cut-disk0');
        seen.push(`thaw: view ${view ? 'exported' : 'not exported'}`);
      },
    });
    cleanups.push(() => qga.close());
    const agent = agentFor(qsd, sink, {
      guestAgentSocket: join(dir, 'qga.sock'),
      appConsistentIntervalMs: 1000,
      hooks: { beforeCut: (id) => void (cutId = id) },
    });
    await agent.start();
    const first = await agent.nextCut();
    const second = await agent.nextCut();
    await agent.stop();
    expect([first.kind, second.kind]).toEqual(['app', 'app']);
    expect(seen.slice(0, 4)).toEqual([
      'freeze: overlay created',
      'thaw: view not exported',
      'freeze: overlay created',
      'thaw: view not exported',
    ]);
    // The point's time is taken once the guest is frozen, right before the transaction.
    for (const c of [first, second])
      expect(c.time).toBeGreaterThanOrEqual(frozenAt.get(c.cutId) as number);
  });
});
