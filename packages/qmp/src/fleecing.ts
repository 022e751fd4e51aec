import { spawn } from 'node:child_process';
import { rm } from 'node:fs/promises';
import { LifeboatError } from '@lifeboat/protocol';
import type { QmpClient } from './qmp-client.js';

/** One disk of a consistent cut by image fleecing. */
export interface FleeceDisk {
  /** The live format node (e.g. the qcow2 node the guest writes). */
  node: string;
  /** The bitmap that tracked changes until now: disabled at the cut and exported. */
  oldBitmap: string;
  /** A bitmap created at the cut that tracks changes after it. @default none */
  newBitmap?: string;
  /** Make the new bitmap persistent (qcow2 only). @default true */
  persistent?: boolean;
  /** A path for the temporary qcow2 overlay; created, then deleted on release. */
  overlayPath: string;
  /** NBD export name of the point-in-time view. */
  exportName: string;
}

/** Options of {@link startFleecing}. */
export interface FleecingOptions {
  /** All disks of one machine: cut together in one transaction. */
  disks: FleeceDisk[];
  /** Prefix of the node, job and export ids created here. @default 'lbfleece' */
  idPrefix?: string;
  /** Delete the old bitmap on release (its changes are then read). @default true */
  removeOldBitmapOnRelease?: boolean;
  /** Time limit of each QMP command and event wait. @default 30000 */
  timeoutMs?: number;
  /**
   * Runs right before the cut's transaction, once the overlays are in place: where to freeze
   * the guest's file systems, so they stay frozen for the transaction alone, not for the
   * overlays' creation or the exports. A failure rolls the cut back. @default none
   */
  beforeTransaction?: () => Promise<void>;
  /**
   * Runs right after the transaction, also when the transaction failed (where to thaw). A
   * failure fails the cut (rolled back) unless the transaction's own error is thrown. @default none
   */
  afterTransaction?: () => Promise<void>;
}

/** A point-in-time view of each disk, exported over NBD with its old bitmap. */
export interface FleecingCut {
  disks: {
    node: string;
    exportName: string;
    /** The NBD meta context that lists the changed extents: `qemu:dirty-bitmap:<oldBitmap>`. */
    bitmapContext: string;
    fleeceNode: string;
    jobId: string;
    exportId: string;
  }[];
  /** Removes exports, jobs, overlay nodes and files (and the old bitmaps, by default). */
  release(): Promise<void>;
}

interface NamedNode {
  'node-name': string;
  image: { 'virtual-size': number };
}

/**
 * Takes a consistent cut of one machine's disks by image fleecing, the way that works on
 * Debian's QEMU 7.2 (where a copy-before-write filter cannot be inserted into a live graph):
 *
 * 1. `qemu-img create` an empty qcow2 overlay per disk, `blockdev-add` it with the live node
 *    as its backing.
 * 2. One `transaction` (between the optional `beforeTransaction` and `afterTransaction`): per disk `block-dirty-bitmap-add` (new bitmap),
 *    `block-dirty-bitmap-disable` (old bitmap) and `blockdev-backup sync=none` from the live
 *    node into the overlay. From this instant QEMU copies old data into the overlay before
 *    any guest write lands, so overlay-over-live reads as the disk at the cut.
 * 3. `block-export-add` (NBD, read-only) of each overlay node with the old bitmap; a client
 *    reads the changed extents through the `qemu:dirty-bitmap:<old>` meta context.
 * 4. `release()`: `block-export-del`, `block-job-cancel`, `blockdev-del`, bitmap removal.
 *
 * The QEMU process must already run an NBD server (`nbd-server-start`, or
 * qemu-storage-daemon's `--nbd-server`).
 */
export async function startFleecing(
  qmp: QmpClient,
  options: FleecingOptions,
): Promise<FleecingCut> {
  const prefix = options.idPrefix ?? 'lbfleece';
  const timeoutMs = options.timeoutMs ?? 30_000;
  const removeOld = options.removeOldBitmapOnRelease ?? true;
  if (options.disks.length === 0) {
    throw new LifeboatError('LB_QMP_INVALID_OPTIONS', 'startFleecing needs at least one disk.');
  }
  const exec = <T>(cmd: string, args?: Record<string, unknown>): Promise<T> =>
    qmp.execute<T>(cmd, args, { timeoutMs });

  const nodes = await exec<NamedNode[]>('query-named-block-nodes', { flat: true });
  const disks = options.disks.map((d, i) => {
    const n = nodes.find((x) => x['node-name'] === d.node);
    if (n === undefined) {
      throw new LifeboatError(
        'LB_QMP_NODE_NOT_FOUND',
        `No block node named '${d.node}' in QEMU. Check the disk's node name (query-named-block-nodes).`,
        {
          details: { node: d.node },
        },
      );
    }
    return {
      ...d,
      size: n.image['virtual-size'],
      fleeceNode: `${prefix}-node-${i}`,
      jobId: `${prefix}-job-${i}`,
      exportId: `${prefix}-export-${i}`,
    };
  });

  const added: string[] = [];
  const exported: string[] = [];
  let transacted = false;
  /** Set once the cut is handed to the caller: from then on release() must not undo it. */
  let completed = false;
  const undo = async (): Promise<void> => {
    for (const id of exported) await deleteExport(qmp, id, timeoutMs).catch(() => undefined);
    if (transacted) {
      for (const d of disks) await cancelJob(qmp, d.jobId, timeoutMs).catch(() => undefined);
    }
    if (transacted && !completed) {
      // Undo the cut so no change is lost: fold what the new bitmap saw back into the old one
      // and let the old one record again, atomically (QEMU drains I/O around a transaction).
      const actions: Record<string, unknown>[] = [];
      for (const d of disks) {
        if (d.newBitmap !== undefined) {
          actions.push({
            type: 'block-dirty-bitmap-merge',
            data: { node: d.node, target: d.oldBitmap, bitmaps: [d.newBitmap] },
          });
        }
        actions.push({
          type: 'block-dirty-bitmap-enable',
          data: { node: d.node, name: d.oldBitmap },
        });
        if (d.newBitmap !== undefined) {
          actions.push({
            type: 'block-dirty-bitmap-remove',
            data: { node: d.node, name: d.newBitmap },
          });
        }
      }
      await exec('transaction', { actions });
    }
    for (const n of added) await exec('blockdev-del', { 'node-name': n }).catch(() => undefined);
    for (const d of disks) await rm(d.overlayPath, { force: true });
  };

  try {
    for (const d of disks) {
      await runQemuImg(['create', '-q', '-f', 'qcow2', d.overlayPath, String(d.size)]);
      await exec('blockdev-add', {
        driver: 'qcow2',
        'node-name': d.fleeceNode,
        file: { driver: 'file', filename: d.overlayPath },
        backing: d.node,
      });
      added.push(d.fleeceNode);
    }
    const actions: Record<string, unknown>[] = [];
    for (const d of disks) {
      if (d.newBitmap !== undefined) {
        actions.push({
          type: 'block-dirty-bitmap-add',
          data: { node: d.node, name: d.newBitmap, persistent: d.persistent ?? true },
        });
      }
      actions.push({
        type: 'block-dirty-bitmap-disable',
        data: { node: d.node, name: d.oldBitmap },
      });
      actions.push({
        type: 'blockdev-backup',
        data: { device: d.node, target: d.fleeceNode, sync: 'none', 'job-id': d.jobId },
      });
    }
    await options.beforeTransaction?.();
    let failed: { error: unknown } | undefined;
    try {
      await exec('transaction', { actions });
      transacted = true;
    } catch (error) {
      failed = { error };
    }
    try {
      await options.afterTransaction?.();
    } catch (error) {
      failed ??= { error };
    }
    if (failed) throw failed.error;
    for (const d of disks) {
      await exec('block-export-add', {
        type: 'nbd',
        id: d.exportId,
        'node-name': d.fleeceNode,
        name: d.exportName,
        writable: false,
        bitmaps: [{ node: d.node, name: d.oldBitmap }],
      });
      exported.push(d.exportId);
    }
  } catch (err) {
    await undo().catch(() => undefined);
    throw err;
  }
  completed = true;

  let released = false;
  return {
    disks: disks.map((d) => ({
      node: d.node,
      exportName: d.exportName,
      bitmapContext: `qemu:dirty-bitmap:${d.oldBitmap}`,
      fleeceNode: d.fleeceNode,
      jobId: d.jobId,
      exportId: d.exportId,
    })),
    release: async () => {
      if (released) return;
      released = true;
      await undo();
      if (removeOld) {
        for (const d of disks)
          await exec('block-dirty-bitmap-remove', { node: d.node, name: d.oldBitmap });
      }
    },
  };
}

async function deleteExport(qmp: QmpClient, id: string, timeoutMs: number): Promise<void> {
  const gone = qmp.waitForEvent('BLOCK_EXPORT_DELETED', (e) => e.data['id'] === id, timeoutMs);
  gone.catch(() => undefined);
  await qmp.execute('block-export-del', { id }, { timeoutMs });
  await gone;
}

async function cancelJob(qmp: QmpClient, id: string, timeoutMs: number): Promise<void> {
  // The job is gone once it reaches "null" (auto-dismissed after concluding).
  const gone = qmp.waitForEvent(
    'JOB_STATUS_CHANGE',
    (e) => e.data['id'] === id && e.data['status'] === 'null',
    timeoutMs,
  );
  gone.catch(() => undefined);
  await qmp.execute('block-job-cancel', { device: id, force: true }, { timeoutMs });
  await gone;
}

function runQemuImg(args: string[]): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn('qemu-img', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.once('error', (e) =>
      reject(
        new LifeboatError(
          'LB_QMP_OVERLAY',
          `Could not run qemu-img: ${e.message}. Install qemu-utils.`,
          { cause: e },
        ),
      ),
    );
    child.once('exit', (code) => {
      if (code === 0) resolve();
      else
        reject(
          new LifeboatError(
            'LB_QMP_OVERLAY',
            `qemu-img ${args.join(' ')} failed: ${err.trim()}. Check the overlay directory (space, permissions).`,
          ),
        );
    });
  });
}
