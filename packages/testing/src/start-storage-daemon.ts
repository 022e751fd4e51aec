import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { LifeboatError } from '@lifeboat/protocol';
import { startQemuStorageDaemon } from '@lifeboat/qmp';
import type { QemuStorageDaemon } from '@lifeboat/qmp';

/** One image opened by {@link startStorageDaemon} as a block node. */
export interface DaemonDisk {
  /** Image file. */
  path: string;
  /** Image format. @default 'qcow2' */
  format?: 'qcow2' | 'raw';
  /** Block node name of the format node. @default `disk<N>` */
  nodeName?: string;
  /**
   * Exports the node over the daemon's NBD server under this name, writable, so a test can
   * write to the disk (a "guest") while an agent tracks it. @default not exported
   */
  exportName?: string;
}

/** Options for {@link startStorageDaemon}. */
export interface StartStorageDaemonOptions {
  disks: DaemonDisk[];
  /** Starts an NBD server on a UNIX socket (`<dir>/nbd.sock`). Implied by any `exportName`. @default false */
  nbd?: boolean;
}

/** A running qemu-storage-daemon for a test (see `@lifeboat/qmp`'s launcher, which it wraps). */
export interface StorageDaemon {
  /** The launcher's handle: QMP client, sockets, pid, stderr. */
  readonly daemon: QemuStorageDaemon;
  /** A QMP monitor free for the test or the agent (the launcher's own is `daemon.qmpSocket`). */
  readonly qmpSocket: string;
  /** The NBD server's UNIX socket, when started. */
  readonly nbdSocket: string | undefined;
  /** Block node names, in the order of the disks. */
  readonly nodeNames: readonly string[];
  /** `nbd+unix:///NAME?socket=PATH` of an export, for qemu-io / qemu-img / nbdinfo. */
  nbdUri(exportName: string): string;
  /**
   * Stops the daemon: cleanly (QMP `quit`, persistent bitmaps written) unless `kill`, which
   * SIGKILLs it as a crash would (bitmaps on disk are left marked in-use, i.e. inconsistent).
   */
  stop(options?: { kill?: boolean }): Promise<void>;
}

/**
 * Starts `qemu-storage-daemon` with each image as a block node (`disk<N>` over `disk<N>-file`),
 * a QMP socket, and optionally an NBD server on a UNIX socket exporting chosen nodes writable.
 * The caller must `stop()` it.
 */
export async function startStorageDaemon(
  options: StartStorageDaemonOptions,
): Promise<StorageDaemon> {
  for (const d of options.disks) {
    if (!existsSync(d.path)) {
      throw new LifeboatError('LB_TESTING_BAD_OPTION', `Disk image ${d.path} does not exist.`);
    }
  }
  const dir = await mkdtemp(join(tmpdir(), 'lifeboat-qsd-'));
  const wantNbd = options.nbd === true || options.disks.some((d) => d.exportName !== undefined);
  const nbdSocket = wantNbd ? join(dir, 'nbd.sock') : undefined;
  const nodeNames = options.disks.map((d, i) => d.nodeName ?? `disk${i}`);
  const blockdevs: Record<string, unknown>[] = [];
  const exports: Record<string, unknown>[] = [];
  options.disks.forEach((d, i) => {
    const node = nodeNames[i] as string;
    blockdevs.push({ driver: 'file', filename: d.path, 'node-name': `${node}-file` });
    blockdevs.push({ driver: d.format ?? 'qcow2', file: `${node}-file`, 'node-name': node });
    if (d.exportName !== undefined) {
      exports.push({
        type: 'nbd',
        id: `export-${i}`,
        'node-name': node,
        name: d.exportName,
        writable: true,
      });
    }
  });
  // The launcher keeps its own QMP connection (a monitor serves one client at a time), so
  // the test and the agent get a second monitor of their own.
  const qmpSocket = join(dir, 'qmp.sock');
  let daemon: QemuStorageDaemon;
  try {
    daemon = await startQemuStorageDaemon({
      blockdevs,
      exports,
      qmpSocket: join(dir, 'launcher-qmp.sock'),
      ...(nbdSocket === undefined ? {} : { nbdSocket }),
      extraArgs: [
        '--chardev',
        `socket,path=${qmpSocket},server=on,wait=off,id=lbqmp-test`,
        '--monitor',
        'chardev=lbqmp-test',
      ],
    });
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
  return {
    daemon,
    qmpSocket,
    nbdSocket,
    nodeNames,
    nbdUri(exportName) {
      if (!nbdSocket) {
        throw new LifeboatError('LB_TESTING_BAD_OPTION', 'The storage daemon has no NBD server.');
      }
      return `nbd+unix:///${exportName}?socket=${nbdSocket}`;
    },
    async stop(stopOptions = {}) {
      if (stopOptions.kill) {
        try {
          process.kill(daemon.pid, 'SIGKILL');
        } catch {
          // Already gone.
        }
      }
      await daemon.stop();
      await rm(dir, { recursive: true, force: true });
    },
  };
}
