import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { NbdServer, exportSourceFromReader, type NbdPendingRequests } from '@lifeboat/nbd';
import type { PointInfo, StoreApi } from '@lifeboat/store';
import { CachedPointSource, type PointReadFault } from './cached-point-source.js';
import type { DiskExport } from './recovery-machine.js';

/** Options for {@link PointExport.start}. */
export interface PointExportOptions {
  /** Export name (also the socket's base name). */
  name: string;
  /** Private directory the UNIX socket is created in. */
  dir: string;
  /** Bytes of chunk cache for this export. @default 67108864 */
  cacheBytes?: number;
  /** Chunks read ahead once reads are sequential. @default 16 */
  readAheadChunks?: number;
  /** Called for each read the store could not serve (the client got EIO). */
  onFault?: (fault: PointReadFault) => void;
}

/**
 * One recovery point served read-only over NBD (Lifeboat's own server, on a UNIX socket in a
 * private directory, so nothing on the network can reach it), through a chunk cache with
 * read-ahead. A damaged range gives the client an I/O error and is recorded in `faults`.
 */
export class PointExport implements DiskExport {
  private constructor(
    readonly name: string,
    readonly socketPath: string,
    readonly point: PointInfo,
    /** The cached source, for its figures and faults. */
    readonly source: CachedPointSource,
    private readonly server: NbdServer,
  ) {}

  /** Size of the point's disk. */
  get size(): number {
    return this.point.size;
  }

  /** The exported point's id. */
  get pointId(): string {
    return this.point.id;
  }

  /** Reads that failed so far (point, range, store error). */
  get faults(): readonly PointReadFault[] {
    return this.source.faults;
  }

  /** Opens `pointId` in `store` and starts serving it. */
  static async start(
    store: StoreApi,
    pointId: string,
    options: PointExportOptions,
  ): Promise<PointExport> {
    const reader = await store.openPoint(pointId);
    const source = new CachedPointSource(reader, {
      blockSize: store.chunkSize,
      ...(options.cacheBytes !== undefined ? { cacheBytes: options.cacheBytes } : {}),
      ...(options.readAheadChunks !== undefined
        ? { readAheadBlocks: options.readAheadChunks }
        : {}),
      ...(options.onFault ? { onFault: options.onFault } : {}),
    });
    const server = new NbdServer();
    server.addExport(options.name, exportSourceFromReader(source), {
      description: `Lifeboat recovery point ${pointId} of ${reader.point.machine}/${reader.point.disk}`,
    });
    const socketPath = join(options.dir, `${options.name}.nbd.sock`);
    await server.listen({ path: socketPath });
    return new PointExport(options.name, socketPath, reader.point, source, server);
  }

  /** Reads QEMU asked for that the store has not answered yet (see NbdServer.pendingRequests). */
  get pendingRequests(): NbdPendingRequests {
    return this.server.pendingRequests;
  }

  /** Open NBD connections (QEMU holds one per disk). */
  get connections(): number {
    return this.server.connections;
  }

  /** Stops serving and removes the socket. */
  async close(): Promise<void> {
    await this.server.close();
    await rm(this.socketPath, { force: true });
  }
}
