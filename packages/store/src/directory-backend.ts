import { randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import { link, mkdir, open, readFile, readdir, rename, stat, unlink } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { LifeboatError } from '@lifeboat/protocol';
import type { ObjectBackend, ObjectInfo, PutOptions } from './object-backend.js';

/** Options for {@link DirectoryBackend}. */
export interface DirectoryBackendOptions {
  /** The directory holding the store's objects; created when missing. */
  path: string;
}

// Temporary files live beside their final name so rename stays within one file system.
const TMP_PREFIX = '.tmp-';
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

  constructor(options: DirectoryBackendOptions) {
    if (typeof options.path !== 'string' || options.path === '') {
      throw new LifeboatError(
        'LB_BACKEND_INVALID_OPTIONS',
        'The directory backend needs a path. Give the store directory.',
      );
    }
    this.root = resolve(options.path);
    this.location = `dir:${this.root}`;
  }

  async put(key: string, data: Uint8Array, options: PutOptions = {}): Promise<void> {
    const file = this.file(key);
    const dir = dirname(file);
    options.signal?.throwIfAborted();
    await this.ensureDir(dir);
    const tmp = join(dir, `${TMP_PREFIX}${randomBytes(8).toString('hex')}`);
    try {
      const handle = await open(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL);
      try {
        await handle.writeFile(data);
        await handle.sync();
      } finally {
        await handle.close();
      }
      if (options.overwrite === true) {
        await rename(tmp, file);
      } else {
        // link fails atomically when the name exists, which rename would silently replace.
        try {
          await link(tmp, file).catch(async (err: unknown) => {
            // File systems without hard links: check, then rename (racy only against
            // another writer of the same key, which random object names make moot).
            if (!['EPERM', 'ENOTSUP', 'EOPNOTSUPP', 'ENOSYS'].includes(errCode(err) ?? ''))
              throw err;
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
      await fsyncDir(dir);
    } catch (err) {
      await unlink(tmp).catch(() => undefined);
      throw this.wrap(err, key);
    }
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
    signal?.throwIfAborted();
    if (
      !Number.isSafeInteger(offset) ||
      !Number.isSafeInteger(length) ||
      offset < 0 ||
      length < 0
    ) {
      throw new LifeboatError('LB_BACKEND_RANGE', `Invalid range ${offset}+${length} of ${key}.`, {
        details: { key, offset, length },
      });
    }
    let handle;
    try {
      handle = await open(this.file(key), 'r');
    } catch (err) {
      throw this.wrap(err, key);
    }
    try {
      // An empty range is valid up to the object's end, like on Azure; past it, it is not.
      if (length === 0 && offset > (await handle.stat()).size)
        throw this.rangeError(key, offset, length, 0);
      const buf = Buffer.allocUnsafe(length);
      let done = 0;
      while (done < length) {
        const { bytesRead } = await handle.read(buf, done, length - done, offset + done);
        if (bytesRead === 0) break;
        done += bytesRead;
      }
      if (done < length) throw this.rangeError(key, offset, length, done);

      return buf;
    } catch (err) {
      throw this.wrap(err, key);
    } finally {
      await handle.close();
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
    yield* this.walk(baseKey, prefix);
  }

  async delete(key: string): Promise<void> {
    try {
      await unlink(this.file(key));
    } catch (err) {
      if (errCode(err) === 'ENOENT') return;
      throw this.wrap(err, key);
    }
  }

  async close(): Promise<void> {
    // Nothing is held open between calls.
  }

  private async *walk(dirKey: string, prefix: string): AsyncIterable<ObjectInfo> {
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
        if (key.startsWith(prefix) || prefix.startsWith(`${key}/`)) yield* this.walk(key, prefix);
      } else if (entry.isFile() && key.startsWith(prefix)) {
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
