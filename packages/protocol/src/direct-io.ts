// Helpers for direct I/O (O_DIRECT): writes that bypass the page cache. The CLI's restore and
// the process server's journal use them. On the VMs Lifeboat is developed on, the guest gives
// freed memory back to the host, so every write of new file data into the page cache costs a
// host fault per page; a journal that is written once, fsynced and deleted gains nothing from
// the cache and paid for it (measured: 0.7-0.9 s of kernel time per GiB buffered, 0.1 direct).
import { constants, type promises } from 'node:fs';

type FileHandle = promises.FileHandle;

/** Bytes direct I/O is aligned to (offsets, lengths and memory): a page. */
export const DIRECT_IO_ALIGN = 4096;

/** The O_DIRECT open flag, or undefined where the platform has none. */
export const O_DIRECT: number | undefined = (constants as { O_DIRECT?: number }).O_DIRECT;

/**
 * Shared memory that starts on a page boundary: a shared WebAssembly memory, which V8 maps
 * whole pages for. Buffers and SharedArrayBuffers come from malloc, 16 bytes past a page, and
 * direct I/O refuses them (EINVAL).
 */
export function pageAlignedShared(bytes: number): SharedArrayBuffer {
  const pages = Math.max(1, Math.ceil(bytes / WASM_PAGE));
  return new Wasm.Memory({ initial: pages, maximum: pages, shared: true }).buffer;
}

/** True when an error is the file system refusing direct I/O (EINVAL): go through the page cache. */
export function directIoRefused(err: unknown): boolean {
  return (err as NodeJS.ErrnoException | undefined)?.code === 'EINVAL';
}

/** Writes all of `data[offset, offset + length)` at `position`, however many writes it takes. */
export async function writeFully(
  fh: FileHandle,
  data: Uint8Array,
  position: number,
  offset = 0,
  length = data.length - offset,
): Promise<void> {
  let done = 0;
  while (done < length) {
    const { bytesWritten } = await fh.write(data, offset + done, length - done, position + done);
    if (bytesWritten <= 0) throw new Error(`write at ${position + done} wrote nothing`);
    done += bytesWritten;
  }
}

const WASM_PAGE = 65536;
/** The global WebAssembly object (Node's type definitions declare its types, not the value). */
const Wasm = (
  globalThis as unknown as {
    WebAssembly: {
      Memory: new (d: { initial: number; maximum: number; shared: boolean }) => {
        buffer: SharedArrayBuffer;
      };
    };
  }
).WebAssembly;
