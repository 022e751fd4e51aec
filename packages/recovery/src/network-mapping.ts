import { LifeboatError } from '@lifeboat/protocol';
import type { MachineNic } from './recovery-machine.js';
import { machineMac } from './recovery-machine.js';
import type { StaticAddress } from './seed-disk.js';

/** A network interface of the protected machine, as recorded at the source. */
export interface SourceNic {
  /** The source network it is attached to (a bridge, port group or VLAN name). */
  network: string;
  /** Its MAC address at the source; kept on the recovered machine when given. */
  mac?: string;
}

/** Where machines of a source network land on the recovery site, with an optional fixed address. */
export interface NetworkMapping {
  /** Source network name. */
  source: string;
  /** Target network: one of the recovery host's networks. */
  target: MachineNic;
  /** Static target addresses by source MAC (or `*` for any NIC of this network). @default DHCP */
  addresses?: Record<string, Omit<StaticAddress, 'mac'>>;
}

/** The NICs of the recovered machine and the static addresses to hand it through cloud-init. */
export interface MappedNetworks {
  nics: MachineNic[];
  addresses: StaticAddress[];
}

/**
 * Applies the network mappings to a machine's source NICs: each NIC is attached to its source
 * network's target network (keeping its MAC, or getting a stable one from the machine's name),
 * and gets the mapping's static address, which reaches the guest through the cloud-init seed
 * disk. A NIC on an unmapped network is an error: booting it on the wrong network is worse.
 */
export function mapNetworks(
  machine: string,
  sourceNics: readonly SourceNic[],
  mappings: readonly NetworkMapping[],
): MappedNetworks {
  const nics: MachineNic[] = [];
  const addresses: StaticAddress[] = [];
  sourceNics.forEach((n, i) => {
    const m = mappings.find((x) => x.source === n.network);
    if (!m) {
      throw new LifeboatError(
        'LB_RECOVERY_BAD_NETWORK',
        `Network ${n.network} of machine ${machine} has no mapping to a recovery network. Add one (source ${n.network}).`,
        { details: { machine, network: n.network } },
      );
    }
    const mac = (n.mac ?? m.target.mac ?? machineMac(machine, i)).toLowerCase();
    nics.push({ ...m.target, mac });
    const address = m.addresses?.[n.mac?.toLowerCase() ?? ''] ?? m.addresses?.['*'];
    if (address) addresses.push({ ...address, mac });
  });
  return { nics, addresses };
}
