import { mkdtemp, readdir, rm, utimes, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { isLifeboatError } from '@lifeboat/protocol';
import { DirectoryBackend } from './directory-backend.js';

let dir: string;
let b: DirectoryBackend;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lifeboat-dirbackend-'));
  b = new DirectoryBackend({ path: join(dir, 'store') });
});
afterEach(async () => {
  await b.close();
  await rm(dir, { recursive: true, force: true });
});

const code = (c: string) => (e: unknown) => isLifeboatError(e, c);

describe('DirectoryBackend', () => {
  it('puts, gets, ranges, stats, lists and deletes', async () => {
    await b.put('packs/ab/abcd', Buffer.from('hello world'));
    await b.put('config', Buffer.from('{}'));
    expect((await b.get('packs/ab/abcd')).toString()).toBe('hello world');
    expect((await b.getRange('packs/ab/abcd', 6, 5)).toString()).toBe('world');
    expect(await b.stat('packs/ab/abcd')).toEqual({ key: 'packs/ab/abcd', size: 11 });
    expect(await b.stat('packs/ab/nope')).toBeUndefined();
    const keys: string[] = [];
    for await (const o of b.list('packs/')) keys.push(o.key);
    expect(keys).toEqual(['packs/ab/abcd']);
    const all: string[] = [];
    for await (const o of b.list('')) all.push(o.key);
    expect(all.sort()).toEqual(['config', 'packs/ab/abcd']);
    // listKeys: the same keys without a stat per file.
    const names: string[] = [];
    for await (const k of b.listKeys('')) names.push(k);
    expect(names.sort()).toEqual(['config', 'packs/ab/abcd']);
    const packNames: string[] = [];
    for await (const k of b.listKeys('packs/a')) packNames.push(k);
    expect(packNames).toEqual(['packs/ab/abcd']);
    await b.delete('packs/ab/abcd');
    await b.delete('packs/ab/abcd');
    await expect(b.get('packs/ab/abcd')).rejects.toSatisfy(code('LB_BACKEND_NOT_FOUND'));
    expect(b.location).toBe(`dir:${join(dir, 'store')}`);
  });

  it('refuses to overwrite unless asked, and leaves no temporary file', async () => {
    await b.put('locks/x', Buffer.from('1'));
    await expect(b.put('locks/x', Buffer.from('2'))).rejects.toSatisfy(code('LB_BACKEND_EXISTS'));
    expect((await b.get('locks/x')).toString()).toBe('1');
    await b.put('locks/x', Buffer.from('3'), { overwrite: true });
    expect((await b.get('locks/x')).toString()).toBe('3');
    expect(await readdir(join(dir, 'store', 'locks'))).toEqual(['x']);
  });

  it('writes an object in pieces that nobody sees before its commit', async () => {
    const w = await b.openWrite('packs/cd/cdef');
    await w.append(Buffer.from('hello '));
    await w.syncEarly?.();
    await w.append(Buffer.from('world'));
    expect(await b.stat('packs/cd/cdef')).toBeUndefined();
    const seen: string[] = [];
    for await (const k of b.listKeys('packs/')) seen.push(k);
    expect(seen).toEqual([]);
    await w.commit();
    expect((await b.get('packs/cd/cdef')).toString()).toBe('hello world');
    // Nothing but the object is left in its directory.
    expect(await readdir(join(dir, 'store', 'packs', 'cd'))).toEqual(['cdef']);

    // An aborted object leaves nothing; one whose key exists fails its commit and is dropped.
    const dropped = await b.openWrite('packs/cd/0000');
    await dropped.append(Buffer.from('partial'));
    await dropped.abort();
    const clash = await b.openWrite('packs/cd/cdef');
    await clash.append(Buffer.from('other'));
    await expect(clash.commit()).rejects.toSatisfy(code('LB_BACKEND_EXISTS'));
    await clash.abort();
    expect(await readdir(join(dir, 'store', 'packs', 'cd'))).toEqual(['cdef']);
    expect((await b.get('packs/cd/cdef')).toString()).toBe('hello world');
    await expect(b.openWrite('../escape')).rejects.toSatisfy(code('LB_BACKEND_INVALID_KEY'));
  });

  it('rejects ranges past the end, bad keys, and hides temporary files from list', async () => {
    await b.put('index/a', Buffer.from('abc'));
    await expect(b.getRange('index/a', 2, 5)).rejects.toSatisfy(code('LB_BACKEND_RANGE'));
    expect((await b.getRange('index/a', 3, 0)).length).toBe(0);
    await expect(b.getRange('index/a', 4, 0)).rejects.toSatisfy(code('LB_BACKEND_RANGE'));
    await expect(b.getRange('index/missing', 0, 1)).rejects.toSatisfy(code('LB_BACKEND_NOT_FOUND'));
    await expect(b.put('../escape', Buffer.from('x'))).rejects.toSatisfy(
      code('LB_BACKEND_INVALID_KEY'),
    );
    await writeFile(join(dir, 'store', 'index', '.tmp-deadbeef'), 'partial');
    const keys: string[] = [];
    for await (const o of b.list('index/')) keys.push(o.key);
    expect(keys).toEqual(['index/a']);
    const names: string[] = [];
    for await (const k of b.listKeys('index/')) names.push(k);
    expect(names).toEqual(['index/a']);
    // A temporary file of a put killed long ago is removed by the next listing.
    const old = join(dir, 'store', 'index', '.tmp-0ld');
    await writeFile(old, 'abandoned');
    await utimes(old, new Date(Date.now() - 2 * 3_600_000), new Date(Date.now() - 2 * 3_600_000));
    for await (const _ of b.list('index/')) void _;
    expect((await readdir(join(dir, 'store', 'index'))).sort()).toEqual(['.tmp-deadbeef', 'a']);
    expect(() => new DirectoryBackend({ path: '' })).toThrow(/path/);
  });
});
