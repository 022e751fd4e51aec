import { open, stat } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { LifeboatError, isLifeboatError } from '@lifeboat/protocol/errors';
import type { QemuNbdReader } from './qemu-nbd-reader.js';
import { runTool } from './run-tool.js';

/** Image formats `lifeboat store import` reads. */
export type ImageFormat = 'raw' | 'qcow2';

/** One range of `qemu-img map --output=json`. */
export interface ImageMapEntry {
  /** Guest offset. */
  start: number;
  length: number;
  /** Reads as zeros. */
  zero: boolean;
  /** Has data (allocated, not known zero). */
  data: boolean;
  /** 0 for this file, 1+ for a backing file. */
  depth: number;
  /** Offset in the host file, when the data lies uncompressed at one place in it. */
  offset?: number;
}

/** What `qemu-img info` says about an image, as far as import cares. */
export interface ImageInfo {
  path: string;
  format: ImageFormat;
  /** Virtual (guest-visible) size in bytes. */
  size: number;
  /** Data must be decrypted by QEMU. */
  encrypted: boolean;
  /** qcow2 with an external data file: host offsets point into that file. */
  externalDataFile: boolean;
  /** A backing file, if any (its data is read through QEMU). */
  backingFile?: string;
}

/** Options of {@link DiskImage.open}. */
export interface DiskImageOptions {
  /** Skip format probing (a raw disk whose first sector looks like qcow2 would fool it). */
  format?: ImageFormat;
  /**
   * A regular file whose first sector carries none of the signatures of the formats qemu-img
   * detects is taken as raw without running `qemu-img info` (20-30 ms and a process spawn).
   * That skips qemu-img's check that no VM holds the image open for writing, so the CLI uses
   * it only for a changed-extents import, where those milliseconds are most of the command.
   * Anything that looks like another format still goes through qemu-img. @default false
   */
  sniffRaw?: boolean;
  signal?: AbortSignal;
}

// Signatures (offset, bytes) of the image formats qemu-img probes. A file starting with one of
// them is never taken for raw without asking qemu-img, which then reports the format.
const SIGNATURES: ReadonlyArray<readonly [number, Buffer]> = [
  [0, Buffer.from('QFI\xfb', 'latin1')], // qcow, qcow2
  [0, Buffer.from('QED\0', 'latin1')], // qed
  [0, Buffer.from('KDMV', 'latin1')], // vmdk (sparse)
  [0, Buffer.from('COWD', 'latin1')], // vmdk (ESX COW)
  [0x40, Buffer.from([0x7f, 0x10, 0xda, 0xbe])], // vdi
  [0, Buffer.from('vhdxfile', 'latin1')], // vhdx
  [0, Buffer.from('conectix', 'latin1')], // vpc (dynamic VHD)
  [0, Buffer.from('Bochs Virtual HD Image', 'latin1')], // bochs
  [0, Buffer.from('#!/bin/sh', 'latin1')], // cloop
  [0, Buffer.from('WithoutFreeSpace', 'latin1')], // parallels
  [0, Buffer.from('WithouFreSpacExt', 'latin1')], // parallels
  [0, Buffer.from('LUKS\xba\xbe', 'latin1')], // luks
];

/**
 * True when `head` (the file's first bytes) shows no sign of an image format other than raw:
 * none of the signatures above, and not text (a vmdk descriptor starts with a comment line).
 */
export function looksRaw(head: Buffer, name: string): boolean {
  if (/\.(dmg|vmdk|vhdx?|vdi|qcow2?|qed)$/i.test(name)) return false;
  if (head[0] === 0x23 /* '#' */) return false;
  return !SIGNATURES.some(([at, sig]) => head.subarray(at, at + sig.length).equals(sig));
}

/** The first sector of a regular file, or undefined when it cannot be read whole. */
async function readHead(path: string): Promise<Buffer | undefined> {
  const fh = await open(path, 'r');
  try {
    const head = Buffer.alloc(512);
    const { bytesRead } = await fh.read(head, 0, 512, 0);
    return bytesRead === 512 ? head : undefined;
  } finally {
    await fh.close();
  }
}

function toolError(err: unknown, path: string): unknown {
  if (isLifeboatError(err, 'LB_CLI_TOOL_FAILED')) {
    const stderr = String(err.details['stderr'] ?? '');
    if (/lock/i.test(stderr)) {
      return new LifeboatError(
        'LB_CLI_IMAGE_IN_USE',
        `Image ${path} is in use by another process (${stderr}). Stop the VM or take a copy first: importing a disk that is being written gives an inconsistent point.`,
        { cause: err, details: { path } },
      );
    }
    return new LifeboatError(
      'LB_CLI_IMAGE_UNREADABLE',
      `Cannot read image ${path}: ${stderr || err.message}`,
      { cause: err, details: { path } },
    );
  }
  return err;
}

/**
 * A disk image file (raw or qcow2) opened for import. Formats are understood by QEMU's own
 * tools, never by a hand-written parser: `qemu-img info` for the format and size, `qemu-img
 * map` for the allocation, and for data QEMU cannot point at in the file (compressed or
 * encrypted clusters, backing files) a read-only `qemu-nbd` export.
 */
export class DiskImage {
  // Promises, not handles: reads run ahead of each other and must share one open.
  private file: Promise<FileHandle> | undefined;
  private nbd: Promise<QemuNbdReader> | undefined;
  private mapping: Promise<ImageMapEntry[]> | undefined;
  private closed = false;

  private constructor(
    /** What qemu-img reported. */
    readonly info: ImageInfo,
    private readonly signal: AbortSignal | undefined,
  ) {}

  /** Probes the image with `qemu-img info`; rejects formats other than raw and qcow2. */
  static async open(path: string, options: DiskImageOptions = {}): Promise<DiskImage> {
    let st;
    try {
      st = await stat(path);
    } catch (cause) {
      throw new LifeboatError(
        'LB_CLI_IMAGE_NOT_FOUND',
        `Image ${path} cannot be opened: ${(cause as Error).message}. Check the path.`,
        { cause, details: { path } },
      );
    }
    if (!st.isFile() && !st.isBlockDevice()) {
      throw new LifeboatError(
        'LB_CLI_IMAGE_UNREADABLE',
        `${path} is not a file or block device. Give a raw or qcow2 disk image.`,
        { details: { path } },
      );
    }
    if (
      options.sniffRaw === true &&
      options.format !== 'qcow2' &&
      st.isFile() &&
      st.size % 512 === 0 &&
      st.size > 0
    ) {
      // --format raw says so already; otherwise the first sector must not look like another format.
      const head =
        options.format === 'raw' ? undefined : await readHead(path).catch(() => undefined);
      if (options.format === 'raw' || (head !== undefined && looksRaw(head, path))) {
        return new DiskImage(
          { path, format: 'raw', size: st.size, encrypted: false, externalDataFile: false },
          options.signal,
        );
      }
    }
    const args = ['info', '--output=json'];
    if (options.format !== undefined) args.push('-f', options.format);
    args.push(path);
    let raw: unknown;
    try {
      const { stdout } = await runTool(
        'qemu-img',
        args,
        options.signal === undefined ? {} : { signal: options.signal },
      );
      raw = JSON.parse(stdout);
    } catch (err) {
      throw toolError(err, path);
    }
    const info = raw as {
      format?: string;
      'virtual-size'?: number;
      encrypted?: boolean;
      'backing-filename'?: string;
      'full-backing-filename'?: string;
      'format-specific'?: { data?: { 'data-file'?: string; encrypt?: unknown } };
    };
    const format = info.format;
    if (format !== 'raw' && format !== 'qcow2') {
      throw new LifeboatError(
        'LB_CLI_UNSUPPORTED_FORMAT',
        `Image ${path} is ${format ?? 'of an unknown format'}; import reads raw and qcow2. Convert it first: qemu-img convert -O qcow2 ${path} disk.qcow2`,
        { details: { path, format } },
      );
    }
    let size = info['virtual-size'] ?? 0;
    if (format === 'raw' && st.isFile()) {
      // qemu-img rounds a raw file up to whole sectors; the file's own size is the truth.
      size = st.size;
    }
    if (size % 512 !== 0) {
      throw new LifeboatError(
        'LB_CLI_IMAGE_SIZE',
        `Image ${path} is ${size} bytes, not a whole number of 512-byte sectors, so it is not a disk image. Pad it (truncate -s %512 ${path}) if it is one.`,
        { details: { path, size } },
      );
    }
    const specific = info['format-specific']?.data;
    const backing = info['full-backing-filename'] ?? info['backing-filename'];
    return new DiskImage(
      {
        path,
        format,
        size,
        encrypted: info.encrypted === true || specific?.encrypt !== undefined,
        externalDataFile: specific?.['data-file'] !== undefined,
        ...(backing === undefined ? {} : { backingFile: backing }),
      },
      options.signal,
    );
  }

  /**
   * The allocation map from `qemu-img map`, in offset order, covering the whole disk. Asked for
   * once (a caller may start it early, while other start-up work runs); later calls share it.
   */
  map(): Promise<ImageMapEntry[]> {
    this.mapping ??= this.readMap();
    return this.mapping;
  }

  private async readMap(): Promise<ImageMapEntry[]> {
    let raw: unknown;
    try {
      const { stdout } = await runTool(
        'qemu-img',
        ['map', '--output=json', '-f', this.info.format, this.info.path],
        this.signal === undefined ? {} : { signal: this.signal },
      );
      raw = JSON.parse(stdout);
    } catch (err) {
      throw toolError(err, this.info.path);
    }
    const entries = (raw as ImageMapEntry[]).map((e) => ({
      start: e.start,
      length: e.length,
      zero: e.zero,
      data: e.data,
      depth: e.depth,
      ...(typeof e.offset === 'number' ? { offset: e.offset } : {}),
    }));
    entries.sort((a, b) => a.start - b.start);
    // qemu-img map covers the sector-rounded size; a raw file's tail beyond it never matters.
    return entries
      .filter((e) => e.start < this.info.size)
      .map((e) => ({ ...e, length: Math.min(e.length, this.info.size - e.start) }));
  }

  /** True when the bytes of `entry` can be read straight from the image file. */
  canReadDirectly(entry: ImageMapEntry): boolean {
    if (this.info.format === 'raw') return true;
    return (
      entry.offset !== undefined &&
      entry.depth === 0 &&
      !this.info.encrypted &&
      !this.info.externalDataFile
    );
  }

  /**
   * Reads `length` bytes at guest `offset`, which lie inside `entry`: from the file directly
   * when the map gives a host offset in this file, otherwise through qemu-nbd. With `into`
   * (at least `length` bytes), a direct read fills it instead of a new buffer.
   */
  async read(entry: ImageMapEntry, offset: number, length: number, into?: Buffer): Promise<Buffer> {
    if (this.closed) throw new Error('DiskImage is closed');
    if (this.canReadDirectly(entry)) {
      const host =
        this.info.format === 'raw' ? offset : (entry.offset as number) + (offset - entry.start);
      this.file ??= open(this.info.path, 'r');
      const file = await this.file;
      const buf =
        into !== undefined && into.length >= length
          ? into.subarray(0, length)
          : Buffer.allocUnsafe(length);
      let got = 0;
      while (got < length) {
        const { bytesRead } = await file.read(buf, got, length - got, host + got);
        if (bytesRead === 0) {
          // Past the end of a raw file (it shrank while we read): a changed image is an error.
          throw new LifeboatError(
            'LB_CLI_IMAGE_CHANGED',
            `Image ${this.info.path} ended at ${host + got} while reading; it changed during import. Import a copy that nothing writes to.`,
            { details: { path: this.info.path, offset: host + got } },
          );
        }
        got += bytesRead;
      }
      return buf;
    }
    // Loaded on first need: most imports never read through qemu-nbd.
    this.nbd ??= import('./qemu-nbd-reader.js').then(({ QemuNbdReader }) =>
      QemuNbdReader.start({
        path: this.info.path,
        format: this.info.format,
        ...(this.signal === undefined ? {} : { signal: this.signal }),
      }),
    );
    return (await this.nbd).readAt(offset, length);
  }

  /** Closes the file and stops qemu-nbd if it was started. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const file = this.file;
    const nbd = this.nbd;
    this.file = undefined;
    this.nbd = undefined;
    // A failed open or start has nothing to close.
    await Promise.all([
      file?.then(
        (f) => f.close(),
        () => undefined,
      ),
      nbd?.then(
        (n) => n.close(),
        () => undefined,
      ),
    ]);
  }
}
