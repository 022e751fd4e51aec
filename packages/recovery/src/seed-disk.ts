import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { LifeboatError } from '@lifeboat/protocol';
import { runTool } from './run-tool.js';

/** A static address for one interface of a recovered machine (network mapping target). */
export interface StaticAddress {
  /**
   * MAC address of the interface the address belongs to (how cloud-init matches it).
   * @default the MAC the recovery host gives the machine's NIC of the same index
   */
  mac?: string;
  /** Address with prefix length, `A.B.C.D/N`. */
  address: string;
  /** Default gateway. @default none */
  gateway?: string;
  /** DNS servers. @default none */
  nameservers?: string[];
}

/** What a cloud-init NoCloud seed disk tells the guest. */
export interface SeedDiskOptions {
  /** Directory the ISO is written into. */
  dir: string;
  /** cloud-init instance id; a new id makes cloud-init apply the network again. */
  instanceId: string;
  /** Host name. @default none */
  hostname?: string;
  /** Static addresses by interface. @default [] (cloud-init falls back to DHCP) */
  addresses?: StaticAddress[];
  /** `user-data` content. @default "#cloud-config\n{}" */
  userData?: string;
  /** The ISO-building tool. @default 'genisoimage' */
  genisoimage?: string;
}

const MAC = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/;
const CIDR = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})\/(\d{1,2})$/;
const IPV4 = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/;

function checkIpv4(value: string, cidr: boolean, field: string): void {
  const m = (cidr ? CIDR : IPV4).exec(value);
  const ok =
    m !== null && m.slice(1, 5).every((o) => Number(o) <= 255) && (!cidr || Number(m[5]) <= 32);
  if (!ok) {
    throw new LifeboatError(
      'LB_RECOVERY_BAD_NETWORK',
      `${field} "${value}" is not an IPv4 address${cidr ? ' with a prefix length (A.B.C.D/N)' : ' (A.B.C.D)'}. Correct the network mapping.`,
      { details: { field, value } },
    );
  }
}

/** The `network-config` (version 2) document for the given static addresses. */
export function networkConfig(addresses: readonly StaticAddress[]): string {
  const lines = ['version: 2', 'ethernets:'];
  addresses.forEach((a, i) => {
    const mac = (a.mac ?? '').toLowerCase();
    if (!MAC.test(mac)) {
      throw new LifeboatError(
        'LB_RECOVERY_BAD_NETWORK',
        `MAC address "${a.mac ?? ''}" is not six colon-separated hex bytes. Correct the network mapping.`,
        { details: { field: 'mac', value: a.mac } },
      );
    }
    checkIpv4(a.address, true, 'address');
    if (a.gateway !== undefined) checkIpv4(a.gateway, false, 'gateway');
    for (const ns of a.nameservers ?? []) checkIpv4(ns, false, 'nameserver');
    lines.push(
      `  nic${i}:`,
      '    match:',
      `      macaddress: "${mac}"`,
      `    set-name: eth${i}`,
      '    dhcp4: false',
      `    addresses: ["${a.address}"]`,
    );
    if (a.gateway !== undefined) {
      lines.push('    routes:', `      - to: 0.0.0.0/0`, `        via: ${a.gateway}`);
    }
    if (a.nameservers?.length) {
      lines.push('    nameservers:', `      addresses: [${a.nameservers.join(', ')}]`);
    }
  });
  return `${lines.join('\n')}\n`;
}

/**
 * Builds a cloud-init NoCloud seed disk: an ISO 9660 image labelled `cidata` holding
 * `meta-data`, `user-data` and `network-config`, which cloud-init reads at first boot to set
 * the host name and the static addresses of the network mapping. Returns the ISO's path.
 */
export async function buildSeedDisk(options: SeedDiskOptions): Promise<string> {
  if (!/^[A-Za-z0-9._-]+$/.test(options.instanceId)) {
    throw new LifeboatError(
      'LB_RECOVERY_BAD_NETWORK',
      `Instance id "${options.instanceId}" may hold only letters, digits, dot, dash and underscore.`,
      { details: { field: 'instanceId', value: options.instanceId } },
    );
  }
  if (options.hostname !== undefined && !/^[A-Za-z0-9-]{1,63}$/.test(options.hostname)) {
    throw new LifeboatError(
      'LB_RECOVERY_BAD_NETWORK',
      `Host name "${options.hostname}" is not a valid host name (letters, digits, dash; at most 63).`,
      { details: { field: 'hostname', value: options.hostname } },
    );
  }
  const files: Record<string, string> = {
    'meta-data':
      `instance-id: ${options.instanceId}\n` +
      (options.hostname !== undefined ? `local-hostname: ${options.hostname}\n` : ''),
    'user-data': options.userData ?? '#cloud-config\n{}\n',
    'network-config': networkConfig(options.addresses ?? []),
  };
  await mkdir(options.dir, { recursive: true });
  const staging = await mkdtemp(join(options.dir, 'seed-'));
  const iso = join(options.dir, `seed-${options.instanceId}.iso`);
  try {
    for (const [name, content] of Object.entries(files)) {
      await writeFile(join(staging, name), content);
    }
    await runTool(
      'LB_RECOVERY_SEED_DISK',
      options.genisoimage ?? 'genisoimage',
      ['-quiet', '-output', iso, '-volid', 'cidata', '-joliet', '-rock', staging],
      'Building the cloud-init seed disk',
    );
  } finally {
    await rm(staging, { recursive: true, force: true });
  }
  return iso;
}
