import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect } from 'node:tls';
import type { TLSSocket } from 'node:tls';
import { promisify } from 'node:util';
import { FrameDecoder, encodeFrame } from '@lifeboat/protocol';
import type { Frame, HelloDisk } from '@lifeboat/protocol';
import { ProcessServer } from '@lifeboat/process-server';
import type { ProcessServerOptions } from '@lifeboat/process-server';
import { DirectoryBackend, Store } from '@lifeboat/store';
import type { StoreApi } from '@lifeboat/store';

const run = promisify(execFile);

/** PEM material of a throwaway PKI for one test file. */
export interface TestPki {
  ca: Buffer;
  server: { cert: Buffer; key: Buffer; certPath: string; keyPath: string };
  caPath: string;
  /** A client certificate signed by the test CA. */
  client: { cert: Buffer; key: Buffer };
  /** A client certificate from another CA the server does not trust. */
  foreign: { cert: Buffer; key: Buffer };
}

async function makeCa(dir: string, name: string): Promise<{ crt: string; key: string }> {
  const crt = join(dir, `${name}.crt`);
  const key = join(dir, `${name}.key`);
  await run('openssl', [
    'req',
    '-x509',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:P-256',
    '-nodes',
    '-keyout',
    key,
    '-out',
    crt,
    '-days',
    '2',
    '-subj',
    `/CN=${name}`,
  ]);
  return { crt, key };
}

async function makeLeaf(
  dir: string,
  ca: { crt: string; key: string },
  name: string,
  ext: string,
): Promise<{ cert: Buffer; key: Buffer; certPath: string; keyPath: string }> {
  const key = join(dir, `${name}.key`);
  const csr = join(dir, `${name}.csr`);
  const crt = join(dir, `${name}.crt`);
  const extFile = join(dir, `${name}.ext`);
  await writeFile(extFile, ext);
  await run('openssl', [
    'req',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:P-256',
    '-nodes',
    '-keyout',
    key,
    '-out',
    csr,
    '-subj',
    `/CN=${name}`,
  ]);
  await run('openssl', [
    'x509',
    '-req',
    '-in',
    csr,
    '-CA',
    ca.crt,
    '-CAkey',
    ca.key,
    '-CAcreateserial',
    '-out',
    crt,
    '-days',
    '2',
    '-extfile',
    extFile,
  ]);
  return { cert: await readFile(crt), key: await readFile(key), certPath: crt, keyPath: key };
}

/** Creates a CA, a server certificate for 127.0.0.1/localhost, a client certificate, and one from a foreign CA. */
export async function createTestPki(dir: string): Promise<TestPki> {
  const ca = await makeCa(dir, 'test-ca');
  const other = await makeCa(dir, 'other-ca');
  const server = await makeLeaf(
    dir,
    ca,
    'server',
    'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n',
  );
  const client = await makeLeaf(dir, ca, 'agent', 'extendedKeyUsage=clientAuth\n');
  const foreign = await makeLeaf(dir, other, 'intruder', 'extendedKeyUsage=clientAuth\n');
  return {
    ca: await readFile(ca.crt),
    caPath: ca.crt,
    server,
    client: { cert: client.cert, key: client.key },
    foreign: { cert: foreign.cert, key: foreign.key },
  };
}

/**
 * The source disks of one test machine, in memory, with a copy of every disk at every cut:
 * what each committed point must equal byte for byte.
 */
export class SourceMachine {
  readonly disks = new Map<string, Buffer>();
  readonly cuts = new Map<string, Map<string, Buffer>>();

  constructor(
    readonly machine: string,
    disks: HelloDisk[],
  ) {
    for (const d of disks) this.disks.set(d.name, Buffer.alloc(d.size));
  }

  /** The disk list for a hello. */
  helloDisks(): HelloDisk[] {
    return [...this.disks].map(([name, b]) => ({ name, size: b.length }));
  }

  write(disk: string, offset: number, data: Buffer): void {
    data.copy(this.disks.get(disk)!, offset);
  }

  zero(disk: string, offset: number, length: number): void {
    this.disks.get(disk)!.fill(0, offset, offset + length);
  }

  resize(disk: string, size: number): void {
    const old = this.disks.get(disk)!;
    const next = Buffer.alloc(size);
    old.copy(next, 0, 0, Math.min(size, old.length));
    this.disks.set(disk, next);
  }

  cut(cutId: string): void {
    this.cuts.set(cutId, new Map([...this.disks].map(([n, b]) => [n, Buffer.from(b)])));
  }
}

/** Random extents: writes mostly, some zero ranges, some trims, all 512-aligned and inside the disk. */
export function randomExtent(
  size: number,
  rnd: () => number,
): { kind: 'write' | 'zero' | 'trim'; offset: number; length: number } {
  const r = rnd();
  const kind = r < 0.8 ? 'write' : r < 0.9 ? 'zero' : 'trim';
  const sectors = size / 512;
  const len = 1 + Math.floor(rnd() * Math.min(sectors, 256));
  const off = Math.floor(rnd() * (sectors - len + 1));
  return { kind, offset: off * 512, length: len * 512 };
}

/** A small deterministic PRNG (mulberry32) so failures replay. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * Checks every committed point of the machine against the source at its cut; returns the
 * number of points checked. Throws naming the first difference.
 */
export async function verifyPoints(store: StoreApi, src: SourceMachine): Promise<number> {
  const points = await store.listPoints({ machine: src.machine });
  for (const p of points) {
    const expected = src.cuts.get(p.cut ?? '')?.get(p.disk);
    if (!expected)
      throw new Error(
        `point ${p.id} of ${p.machine}/${p.disk} has cut ${p.cut}, which the test never took`,
      );
    if (p.size !== expected.length)
      throw new Error(
        `point ${p.id} (${p.disk}, cut ${p.cut}) has size ${p.size}, expected ${expected.length}`,
      );
    const reader = await store.openPoint(p.id);
    const got = await reader.readAt(0, p.size);
    if (!got.equals(expected)) {
      let i = 0;
      while (got[i] === expected[i]) i++;
      throw new Error(
        `point ${p.id} (${p.disk}, cut ${p.cut}) differs from the source at byte ${i}`,
      );
    }
  }
  return points.length;
}

/** A hand-driven TLS connection speaking raw frames, for fault tests. */
export class RawSession {
  readonly frames: Frame[] = [];
  closed = false;
  decodeError: unknown;
  private readonly decoder = new FrameDecoder();
  private readonly waiters: Array<() => void> = [];

  private constructor(readonly socket: TLSSocket) {
    socket.on('data', (c: Buffer) => {
      try {
        this.frames.push(...this.decoder.push(c));
      } catch (err) {
        this.decodeError = err;
      }
      this.notify();
    });
    socket.on('error', () => undefined);
    socket.on('close', () => {
      this.closed = true;
      this.notify();
    });
  }

  /** Connects with the given client certificate. */
  static async connect(
    port: number,
    ca: Buffer,
    id: { cert: Buffer; key: Buffer },
  ): Promise<RawSession> {
    const socket = connect({
      host: '127.0.0.1',
      port,
      ca,
      cert: id.cert,
      key: id.key,
      servername: 'localhost',
      minVersion: 'TLSv1.3',
    });
    await new Promise<void>((resolve, reject) => {
      socket.once('secureConnect', () => resolve());
      socket.once('error', reject);
    });
    return new RawSession(socket);
  }

  send(f: Frame): void {
    for (const p of encodeFrame(f)) this.socket.write(p);
  }

  sendBytes(b: Buffer): void {
    this.socket.write(b);
  }

  /** Waits until a frame matches, or the connection closes (then returns undefined). */
  async waitFor(pred: (f: Frame) => boolean, timeoutMs = 30_000): Promise<Frame | undefined> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const f = this.frames.find(pred);
      if (f) return f;
      if (this.closed) return undefined;
      if (Date.now() > deadline) throw new Error('timed out waiting for a frame');
      await new Promise<void>((resolve) => {
        this.waiters.push(resolve);
        setTimeout(resolve, 200);
      });
    }
  }

  /** Waits for the ERROR frame the server sends before closing; returns its code. */
  async errorCode(): Promise<string | undefined> {
    const f = await this.waitFor((x) => x.type === 'error');
    return f?.type === 'error' ? f.code : undefined;
  }

  destroy(): void {
    this.socket.destroy();
  }

  private notify(): void {
    for (const w of this.waiters.splice(0)) w();
  }
}

/** Waits until `cond` holds, polling; throws with `what` after the timeout. */
export async function waitUntil(
  cond: () => boolean | Promise<boolean>,
  what: string,
  timeoutMs = 60_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A process server on loopback over a fresh directory store, with its own throwaway PKI. */
export interface TestProcessServer {
  /** The test's private directory (PKI, store, journal); removed by stop. */
  dir: string;
  pki: TestPki;
  store: Store;
  server: ProcessServer;
  /** Stops the server, closes the store and removes the directory. */
  stop(): Promise<void>;
}

/**
 * Starts a process server for one test file: a temp directory named with `prefix`, a test PKI,
 * a directory store (cheap scrypt cost), and the server on 127.0.0.1 with an ephemeral port and
 * no health listener unless `options` say otherwise.
 */
export async function startTestProcessServer(
  prefix: string,
  options: Partial<ProcessServerOptions> = {},
  /** Run store work on this many worker threads (as `lifeboat process-server start` does) instead of the ingest thread. */
  storeWorkers?: number,
): Promise<TestProcessServer> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  const pki = await createTestPki(dir);
  const store = await Store.init({
    backend: new DirectoryBackend({ path: join(dir, 'store') }),
    passphrase: 'test',
    kdfCost: 1024,
  });
  const server = await ProcessServer.start({
    ...(storeWorkers === undefined
      ? { store }
      : {
          storeWorkers: {
            count: storeWorkers,
            spec: { kind: 'directory', path: join(dir, 'store'), passphrase: 'test' },
          },
        }),
    journalDir: join(dir, 'ps'),
    tls: { cert: pki.server.cert, key: pki.server.key, ca: pki.ca },
    host: '127.0.0.1',
    port: 0,
    healthPort: null,
    logLevel: 'silent',
    ...options,
  });
  return {
    dir,
    pki,
    store,
    server,
    async stop() {
      await server.stop();
      await store.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
}
