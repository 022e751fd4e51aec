// Appends to a file with direct I/O (O_DIRECT), for the directory backend's objects written in
// pieces (packs). On the VMs Lifeboat is developed on, every new page of file data in the page
// cache costs a host fault and a kernel copy; a process server writes packs once and rarely
// reads them again, so the cache gains it nothing (see docs/operations.md, "Direct I/O").
import type { FileHandle } from 'node:fs/promises';
import {
  DIRECT_IO_ALIGN,
  O_DIRECT,
  directIoRefused,
  pageAlignedShared,
  writeFully,
} from '@lifeboat/protocol/direct-io';

/**
 * Bytes of a writer's page-aligned staging buffer (direct writes go out from it): a pack's
 * piece (1 MiB) in one write. Each write waits for a turn of the event loop to start the next;
 * with 256 KiB, four turns per piece left a 4 MiB cut's pieces 5.4 ms behind at its commit
 * (3.0 ms with 1 MiB, on the development VM).
 */
export const STAGING_BYTES = 1024 * 1024;
/** Staging buffers kept for the next writer of this thread (each is a mapping of its own). */
const MAX_SPARE_STAGING = 4;
const spareStaging: Buffer[] = [];

function takeStaging(): Buffer {
  return spareStaging.pop() ?? Buffer.from(pageAlignedShared(STAGING_BYTES));
}

function giveStaging(buf: Buffer): void {
  if (spareStaging.length < MAX_SPARE_STAGING) spareStaging.push(buf);
}

/** The O_DIRECT flag when the platform has it, else 0 (then writes go through the cache). */
export const DIRECT_FLAG = O_DIRECT ?? 0;

/**
 * Sequential appends to a file opened with {@link DIRECT_FLAG}. Bytes are copied into a
 * page-aligned staging buffer and written out in whole 4 KiB blocks; the last partial block
 * stays in the buffer until {@link finish}, which writes it zero-padded and truncates the file
 * to its length. Should the file system refuse a direct write (EINVAL), the writer carries on
 * through the page cache on a second handle of the same file: the bytes are the same either way.
 */
export class DirectAppender {
  private staging: Buffer | undefined = takeStaging();
  /** Bytes in `staging` not yet on disk (always fewer than a block after an append). */
  private fill = 0;
  /** File position of `staging[0]`. */
  private position = 0;
  private buffered: FileHandle | undefined;

  /**
   * @param fh the file, opened for writing with O_DIRECT
   * @param reopen opens the same file again without O_DIRECT (the fallback)
   */
  constructor(
    private readonly fh: FileHandle,
    private readonly reopen: () => Promise<FileHandle>,
  ) {}

  /** True once the file system refused direct writes and the cache is used instead. */
  get refused(): boolean {
    return this.buffered !== undefined;
  }

  async append(data: Uint8Array): Promise<void> {
    const staging = this.buf();
    let from = 0;
    while (from < data.length) {
      const n = Math.min(data.length - from, staging.length - this.fill);
      staging.set(data.subarray(from, from + n), this.fill);
      this.fill += n;
      from += n;
      if (this.fill === staging.length) await this.writeOut(false);
    }
    // What fills whole blocks goes out now (syncEarly then makes it durable).
    if (this.fill >= DIRECT_IO_ALIGN) await this.writeOut(false);
  }

  /** Writes what is left (the last partial block, padded) and cuts the file to its length. */
  async finish(): Promise<void> {
    if (this.fill > 0) await this.writeOut(true);
  }

  /** The handle to fsync and close along with `fh` (the fallback's), if any. */
  get fallbackHandle(): FileHandle | undefined {
    return this.buffered;
  }

  /** Hands the staging buffer to the next writer; the appender is done. */
  release(): void {
    if (this.staging !== undefined) giveStaging(this.staging);
    this.staging = undefined;
  }

  private buf(): Buffer {
    if (this.staging === undefined) throw new Error('DirectAppender used after release');
    return this.staging;
  }

  /** Writes the whole blocks of `staging` (all of it, padded, with `last`); keeps the rest. */
  private async writeOut(last: boolean): Promise<void> {
    const staging = this.buf();
    const end = this.position + this.fill;
    if (this.buffered !== undefined) {
      await writeFully(this.buffered, staging, this.position, 0, this.fill);
      this.position = end;
      this.fill = 0;
      return;
    }
    const whole = this.fill - (this.fill % DIRECT_IO_ALIGN);
    const bytes = last ? Math.ceil(this.fill / DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN : whole;
    if (bytes === 0) return;
    if (bytes > this.fill) staging.fill(0, this.fill, bytes);
    try {
      await writeFully(this.fh, staging, this.position, 0, bytes);
    } catch (err) {
      if (!directIoRefused(err)) throw err;
      this.buffered = await this.reopen();
      await this.writeOut(last);
      return;
    }
    if (last) {
      if (bytes > this.fill) await this.fh.truncate(end);
      this.position = end;
      this.fill = 0;
      return;
    }
    staging.copyWithin(0, whole, this.fill);
    this.fill -= whole;
    this.position += whole;
  }
}
