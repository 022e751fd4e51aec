import type { QmpClient } from '@lifeboat/qmp';
import { isFirmwareFlash } from './machine-hardware.js';

/** A dirty bitmap as QEMU reports it on a node. */
export interface BitmapInfo {
  name: string;
  recording: boolean;
  persistent: boolean;
  busy: boolean;
  /** Set when QEMU stopped uncleanly while the (persistent) bitmap was in use: unusable. */
  inconsistent: boolean;
}

/** A disk of the protected machine as found in QEMU. */
export interface DiscoveredDisk {
  /** Name of the disk within the machine: the block node name. */
  name: string;
  /** The format node the guest writes through. */
  node: string;
  /** Format driver (`qcow2`, `raw`, ...). */
  format: string;
  /** Virtual size in bytes. */
  size: number;
  /** Persistent bitmaps are possible (qcow2); otherwise they die with QEMU and a restart resyncs. */
  persistentBitmaps: boolean;
  bitmaps: BitmapInfo[];
}

interface NamedNode {
  'node-name': string;
  drv: string;
  image: { 'virtual-size': number };
  'dirty-bitmaps'?: Array<{
    name?: string;
    recording?: boolean;
    persistent?: boolean;
    busy?: boolean;
    inconsistent?: boolean;
  }>;
}

interface BlockInfo {
  device: string;
  qdev?: string;
  inserted?: { 'node-name': string };
}

/** Protocol and filter drivers: never a disk the guest sees directly. */
const NOT_A_DISK = new Set([
  'file',
  'host_device',
  'host_cdrom',
  'nbd',
  'null-co',
  'null-aio',
  'throttle',
  'copy-before-write',
  'snapshot-access',
  'blkdebug',
  'blkverify',
  'iscsi',
  'ssh',
  'http',
  'https',
]);

/** Node name prefix of everything the agent creates (fleecing overlays, live exports). */
export const AGENT_NODE_PREFIX = 'lb-';

/**
 * Finds the machine's disks. In a VM, `query-block` lists the devices and their root nodes.
 * In qemu-storage-daemon there are no devices: every format node that is not the agent's own
 * and not a protocol node is a disk. `only` restricts the result to the named nodes.
 */
export async function discoverDisks(
  qmp: QmpClient,
  only?: readonly string[],
): Promise<DiscoveredDisk[]> {
  const nodes = await qmp.execute<NamedNode[]>('query-named-block-nodes', { flat: true });
  const blocks = await qmp.execute<BlockInfo[]>('query-block');
  let roots = blocks
    // UEFI's flash (code and variables) is firmware, which the recovery host provides itself.
    .filter((b) => !isFirmwareFlash(b))
    .map((b) => b.inserted?.['node-name'])
    .filter((n): n is string => n !== undefined && !n.startsWith(AGENT_NODE_PREFIX));
  if (roots.length === 0) {
    // Nodes used as another node's backing (our fleecing overlays use the live disk as
    // backing) are still disks; protocol children are excluded by driver.
    roots = nodes
      .filter((n) => !NOT_A_DISK.has(n.drv) && !n['node-name'].startsWith(AGENT_NODE_PREFIX))
      .filter((n) => !n['node-name'].startsWith('#'))
      .map((n) => n['node-name'])
      .sort();
  }
  if (only) roots = roots.filter((r) => only.includes(r));
  const out: DiscoveredDisk[] = [];
  for (const root of roots) {
    const n = nodes.find((x) => x['node-name'] === root);
    if (!n) continue;
    out.push({
      name: root,
      node: root,
      format: n.drv,
      size: n.image['virtual-size'],
      persistentBitmaps: n.drv === 'qcow2',
      bitmaps: (n['dirty-bitmaps'] ?? [])
        .filter((b) => typeof b.name === 'string')
        .map((b) => ({
          name: b.name as string,
          recording: b.recording ?? false,
          persistent: b.persistent ?? false,
          busy: b.busy ?? false,
          inconsistent: b.inconsistent ?? false,
        })),
    });
  }
  return out;
}
