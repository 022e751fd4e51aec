import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import type { ProcessServerHealth } from '@lifeboat/process-server';
import { ReplicationClient } from '@lifeboat/protocol';
import { DirectoryBackend, Store } from '@lifeboat/store';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ChildConfig } from './process-server-child.js';
import { SourceMachine, createTestPki, prng, verifyPoints } from './process-server-fixtures.js';
import type { TestPki } from './process-server-fixtures.js';

const ITERATIONS = 20;
const CHILD = join(import.meta.dirname, 'process-server-child.ts');

let dir: string;
let pki: TestPki;
let port: number;
let healthPort = 0;
let child: ChildProcess | undefined;
const clients: ReplicationClient[] = [];

async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const p = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return p;
}

/** Starts the process server as a child process and waits for its ready line. */
async function startChild(): Promise<ChildProcess> {
  const cfg: ChildConfig = {
    store: { dir: join(dir, 'store') },
    passphrase: 'test',
    journalDir: join(dir, 'ps'),
    port,
    tls: { certPath: pki.server.certPath, keyPath: pki.server.keyPath, caPath: pki.caPath },
    storeWorkers: 2,
  };
  const c = spawn(
    process.execPath,
    ['--conditions=source', '--import', 'tsx', CHILD, JSON.stringify(cfg)],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let stderr = '';
  c.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const lines = createInterface({ input: c.stdout! });
  await new Promise<void>((resolve, reject) => {
    lines.on('line', (l) => {
      if (!l.includes('"ready":true')) return;
      healthPort = (JSON.parse(l) as { healthPort: number }).healthPort;
      resolve();
    });
    c.once('exit', (code) =>
      reject(new Error(`process server child exited (${code}) before ready:\n${stderr}`)),
    );
  });
  c.removeAllListeners('exit');
  return c;
}

async function kill9(c: ChildProcess): Promise<void> {
  if (c.exitCode !== null || c.signalCode !== null) return;
  const gone = new Promise((r) => c.once('exit', r));
  c.kill('SIGKILL');
  await gone;
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lb-ps-crash-'));
  pki = await createTestPki(dir);
  const store = await Store.init({
    backend: new DirectoryBackend({ path: join(dir, 'store') }),
    passphrase: 'test',
    kdfCost: 1024,
  });
  await store.close();
  port = await freePort();
});

afterAll(async () => {
  for (const c of clients) await c.close();
  if (child) await kill9(child);
  await rm(dir, { recursive: true, force: true });
});

describe('process server crash safety', () => {
  it(`keeps every acknowledged frame and every point exact across ${ITERATIONS} kill -9 at random instants`, async () => {
    const sources = [
      new SourceMachine('crash-a', [{ name: 'vda', size: 512 * 1024 }]),
      new SourceMachine('crash-b', [
        { name: 'vda', size: 256 * 1024 },
        { name: 'vdb', size: 256 * 1024 },
      ]),
    ];
    let resyncs = 0;
    let failures = 0;
    let written = 0;
    const rnd = prng(20261125);
    child = await startChild();
    for (const s of sources) {
      const c = new ReplicationClient({
        host: '127.0.0.1',
        port,
        servername: 'localhost',
        ca: pki.ca,
        cert: pki.client.cert,
        key: pki.client.key,
        machine: s.machine,
        disks: s.helloDisks(),
        maxInFlightBytes: 1024 * 1024,
        reconnectInitialDelayMs: 50,
        reconnectMaxDelayMs: 400,
      });
      c.on('resync-required', () => resyncs++);
      c.on('failed', () => failures++);
      clients.push(c);
      await c.start();
    }
    let stop = false;
    // Agents stream all along; they never stop for the crashes, only wait (backpressure) when unacked bytes pile up.
    const loops = sources.map(async (s, i) => {
      const c = clients[i]!;
      while (!stop) {
        for (let k = 0; k < 6; k++) {
          for (const [disk, buf] of s.disks) {
            const off = Math.floor(rnd() * (buf.length / 512 - 64)) * 512;
            const data = Buffer.alloc(512 * (1 + Math.floor(rnd() * 63)), Math.floor(rnd() * 256));
            data.writeUInt32LE(written, 0);
            await c.write(disk, off, data);
            s.write(disk, off, data);
            written += data.length;
          }
        }
        const { cutId } = await c.cut();
        s.cut(cutId);
        // Agents cut every few seconds; here every ~150 ms, which still gives ~5 cuts per crash.
        await new Promise((r) => setTimeout(r, 150));
      }
    });

    for (let i = 0; i < ITERATIONS; i++) {
      await new Promise((r) => setTimeout(r, 100 + rnd() * 400));
      await kill9(child);
      child = await startChild();
    }
    stop = true;
    await Promise.all(loops);
    for (const c of clients) await c.waitForAck();

    // Every acknowledged cut must become points; the last server drains its journal, then stops cleanly.
    const h = await waitForDrain();
    child.kill('SIGTERM');
    await new Promise((r) => child!.once('exit', r));
    child = undefined;
    expect(h).toBe(true);

    const store = await Store.open({
      backend: new DirectoryBackend({ path: join(dir, 'store') }),
      passphrase: 'test',
    });
    try {
      for (const s of sources) {
        const points = await store.listPoints({ machine: s.machine });
        // One point per disk per cut, never two for the same cut (a replayed commit is not repeated).
        expect(points.length).toBe(s.cuts.size * s.disks.size);
        expect(new Set(points.map((p) => `${p.disk}/${p.cut}`)).size).toBe(points.length);
        expect(await verifyPoints(store, s)).toBe(points.length);
      }
    } finally {
      await store.close();
    }
    expect(resyncs).toBe(0);
    expect(failures).toBe(0);
    // Resume, not resync: bytes sent stay within a small factor of bytes written.
    const sent = clients.reduce((n, c) => n + c.stats.bytesSent, 0);
    expect(sent).toBeLessThan(written * 3);
  }, 240_000);
});

/** Polls the child's health until every machine's journaled frames are committed. */
async function waitForDrain(): Promise<boolean> {
  const deadline = Date.now() + 90_000;
  while (Date.now() < deadline) {
    const res = await fetch(`http://127.0.0.1:${healthPort}/health`);
    const h = (await res.json()) as ProcessServerHealth;
    if (
      h.machines.length > 0 &&
      h.machines.every((m) => m.backlogBytes === 0 && m.committedSeq === m.lastSeq)
    )
      return true;
    await new Promise((r) => setTimeout(r, 200));
  }
  return false;
}
