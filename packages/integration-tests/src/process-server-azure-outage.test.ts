import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ProcessServer } from '@lifeboat/process-server';
import { ReplicationClient, isLifeboatError } from '@lifeboat/protocol';
import { Store } from '@lifeboat/store';
import { AzureBlobBackend } from '@lifeboat/store-azure';
import { startAzurite } from '@lifeboat/testing';
import type { Azurite } from '@lifeboat/testing';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  SourceMachine,
  createTestPki,
  prng,
  verifyPoints,
  waitUntil,
} from './process-server-fixtures.js';
import type { TestPki } from './process-server-fixtures.js';

let dir: string;
let pki: TestPki;
let azurite: Azurite;
let store: Store;
let server: ProcessServer;
let client: ReplicationClient | undefined;

function backend(): AzureBlobBackend {
  // Few retries: the process server retries itself, and the test wants the outage seen quickly.
  return new AzureBlobBackend({
    connectionString: azurite.connectionString,
    container: 'lifeboat',
    createContainer: true,
    retry: { maxAttempts: 2, totalTimeoutMs: 2000, tryTimeoutMs: 5000 },
  });
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lb-ps-azure-'));
  pki = await createTestPki(dir);
  azurite = await startAzurite();
  store = await Store.init({ backend: backend(), passphrase: 'test', kdfCost: 1024 });
  server = await ProcessServer.start({
    store,
    journalDir: join(dir, 'ps'),
    tls: { cert: pki.server.cert, key: pki.server.key, ca: pki.ca },
    host: '127.0.0.1',
    port: 0,
    healthPort: null,
    logLevel: 'silent',
    storeRetryInitialMs: 100,
    storeRetryMaxMs: 1000,
  });
});

afterAll(async () => {
  await client?.close();
  await server?.stop();
  await store?.close().catch(() => undefined);
  await azurite?.stop();
  await rm(dir, { recursive: true, force: true });
});

describe('process server with Azure Blob Storage (Azurite)', () => {
  it('keeps acknowledging while the store is down, then drains the backlog oldest first; all points exact', async () => {
    const src = new SourceMachine('azure-m', [
      { name: 'vda', size: 512 * 1024 },
      { name: 'vdb', size: 128 * 1024 },
    ]);
    client = new ReplicationClient({
      host: '127.0.0.1',
      port: server.port,
      servername: 'localhost',
      ca: pki.ca,
      cert: pki.client.cert,
      key: pki.client.key,
      machine: src.machine,
      disks: src.helloDisks(),
    });
    await client.start();
    const c = client;
    const rnd = prng(5);
    const cycle = async (): Promise<void> => {
      for (let i = 0; i < 6; i++) {
        for (const [disk, buf] of src.disks) {
          const off = Math.floor(rnd() * (buf.length / 512 - 32)) * 512;
          const data = Buffer.alloc(512 * (1 + Math.floor(rnd() * 31)), Math.floor(rnd() * 256));
          await c.write(disk, off, data);
          src.write(disk, off, data);
        }
      }
      const { cutId } = await c.cut();
      src.cut(cutId);
      await c.waitForAck();
    };
    const points = async (): Promise<number> =>
      (await store.listPoints({ machine: src.machine })).length;

    for (let i = 0; i < 3; i++) await cycle();
    await waitUntil(async () => (await points()) === 6, 'points before the outage');

    await azurite.kill();
    // The agent's frames are still acknowledged: they are durable in the journal.
    for (let i = 0; i < 5; i++) await cycle();
    await waitUntil(
      () => server.healthReport().store.reachable === false,
      'the outage reported in health',
    );
    const during = server.healthReport().machines[0]!;
    expect(during.backlogBytes).toBeGreaterThan(0);
    expect(during.lastError).not.toBeNull();
    expect(server.healthReport().status).toBe('degraded');

    await azurite.restart();
    await waitUntil(
      () => server.healthReport().machines[0]!.backlogBytes === 0,
      'the backlog drained',
      120_000,
    );
    const all = await store.listPoints({ machine: src.machine });
    expect(all.length).toBe(16);
    // Drained oldest first: per disk, points were committed in cut order.
    for (const disk of ['vda', 'vdb']) {
      const ps = all.filter((p) => p.disk === disk);
      const byCommit = [...ps]
        .sort((a, b) => a.committedAt.getTime() - b.committedAt.getTime())
        .map((p) => p.cut);
      expect(byCommit).toEqual([...src.cuts.keys()]);
    }
    expect(await verifyPoints(store, src)).toBe(16);
    expect(server.healthReport().store.reachable).toBe(true);
  }, 180_000);

  it('applies backpressure when the journal is full, then marks the machine for resync after the overflow timeout', async () => {
    const smallOptions = {
      store,
      journalDir: join(dir, 'ps-small'),
      journalMaxBytes: 4 * 1024 * 1024,
      overflowTimeoutMs: 1500,
      tls: { cert: pki.server.cert, key: pki.server.key, ca: pki.ca },
      host: '127.0.0.1',
      port: 0,
      healthPort: null,
      logLevel: 'silent' as const,
      storeRetryInitialMs: 100,
      storeRetryMaxMs: 1000,
    };
    let small = await ProcessServer.start(smallOptions);
    const src = new SourceMachine('overflow-m', [{ name: 'vda', size: 2 * 1024 * 1024 }]);
    const c = new ReplicationClient({
      host: '127.0.0.1',
      port: small.port,
      servername: 'localhost',
      ca: pki.ca,
      cert: pki.client.cert,
      key: pki.client.key,
      machine: src.machine,
      disks: src.helloDisks(),
      maxInFlightBytes: 2 * 1024 * 1024,
      reconnectInitialDelayMs: 50,
      reconnectMaxDelayMs: 200,
    });
    let failed = false;
    c.on('failed', () => (failed = true));
    const resync = new Promise<void>((resolve) => c.once('resync-required', () => resolve()));
    try {
      await c.start();
      await azurite.kill();
      // A cut durable in the journal whose point cannot be committed yet (the store is down).
      const first = Buffer.alloc(64 * 1024, 7);
      src.write('vda', 0, first);
      await c.write('vda', 0, first);
      const { seq: cutSeq } = await c.cut();
      await c.waitForAck();
      let stop = false;
      const rnd = prng(11);
      const writer = (async () => {
        while (!stop) {
          const off = Math.floor(rnd() * 2048) * 1024;
          const data = Buffer.alloc(64 * 1024, Math.floor(rnd() * 256));
          const len = Math.min(data.length, src.disks.get('vda')!.length - off);
          src.write('vda', off, data.subarray(0, len));
          await c.write('vda', off, data.subarray(0, len));
        }
      })();
      const outcome = (p: Promise<unknown>): Promise<unknown> =>
        p.then(
          () => 'resolved',
          (e: unknown) => e,
        );
      const writerEnd = outcome(writer);
      // Journal full: the server stops reading, the agent's writes wait; nothing fails.
      await waitUntil(
        () => small.healthReport().journal.fullForSeconds !== null,
        'the journal full',
      );
      expect(failed).toBe(false);
      // Waiting for frames and a cut the server will drop: each must learn it, not hang.
      const lastAck = outcome(c.waitForAck());
      const lastCommit = outcome(c.waitForCommit(cutSeq));
      await resync;
      stop = true;
      const inTime = <T>(p: Promise<T>, what: string): Promise<T> =>
        Promise.race([
          p,
          new Promise<T>((_, reject) =>
            setTimeout(() => reject(new Error(`${what} still pending after the resync`)), 10_000),
          ),
        ]);
      for (const [p, what] of [
        [lastAck, 'the ack of a dropped frame'],
        [lastCommit, 'the commit of a dropped cut'],
        [writerEnd, 'a write waiting for room in the window'],
      ] as const) {
        const got = await inTime(p, what);
        // The write that waited fails with the resync; a write that got through just ends.
        if (got === 'resolved' && p === writerEnd) continue;
        expect(isLifeboatError(got, 'LB_PS_RESYNC_REQUIRED'), `${what}: ${String(got)}`).toBe(true);
      }
      const h = small.healthReport().machines.find((m) => m.machine === 'overflow-m')!;
      expect(h.resyncRequired).toBe(true);
      expect(h.resyncReason).toMatch(/journal full/);
      expect(h.backlogBytes).toBe(0);
      expect(small.healthReport().journal.usedBytes).toBeLessThan(4 * 1024 * 1024);

      // The agent resyncs: here, the whole disk, then a cut; the flag clears once that point is
      // committed. The server restarts before that (the store is still down): the welcome after
      // it still says resyncRequired, for the same request, and the client goes on with the
      // resync it holds instead of dropping it and asking for another.
      let resyncs = 0;
      c.on('resync-required', () => resyncs++);
      await c.write('vda', 0, Buffer.from(src.disks.get('vda')!));
      const port = small.port;
      await small.stop();
      const reconnected = new Promise<void>((resolve) => c.once('connected', () => resolve()));
      small = await ProcessServer.start({ ...smallOptions, port });
      await reconnected;
      expect(resyncs).toBe(0);
      await azurite.restart();
      const { cutId } = await c.cut();
      src.cut(cutId);
      await c.waitForAck();
      await waitUntil(
        () =>
          small.healthReport().machines.find((m) => m.machine === 'overflow-m')!.resyncRequired ===
          false,
        'the resync committed',
        120_000,
      );
      expect(await verifyPoints(store, src)).toBe(1);
      expect(failed).toBe(false);
    } finally {
      await c.close();
      await small.stop();
    }
  }, 180_000);
});
