import { randomBytes, randomUUID } from 'node:crypto';
import {
  createServer,
  request,
  type IncomingMessage,
  type Server,
  type ServerResponse,
} from 'node:http';
import type { AddressInfo } from 'node:net';
import { BlobServiceClient, ContainerSASPermissions } from '@azure/storage-blob';
import { isLifeboatError, type LifeboatError } from '@lifeboat/protocol';
import { DirectoryBackend, Store, type ObjectBackend, type ObjectInfo } from '@lifeboat/store';
import { AzureBlobBackend, type AzureBlobBackendOptions } from '@lifeboat/store-azure';
import { makeTempDir, startAzurite, type Azurite } from '@lifeboat/testing';
import fc from 'fast-check';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';

/** A backend under test and how to dispose of it. */
interface BackendUnderTest {
  backend: ObjectBackend;
  cleanup?: () => Promise<void>;
}

/** Rejection's LifeboatError code (or a description of what else happened). */
async function codeOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'resolved';
  } catch (err) {
    return isLifeboatError(err) ? err.code : `not a LifeboatError: ${String(err)}`;
  }
}

/** The LifeboatError a promise rejects with; fails the test if it resolves or throws anything else. */
async function rejection(p: Promise<unknown>): Promise<LifeboatError> {
  try {
    await p;
  } catch (err) {
    if (isLifeboatError(err)) return err;
    throw new Error(`expected a LifeboatError, got ${String(err)}`, { cause: err });
  }
  throw new Error('expected a rejection, but the promise resolved');
}

/** Polls `condition` until it holds (no fixed sleeps: the machine may be busy). */
async function waitFor(condition: () => boolean, what: string, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function collect(it: AsyncIterable<ObjectInfo>): Promise<ObjectInfo[]> {
  const out: ObjectInfo[] = [];
  for await (const o of it) out.push(o);
  return out;
}

function sortedKeys(objects: ObjectInfo[]): string[] {
  return objects.map((o) => o.key).sort();
}

/** Every byte value, then random bytes: a codec that mangles anything shows. */
function binary(size: number): Buffer {
  const b = randomBytes(size);
  for (let i = 0; i < Math.min(256, size); i++) b[i] = i;
  return b;
}

/**
 * The ObjectBackend contract (packages/store/src/object-backend.ts) as one suite, run against
 * every backend: whatever the store relies on must hold for each of them alike.
 */
function describeBackendConformance(
  name: string,
  makeBackend: () => Promise<BackendUnderTest>,
  extra: { largeObjectCheck?: (backend: ObjectBackend, key: string) => Promise<void> } = {},
): void {
  describe(`ObjectBackend conformance: ${name}`, () => {
    let current: BackendUnderTest | undefined;
    const fresh = async (): Promise<ObjectBackend> => {
      current = await makeBackend();
      return current.backend;
    };
    afterEach(async () => {
      await current?.backend.close();
      await current?.cleanup?.();
      current = undefined;
    });

    it('stores binary objects byte-exact and reports their size', async () => {
      const b = await fresh();
      const data = binary(300_000);
      await b.put('packs/ab/ab01', data);
      await b.put('empty', new Uint8Array(0));
      // A view into a larger buffer: only the view's bytes are stored.
      const big = binary(1000);
      await b.put('view', big.subarray(100, 200));
      expect((await b.get('packs/ab/ab01')).equals(data)).toBe(true);
      expect((await b.get('empty')).length).toBe(0);
      expect((await b.get('view')).equals(big.subarray(100, 200))).toBe(true);
      expect(await b.stat('packs/ab/ab01')).toEqual({ key: 'packs/ab/ab01', size: 300_000 });
      expect(await b.stat('empty')).toEqual({ key: 'empty', size: 0 });
      expect(b.location.length).toBeGreaterThan(0);
    });

    it('never replaces an object unless asked to', async () => {
      const b = await fresh();
      await b.put('config', Buffer.from('first'));
      expect(await codeOf(b.put('config', Buffer.from('second')))).toBe('LB_BACKEND_EXISTS');
      expect((await b.get('config')).toString()).toBe('first');
      await b.put('config', Buffer.from('third'), { overwrite: true });
      expect((await b.get('config')).toString()).toBe('third');
      // overwrite also creates.
      await b.put('new', Buffer.from('x'), { overwrite: true });
      expect((await b.get('new')).toString()).toBe('x');
    });

    it('reports missing objects as such, and deletes idempotently', async () => {
      const b = await fresh();
      expect(await codeOf(b.get('nope'))).toBe('LB_BACKEND_NOT_FOUND');
      expect(await codeOf(b.getRange('nope', 0, 10))).toBe('LB_BACKEND_NOT_FOUND');
      expect(await b.stat('nope')).toBeUndefined();
      await b.delete('nope');
      await b.put('dir/obj', Buffer.from('data'));
      await b.delete('dir/obj');
      await b.delete('dir/obj');
      expect(await b.stat('dir/obj')).toBeUndefined();
      expect(await codeOf(b.get('dir/obj'))).toBe('LB_BACKEND_NOT_FOUND');
      expect(await collect(b.list('dir/'))).toEqual([]);
      // A deleted key can be written again.
      await b.put('dir/obj', Buffer.from('again'));
      expect((await b.get('dir/obj')).toString()).toBe('again');
    });

    it('reads ranges exactly and rejects ranges past the end', async () => {
      const b = await fresh();
      const data = binary(10_000);
      await b.put('obj', data);
      expect((await b.getRange('obj', 0, 1)).equals(data.subarray(0, 1))).toBe(true);
      expect((await b.getRange('obj', 1234, 5000)).equals(data.subarray(1234, 6234))).toBe(true);
      expect((await b.getRange('obj', 9000, 1000)).equals(data.subarray(9000))).toBe(true);
      expect((await b.getRange('obj', 10_000, 0)).length).toBe(0);
      expect(await codeOf(b.getRange('obj', 9000, 1001))).toBe('LB_BACKEND_RANGE');
      expect(await codeOf(b.getRange('obj', 10_000, 1))).toBe('LB_BACKEND_RANGE');
      expect(await codeOf(b.getRange('obj', 20_000, 10))).toBe('LB_BACKEND_RANGE');
      expect(await codeOf(b.getRange('obj', -1, 10))).toBe('LB_BACKEND_RANGE');
      expect(await codeOf(b.getRange('obj', 0.5, 10))).toBe('LB_BACKEND_RANGE');
    });

    it('lists by key prefix, each object once with its size', async () => {
      const b = await fresh();
      const keys = ['a/1', 'a/2', 'a/sub/3', 'ab/4', 'b/5', 'top'];
      await Promise.all(keys.map((k, i) => b.put(k, Buffer.alloc(i + 1, i))));
      expect(sortedKeys(await collect(b.list('')))).toEqual(keys);
      expect(sortedKeys(await collect(b.list('a/')))).toEqual(['a/1', 'a/2', 'a/sub/3']);
      expect(sortedKeys(await collect(b.list('a')))).toEqual(['a/1', 'a/2', 'a/sub/3', 'ab/4']);
      expect(sortedKeys(await collect(b.list('a/s')))).toEqual(['a/sub/3']);
      expect(await collect(b.list('zzz'))).toEqual([]);
      const sizes = Object.fromEntries((await collect(b.list(''))).map((o) => [o.key, o.size]));
      expect(sizes).toEqual({ 'a/1': 1, 'a/2': 2, 'a/sub/3': 3, 'ab/4': 4, 'b/5': 5, top: 6 });
    });

    it('lists many objects (several pages) completely', async () => {
      const b = await fresh();
      const keys = Array.from(
        { length: 650 },
        (_, i) => `many/${(i % 16).toString(16).padStart(2, '0')}/${String(i).padStart(5, '0')}`,
      );
      const payload = Buffer.from('x');
      // In batches: 650 promises at once would make the directory backend open 650 files.
      for (let i = 0; i < keys.length; i += 100) {
        await Promise.all(keys.slice(i, i + 100).map((k) => b.put(k, payload)));
      }
      await b.put('other/1', payload);
      const listed = await collect(b.list('many/'));
      expect(listed.length).toBe(650);
      expect(sortedKeys(listed)).toEqual([...keys].sort());
      expect(listed.every((o) => o.size === 1)).toBe(true);
    });

    it('takes concurrent puts: distinct keys all land, one key has exactly one winner', async () => {
      const b = await fresh();
      const blobs = Array.from({ length: 40 }, () =>
        binary(20_000 + Math.floor(Math.random() * 50_000)),
      );
      await Promise.all(blobs.map((d, i) => b.put(`c/${i}`, d)));
      const back = await Promise.all(blobs.map((_, i) => b.get(`c/${i}`)));
      back.forEach((d, i) => expect(d.equals(blobs[i] ?? Buffer.alloc(0)), `c/${i}`).toBe(true));

      const rivals = Array.from({ length: 8 }, () => binary(50_000));
      const outcomes = await Promise.all(rivals.map((d) => codeOf(b.put('contested', d))));
      expect(outcomes.filter((o) => o === 'resolved').length).toBe(1);
      expect(outcomes.filter((o) => o === 'LB_BACKEND_EXISTS').length).toBe(rivals.length - 1);
      const winner = rivals[outcomes.indexOf('resolved')] ?? Buffer.alloc(0);
      expect((await b.get('contested')).equals(winner)).toBe(true);
    });

    it('stores a large object (20 MiB) byte-exact and reads ranges across it', async () => {
      const b = await fresh();
      const data = randomBytes(20 * 1024 * 1024);
      // Readers polling while it is written never see part of it.
      let done = false;
      const observed = new Set<string>();
      const watcher = (async () => {
        while (!done) {
          const info = await b.stat('packs/large');
          observed.add(
            info === undefined
              ? 'absent'
              : info.size === data.length
                ? 'whole'
                : `partial ${info.size}`,
          );
          const head = await b
            .getRange('packs/large', data.length - 16, 16)
            .catch((e: unknown) => e);
          if (Buffer.isBuffer(head))
            observed.add(head.equals(data.subarray(-16)) ? 'whole' : 'wrong tail');
        }
      })();
      await b.put('packs/large', data).finally(() => {
        done = true;
      });
      await watcher;
      expect([...observed].filter((o) => o !== 'absent' && o !== 'whole')).toEqual([]);
      expect((await b.stat('packs/large'))?.size).toBe(data.length);
      expect((await b.get('packs/large')).equals(data)).toBe(true);
      // Ranges straddling 4 MiB boundaries (block boundaries of the Azure backend under test).
      for (const at of [4 * 1024 * 1024 - 100, 8 * 1024 * 1024 - 1, data.length - 65_536]) {
        expect(
          (await b.getRange('packs/large', at, 65_536)).equals(data.subarray(at, at + 65_536)),
        ).toBe(true);
      }
      await extra.largeObjectCheck?.(b, 'packs/large');
    });

    it('rejects keys the store format does not produce', async () => {
      const b = await fresh();
      for (const key of [
        '',
        '/abs',
        'a//b',
        'a/',
        '../up',
        'a/../b',
        'a\\b',
        '.hidden',
        'sp ace',
        'nul\u0000',
      ]) {
        expect(await codeOf(b.put(key, Buffer.from('x'))), JSON.stringify(key)).toBe(
          'LB_BACKEND_INVALID_KEY',
        );
        expect(await codeOf(b.get(key)), JSON.stringify(key)).toBe('LB_BACKEND_INVALID_KEY');
      }
      expect(await collect(b.list(''))).toEqual([]);
    });

    it('behaves like a map under any sequence of puts, overwrites, deletes and reads', async () => {
      const b = await fresh();
      // As in the store format, no key is a path prefix of another ('a' and 'a/b'): a directory
      // cannot be a file too. Shared directories ('b/c', 'b/d') and string prefixes ('a', 'ab') are.
      const keys = ['a', 'ab', 'b/c', 'b/d', 'e/f/g'];
      const key = fc.constantFrom(...keys);
      const op = fc.oneof(
        fc.record({
          kind: fc.constant('put' as const),
          key,
          size: fc.nat(300),
          overwrite: fc.boolean(),
        }),
        fc.record({ kind: fc.constant('delete' as const), key }),
        fc.record({ kind: fc.constant('get' as const), key }),
        // Empty ranges are left out: past the end the directory backend returns an empty buffer
        // where Azure rejects (LB_BACKEND_RANGE); empty reads within an object are tested above.
        fc.record({
          kind: fc.constant('range' as const),
          key,
          offset: fc.nat(320),
          length: fc.integer({ min: 1, max: 64 }),
        }),
        fc.record({
          kind: fc.constant('list' as const),
          prefix: fc.constantFrom('', 'a', 'b/', 'b', 'e/f', 'x'),
        }),
      );
      let run = 0;
      await fc.assert(
        fc.asyncProperty(fc.array(op, { minLength: 4, maxLength: 20 }), async (ops) => {
          // A fresh prefix per run instead of a fresh backend: creating one per run is slow.
          const root = `run${run++}/`;
          const model = new Map<string, Buffer>();
          for (const o of ops) {
            if (o.kind === 'put') {
              const data = randomBytes(o.size);
              const code = await codeOf(b.put(root + o.key, data, { overwrite: o.overwrite }));
              const expected = model.has(o.key) && !o.overwrite ? 'LB_BACKEND_EXISTS' : 'resolved';
              expect(code, `put ${o.key}`).toBe(expected);
              if (expected === 'resolved') model.set(o.key, data);
            } else if (o.kind === 'delete') {
              await b.delete(root + o.key);
              model.delete(o.key);
            } else if (o.kind === 'get') {
              const want = model.get(o.key);
              if (want === undefined)
                expect(await codeOf(b.get(root + o.key))).toBe('LB_BACKEND_NOT_FOUND');
              else expect((await b.get(root + o.key)).equals(want)).toBe(true);
              expect(await b.stat(root + o.key)).toEqual(
                want === undefined ? undefined : { key: root + o.key, size: want.length },
              );
            } else if (o.kind === 'range') {
              const want = model.get(o.key);
              const p = b.getRange(root + o.key, o.offset, o.length);
              if (want === undefined) expect(await codeOf(p)).toBe('LB_BACKEND_NOT_FOUND');
              else if (o.offset + o.length > want.length)
                expect(await codeOf(p)).toBe('LB_BACKEND_RANGE');
              else
                expect((await p).equals(want.subarray(o.offset, o.offset + o.length))).toBe(true);
            } else {
              const listed = await collect(b.list(root + o.prefix));
              const want = [...model.keys()]
                .filter((k) => k.startsWith(o.prefix))
                .map((k) => root + k);
              expect(sortedKeys(listed)).toEqual(want.sort());
            }
          }
          // Whatever happened, the backend now holds exactly the model's objects.
          const all = await collect(b.list(root));
          expect(sortedKeys(all)).toEqual([...model.keys()].map((k) => root + k).sort());
          for (const [k, v] of model) expect((await b.get(root + k)).equals(v), k).toBe(true);
        }),
        { numRuns: 20 },
      );
    });

    it('writes an object in pieces that nobody sees before its commit', async () => {
      const b = await fresh();
      // The store streams its packs through openWrite: every backend has it.
      expect(b.openWrite).toBeDefined();
      const openWrite = (key: string) => (b.openWrite as NonNullable<typeof b.openWrite>)(key);
      const pieces = [binary(300_000), binary(1), binary(1_500_000), binary(70_000)];
      const w = await openWrite('packs/cd/cd01');
      for (const piece of pieces) {
        await w.append(piece);
        await w.syncEarly?.();
      }
      expect(await b.stat('packs/cd/cd01')).toBeUndefined();
      expect(await collect(b.list('packs/'))).toEqual([]);
      await w.commit();
      const whole = Buffer.concat(pieces);
      expect((await b.get('packs/cd/cd01')).equals(whole)).toBe(true);
      expect(await b.stat('packs/cd/cd01')).toEqual({ key: 'packs/cd/cd01', size: whole.length });
      expect(
        (await b.getRange('packs/cd/cd01', 299_990, 20)).equals(whole.subarray(299_990, 300_010)),
      ).toBe(true);

      // A name that exists: the commit fails as a put would, and the object is untouched.
      const clash = await openWrite('packs/cd/cd01');
      await clash.append(binary(1000));
      expect(await codeOf(clash.commit())).toBe('LB_BACKEND_EXISTS');
      await clash.abort();
      expect((await b.get('packs/cd/cd01')).equals(whole)).toBe(true);

      // Aborted: nothing. Committed with nothing appended: an empty object.
      const dropped = await openWrite('packs/cd/cd02');
      await dropped.append(binary(200_000));
      await dropped.abort();
      const empty = await openWrite('packs/cd/cd03');
      await empty.commit();
      expect(sortedKeys(await collect(b.list('packs/')))).toEqual([
        'packs/cd/cd01',
        'packs/cd/cd03',
      ]);
      expect((await b.get('packs/cd/cd03')).length).toBe(0);
      expect(await codeOf(openWrite('../escape'))).toBe('LB_BACKEND_INVALID_KEY');
    });

    it('leaves a large put aborted in flight either absent or whole', async () => {
      const b = await fresh();
      const data = randomBytes(12 * 1024 * 1024);
      const ac = new AbortController();
      const pending = b.put('aborted-large', data, { signal: ac.signal });
      setImmediate(() => ac.abort(new Error('caller gave up')));
      const outcome = await codeOf(pending);
      const info = await b.stat('aborted-large');
      if (outcome === 'resolved') {
        expect((await b.get('aborted-large')).equals(data)).toBe(true);
      } else {
        expect(info).toBeUndefined();
        expect(sortedKeys(await collect(b.list('')))).toEqual([]);
      }
    });

    it('honours an aborted signal and stores nothing', async () => {
      const b = await fresh();
      const ac = new AbortController();
      ac.abort();
      await expect(b.put('aborted', Buffer.from('x'), { signal: ac.signal })).rejects.toThrow();
      expect(await b.stat('aborted')).toBeUndefined();
      await b.put('present', Buffer.from('x'));
      await expect(b.get('present', ac.signal)).rejects.toThrow();
      await expect(b.getRange('present', 0, 1, ac.signal)).rejects.toThrow();
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Local directory

describeBackendConformance('DirectoryBackend', async () => {
  const dir = await makeTempDir('lifeboat-backend-');
  return { backend: new DirectoryBackend({ path: dir.path }), cleanup: () => dir.remove() };
});

// As a process server opens it: objects written in pieces go past the page cache.
describeBackendConformance('DirectoryBackend (direct writes)', async () => {
  const dir = await makeTempDir('lifeboat-backend-');
  return {
    backend: new DirectoryBackend({ path: dir.path, directWrites: true }),
    cleanup: () => dir.remove(),
  };
});

// ---------------------------------------------------------------------------------------------
// Azure Blob Storage on Azurite

/** Fault the proxy injects into the next request that matches. */
type Fault = 'status-503' | 'reset' | 'drop-response' | 'truncate-body';

/**
 * An HTTP proxy in front of Azurite that counts concurrent requests and injects faults the
 * emulator cannot produce on demand: a 503, a reset connection, or a request that the service
 * carries out but whose answer never arrives.
 */
class FaultProxy {
  readonly server: Server;
  active = 0;
  peak = 0;
  requests = 0;
  private readonly faults: Array<{ fault: Fault; match: (req: IncomingMessage) => boolean }> = [];

  constructor(private readonly target: URL) {
    this.server = createServer((req, res) => this.handle(req, res));
  }

  async listen(): Promise<number> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    return (this.server.address() as AddressInfo).port;
  }

  inject(fault: Fault, match: (req: IncomingMessage) => boolean = () => true): void {
    this.faults.push({ fault, match });
  }

  resetCounters(): void {
    this.peak = this.active;
    this.requests = 0;
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    this.requests++;
    this.active++;
    this.peak = Math.max(this.peak, this.active);
    let ended = false;
    const done = (): void => {
      if (ended) return;
      ended = true;
      this.active--;
    };
    res.on('close', done);
    const i = this.faults.findIndex((f) => f.match(req));
    const fault = i >= 0 ? this.faults.splice(i, 1)[0]?.fault : undefined;
    if (fault === 'status-503') {
      req.resume();
      res.writeHead(503, { 'x-ms-error-code': 'ServerBusy' }).end();
      return;
    }
    if (fault === 'reset') {
      req.socket.destroy();
      return;
    }
    const upstream = request(
      {
        host: this.target.hostname,
        port: this.target.port,
        method: req.method,
        path: req.url,
        headers: req.headers,
      },
      (up) => {
        if (fault === 'drop-response') {
          // The service did the work; the client never hears of it.
          up.resume();
          up.on('end', () => req.socket.destroy());
          return;
        }
        res.writeHead(up.statusCode ?? 502, up.headers);
        if (fault === 'truncate-body') {
          // Half the body, then the connection drops.
          const half = Math.floor(Number(up.headers['content-length'] ?? 0) / 2);
          let sent = 0;
          up.on('data', (chunk: Buffer) => {
            if (sent >= half) return;
            const part = chunk.subarray(0, half - sent);
            sent += part.length;
            res.write(part);
            if (sent >= half) {
              up.destroy();
              req.socket.destroy();
            }
          });
          return;
        }
        up.pipe(res);
      },
    );
    upstream.on('error', () => req.socket.destroy());
    req.pipe(upstream);
  }
}

describe('AzureBlobBackend on Azurite', () => {
  let azurite: Azurite;
  let proxy: FaultProxy;
  let proxied: string;
  const backends: AzureBlobBackend[] = [];

  beforeAll(async () => {
    azurite = await startAzurite();
    proxy = new FaultProxy(new URL(azurite.blobEndpoint));
    const port = await proxy.listen();
    proxied = azurite.connectionString.replace(
      /BlobEndpoint=[^;]+/,
      `BlobEndpoint=http://127.0.0.1:${port}/devstoreaccount1`,
    );
  });
  afterAll(async () => {
    await Promise.allSettled(backends.map((b) => b.close()));
    await proxy?.close();
    await azurite?.stop();
  });

  /**
   * A backend on a fresh container, straight to Azurite (tests of faults pass the proxy's
   * connection string: forwarding every request would cost the busy machine CPU for nothing).
   */
  const azureBackend = (options: Partial<AzureBlobBackendOptions> = {}): AzureBlobBackend => {
    const b = new AzureBlobBackend({
      connectionString: azurite.connectionString,
      container: `t-${randomUUID()}`,
      createContainer: true,
      // Small blocks and pages so that 20 MiB takes several blocks and 650 objects 7 pages (the
      // last one partial): as thorough for paging as thousands of objects, at a fraction of the time.
      blockSize: 4 * 1024 * 1024,
      maxSinglePutSize: 4 * 1024 * 1024,
      listPageSize: 100,
      retry: { initialDelayMs: 20, maxDelayMs: 200, totalTimeoutMs: 5000 },
      ...options,
    });
    backends.push(b);
    return b;
  };

  describeBackendConformance(
    'AzureBlobBackend (Azurite)',
    async () => ({ backend: azureBackend() }),
    {
      // The 20 MiB object went up as 4 MiB blocks, within the service's per-request limits.
      largeObjectCheck: async (backend, key) => {
        const b = backend as AzureBlobBackend;
        const container = BlobServiceClient.fromConnectionString(
          azurite.connectionString,
        ).getContainerClient(b.location.split('/')[1] ?? '');
        const list = await container.getBlockBlobClient(key).getBlockList('committed');
        const sizes = (list.committedBlocks ?? []).map((blk) => blk.size);
        expect(sizes.length).toBe(5);
        expect(Math.max(...sizes)).toBeLessThanOrEqual(4 * 1024 * 1024);
      },
    },
  );

  it('a point read chunk by chunk (a read-ahead) costs a few merged ranged GETs, not one per chunk', async () => {
    const b = azureBackend({ connectionString: proxied });
    const store = await Store.init({
      backend: b,
      passphrase: 'pw',
      kdfCost: 1024,
      chunkSize: 4096,
    });
    const data = randomBytes(128 * 4096);
    const w = await store.beginWrite({ machine: 'm', disk: 'vda', size: data.length });
    await w.write(0, data);
    const p = await w.commit();
    const reader = await store.openPoint(p.id);
    await reader.readAt(0, 4096); // the tree is loaded now
    proxy.resetCounters();
    const got = await Promise.all(
      Array.from({ length: 64 }, (_, i) => reader.readAt((32 + i) * 4096, 4096)),
    );
    got.forEach((g, i) =>
      expect(g.equals(data.subarray((32 + i) * 4096, (33 + i) * 4096))).toBe(true),
    );
    expect(proxy.requests).toBeGreaterThan(0);
    expect(proxy.requests).toBeLessThanOrEqual(2);
    await store.close();
  });

  it('keeps at most maxConcurrency requests in flight', async () => {
    const b = azureBackend({ connectionString: proxied, maxConcurrency: 3 });
    await b.put('warm', Buffer.from('x'));
    proxy.resetCounters();
    await Promise.all(
      Array.from({ length: 40 }, (_, i) => b.put(`k/${i}`, randomBytes(64 * 1024))),
    );
    await Promise.all(Array.from({ length: 40 }, (_, i) => b.get(`k/${i}`)));
    expect(proxy.requests).toBe(80);
    expect(proxy.peak).toBeLessThanOrEqual(3);
    expect(proxy.peak).toBeGreaterThan(1);
  });

  it('puts an object written in one piece in one request, and stages the pieces of a larger one', async () => {
    const b = azureBackend({ connectionString: proxied });
    await b.put('warm', Buffer.from('x'));
    // A process server's usual pack: one cut's few blobs, one piece.
    const small = randomBytes(200_000);
    let seen = proxy.requests;
    const w = await b.openWrite('packs/ff/ff01');
    await w.append(small);
    await w.commit();
    expect(proxy.requests - seen).toBe(1);
    expect((await b.get('packs/ff/ff01')).equals(small)).toBe(true);
    // Two pieces: two blocks and the block list.
    const two = [randomBytes(300_000), randomBytes(1000)];
    seen = proxy.requests;
    const w2 = await b.openWrite('packs/ff/ff02');
    for (const piece of two) await w2.append(piece);
    await w2.commit();
    expect(proxy.requests - seen).toBe(3);
    expect((await b.get('packs/ff/ff02')).equals(Buffer.concat(two))).toBe(true);
  });

  it('retries 503 and reset connections, and recognises its own put whose answer was lost', async () => {
    const b = azureBackend({ connectionString: proxied });
    await b.put('warm', Buffer.from('x'));
    proxy.inject('status-503', (r) => r.method === 'PUT');
    proxy.inject('reset', (r) => r.method === 'PUT');
    const data = randomBytes(1000);
    await b.put('retried', data);
    expect((await b.get('retried')).equals(data)).toBe(true);

    proxy.inject('reset', (r) => r.method === 'GET');
    proxy.inject('status-503', (r) => r.method === 'GET');
    expect((await b.getRange('retried', 10, 20)).equals(data.subarray(10, 30))).toBe(true);
    // A body cut off half-way is read again, whole.
    proxy.inject('truncate-body', (r) => r.method === 'GET');
    const seen = proxy.requests;
    expect((await b.get('retried')).equals(data)).toBe(true);
    expect(proxy.requests - seen).toBe(2);
    proxy.inject('truncate-body', (r) => r.method === 'GET');
    expect((await b.getRange('retried', 100, 800)).equals(data.subarray(100, 900))).toBe(true);

    // The first put lands but its answer is lost; the retry meets BlobAlreadyExists — of itself.
    proxy.inject('drop-response', (r) => r.method === 'PUT');
    const mine = randomBytes(5000);
    await b.put('lost-answer', mine);
    expect((await b.get('lost-answer')).equals(mine)).toBe(true);
    // Someone else's object under the key is still a conflict.
    proxy.inject('drop-response', (r) => r.method === 'PUT');
    await b.put('taken', randomBytes(10));
    expect(await codeOf(b.put('taken', randomBytes(10)))).toBe('LB_BACKEND_EXISTS');

    // Large objects: a block and the block list fail once each.
    proxy.inject('reset', (r) => r.method === 'PUT' && /[?&]comp=block(&|$)/.test(r.url ?? ''));
    proxy.inject(
      'status-503',
      (r) => r.method === 'PUT' && /[?&]comp=blocklist(&|$)/.test(r.url ?? ''),
    );
    const large = randomBytes(9 * 1024 * 1024);
    await b.put('large-retried', large);
    expect((await b.get('large-retried')).equals(large)).toBe(true);
  });

  it('writes an object in pieces as staged blocks, through faults, a lost answer and rivals', async () => {
    const b = azureBackend({ connectionString: proxied });
    await b.put('warm', Buffer.from('x'));
    // A staged block fails once, and the block list lands with its answer lost.
    proxy.inject('reset', (r) => r.method === 'PUT' && /[?&]comp=block(&|$)/.test(r.url ?? ''));
    proxy.inject(
      'drop-response',
      (r) => r.method === 'PUT' && /[?&]comp=blocklist(&|$)/.test(r.url ?? ''),
    );
    const pieces = [randomBytes(1024 * 1024), randomBytes(1024 * 1024), randomBytes(300_000)];
    const w = await b.openWrite('packs/ee/ee01');
    for (const piece of pieces) await w.append(piece);
    await w.commit();
    expect((await b.get('packs/ee/ee01')).equals(Buffer.concat(pieces))).toBe(true);
    // It went up as one block per piece, not again as a whole put.
    const container = BlobServiceClient.fromConnectionString(
      azurite.connectionString,
    ).getContainerClient(b.location.split('/')[1] ?? '');
    const list = await container.getBlockBlobClient('packs/ee/ee01').getBlockList('committed');
    expect((list.committedBlocks ?? []).map((blk) => blk.size)).toEqual(
      pieces.map((p) => p.length),
    );

    // Three writers of one name at once: exactly one wins, with its own bytes.
    const rivals = Array.from({ length: 3 }, () => [randomBytes(1024 * 1024), randomBytes(5000)]);
    const outcomes = await Promise.all(
      rivals.map(async (parts) => {
        const rival = await b.openWrite('packs/ee/ee02');
        for (const part of parts) await rival.append(part);
        return codeOf(rival.commit());
      }),
    );
    expect(outcomes.filter((o) => o === 'resolved').length).toBe(1);
    expect(outcomes.filter((o) => o === 'LB_BACKEND_EXISTS').length).toBe(2);
    const winner = rivals[outcomes.indexOf('resolved')] ?? [];
    expect((await b.get('packs/ee/ee02')).equals(Buffer.concat(winner))).toBe(true);
  });

  it('a store streams its packs to the container as blocks, and they read back byte-exact', async () => {
    const b = azureBackend();
    const store = await Store.init({ backend: b, passphrase: 'pw', kdfCost: 1024 });
    const data = randomBytes(6 * 1024 * 1024);
    const w = await store.beginWrite({ machine: 'm', disk: 'vda', size: data.length });
    await w.write(0, data);
    const p = await w.commit();
    await store.close();
    const container = BlobServiceClient.fromConnectionString(
      azurite.connectionString,
    ).getContainerClient(b.location.split('/')[1] ?? '');
    let blocks = 0;
    for await (const item of container.listBlobsFlat({ prefix: 'packs/' })) {
      const list = await container.getBlockBlobClient(item.name).getBlockList('committed');
      blocks = Math.max(blocks, list.committedBlocks?.length ?? 0);
    }
    // 6 MiB in 1 MiB pieces (below maxSinglePutSize: a whole put would be one request).
    expect(blocks).toBeGreaterThanOrEqual(6);
    const again = await Store.open({
      backend: azureBackend({ container: b.location.split('/')[1] ?? '' }),
      passphrase: 'pw',
    });
    expect((await (await again.openPoint(p.id)).readAt(0, data.length)).equals(data)).toBe(true);
    expect((await again.verify()).ok).toBe(true);
    await again.close();
  });

  it('lets exactly one of several writers of one large object win, with its own bytes', async () => {
    // Blocks staged for one blob are shared by all writers until a commit discards the rest.
    const b = azureBackend({ blockSize: 1024 * 1024, maxSinglePutSize: 1024 * 1024 });
    const rivals = Array.from({ length: 3 }, () => randomBytes(6 * 1024 * 1024 + 17));
    const outcomes = await Promise.all(rivals.map((d) => codeOf(b.put('contested-large', d))));
    expect(outcomes.filter((o) => o === 'resolved').length).toBe(1);
    expect(outcomes.filter((o) => o === 'LB_BACKEND_EXISTS').length).toBe(rivals.length - 1);
    const winner = rivals[outcomes.indexOf('resolved')] ?? Buffer.alloc(0);
    expect((await b.get('contested-large')).equals(winner)).toBe(true);

    // Replacing writers (overwrite) all succeed; the object is one of them, whole.
    const replacers = Array.from({ length: 3 }, () => randomBytes(3 * 1024 * 1024 + 5));
    await Promise.all(replacers.map((d) => b.put('replaced-large', d, { overwrite: true })));
    const final = await b.get('replaced-large');
    expect(replacers.some((d) => d.equals(final))).toBe(true);
  });

  it('reports a store that stays down as LB_BACKEND_UNAVAILABLE, and works again once it is back', async () => {
    // Straight to Azurite, not through the proxy: the client meets a refused connection.
    const b = azureBackend({
      connectionString: azurite.connectionString,
      retry: { initialDelayMs: 20, maxDelayMs: 100, totalTimeoutMs: 600 },
    });
    const before = randomBytes(100_000);
    await b.put('before-outage', before);
    await azurite.kill();
    try {
      const err = await rejection(b.get('before-outage'));
      expect(err.code).toBe('LB_BACKEND_UNAVAILABLE');
      expect(err.message).toContain(b.location);
      expect(err.details).toMatchObject({ location: b.location, key: 'before-outage' });
      expect(Number(err.details['attempts'])).toBeGreaterThan(1);
      expect(await codeOf(b.put('during-outage', Buffer.from('x')))).toBe('LB_BACKEND_UNAVAILABLE');
      expect(await codeOf(b.stat('before-outage'))).toBe('LB_BACKEND_UNAVAILABLE');
      expect(await codeOf(collect(b.list('')))).toBe('LB_BACKEND_UNAVAILABLE');
    } finally {
      await azurite.restart();
    }
    // The same backend instance works again (its short budget is enough for a live service).
    expect((await b.get('before-outage')).equals(before)).toBe(true);
    await b.put('after-outage', Buffer.from('back'));
    expect((await b.get('after-outage')).toString()).toBe('back');
  });

  it('rides out a short outage within its retry budget', async () => {
    // Bounded by time only: a restart on a busy machine may take many short retries.
    const b = azureBackend({
      connectionString: proxied,
      retry: { maxAttempts: 1000, initialDelayMs: 50, maxDelayMs: 500, totalTimeoutMs: 60_000 },
    });
    await b.put('warm', Buffer.from('x'));
    await azurite.kill();
    const data = randomBytes(10_000);
    const seen = proxy.requests;
    const pending = b.put('through-outage', data);
    // Restart only once the put has met the outage twice: the retry is what is under test.
    await waitFor(() => proxy.requests >= seen + 2, 'two failed attempts');
    await azurite.restart();
    await pending;
    expect((await b.get('through-outage')).equals(data)).toBe(true);
  });

  it('abandons requests to a hung service after tryTimeoutMs, and recovers when it answers again', async () => {
    const b = azureBackend({
      connectionString: azurite.connectionString,
      retry: { initialDelayMs: 20, maxDelayMs: 100, tryTimeoutMs: 300, totalTimeoutMs: 500 },
    });
    const data = randomBytes(5000);
    await b.put('before-hang', data);
    azurite.pause();
    try {
      const err = await rejection(b.get('before-hang'));
      expect(err.code).toBe('LB_BACKEND_UNAVAILABLE');
      expect(err.message).toContain('did not finish within 300 ms');
    } finally {
      azurite.resume();
    }
    // A thawed Azurite on a busy machine may answer slowly at first: read with default patience.
    const patient = azureBackend({
      connectionString: azurite.connectionString,
      container: b.location.split('/')[1] ?? '',
    });
    expect((await patient.get('before-hang')).equals(data)).toBe(true);
  });

  it('reports a wrong account key as LB_BACKEND_AUTH without retrying for long', async () => {
    const wrongKey = proxied.replace(
      /AccountKey=[^;]+/,
      `AccountKey=${randomBytes(64).toString('base64')}`,
    );
    const b = azureBackend({
      connectionString: wrongKey,
      createContainer: false,
      retry: { totalTimeoutMs: 60_000 },
    });
    proxy.resetCounters();
    const err = await rejection(b.get('anything'));
    expect(err.code).toBe('LB_BACKEND_AUTH');
    expect(err.message).toContain('azure:devstoreaccount1/');
    expect(proxy.requests).toBe(1);
    expect(await codeOf(b.put('x', Buffer.from('x')))).toBe('LB_BACKEND_AUTH');
  });

  it('names a missing container, and creates it only when asked to', async () => {
    const name = `missing-${randomUUID()}`.slice(0, 40);
    const b = azureBackend({ container: name, createContainer: false });
    expect(await codeOf(b.get('k'))).toBe('LB_BACKEND_CONTAINER_NOT_FOUND');
    expect(await codeOf(b.stat('k'))).toBe('LB_BACKEND_CONTAINER_NOT_FOUND');
    expect(await codeOf(b.put('k', Buffer.from('x')))).toBe('LB_BACKEND_CONTAINER_NOT_FOUND');
    expect(await codeOf(collect(b.list('')))).toBe('LB_BACKEND_CONTAINER_NOT_FOUND');
    const creating = azureBackend({ container: name, createContainer: true });
    await creating.put('k', Buffer.from('x'));
    expect((await b.get('k')).toString()).toBe('x');
  });

  it('opens a container by URL, with the account connection string', async () => {
    const writer = azureBackend();
    await writer.put('via-name', Buffer.from('hello'));
    const container = writer.location.split('/')[1] ?? '';
    const endpoint = /BlobEndpoint=([^;]+)/.exec(proxied)?.[1] ?? '';
    const byUrl = AzureBlobBackend.fromContainerUrl(`${endpoint}/${container}`, proxied);
    backends.push(byUrl);
    expect(byUrl.location).toBe(writer.location);
    expect((await byUrl.get('via-name')).toString()).toBe('hello');
  });

  it('works with a container SAS URL alone, and a read-only SAS cannot write', async () => {
    const writer = azureBackend();
    await writer.put('shared', Buffer.from('by key'));
    const container = BlobServiceClient.fromConnectionString(
      azurite.connectionString,
    ).getContainerClient(writer.location.split('/')[1] ?? '');
    const expiresOn = new Date(Date.now() + 3_600_000);
    const fullSas = await container.generateSasUrl({
      permissions: ContainerSASPermissions.parse('racwdl'),
      expiresOn,
    });
    const full = AzureBlobBackend.fromContainerUrl(fullSas);
    backends.push(full);
    expect(full.location).toBe(writer.location);
    expect((await full.get('shared')).toString()).toBe('by key');
    await full.put('via-sas', Buffer.from('sas'));
    expect(sortedKeys(await collect(full.list('')))).toEqual(['shared', 'via-sas']);
    await full.delete('via-sas');

    const readOnly = AzureBlobBackend.fromContainerUrl(
      await container.generateSasUrl({
        permissions: ContainerSASPermissions.parse('rl'),
        expiresOn,
      }),
    );
    backends.push(readOnly);
    expect((await readOnly.get('shared')).toString()).toBe('by key');
    expect(await codeOf(readOnly.put('nope', Buffer.from('x')))).toBe('LB_BACKEND_AUTH');
    expect(await codeOf(readOnly.delete('shared'))).toBe('LB_BACKEND_AUTH');
  });

  it('refuses work after close', async () => {
    const b = azureBackend();
    await b.put('k', Buffer.from('x'));
    await b.close();
    expect(await codeOf(b.get('k'))).toBe('LB_BACKEND_CLOSED');
  });
});
