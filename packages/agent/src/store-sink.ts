import type { PointInfo, StoreApi, WriteSession } from '@lifeboat/store';
import type { ReplicationSink, ResyncBaseline, SinkCutOptions } from './replication-sink.js';

/** A cut committed by a {@link StoreSink}: one point per disk. */
export interface StoreSinkCut {
  cutId: string;
  kind: 'crash' | 'app';
  time: number;
  points: PointInfo[];
}

/**
 * A sink that writes straight into a store: one write session per disk on top of its latest
 * point, committed at each cut. It plays the process server's part in one process (tests,
 * single-machine installs); "acknowledged" means committed or held in an open session, which
 * lives as long as this object (as the process server's journal outlives an agent restart).
 */
export class StoreSink implements ReplicationSink {
  /** Cuts committed so far, oldest first. */
  readonly committed: StoreSinkCut[] = [];
  /** Data bytes received (write frames only). */
  dataBytes = 0;
  private readonly sizes = new Map<string, number>();
  private readonly sessions = new Map<string, WriteSession>();

  constructor(
    private readonly store: StoreApi,
    private readonly machine: string,
  ) {}

  addDisk(disk: { name: string; size: number }): void {
    if (!this.sizes.has(disk.name)) this.sizes.set(disk.name, disk.size);
  }

  private async session(disk: string): Promise<WriteSession> {
    let s = this.sessions.get(disk);
    if (!s) {
      const size = this.sizes.get(disk);
      if (size === undefined) throw new Error(`unknown disk ${disk}`);
      s = await this.store.beginWrite({ machine: this.machine, disk, size, base: 'latest' });
      if (s.size !== size) await s.resize(size);
      this.sessions.set(disk, s);
    }
    return s;
  }

  async write(disk: string, offset: number, data: Buffer): Promise<void> {
    this.dataBytes += data.length;
    await (await this.session(disk)).write(offset, data);
  }

  async writeZeroes(disk: string, offset: number, length: number): Promise<void> {
    await (await this.session(disk)).writeZeroes(offset, length);
  }

  async resize(disk: string, size: number): Promise<void> {
    this.sizes.set(disk, size);
    await (await this.session(disk)).resize(size);
  }

  async cut(options: SinkCutOptions): Promise<void> {
    const points: PointInfo[] = [];
    for (const disk of this.sizes.keys()) {
      const s = await this.session(disk);
      points.push(
        await s.commit({
          time: new Date(options.time),
          kind: options.kind,
          cut: options.cutId,
          ...(options.consistencyGroup ? { consistencyGroup: options.consistencyGroup } : {}),
          ...(options.labels ? { labels: options.labels } : {}),
        }),
      );
      this.sessions.delete(disk);
    }
    this.committed.push({ cutId: options.cutId, kind: options.kind, time: options.time, points });
  }

  async waitForAck(): Promise<void> {
    // Writes are applied to the session when they resolve; cuts commit before they resolve.
  }

  async discardPending(disk: string): Promise<void> {
    const s = this.sessions.get(disk);
    this.sessions.delete(disk);
    await s?.abort();
  }

  async latestCut(): Promise<{ cutId: string; time: number } | undefined> {
    const points = await this.store.listPoints({ machine: this.machine });
    let newest: PointInfo | undefined;
    for (const p of points) {
      if (p.cut !== undefined && (!newest || p.time.getTime() > newest.time.getTime())) newest = p;
    }
    return newest ? { cutId: newest.cut as string, time: newest.time.getTime() } : undefined;
  }

  async resyncBaseline(disk: string): Promise<ResyncBaseline | undefined> {
    const latest = await this.store.latestPoint(this.machine, disk);
    if (!latest) return undefined;
    const reader = await this.store.openPoint(latest.id);
    const ids = new Map<number, string | null>();
    for await (const c of reader.chunkIds()) ids.set(c.offset, c.id);
    return {
      chunkSize: this.store.chunkSize,
      size: reader.size,
      idAt: (offset) => ids.get(offset) ?? null,
      idOf: (data) => this.store.chunkIdOf(data),
    };
  }
}
