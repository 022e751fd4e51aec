import { randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import { link, mkdir, open, readFile, readdir, rename, stat, unlink } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { directIoRefused, writeFully } from '@lifeboat/protocol/direct-io';
import { LifeboatError } from '@lifeboat/protocol/errors';
import { DIRECT_FLAG, DirectAppender } from './direct-writer.js';
import type { ObjectBackend, ObjectInfo, ObjectWriter, PutOptions } from './object-backend.js';

/** Options for {@link DirectoryBackend}. */
export interface DirectoryBackendOptions {
  /** The directory holding the store's objects; created when missing. */
  path: string;
  /**
   * Files kept open for ranged reads (least recently used closed first), so reading a pack
   * chunk by chunk does not open and close it each time. Closed on close().
   * @default 64
   */
  maxOpenFiles?: number;
  /**
   * Objects written in pieces (packs) go to disk with direct I/O, past the page cache, where
   * the file system allows it (else through the cache, as without this option). For writers
   * that seldom read back what they wrote, such as a process server: the cache would cost a
   * kernel copy and, on VMs that give freed memory back to the host, a fault per page.
   * Objects written whole (`put`) always go through the cache.
   * @default false
   */
  directWrites?: boolean;
}

/** A file kept open for ranged reads, and how many reads use it now. */
interface OpenFile {
  handle: Promise<FileHandle>;
  users: number;
  /** Dropped from the cache: closed once its last user is done. */
  evicted: boolean;
}

// Temporary files live beside their final name so rename stays within one file system.
const TMP_PREFIX = '.tmp-';
const WRITE_NEW = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL;
const ABANDONED_TMP_MS = 3_600_000;
const KEY_RE = /^[A-Za-z0-9_-][A-Za-z0-9._-]*(\/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$/;

/**
 * The local-directory backend: one file per object. `put` writes a temporary file, fsyncs it,
 * renames (or hard-links, when it must not overwrite) it into place and fsyncs the directory,
 * so an object is either absent or complete and durable, whatever instant the machine stops.
 */
export class DirectoryBackend implements ObjectBackend {
  readonly location: string;
  private readonly root: string;
  private readonly madeDirs = new Set<string>();
  private readonly open = new Map<string, OpenFile>();
  private readonly maxOpenFiles: number;
  /** Direct writes wanted and not yet refused by the file system (see `directWrites`). */
  private direct: boolean;

  constructor(options: DirectoryBackendOptions) {
    if (typeof options.path !== 'string' || options.path === '') {
      throw new LifeboatError(
        'LB_BACKEND_INVALID_OPTIONS',
        'The directory backend needs a path. Give the store directory.',
      );
    }
    this.root = resolve(options.path);
    this.location = `dir:${this.root}`;
    this.maxOpenFiles = Math.max(0, options.maxOpenFiles ?? 64);
    this.direct = options.directWrites === true && DIRECT_FLAG !== 0;
  }

  async put(key: string, data: Uint8Array, options: PutOptions = {}): Promise<void> {
    const file = this.file(key);
    const dir = dirname(file);
    this.forget(file);
    options.signal?.throwIfAborted();
    await this.ensureDir(dir);
    const tmp = tmpName(dir);
    try {
      const handle = await open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL);
      try {
        await handle.writeFile(data);
        if (options.durable !== false) await handle.sync();
      } finally {
        await handle.close();
      }
      await this.publish(tmp, key, options.overwrite === true);
      if (options.durable !== false) await fsyncDir(dir);
    } catch (err) {
      await unlink(tmp).catch(() => undefined);
      throw this.wrap(err, key);
    }
  }

  /**
   * An object written in pieces into a temporary file beside its name, then published as
   * `put` does (fsync, hard link, fsync of the directory). `syncEarly` is an fdatasync of what
   * is there so far. A killed writer leaves only the temporary file, removed by a later
   * listing once it is an hour old (every append touches it).
   */
  async openWrite(key: string): Promise<ObjectWriter> {
    const file = this.file(key);
    const dir = dirname(file);
    this.forget(file);
    await this.ensureDir(dir);
    let tmp = tmpName(dir);
    let handle: FileHandle;
    let direct: DirectAppender | undefined;
    try {
      if (this.direct) {
        try {
          handle = await open(tmp, WRITE_NEW | DIRECT_FLAG);
          direct = new DirectAppender(handle, () => open(tmp, constants.O_WRONLY));
        } catch (err) {
          if (!directIoRefused(err)) throw err;
          // The file system has no direct I/O (tmpfs on older kernels): the cache from now on.
          this.direct = false;
          await unlink(tmp).catch(() => undefined);
          tmp = tmpName(dir);
          handle = await open(tmp, WRITE_NEW);
        }
      } else {
        handle = await open(tmp, WRITE_NEW);
      }
    } catch (err) {
      throw this.wrap(err, key);
    }
    let position = 0;
    let closed = false;
    const close = async (): Promise<void> => {
      if (closed) return;
      closed = true;
      direct?.release();
      await direct?.fallbackHandle?.close();
      await handle.close();
    };
    return {
      append: async (data) => {
        try {
          if (direct !== undefined) await direct.append(data);
          else {
            await writeFully(handle, data, position);
            position += data.length;
          }
        } catch (err) {
          throw this.wrap(err, key);
        }
      },
      syncEarly: async () => {
        try {
          await handle.datasync();
        } catch (err) {
          throw this.wrap(err, key);
        }
      },
      commit: async () => {
        try {
          await direct?.finish();
          // fsync covers the file whichever handle wrote it (the fallback's too).
          await handle.sync();
          await close();
          await this.publish(tmp, key, false);
          await fsyncDir(dir);
        } catch (err) {
          throw this.wrap(err, key);
        }
      },
      abort: async () => {
        await close().catch(() => undefined);
        await unlink(tmp).catch(() => undefined);
      },
    };
  }

  /**
   * Gives the durable temporary file `tmp` the name of `key`: renames it over an existing
   * object with `overwrite`, else hard-links it (which fails atomically when the name exists,
   * where rename would silently replace) and removes the temporary name.
   */
  private async publish(tmp: string, key: string, overwrite: boolean): Promise<void> {
    const file = this.file(key);
    if (overwrite) {
      await rename(tmp, file);
      return;
    }
    try {
      await link(tmp, file).catch(async (err: unknown) => {
        // File systems without hard links: check, then rename (racy only against
        // another writer of the same key, which random object names make moot).
        if (!['EPERM', 'ENOTSUP', 'EOPNOTSUPP', 'ENOSYS'].includes(errCode(err) ?? '')) throw err;
        if ((await this.stat(key)) !== undefined)
          throw Object.assign(new Error('exists'), { code: 'EEXIST' });
        await rename(tmp, file);
      });
    } catch (err) {
      if (errCode(err) === 'EEXIST') {
        throw new LifeboatError(
          'LB_BACKEND_EXISTS',
          `Object ${key} already exists in ${this.location}.`,
          {
            details: { key, location: this.location },
          },
        );
      }
      throw err;
    }
    await unlink(tmp).catch((err: unknown) => {
      if (errCode(err) !== 'ENOENT') throw err;
    });
  }

  async get(key: string, signal?: AbortSignal): Promise<Buffer> {
    try {
      return await readFile(this.file(key), signal === undefined ? {} : { signal });
    } catch (err) {
      throw this.wrap(err, key);
    }
  }

  async getRange(
    key: string,
    offset: number,
    length: number,
    signal?: AbortSignal,
  ): Promise<Buffer> {
    if (!Number.isSafeInteger(length) || length < 0) {
      throw new LifeboatError('LB_BACKEND_RANGE', `Invalid range ${offset}+${length} of ${key}.`, {
        details: { key, offset, length },
      });
    }
    const buf = Buffer.allocUnsafe(length);
    await this.getRangeInto(key, offset, buf, signal);
    return buf;
  }

  async getRangeInto(
    key: string,
    offset: number,
    target: Uint8Array,
    signal?: AbortSignal,
  ): Promise<void> {
    signal?.throwIfAborted();
    const length = target.byteLength;
    if (!Number.isSafeInteger(offset) || offset < 0) {
      throw new LifeboatError('LB_BACKEND_RANGE', `Invalid range ${offset}+${length} of ${key}.`, {
        details: { key, offset, length },
      });
    }
    const file = this.file(key);
    const entry = this.acquire(file);
    let handle: FileHandle;
    try {
      handle = await entry.handle;
    } catch (err) {
      this.release(entry);
      throw this.wrap(err, key);
    }
    try {
      // An empty range is valid up to the object's end, like on Azure; past it, it is not.
      if (length === 0 && offset > (await handle.stat()).size)
        throw this.rangeError(key, offset, length, 0);
      let done = 0;
      while (done < length) {
        const { bytesRead } = await handle.read(target, done, length - done, offset + done);
        if (bytesRead === 0) break;
        done += bytesRead;
      }
      if (done < length) throw this.rangeError(key, offset, length, done);
    } catch (err) {
      throw this.wrap(err, key);
    } finally {
      this.release(entry);
    }
  }

  async stat(key: string): Promise<ObjectInfo | undefined> {
    try {
      const s = await stat(this.file(key));
      return { key, size: s.size };
    } catch (err) {
      if (errCode(err) === 'ENOENT') return undefined;
      throw this.wrap(err, key);
    }
  }

  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    const slash = prefix.lastIndexOf('/');
    const baseKey = slash < 0 ? '' : prefix.slice(0, slash);
    for await (const e of this.walk(baseKey, prefix, true)) yield e as ObjectInfo;
  }

  async *listKeys(prefix: string): AsyncIterable<string> {
    const slash = prefix.lastIndexOf('/');
    const baseKey = slash < 0 ? '' : prefix.slice(0, slash);
    for await (const e of this.walk(baseKey, prefix, false)) yield e as string;
  }

  async delete(key: string): Promise<void> {
    try {
      const file = this.file(key);
      this.forget(file);
      await unlink(file);
    } catch (err) {
      if (errCode(err) === 'ENOENT') return;
      throw this.wrap(err, key);
    }
  }

  async close(): Promise<void> {
    const files = [...this.open.keys()];
    for (const f of files) this.forget(f);
  }

  /** The open file for ranged reads of `file` (opened now, or kept from an earlier read). */
  private acquire(file: string): OpenFile {
    let entry = this.open.get(file);
    if (entry !== undefined) {
      // Re-insert: the map's order is the order of last use.
      this.open.delete(file);
      this.open.set(file, entry);
    } else {
      entry = { handle: open(file, 'r'), users: 0, evicted: false };
      // A file that cannot be opened is not kept (the error goes to the reader).
      const opened = entry;
      entry.handle.catch(() => {
        if (this.open.get(file) === opened) this.forget(file);
      });
      if (this.maxOpenFiles > 0) this.open.set(file, entry);
      else entry.evicted = true;
      for (const [f] of this.open) {
        if (this.open.size <= this.maxOpenFiles) break;
        this.forget(f);
      }
    }
    entry.users++;
    return entry;
  }

  private release(entry: OpenFile): void {
    entry.users--;
    if (entry.evicted && entry.users === 0) closeQuietly(entry.handle);
  }

  /** Drops a kept file (the object changes, or the cache is full); closes it once unused. */
  private forget(file: string): void {
    const entry = this.open.get(file);
    if (entry === undefined) return;
    this.open.delete(file);
    entry.evicted = true;
    if (entry.users === 0) closeQuietly(entry.handle);
  }

  /** Objects under `dirKey` whose keys start with `prefix`: infos with sizes, or keys only. */
  private async *walk(
    dirKey: string,
    prefix: string,
    sizes: boolean,
  ): AsyncIterable<ObjectInfo | string> {
    const dir = dirKey === '' ? this.root : join(this.root, ...dirKey.split('/'));
    let entries;
    try {
      entries = await readdir(dir, { withFileTypes: true });
    } catch (err) {
      if (errCode(err) === 'ENOENT' || errCode(err) === 'ENOTDIR') return;
      throw this.wrap(err, dirKey);
    }
    for (const entry of entries) {
      if (entry.name.startsWith(TMP_PREFIX)) {
        await this.removeIfAbandoned(join(dir, entry.name));
        continue;
      }
      const key = dirKey === '' ? entry.name : `${dirKey}/${entry.name}`;
      if (entry.isDirectory()) {
        // Descend only where keys below can still match the prefix.
        if (key.startsWith(prefix) || prefix.startsWith(`${key}/`))
          yield* this.walk(key, prefix, sizes);
      } else if (entry.isFile() && key.startsWith(prefix)) {
        if (!sizes) {
          yield key;
          continue;
        }
        try {
          const s = await stat(join(dir, entry.name));
          yield { key, size: s.size };
        } catch (err) {
          if (errCode(err) !== 'ENOENT') throw this.wrap(err, key);
        }
      }
    }
  }

  /**
   * A temporary file older than an hour is left by a put that was killed (no put takes that
   * long): remove it, since no object name refers to it.
   */
  private async removeIfAbandoned(path: string): Promise<void> {
    try {
      const s = await stat(path);
      if (Date.now() - s.mtimeMs > ABANDONED_TMP_MS) await unlink(path);
    } catch {
      // Gone already, or not ours to judge: leave it.
    }
  }

  private rangeError(
    key: string,
    offset: number,
    length: number,
    available: number,
  ): LifeboatError {
    return new LifeboatError(
      'LB_BACKEND_RANGE',
      `Range ${offset}+${length} is past the end of ${key} in ${this.location} (the object may be truncated).`,
      { details: { key, offset, length, available } },
    );
  }

  private file(key: string): string {
    if (!KEY_RE.test(key)) {
      throw new LifeboatError(
        'LB_BACKEND_INVALID_KEY',
        `Invalid object key ${JSON.stringify(key)}.`,
        {
          details: { key },
        },
      );
    }
    return join(this.root, ...key.split('/'));
  }

  private async ensureDir(dir: string): Promise<void> {
    if (this.madeDirs.has(dir)) return;
    const created = await mkdir(dir, { recursive: true });
    if (created !== undefined) {
      // New directories must themselves be durable entries of their parents.
      let d = dir;
      while (d.length >= created.length) {
        await fsyncDir(dirname(d));
        d = dirname(d);
      }
    }
    this.madeDirs.add(dir);
  }

  private wrap(err: unknown, key: string): unknown {
    if (err instanceof LifeboatError) return err;
    const code = errCode(err);
    if (code === 'ENOENT') {
      return new LifeboatError(
        'LB_BACKEND_NOT_FOUND',
        `Object ${key} does not exist in ${this.location}.`,
        {
          cause: err,
          details: { key, location: this.location },
        },
      );
    }
    if (code === 'ABORT_ERR') return err;
    return new LifeboatError(
      'LB_BACKEND_UNAVAILABLE',
      `The store directory ${this.root} failed on ${key} (${code ?? String(err)}). Check the disk, its space and permissions.`,
      { cause: err, details: { key, location: this.location, errno: code } },
    );
  }
}

function tmpName(dir: string): string {
  return join(dir, `${TMP_PREFIX}${randomBytes(8).toString('hex')}`);
}

function closeQuietly(handle: Promise<FileHandle>): void {
  handle.then(
    (h) => h.close().catch(() => undefined),
    () => undefined,
  );
}

async function fsyncDir(dir: string): Promise<void> {
  const handle = await open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

function errCode(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string'
    ? err.code
    : undefined;
}
