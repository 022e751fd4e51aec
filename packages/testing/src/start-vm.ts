import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { LifeboatError } from '@lifeboat/protocol';
import { QmpClient, kvmBootsKernel } from '@lifeboat/qmp';
import { ManagedProcess } from './managed-process.js';
import type { StopOptions } from './managed-process.js';

/** One disk of a test VM, attached as an NVMe controller in the order given. */
export interface VmDisk {
  /** Image file. */
  path: string;
  /** Image format. @default 'qcow2' */
  format?: 'qcow2' | 'raw';
  /** Block node name (what `query-block` reports). @default `disk<N>` */
  nodeName?: string;
  /** NVMe serial number. @default the node name */
  serial?: string;
}

/**
 * The VM's network: `none`, QEMU user networking (`user`), or user networking that cannot
 * reach anything outside the guest (`user-restrict`, `restrict=on`; port forwards still work).
 */
export type VmNet = 'none' | 'user' | 'user-restrict';

/** Options for {@link startVm}. */
export interface StartVmOptions {
  /** Kernel to boot directly (`-kernel`). */
  kernel: string;
  /** Disks, the first is the root disk. */
  disks: VmDisk[];
  /** Kernel command line. @default '' */
  append?: string;
  /** Guest memory. @default 256 */
  memoryMiB?: number;
  /** Virtual CPUs. @default 1 */
  cpus?: number;
  /** Directory for sockets and the console log (created if missing); removed by stop() only when it is the default. @default a new temporary directory */
  dir?: string;
  /** QMP socket path. @default <dir>/qmp.sock */
  qmpSocket?: string;
  /** Serial console log. @default <dir>/console.log */
  console?: string;
  /** Network. @default 'none' */
  net?: VmNet;
  /** Guest TCP ports reachable from 127.0.0.1 on ephemeral host ports (user networking only). @default [] */
  forwardPorts?: number[];
  /** Adds a virtio-serial port for the QEMU guest agent with its socket at `<dir>/qga.sock`. @default false */
  guestAgent?: boolean;
  /** `kvm`, `tcg`, or `auto` (KVM when it really works, else TCG). @default 'auto' */
  accel?: 'auto' | 'kvm' | 'tcg';
  /** More QEMU arguments, appended as they are. @default [] */
  extraArgs?: string[];
}

/** A running test VM. */
export interface TestVm {
  /** The QEMU process. */
  readonly process: ManagedProcess;
  readonly qmpSocket: string;
  readonly console: string;
  /** Guest agent socket when `guestAgent` was set. */
  readonly qgaSocket: string | undefined;
  /** The accelerator in use. */
  readonly accel: 'kvm' | 'tcg';
  /** Guest port -> 127.0.0.1 host port, for `forwardPorts`. */
  readonly ports: ReadonlyMap<number, number>;
  /** Block node names of the disks, in order. */
  readonly nodeNames: readonly string[];
  /** The console output so far. */
  consoleText(): Promise<string>;
  /**
   * Waits until the console matches `pattern` and returns the match; rejects with
   * `LB_TESTING_TIMEOUT` (with the console's tail) or when QEMU exits.
   * @param from only look at console text after this character offset
   */
  waitForConsole(
    pattern: RegExp | string,
    timeoutMs?: number,
    from?: number,
  ): Promise<RegExpMatchArray>;
  /** Stops QEMU (cleanly unless `kill`) and removes the directory it created. */
  stop(options?: StopOptions): Promise<void>;
}

/** Finds a free TCP port on 127.0.0.1 (QEMU's hostfwd cannot report one it chose itself). */
async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      srv.close(() =>
        typeof addr === 'object' && addr ? resolve(addr.port) : reject(new Error('no port')),
      );
    });
  });
}

/**
 * Boots `qemu-system-x86_64` with the disks on NVMe, the serial console in a file and a QMP
 * socket; KVM when it really works, else TCG. The caller must `stop()` it (in `afterAll`).
 */
export async function startVm(options: StartVmOptions): Promise<TestVm> {
  if (options.disks.length === 0) {
    throw new LifeboatError('LB_TESTING_BAD_OPTION', 'startVm needs at least one disk.');
  }
  for (const d of options.disks) {
    if (!existsSync(d.path)) {
      throw new LifeboatError('LB_TESTING_BAD_OPTION', `Disk image ${d.path} does not exist.`);
    }
  }
  const ownDir = options.dir === undefined;
  const dir = options.dir ?? (await mkdtemp(join(tmpdir(), 'lifeboat-vm-')));
  // A given directory may not exist yet: QEMU cannot bind its QMP socket in a missing one.
  if (!ownDir) await mkdir(dir, { recursive: true });
  const qmpSocket = options.qmpSocket ?? join(dir, 'qmp.sock');
  const consolePath = options.console ?? join(dir, 'console.log');
  // A second monitor, never used by the test or an agent (a monitor serves one client): what
  // the guest was doing when a wait for its console fails is read through it.
  // (Left out where its path would pass the 107 bytes a UNIX socket path may have.)
  const diag = join(dir, 'diag-qmp.sock');
  const diagSocket = Buffer.byteLength(diag) < 100 ? diag : undefined;
  const wanted = options.accel ?? 'auto';
  const accel: 'kvm' | 'tcg' =
    wanted === 'auto' ? ((await kvmBootsKernel(options.kernel)) ? 'kvm' : 'tcg') : wanted;

  const args = [
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-no-reboot',
    '-machine',
    `q35,accel=${accel}`,
    '-cpu',
    accel === 'kvm' ? 'host' : 'max',
    '-m',
    String(options.memoryMiB ?? 256),
    '-smp',
    String(options.cpus ?? 1),
    '-kernel',
    options.kernel,
    '-append',
    options.append ?? '',
    '-serial',
    `file:${consolePath}`,
    '-qmp',
    `unix:${qmpSocket},server=on,wait=off`,
    ...(diagSocket === undefined
      ? []
      : [
          '-chardev',
          `socket,id=lbdiag,path=${diagSocket},server=on,wait=off`,
          '-mon',
          'chardev=lbdiag,mode=control',
        ]),
  ];
  const nodeNames: string[] = [];
  options.disks.forEach((d, i) => {
    const node = d.nodeName ?? `disk${i}`;
    nodeNames.push(node);
    args.push(
      '-blockdev',
      `driver=file,filename=${d.path},node-name=${node}-file,cache.direct=off`,
      '-blockdev',
      `driver=${d.format ?? 'qcow2'},file=${node}-file,node-name=${node}`,
      '-device',
      `nvme,drive=${node},serial=${d.serial ?? node},id=${node}-dev`,
    );
  });
  const ports = new Map<number, number>();
  const net = options.net ?? 'none';
  if (net === 'none') {
    if (options.forwardPorts?.length) {
      throw new LifeboatError(
        'LB_TESTING_BAD_OPTION',
        'forwardPorts needs net "user" or "user-restrict".',
      );
    }
  } else {
    let nic = `user,model=virtio-net-pci${net === 'user-restrict' ? ',restrict=on' : ''}`;
    for (const guestPort of options.forwardPorts ?? []) {
      const hostPort = await freePort();
      ports.set(guestPort, hostPort);
      nic += `,hostfwd=tcp:127.0.0.1:${hostPort}-:${guestPort}`;
    }
    args.push('-nic', nic);
  }
  let qgaSocket: string | undefined;
  if (options.guestAgent) {
    qgaSocket = join(dir, 'qga.sock');
    args.push(
      '-chardev',
      `socket,path=${qgaSocket},server=on,wait=off,id=qga0`,
      '-device',
      'virtio-serial-pci',
      '-device',
      'virtserialport,chardev=qga0,name=org.qemu.guest_agent.0',
    );
  }
  args.push(...(options.extraArgs ?? []));

  const proc = new ManagedProcess('qemu-system-x86_64', 'qemu-system-x86_64', args);
  const stop = async (stopOptions?: StopOptions): Promise<void> => {
    await proc.stop(stopOptions);
    if (ownDir) await rm(dir, { recursive: true, force: true });
  };
  try {
    await proc.waitForPath(qmpSocket);
  } catch (err) {
    await stop({ kill: true });
    throw err;
  }

  const consoleText = async (): Promise<string> =>
    existsSync(consolePath) ? readFile(consolePath, 'latin1') : '';
  return {
    process: proc,
    qmpSocket,
    console: consolePath,
    qgaSocket,
    accel,
    ports,
    nodeNames,
    consoleText,
    async waitForConsole(pattern, timeoutMs = 120_000, from = 0) {
      const re = typeof pattern === 'string' ? new RegExp(escapeRegExp(pattern)) : pattern;
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const m = (await consoleText()).slice(from).match(re);
        if (m) return m;
        // A KVM internal error pauses the guest without exiting QEMU: fail now, not at the timeout.
        const broken = /KVM internal error|emulation failure/.test(proc.output);
        if (proc.exit || broken || Date.now() > deadline) {
          const text = await consoleText();
          const tail = text.slice(-3000);
          const state = proc.exit
            ? 'QEMU has exited'
            : diagSocket === undefined
              ? '(no diagnostic monitor: the VM directory path is too long)'
              : await describeGuest(diagSocket);
          throw new LifeboatError(
            proc.exit || broken ? 'LB_TESTING_PROCESS_EXITED' : 'LB_TESTING_TIMEOUT',
            `The VM's console did not show ${re} ${proc.exit || broken ? 'before QEMU stopped' : `within ${timeoutMs} ms`} (accel ${accel}, console ${text.length} bytes${from > 0 ? `, looked after ${from}` : ''}). Console tail:\n${tail}\nQEMU output:\n${proc.output.slice(-2000)}\nGuest state:\n${state}`,
            { details: { pattern: String(re), accel, consoleBytes: text.length } },
          );
        }
        await new Promise((r) => setTimeout(r, 100));
      }
    },
    stop,
  };
}

interface BlockStats {
  device?: string;
  qdev?: string;
  'node-name'?: string;
  stats: {
    rd_operations: number;
    wr_operations: number;
    flush_operations: number;
    rd_bytes: number;
    wr_bytes: number;
    idle_time_ns?: number;
  };
}

/**
 * What the guest is doing, for a failed wait: run state, vCPUs and their registers (where the
 * instruction pointer is tells a hung kernel from a hung firmware), the disks' I/O counters.
 */
async function describeGuest(diagSocket: string): Promise<string> {
  let q: QmpClient | undefined;
  try {
    const client = await QmpClient.connect(
      { path: diagSocket },
      { connectTimeoutMs: 3000, commandTimeoutMs: 5000 },
    );
    q = client;
    const hmp = (cmd: string): Promise<string> =>
      client.execute<string>('human-monitor-command', { 'command-line': cmd });
    const status = await client.execute<{ status: string }>('query-status');
    const parts = [
      `status: ${status.status}`,
      `info cpus:\n${await hmp('info cpus')}`,
      `info registers -a:\n${(await hmp('info registers -a')).slice(0, 4000)}`,
      `disks:\n${(await client.execute<BlockStats[]>('query-blockstats'))
        .map((b) => {
          const st = b.stats;
          return `${b.qdev ?? b['node-name'] ?? b.device ?? '?'}: reads ${st.rd_operations} (${st.rd_bytes} B), writes ${st.wr_operations} (${st.wr_bytes} B), flushes ${st.flush_operations}, idle ${st.idle_time_ns === undefined ? '?' : `${Math.round(st.idle_time_ns / 1e6)} ms`}`;
        })
        .join('\n')}`,
    ];
    return parts.join('\n');
  } catch (err) {
    return `(could not ask QEMU: ${(err as Error).message})`;
  } finally {
    await q?.close().catch(() => undefined);
  }
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}
