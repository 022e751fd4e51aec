import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { readFile, rm, writeFile } from 'node:fs/promises';
import { connect, createServer } from 'node:net';
import { join } from 'node:path';
import { LifeboatError } from '@lifeboat/protocol';
import type { IsolatedSegment } from './isolated-segment.js';
import { listeningSockets, type ListeningSocket } from './listening-sockets.js';
import { ppmToPng, pngSize, type ImageSize } from './png.js';
import type { QmpSession } from './qmp-session.js';
import { runTool } from './run-tool.js';

/** An NBD export a machine's disk is backed by (a point served by the recovery host). */
export interface DiskExport {
  /** Export name. */
  readonly name: string;
  /** UNIX socket of the NBD server. */
  readonly socketPath: string;
  /** Size of the disk in bytes. */
  readonly size: number;
  /** The point it serves, when it is one. */
  readonly pointId?: string;
  /** Reads asked for and not answered yet (a recovery point's export reports them). */
  readonly pendingRequests?: { count: number; oldestMs: number };
}

/** The NBD URI QEMU opens for an export. */
export function exportUri(e: DiskExport): string {
  return `nbd+unix:///${encodeURIComponent(e.name)}?socket=${e.socketPath}`;
}

/** How a machine boots: a kernel directly, or firmware (SeaBIOS or OVMF) from its disks. */
export type MachineBoot =
  { kernel: string; append?: string; initrd?: string } | { firmware: 'bios' | 'uefi' };

/** One network interface of a recovered machine. */
export type MachineNic =
  /** QEMU user networking with `restrict=on`: the guest reaches nothing; listed guest ports are forwarded from 127.0.0.1 only. */
  | {
      kind: 'isolated-user';
      forwardPorts?: number[];
      mac?: string;
      /**
       * The guest's static address on it (`A.B.C.D/N`, from its cloud-init seed): user
       * networking then serves that subnet and forwards the ports to that address.
       * @default none (the guest takes user networking's DHCP address)
       */
      guestAddress?: string;
    }
  /** The private segment of a test: reaches the other machines on it and nothing else. */
  | { kind: 'segment'; segment: IsolatedSegment; mac?: string }
  /**
   * A Linux bridge of the recovery host (a recovery-site network): the machine gets a tap
   * device `lbt-...` enslaved to it, removed when QEMU stops or dies. Needs root.
   */
  | {
      kind: 'bridge';
      bridge: string;
      mac?: string;
      /**
       * The guest's static address on it (`A.B.C.D/N`, from its cloud-init seed), where
       * waitForPort reaches the guest. @default none (waitForPort cannot reach it)
       */
      guestAddress?: string;
    };

/** Options for {@link RecoveryMachine.start}. */
export interface RecoveryMachineOptions {
  /** Name, unique within the recovery host. */
  name: string;
  /** Directory for the machine's overlays, sockets and console. */
  dir: string;
  /** Disks in boot order; each gets a qcow2 overlay backed by its export. */
  disks: DiskExport[];
  /** @default 1 */
  cpus?: number;
  /** @default 512 */
  memoryMiB?: number;
  boot: MachineBoot;
  /** @default [] */
  nics?: MachineNic[];
  /** Disk controller the guest expects. @default 'nvme' */
  diskBus?: 'nvme' | 'virtio';
  /**
   * A cloud-init NoCloud seed ISO, attached read-only as a virtio disk (cloud-init finds it by
   * its label `cidata` on any block device; a CD-ROM on q35's AHCI controller is invisible to
   * kernels without AHCI, such as Debian's cloud kernel). @default none
   */
  seedDisk?: string;
  /** A virtio-serial port for the QEMU guest agent (socket `<dir>/qga.sock`). @default false */
  guestAgent?: boolean;
  /** Accelerator. */
  accel: 'kvm' | 'tcg';
  /** Connects a QMP session to QEMU's QMP socket. */
  connectQmp: (socketPath: string) => Promise<QmpSession>;
  /** @default 'qemu-system-x86_64' */
  qemuBinary?: string;
  /** @default 'qemu-img' */
  qemuImg?: string;
  /** The `ip` tool (iproute2) that creates and removes bridge NICs' taps. @default 'ip' */
  ipBinary?: string;
  /** How long to wait for QEMU's QMP socket. @default 30000 */
  startTimeoutMs?: number;
}

/** A disk of a running machine. */
export interface MachineDisk {
  /** Block node name (`disk0`, ...), what `query-block`/mirror use. */
  node: string;
  /** The qcow2 overlay taking the guest's writes. */
  overlay: string;
  /** What it is backed by. */
  export: DiskExport;
}

const UEFI_FIRMWARE = '/usr/share/qemu/OVMF.fd';

/** Linux interface names: at most 15 bytes, no slash, colon or white space. */
const IFNAME = /^[A-Za-z0-9_.-]{1,15}$/;

/** True when `name` is a valid Linux network interface name (a bridge's). */
export function validIfName(name: string): boolean {
  return IFNAME.test(name) && name !== '.' && name !== '..';
}

/** The file in a machine's directory listing its taps (for cleanupRunDir after a crash). */
export const TAPS_FILE = 'taps';

/** True when `bridge` is a Linux bridge of this host (its sysfs directory has `bridge/`). */
export function bridgeExists(bridge: string): boolean {
  return validIfName(bridge) && existsSync(`/sys/class/net/${bridge}/bridge`);
}

/** The error for a bridge NIC whose bridge this host does not have. */
export function noBridgeError(bridge: string, machine: string, network?: string): LifeboatError {
  return new LifeboatError(
    'LB_RECOVERY_NO_BRIDGE',
    `Machine ${machine} is to be attached to bridge ${bridge}${network !== undefined ? ` (network ${network})` : ''}, which this recovery host does not have. Create the bridge ("ip link add ${bridge} type bridge && ip link set ${bridge} up"), or fix the network mapping / the recovery host's --network.`,
    { details: { machine, bridge, ...(network !== undefined ? { network } : {}) } },
  );
}

/** A locally administered MAC derived from the machine and interface, stable across boots. */
export function machineMac(name: string, index: number): string {
  const h = createHash('sha256').update(`${name}/${index}`).digest();
  return `52:54:00:${[h[0], h[1], h[2]].map((b) => b!.toString(16).padStart(2, '0')).join(':')}`;
}

/**
 * User networking's subnet for a guest with a static address: the guest's network, with QEMU's
 * own (host) address the first one of it that is not the guest's. Undefined for a network too
 * small to hold both (the guest then keeps the address and the ports are forwarded to it).
 */
export function userSubnet(cidr: string): { net: string; host: string; guest: string } | undefined {
  const [ip, bits] = cidr.split('/');
  const octets = (ip ?? '').split('.').map(Number);
  const prefix = Number(bits);
  if (octets.length !== 4 || octets.some((o) => !(o >= 0 && o <= 255)) || !(prefix >= 0)) {
    return undefined;
  }
  const guest = octets.reduce((a, o) => a * 256 + o, 0);
  const toIp = (n: number): string =>
    [24, 16, 8, 0].map((s) => Math.floor(n / 2 ** s) % 256).join('.');
  if (prefix > 28) return { net: '', host: '', guest: toIp(guest) };
  const size = 2 ** (32 - prefix);
  const base = guest - (guest % size);
  const host = base + 1 === guest ? base + 2 : base + 1;
  return { net: `${toIp(base)}/${prefix}`, host: toIp(host), guest: toIp(guest) };
}

async function freeLoopbackPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const a = srv.address();
      srv.close(() =>
        typeof a === 'object' && a ? resolve(a.port) : reject(new Error('no port')),
      );
    });
  });
}

/**
 * A recovered machine: QEMU booting qcow2 overlays over NBD exports of recovery points (all
 * writes land in the overlays, nothing is copied before boot, so boot time does not depend
 * on the disk's size), with its console in a file and QMP for control.
 */
export class RecoveryMachine {
  /** Guest port -> 127.0.0.1 host port, for isolated user networking. */
  readonly ports = new Map<number, number>();
  /** MAC address of each NIC, in order. */
  readonly macs: string[] = [];
  /** The guest's static addresses on bridge NICs (no prefix), where its ports are reached. */
  readonly bridgeAddresses: string[] = [];
  /** Exit status once QEMU has exited. */
  exit: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  private output = '';
  private qmpSession: QmpSession | undefined;
  private process: ChildProcess | undefined;
  private exited: Promise<void> = Promise.resolve();
  /** Tap devices created for bridge NICs (removed when QEMU stops or dies). */
  private readonly taps: string[] = [];
  private tapsRemoved: Promise<void> = Promise.resolve();
  private ipBinary = 'ip';

  private constructor(
    readonly name: string,
    readonly dir: string,
    readonly disks: MachineDisk[],
    readonly accel: 'kvm' | 'tcg',
    /** Serial console log. */
    readonly consolePath: string,
    readonly qmpSocket: string,
    /** QEMU guest agent socket, when enabled. */
    readonly qgaSocket: string | undefined,
  ) {}

  /** Creates the overlays and starts QEMU; resolves once QMP answers. */
  static async start(o: RecoveryMachineOptions): Promise<RecoveryMachine> {
    if (o.disks.length === 0) {
      throw new LifeboatError('LB_RECOVERY_BAD_MACHINE', `Machine ${o.name} has no disk.`);
    }
    const qemuImg = o.qemuImg ?? 'qemu-img';
    const disks: MachineDisk[] = [];
    for (const [i, e] of o.disks.entries()) {
      const overlay = join(o.dir, `disk${i}.overlay.qcow2`);
      // -u: the size is known, so qemu-img need not open the backing export to learn it.
      await runTool(
        'LB_RECOVERY_OVERLAY',
        qemuImg,
        [
          'create',
          '-q',
          '-f',
          'qcow2',
          '-F',
          'raw',
          '-b',
          exportUri(e),
          '-u',
          overlay,
          String(e.size),
        ],
        `Creating the overlay of disk ${i} of ${o.name}`,
      );
      disks.push({ node: `disk${i}`, overlay, export: e });
    }
    const qgaSocket = o.guestAgent ? join(o.dir, 'qga.sock') : undefined;
    const m = new RecoveryMachine(
      o.name,
      o.dir,
      disks,
      o.accel,
      join(o.dir, 'console.log'),
      join(o.dir, 'qmp.sock'),
      qgaSocket,
    );
    m.ipBinary = o.ipBinary ?? 'ip';
    let args: string[];
    try {
      args = await m.buildArgs(o);
    } catch (err) {
      await m.removeTaps();
      throw err;
    }
    await m.spawn(o.qemuBinary ?? 'qemu-system-x86_64', args, o.startTimeoutMs ?? 30_000);
    // The socket file appears at bind(), a moment before QEMU listens: retry briefly.
    const deadline = Date.now() + (o.startTimeoutMs ?? 30_000);
    for (;;) {
      try {
        m.qmpSession = await o.connectQmp(m.qmpSocket);
        break;
      } catch (err) {
        if (m.exit || Date.now() > deadline) {
          await m.stop({ kill: true });
          throw new LifeboatError(
            'LB_RECOVERY_QEMU',
            `Cannot talk to QEMU of machine ${o.name} over QMP: ${err instanceof Error ? err.message : String(err)}. ${m.output.trim().slice(-1000)}`,
            { cause: err, details: { machine: o.name } },
          );
        }
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    return m;
  }

  private async buildArgs(o: RecoveryMachineOptions): Promise<string[]> {
    const args = [
      '-name',
      `${o.name},process=lifeboat-${o.name}`,
      '-nodefaults',
      '-no-user-config',
      '-display',
      'none',
      '-machine',
      `q35,accel=${o.accel}`,
      '-cpu',
      o.accel === 'kvm' ? 'host' : 'max',
      '-smp',
      String(o.cpus ?? 1),
      '-m',
      String(o.memoryMiB ?? 512),
      // A display adapter, so QMP screendump shows what an operator would see.
      '-vga',
      'std',
      '-serial',
      `file:${this.consolePath}`,
      '-qmp',
      `unix:${this.qmpSocket},server=on,wait=off`,
      // Lets `lifeboat failover cleanup` find machines a crashed process left behind.
      '-pidfile',
      join(this.dir, 'qemu.pid'),
    ];
    if ('kernel' in o.boot) {
      args.push('-kernel', o.boot.kernel, '-append', o.boot.append ?? '');
      if (o.boot.initrd !== undefined) args.push('-initrd', o.boot.initrd);
    } else if (o.boot.firmware === 'uefi') {
      args.push('-bios', UEFI_FIRMWARE);
    }
    // A directly booted kernel takes boot index 0 (QEMU's linuxboot ROM); disks follow.
    const firstIndex = 'kernel' in o.boot ? 1 : 0;
    for (const [i, d] of this.disks.entries()) {
      const bootindex = firstIndex + i;
      args.push(
        '-blockdev',
        `driver=file,filename=${d.overlay},node-name=${d.node}-file`,
        // The overlay's header names its backing: the NBD export, opened read-only.
        '-blockdev',
        `driver=qcow2,file=${d.node}-file,node-name=${d.node}`,
        '-device',
        o.diskBus === 'virtio'
          ? `virtio-blk-pci,drive=${d.node},id=${d.node}-dev,bootindex=${bootindex}`
          : `nvme,drive=${d.node},serial=lifeboat-${i},id=${d.node}-dev,bootindex=${bootindex}`,
      );
    }
    if (o.seedDisk !== undefined) {
      args.push(
        '-blockdev',
        `driver=file,filename=${o.seedDisk},node-name=seed-file,read-only=on`,
        '-blockdev',
        'driver=raw,file=seed-file,node-name=seed,read-only=on',
        '-device',
        'virtio-blk-pci,drive=seed,id=seed-dev,serial=cidata',
      );
    }
    for (const [i, nic] of (o.nics ?? []).entries()) {
      const mac = nic.mac ?? machineMac(o.name, i);
      this.macs.push(mac);
      if (nic.kind === 'isolated-user') {
        let netdev = `user,id=net${i},restrict=on`;
        const subnet = nic.guestAddress !== undefined ? userSubnet(nic.guestAddress) : undefined;
        if (subnet !== undefined && subnet.net !== '') {
          netdev += `,net=${subnet.net},host=${subnet.host}`;
        }
        for (const guestPort of nic.forwardPorts ?? []) {
          const hostPort = await freeLoopbackPort();
          this.ports.set(guestPort, hostPort);
          netdev += `,hostfwd=tcp:127.0.0.1:${hostPort}-${subnet?.guest ?? ''}:${guestPort}`;
        }
        args.push('-netdev', netdev);
      } else if (nic.kind === 'bridge') {
        const tap = await this.createTap(nic.bridge, i);
        const guest = nic.guestAddress?.split('/')[0];
        if (guest !== undefined && guest !== '') this.bridgeAddresses.push(guest);
        args.push('-netdev', `tap,id=net${i},ifname=${tap},script=no,downscript=no`);
      } else {
        args.push(
          '-netdev',
          `stream,id=net${i},server=off,addr.type=unix,addr.path=${nic.segment.socketPath}`,
        );
      }
      args.push('-device', `virtio-net-pci,netdev=net${i},mac=${mac},id=net${i}-dev`);
    }
    if (this.qgaSocket !== undefined) {
      args.push(
        '-chardev',
        `socket,path=${this.qgaSocket},server=on,wait=off,id=qga0`,
        '-device',
        'virtio-serial-pci,id=vser0',
        '-device',
        'virtserialport,chardev=qga0,name=org.qemu.guest_agent.0',
      );
    }
    return args;
  }

  /**
   * Creates a tap `lbt-<10 hex>` enslaved to `bridge` and up, listed in the machine's taps
   * file first so that a crashed recovery host's leftovers can be removed.
   */
  private async createTap(bridge: string, index: number): Promise<string> {
    if (!bridgeExists(bridge)) throw noBridgeError(bridge, this.name);
    const tap = `lbt-${createHash('sha256')
      .update(`${this.dir}/${index}/${process.pid}/${Date.now()}/${Math.random()}`)
      .digest('hex')
      .slice(0, 10)}`;
    this.taps.push(tap);
    await writeFile(join(this.dir, TAPS_FILE), `${this.taps.join('\n')}\n`);
    const ip = this.ipBinary;
    const what = `Creating tap ${tap} on bridge ${bridge} for ${this.name} (needs root)`;
    await runTool('LB_RECOVERY_TAP', ip, ['tuntap', 'add', 'dev', tap, 'mode', 'tap'], what);
    await runTool('LB_RECOVERY_TAP', ip, ['link', 'set', tap, 'master', bridge, 'up'], what);
    return tap;
  }

  /** Removes the taps of bridge NICs (once; a tap that is already gone is fine). */
  private removeTaps(): Promise<void> {
    const taps = this.taps.splice(0);
    if (taps.length === 0) return this.tapsRemoved;
    const ip = this.ipBinary;
    this.tapsRemoved = this.tapsRemoved.then(async () => {
      for (const tap of taps) {
        if (!existsSync(`/sys/class/net/${tap}`)) continue;
        await runTool('LB_RECOVERY_TAP', ip, ['link', 'del', tap], `Removing tap ${tap}`).catch(
          (err: unknown) => {
            this.output += `\n${err instanceof Error ? err.message : String(err)}`;
          },
        );
      }
    });
    return this.tapsRemoved;
  }

  /** The tap devices of this machine's bridge NICs (none once QEMU has stopped). */
  get tapDevices(): readonly string[] {
    return [...this.taps];
  }

  private async spawn(binary: string, args: string[], timeoutMs: number): Promise<void> {
    const child = spawn(binary, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    this.process = child;
    const keep = (d: Buffer): void => {
      this.output = (this.output + d.toString('utf8')).slice(-8000);
    };
    child.stdout?.on('data', keep);
    child.stderr?.on('data', keep);
    this.exited = new Promise((resolve) => {
      // QEMU gone (stopped or died): its taps go too, before `exited` resolves.
      child.on('exit', (code, signal) => {
        this.exit = { code, signal };
        void this.removeTaps().then(resolve);
      });
      child.on('error', (err) => {
        this.output += `\n${err.message}`;
        this.exit = { code: null, signal: null };
        void this.removeTaps().then(resolve);
      });
    });
    const deadline = Date.now() + timeoutMs;
    while (!existsSync(this.qmpSocket)) {
      if (this.exit || Date.now() > deadline) {
        const exit = this.exit;
        await this.stop({ kill: true });
        throw new LifeboatError(
          'LB_RECOVERY_QEMU',
          `QEMU did not start machine ${this.name}${exit ? ` (it exited with ${exit.code ?? exit.signal})` : ` within ${timeoutMs} ms`}: ${this.output.trim().slice(-1500)}`,
          { details: { machine: this.name, args } },
        );
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  /** QEMU's process id. */
  get pid(): number | undefined {
    return this.process?.pid;
  }

  /** The QMP session (for commands this class has no method for). */
  get qmp(): QmpSession {
    if (!this.qmpSession) {
      throw new LifeboatError('LB_RECOVERY_QEMU', `Machine ${this.name} is not running.`);
    }
    return this.qmpSession;
  }

  /** QEMU's own output (stderr), for messages. */
  get qemuOutput(): string {
    return this.output;
  }

  /** The console output so far. */
  async consoleText(): Promise<string> {
    return existsSync(this.consolePath) ? readFile(this.consolePath, 'latin1') : '';
  }

  /**
   * Waits until the console matches `pattern` (looking only after character `from`); rejects
   * on timeout or when QEMU exits.
   */
  async waitForConsole(pattern: RegExp, timeoutMs: number, from = 0): Promise<RegExpMatchArray> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const text = await this.consoleText();
      const m = text.slice(from).match(pattern);
      if (m) return m;
      if (this.exit || Date.now() > deadline) {
        // Whether the guest's disk waits for its export: guest I/O timeouts while no read is
        // outstanding point at the emulated device or QEMU, not at the store.
        const unanswered = this.disks.map((d) => ({
          disk: d.node,
          ...(d.export.pendingRequests ?? { count: 0, oldestMs: 0 }),
        }));
        const reads = unanswered
          .map((u) => `${u.disk} ${u.count}${u.count > 0 ? ` (oldest ${u.oldestMs} ms)` : ''}`)
          .join(', ');
        throw new LifeboatError(
          'LB_RECOVERY_BOOT_TIMEOUT',
          `Machine ${this.name} did not show ${String(pattern)} on its console ${this.exit ? 'before QEMU exited' : `within ${timeoutMs} ms`} (accelerator ${this.accel}; disk reads not answered yet: ${reads}). Look at the console log ${this.consolePath}; its tail: ${text.slice(-1500)}`,
          {
            details: {
              machine: this.name,
              pattern: String(pattern),
              console: this.consolePath,
              unansweredReads: unanswered,
            },
          },
        );
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  /**
   * Waits until guest port `guestPort` (forwarded from 127.0.0.1, else at the guest's static
   * address on its bridge) answers with data matching `expect` (any data when absent) after
   * sending `send`. User networking accepts every host connection itself, so only data from
   * the guest proves the guest's port answers.
   */
  async waitForPort(
    guestPort: number,
    timeoutMs: number,
    probe: { send?: string; expect?: RegExp } = {},
  ): Promise<string> {
    const forwarded = this.ports.get(guestPort);
    const [host, hostPort] =
      forwarded !== undefined
        ? ['127.0.0.1', forwarded]
        : this.bridgeAddresses[0] !== undefined
          ? [this.bridgeAddresses[0], guestPort]
          : [undefined, undefined];
    if (host === undefined || hostPort === undefined) {
      throw new LifeboatError(
        'LB_RECOVERY_BAD_MACHINE',
        `Port ${guestPort} of machine ${this.name} is not forwarded and the machine has no static address on a bridge. Add it to the NIC's forwardPorts, or give the machine a static address.`,
      );
    }
    const deadline = Date.now() + timeoutMs;
    let last = '';
    while (Date.now() < deadline && !this.exit) {
      last = await new Promise<string>((resolve) => {
        const s = connect(hostPort, host);
        let got = '';
        const done = (): void => {
          clearTimeout(timer);
          s.destroy();
          resolve(got);
        };
        const timer = setTimeout(done, 3000);
        s.on('connect', () => {
          if (probe.send !== undefined) s.write(probe.send);
        });
        s.on('data', (d: Buffer) => {
          got += d.toString('latin1');
          if (!probe.expect || probe.expect.test(got)) done();
        });
        s.on('error', done);
        s.on('close', done);
      });
      if (last.length > 0 && (!probe.expect || probe.expect.test(last))) return last;
      await new Promise((r) => setTimeout(r, 500));
    }
    throw new LifeboatError(
      'LB_RECOVERY_PORT_TIMEOUT',
      `Port ${guestPort} of machine ${this.name} did not answer${probe.expect ? ` with ${String(probe.expect)}` : ''} within ${timeoutMs} ms. Check that the service starts in the guest (console: ${this.consolePath}).`,
      {
        details: { machine: this.name, guestPort, host, hostPort, received: last.slice(0, 200) },
      },
    );
  }

  /** Saves a PNG screenshot of the display (QMP screendump) at `path`; returns its size. */
  async screenshot(path: string): Promise<ImageSize> {
    try {
      await this.qmp.execute('screendump', { filename: path, format: 'png' });
    } catch {
      // QEMU built without PNG support: take a PPM and convert it here.
      const ppm = `${path}.ppm`;
      await this.qmp.execute('screendump', { filename: ppm });
      await writeFile(path, ppmToPng(await readFile(ppm)));
      await rm(ppm, { force: true });
    }
    const size = pngSize(await readFile(path));
    if (!size) {
      throw new LifeboatError(
        'LB_RECOVERY_SCREENSHOT',
        `The screenshot of machine ${this.name} at ${path} is not a PNG. Retry the verification.`,
      );
    }
    return size;
  }

  /** The TCP sockets QEMU listens on (should be only 127.0.0.1 port forwards). */
  async listening(): Promise<ListeningSocket[]> {
    return this.pid === undefined ? [] : listeningSockets(this.pid);
  }

  /** Stops QEMU: QMP `quit` (or SIGKILL with `kill`), then SIGKILL after a grace period. */
  async stop(options: { kill?: boolean; graceMs?: number } = {}): Promise<void> {
    const child = this.process;
    if (child && !this.exit) {
      if (!options.kill && this.qmpSession) {
        await this.qmpSession.execute('quit').catch(() => undefined);
      } else {
        child.kill('SIGKILL');
      }
      const timer = setTimeout(() => child.kill('SIGKILL'), options.graceMs ?? 10_000);
      await this.exited;
      clearTimeout(timer);
    }
    await this.removeTaps();
    await this.qmpSession?.close().catch(() => undefined);
    this.qmpSession = undefined;
  }
}
