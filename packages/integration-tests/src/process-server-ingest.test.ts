import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ProcessServer } from '@lifeboat/process-server';
import type { ProcessServerHealth } from '@lifeboat/process-server';
import { ReplicationClient } from '@lifeboat/protocol';
import { DirectoryBackend, Store } from '@lifeboat/store';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CRASH_PATTERN } from './crashing-worker-store.js';
import type { CrashingStoreSpec } from './crashing-worker-store.js';
import {
  SourceMachine,
  startTestProcessServer,
  prng,
  randomExtent,
  verifyPoints,
  waitUntil,
} from './process-server-fixtures.js';
import type { TestPki, TestProcessServer } from './process-server-fixtures.js';

let dir: string;
let pki: TestPki;
let store: Store;
let server: ProcessServer;
let ps: TestProcessServer | undefined;
const clients: ReplicationClient[] = [];

beforeAll(async () => {
  ps = await startTestProcessServer('lb-ps-ingest-', {
    healthPort: 0,
    // Small, so sessions pause and resume for the fsync all the time (a hang here once).
    sessionUnsyncedBytes: 64 * 1024,
  });
  ({ dir, pki, store, server } = ps);
});

afterAll(async () => {
  for (const c of clients) await c.close();
  await ps?.stop();
});

function client(src: SourceMachine): ReplicationClient {
  const c = new ReplicationClient({
    host: '127.0.0.1',
    port: server.port,
    servername: 'localhost',
    ca: pki.ca,
    cert: pki.client.cert,
    key: pki.client.key,
    machine: src.machine,
    disks: src.helloDisks(),
    maxInFlightBytes: 256 * 1024,
  });
  clients.push(c);
  return c;
}

/** Streams `cycles` cycles of random extents and a cut each; the source model follows. */
async function stream(
  src: SourceMachine,
  c: ReplicationClient,
  cycles: number,
  seed: number,
): Promise<void> {
  const rnd = prng(seed);
  for (let cycle = 0; cycle < cycles; cycle++) {
    if (cycle === Math.floor(cycles / 2) && src.disks.has('vdb')) {
      // A disk grows mid-stream; the next writes use the new space.
      const grown = src.disks.get('vdb')!.length + 256 * 1024;
      await c.resize('vdb', grown);
      src.resize('vdb', grown);
    }
    for (let i = 0; i < 12; i++) {
      for (const [disk, buf] of src.disks) {
        const e = randomExtent(buf.length, rnd);
        if (e.kind === 'write') {
          const data = Buffer.alloc(e.length);
          for (let k = 0; k < data.length; k += 4) data.writeUInt32LE((rnd() * 2 ** 32) >>> 0, k);
          await c.write(disk, e.offset, data);
          src.write(disk, e.offset, data);
        } else {
          await (e.kind === 'zero'
            ? c.writeZeroes(disk, e.offset, e.length)
            : c.trim(disk, e.offset, e.length));
          src.zero(disk, e.offset, e.length);
        }
      }
    }
    const { cutId } = await c.cut({ kind: cycle % 3 === 0 ? 'app' : 'crash' });
    src.cut(cutId);
  }
  await c.waitForAck();
}

async function getJson(path: string): Promise<ProcessServerHealth> {
  const res = await fetch(`http://127.0.0.1:${server.healthPort}${path}`);
  expect(res.status).toBe(200);
  return (await res.json()) as ProcessServerHealth;
}

describe('process server ingest', () => {
  it('turns the cuts of several machines into byte-exact points, and reports health and metrics', async () => {
    const sources = [1, 2, 3].map(
      (i) =>
        new SourceMachine(`machine-${i}`, [
          { name: 'vda', size: 1024 * 1024 },
          { name: 'vdb', size: 512 * 1024 },
        ]),
    );
    const cs = sources.map((s) => client(s));
    await Promise.all(cs.map((c) => c.start()));
    await Promise.all(sources.map((s, i) => stream(s, cs[i]!, 6, 100 + i)));
    // Every acknowledged cut becomes points of both disks.
    await waitUntil(
      async () => (await store.listPoints()).length === 3 * 6 * 2,
      'all points committed',
    );
    for (const s of sources) expect(await verifyPoints(store, s)).toBe(12);

    const health = await getJson('/health');
    expect(health.machines.map((m) => m.machine)).toEqual(['machine-1', 'machine-2', 'machine-3']);
    for (const m of health.machines) {
      expect(m.connected).toBe(true);
      expect(m.backlogBytes).toBe(0);
      expect(m.committedSeq).toBe(m.lastSeq);
      expect(m.disks.map((d) => d.disk)).toEqual(['vda', 'vdb']);
      expect(m.disks[1]!.size).toBe(768 * 1024);
      for (const d of m.disks) {
        expect(d.rpoSeconds).not.toBeNull();
        expect(d.bytesPerSecondIn).toBeGreaterThanOrEqual(0);
        expect(d.bytesPerSecondOut).toBeGreaterThanOrEqual(0);
      }
    }
    expect(health.journal.maxBytes).toBeGreaterThan(0);
    // This machine's file system takes direct I/O: the journal bypasses the page cache.
    expect(health.journal.directIo).toBe(true);
    expect(health.process.rssBytes).toBeGreaterThan(0);
    const metrics = await (await fetch(`http://127.0.0.1:${server.healthPort}/metrics`)).text();
    expect(metrics).toContain('lifeboat_ps_disk_rpo_seconds{machine="machine-1",disk="vda"}');
    expect(metrics).toContain('lifeboat_ps_journal_used_bytes');
    expect(metrics).toContain('lifeboat_ps_commit_latency_ms{quantile="0.99"}');
  });

  it('resumes a machine after its client reconnects, without resending what was acknowledged', async () => {
    const src = new SourceMachine('machine-resume', [{ name: 'vda', size: 256 * 1024 }]);
    const c1 = client(src);
    await c1.start();
    await stream(src, c1, 2, 7);
    const acked = c1.lastAckedSeq;
    await c1.close();
    const c2 = client(src);
    await c2.start();
    // The new client continues the machine's sequence where the server's durable frames end.
    expect(c2.nextSeq).toBe(acked + 1);
    await stream(src, c2, 2, 8);
    await waitUntil(
      async () => (await store.listPoints({ machine: 'machine-resume' })).length >= 4,
      'points of the resumed machine',
    );
    expect(await verifyPoints(store, src)).toBe(4);
    // Labels of a cut reach its points (agents mark checkpoints of an initial sync this way).
    const labelled = await c2.cut({ kind: 'app', labels: { 'lifeboat.partial': 'initial-sync' } });
    src.cut(labelled.cutId);
    await c2.waitForAck();
    await waitUntil(
      async () =>
        (await store.listPoints({ machine: 'machine-resume', cut: labelled.cutId })).length === 1,
      'the labelled point',
    );
    const [p] = await store.listPoints({ machine: 'machine-resume', cut: labelled.cutId });
    expect(p).toMatchObject({ kind: 'app', labels: { 'lifeboat.partial': 'initial-sync' } });
  });

  it('applies bandwidth limits changed at run time without failing the agents', async () => {
    server.setBandwidthLimits({ total: 2 * 1024 * 1024, perMachine: 1024 * 1024 });
    const src = new SourceMachine('machine-limited', [{ name: 'vda', size: 512 * 1024 }]);
    const c = client(src);
    await c.start();
    await stream(src, c, 2, 9);
    const h = await getJson('/health');
    expect(h.ingest.machineBandwidthBytesPerSecond).toBe(1024 * 1024);
    server.setBandwidthLimits({ total: 0, perMachine: 0 });
    await waitUntil(
      async () => (await store.listPoints({ machine: 'machine-limited' })).length === 2,
      'points of the limited machine',
    );
    expect(await verifyPoints(store, src)).toBe(2);
  });

  it("discards a disk's frames since the last cut, and tells the agent which cut is committed", async () => {
    const src = new SourceMachine('machine-discard', [{ name: 'vda', size: 64 * 1024 }]);
    const c = client(src);
    await c.start();
    expect(await c.latestCut()).toBeUndefined();
    await c.write('vda', 0, Buffer.alloc(4096, 0xaa));
    src.write('vda', 0, Buffer.alloc(4096, 0xaa));
    const first = await c.cut();
    src.cut(first.cutId);
    await c.waitForCommit();
    expect(await c.latestCut()).toMatchObject({ cutId: first.cutId });
    // A write read at a cut the agent can no longer trust; the disk's block changed back since.
    await c.write('vda', 0, Buffer.alloc(4096, 0xbb));
    await c.discardPending('vda');
    await c.write('vda', 8192, Buffer.alloc(4096, 0xcc));
    src.write('vda', 8192, Buffer.alloc(4096, 0xcc));
    const second = await c.cut();
    src.cut(second.cutId);
    await c.waitForCommit();
    expect(await c.latestCut()).toMatchObject({ cutId: second.cutId });
    expect(await verifyPoints(store, src)).toBe(2);
  });

  it('marks a machine for resync when its journal records are damaged, and says so to its agent', async () => {
    const journalDir = join(dir, 'ps-damaged');
    const start = (): Promise<ProcessServer> =>
      ProcessServer.start({
        store,
        journalDir,
        journalMaxBytes: 4 * 1024 * 1024,
        tls: { cert: pki.server.cert, key: pki.server.key, ca: pki.ca },
        host: '127.0.0.1',
        port: 0,
        healthPort: null,
        logLevel: 'silent',
      });
    let ps = await start();
    const src = new SourceMachine('machine-damaged', [{ name: 'vda', size: 4 * 1024 * 1024 }]);
    let c = new ReplicationClient({
      host: '127.0.0.1',
      port: ps.port,
      servername: 'localhost',
      ca: pki.ca,
      cert: pki.client.cert,
      key: pki.client.key,
      machine: src.machine,
      disks: src.helloDisks(),
    });
    await c.start();
    // 3 MiB without a cut: records in several 1 MiB segments, none committed.
    for (let i = 0; i < 48; i++) await c.write('vda', i * 65536, Buffer.alloc(65536, i + 1));
    await c.waitForAck();
    await c.close();
    await ps.stop();
    const segs = (await readdir(join(journalDir, 'journal')))
      .filter((n) => n.endsWith('.lbj'))
      .sort();
    expect(segs.length).toBeGreaterThanOrEqual(2);
    const first = join(journalDir, 'journal', segs[0]!);
    const bytes = await readFile(first);
    const mid = Math.floor(bytes.length / 2);
    bytes[mid] = bytes[mid]! ^ 0xff;
    await writeFile(first, bytes);

    ps = await start();
    try {
      const h = ps.healthReport().machines.find((m) => m.machine === 'machine-damaged')!;
      expect(h.resyncRequired).toBe(true);
      expect(h.resyncReason).toMatch(/journal damaged/);
      c = new ReplicationClient({
        host: '127.0.0.1',
        port: ps.port,
        servername: 'localhost',
        ca: pki.ca,
        cert: pki.client.cert,
        key: pki.client.key,
        machine: src.machine,
        disks: src.helloDisks(),
      });
      const told = new Promise<void>((resolve) => c.once('resync-required', () => resolve()));
      await c.start();
      await told;
    } finally {
      await c.close();
      await ps.stop();
    }
  });

  it('runs store work on worker threads, with the same byte-exact points', async () => {
    const workers = await ProcessServer.start({
      storeWorkers: {
        count: 2,
        spec: { kind: 'directory', path: join(dir, 'store'), passphrase: 'test' },
      },
      journalDir: join(dir, 'ps-workers'),
      tls: { cert: pki.server.cert, key: pki.server.key, ca: pki.ca },
      host: '127.0.0.1',
      port: 0,
      healthPort: null,
      logLevel: 'silent',
    });
    try {
      const sources = [1, 2, 3].map(
        (i) =>
          new SourceMachine(`worker-m${i}`, [
            { name: 'vda', size: 512 * 1024 },
            { name: 'vdb', size: 256 * 1024 },
          ]),
      );
      const cs = sources.map((src) => {
        const c = new ReplicationClient({
          host: '127.0.0.1',
          port: workers.port,
          servername: 'localhost',
          ca: pki.ca,
          cert: pki.client.cert,
          key: pki.client.key,
          machine: src.machine,
          disks: src.helloDisks(),
        });
        clients.push(c);
        return c;
      });
      await Promise.all(cs.map((c) => c.start()));
      await Promise.all(sources.map((src, i) => stream(src, cs[i]!, 4, 300 + i)));
      await waitUntil(
        () =>
          workers
            .healthReport()
            .machines.every((m) => m.backlogBytes === 0 && m.committedSeq === m.lastSeq),
        'worker commits',
      );
      // A fresh reader: the points were written by other Store instances (the workers').
      const reader = await Store.open({
        backend: new DirectoryBackend({ path: join(dir, 'store') }),
        passphrase: 'test',
      });
      try {
        for (const src of sources) expect(await verifyPoints(reader, src)).toBe(8);
      } finally {
        await reader.close();
      }
    } finally {
      await workers.stop();
    }
  });

  it('answers a resync baseline for a large disk in many frames: digests the agent can match, zeros where the point is zero', async () => {
    const size = 128 * 1024 * 1024 * 1024; // 2 Mi chunks: 34 MiB of entries, 35 frames
    // Not a SourceMachine: the disk is far larger than memory; the test knows its three chunks.
    const c = new ReplicationClient({
      host: '127.0.0.1',
      port: server.port,
      servername: 'localhost',
      ca: pki.ca,
      cert: pki.client.cert,
      key: pki.client.key,
      machine: 'baseline-big',
      disks: [{ name: 'vda', size }],
    });
    clients.push(c);
    await c.start();
    const far = 100 * 1024 * 1024 * 1024;
    const a = randomBytes(65536);
    const b = randomBytes(65536);
    await c.write('vda', 65536, a);
    await c.write('vda', far, b);
    await c.write('vda', size - 65536, a); // the same content again: the same digest
    await c.cut();
    // Asked before the cut is committed: the server answers once it is.
    const baseline = await c.resyncBaseline('vda');
    expect(baseline).toBeDefined();
    const bl = baseline!;
    expect(bl.chunkSize).toBe(65536);
    expect(bl.size).toBe(size);
    expect(bl.idAt(0)).toBeNull();
    expect(bl.idAt(65536)).toBe(bl.idOf(a));
    expect(bl.idAt(far)).toBe(bl.idOf(b));
    expect(bl.idAt(far)).not.toBe(bl.idOf(a));
    expect(bl.idAt(far + 65536)).toBeNull();
    expect(bl.idAt(size - 65536)).toBe(bl.idOf(a));
    expect(bl.idAt(size)).toBeNull();
    // A disk without a point has no baseline.
    const fresh = client(new SourceMachine('baseline-none', [{ name: 'vda', size: 65536 }]));
    await fresh.start();
    expect(await fresh.resyncBaseline('vda')).toBeUndefined();
  });

  it('restarts a store worker thread that dies mid-cut, and commits every acknowledged frame from the journal', async () => {
    const marker = join(dir, 'store-worker-crashed');
    const spec: CrashingStoreSpec = {
      kind: 'directory',
      path: join(dir, 'store'),
      passphrase: 'test',
      crashMarker: marker,
    };
    const srv = await ProcessServer.start({
      storeWorkers: {
        count: 1,
        module: new URL('./crashing-worker-store.ts', import.meta.url).href,
        spec: spec as unknown as { kind: 'directory'; path: string; passphrase: string },
      },
      journalDir: join(dir, 'ps-worker-crash'),
      tls: { cert: pki.server.cert, key: pki.server.key, ca: pki.ca },
      host: '127.0.0.1',
      port: 0,
      healthPort: null,
      logLevel: 'silent',
      storeRetryInitialMs: 100,
    });
    const src = new SourceMachine('worker-crash', [{ name: 'vda', size: 1024 * 1024 }]);
    const c = new ReplicationClient({
      host: '127.0.0.1',
      port: srv.port,
      servername: 'localhost',
      ca: pki.ca,
      cert: pki.client.cert,
      key: pki.client.key,
      machine: src.machine,
      disks: src.helloDisks(),
    });
    clients.push(c);
    try {
      await c.start();
      const put = async (offset: number, data: Buffer): Promise<void> => {
        await c.write('vda', offset, data);
        src.write('vda', offset, data);
      };
      await put(0, randomBytes(64 * 1024));
      let cut = await c.cut();
      src.cut(cut.cutId);
      await c.waitForCommit();
      expect(srv.healthReport().storeWorkers).toMatchObject({ count: 1, alive: 1, restarts: 0 });

      // The second cut: every frame is acknowledged (in the journal) before the worker applies
      // them, and it dies on the second of them, with a write session open.
      await put(256 * 1024, randomBytes(8192));
      const poison = Buffer.alloc(4096);
      poison.write(CRASH_PATTERN);
      await put(512 * 1024, poison);
      await put(768 * 1024, randomBytes(16384));
      cut = await c.cut();
      src.cut(cut.cutId);
      await c.waitForAck();
      await c.waitForCommit();
      expect(existsSync(marker)).toBe(true);
      const h = srv.healthReport();
      expect(h.storeWorkers).toMatchObject({ count: 1, alive: 1, restarts: 1 });
      expect(h.storeWorkers?.lastError).toMatch(/exit code 1/);
      expect(h.status).toBe('ok');
      // Both points, byte-exact; the agent never noticed (no reconnect, no resync).
      expect(c.stats.reconnects).toBe(0);
      const reader = await Store.open({
        backend: new DirectoryBackend({ path: join(dir, 'store') }),
        passphrase: 'test',
      });
      try {
        expect(await verifyPoints(reader, src)).toBe(2);
      } finally {
        await reader.close();
      }
    } finally {
      await c.close();
      await srv.stop();
    }
  });
});
