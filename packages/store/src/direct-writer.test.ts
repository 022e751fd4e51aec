import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, open, readFile, readdir, rm, stat } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import fc from 'fast-check';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DIRECT_FLAG, DirectAppender, STAGING_BYTES } from './direct-writer.js';
import { DirectoryBackend } from './directory-backend.js';

const run = promisify(execFile);
let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lifeboat-direct-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

/**
 * Pages of `file` in the page cache (util-linux fincore), or undefined without the tool or on
 * tmpfs (whose files live in the page cache, direct writes or not).
 */
async function cachedPages(file: string): Promise<number | undefined> {
  try {
    const { stdout: fs } = await run('stat', ['-f', '-c', '%T', file]);
    if (fs.trim() === 'tmpfs') return undefined;
    const { stdout } = await run('fincore', ['--bytes', '--noheadings', '--output', 'PAGES', file]);
    return Number(stdout.trim());
  } catch {
    return undefined;
  }
}

describe.skipIf(DIRECT_FLAG === 0)('DirectoryBackend with directWrites', () => {
  it('writes objects in pieces of any size byte-exact, past the page cache', async () => {
    const b = new DirectoryBackend({ path: join(dir, 'store'), directWrites: true });
    try {
      // Sizes around the 4 KiB blocks and the staging buffer's end, and empty appends.
      const size = fc.oneof(
        fc.integer({ min: 0, max: 9000 }),
        fc.integer({ min: STAGING_BYTES - 5000, max: STAGING_BYTES + 5000 }),
        fc.integer({ min: 0, max: 3 * STAGING_BYTES }),
      );
      let n = 0;
      await fc.assert(
        fc.asyncProperty(fc.array(size, { maxLength: 6 }), async (sizes) => {
          const key = `packs/aa/obj${n++}`;
          const parts = sizes.map((s) => randomBytes(s));
          const w = await b.openWrite(key);
          for (const p of parts) await w.append(p);
          await w.commit();
          const file = join(dir, 'store', key);
          expect((await stat(file)).size).toBe(parts.reduce((a, p) => a + p.length, 0));
          expect((await readFile(file)).equals(Buffer.concat(parts))).toBe(true);
        }),
        { numRuns: 40 },
      );
      expect(
        (await readdir(join(dir, 'store', 'packs', 'aa'))).filter((f) => f.startsWith('.tmp')),
      ).toEqual([]);
      // Whole blocks went around the cache: at most the last partial block passed through it
      // (none here: the file is a multiple of 4 KiB).
      const big = 'packs/bb/big';
      const w = await b.openWrite(big);
      await w.append(randomBytes(8 * STAGING_BYTES));
      await w.commit();
      const pages = await cachedPages(join(dir, 'store', big));
      if (pages !== undefined) expect(pages).toBe(0);
    } finally {
      await b.close();
    }
  });

  it('leaves nothing visible when aborted, and puts objects whole as before', async () => {
    const b = new DirectoryBackend({ path: join(dir, 'store'), directWrites: true });
    try {
      const w = await b.openWrite('packs/cc/gone');
      await w.append(randomBytes(10_000));
      await w.abort();
      expect(await b.stat('packs/cc/gone')).toBeUndefined();
      expect(await readdir(join(dir, 'store', 'packs', 'cc'))).toEqual([]);
      await b.put('index/x', Buffer.from('whole'));
      expect((await b.get('index/x')).toString()).toBe('whole');
    } finally {
      await b.close();
    }
  });

  it('goes on through the page cache when the file system refuses a direct write', async () => {
    const file = join(dir, 'f');
    const real = await open(file, 'wx');
    // What a file system without direct I/O answers a direct write: EINVAL.
    let refusals = 0;
    const refusing = new Proxy(real, {
      get(target, prop, receiver) {
        if (prop === 'write') {
          return () => {
            refusals++;
            return Promise.reject(Object.assign(new Error('EINVAL'), { code: 'EINVAL' }));
          };
        }
        const v = Reflect.get(target, prop, receiver) as unknown;
        return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
      },
    }) as FileHandle;
    let reopened: FileHandle | undefined;
    const a = new DirectAppender(refusing, async () => (reopened = await open(file, 'r+')));
    const parts = [randomBytes(5000), randomBytes(2 * STAGING_BYTES + 123), randomBytes(7)];
    for (const p of parts) await a.append(p);
    await a.finish();
    a.release();
    expect(a.refused).toBe(true);
    expect(refusals).toBe(1);
    await reopened?.close();
    await real.close();
    expect((await readFile(file)).equals(Buffer.concat(parts))).toBe(true);
  });
});
