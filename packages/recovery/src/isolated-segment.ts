import { rm } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { LifeboatError } from '@lifeboat/protocol';

// Largest Ethernet frame QEMU sends over a stream netdev (jumbo frames included), to refuse
// a corrupt length prefix instead of buffering without end.
const MAX_FRAME = 65536 + 4;

/**
 * A private Ethernet segment for the machines of one test failover: an Ethernet hub on a
 * UNIX socket in the job's run directory. Each QEMU connects with
 * `-netdev stream,server=off,addr.type=unix,addr.path=<socket>` (frames prefixed with their
 * 32-bit big-endian length, as QEMU's socket and stream netdevs send them), and every frame
 * is repeated to the other machines of the segment and to nothing else: there is no IP
 * address, no gateway and no route out, so no production address can reach them or be reached.
 */
export class IsolatedSegment {
  /** Frames forwarded so far, for the job's record. */
  framesForwarded = 0;
  private readonly ports = new Set<Socket>();

  private constructor(
    /** UNIX socket the machines connect to. */
    readonly socketPath: string,
    private readonly server: Server,
  ) {}

  /** Starts a segment listening on `socketPath` (a path in a private directory). */
  static async start(socketPath: string): Promise<IsolatedSegment> {
    const server = createServer();
    const segment = new IsolatedSegment(socketPath, server);
    server.on('connection', (s) => segment.attach(s));
    await new Promise<void>((resolve, reject) => {
      server.once('error', (cause) =>
        reject(
          new LifeboatError(
            'LB_RECOVERY_NETWORK',
            `Cannot create the isolated network segment at ${socketPath}: ${cause.message}. Check the run directory.`,
            { cause, details: { socketPath } },
          ),
        ),
      );
      server.listen(socketPath, () => resolve());
    });
    return segment;
  }

  /** Number of machines connected now. */
  get connected(): number {
    return this.ports.size;
  }

  private attach(s: Socket): void {
    this.ports.add(s);
    let pending: Buffer = Buffer.alloc(0);
    s.on('data', (data: Buffer) => {
      pending = pending.length === 0 ? data : Buffer.concat([pending, data]);
      for (;;) {
        if (pending.length < 4) return;
        const len = pending.readUInt32BE(0);
        if (len > MAX_FRAME) {
          // Not QEMU's framing: drop this port rather than flood the segment with garbage.
          s.destroy();
          return;
        }
        if (pending.length < 4 + len) return;
        const frame = pending.subarray(0, 4 + len);
        pending = pending.subarray(4 + len);
        for (const other of this.ports) {
          if (other !== s && !other.destroyed) other.write(frame);
        }
        this.framesForwarded++;
      }
    });
    s.on('error', () => s.destroy());
    s.on('close', () => this.ports.delete(s));
  }

  /** Disconnects every machine and removes the socket. */
  async close(): Promise<void> {
    for (const s of this.ports) s.destroy();
    this.ports.clear();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
    await rm(this.socketPath, { force: true });
  }
}
