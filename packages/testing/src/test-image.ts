import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import {
  chmod,
  copyFile,
  mkdir,
  readFile,
  readdir,
  rename,
  rm,
  stat,
  symlink,
  writeFile,
} from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { LifeboatError } from '@lifeboat/protocol';
import { runCommand } from './run-command.js';

// Bumped when the build steps change in a way the hashed inputs do not show.
const BUILDER_VERSION = '2';
const KERNEL_METAPACKAGE = 'linux-image-cloud-amd64';
// Modules the init script loads; the rest of the cloud kernel's 90 MiB of modules stay out.
const MODULES = [
  'virtio_ring',
  'virtio',
  'virtio_pci_legacy_dev',
  'virtio_pci_modern_dev',
  'virtio_pci',
  'failover',
  'net_failover',
  'virtio_net',
  'virtio_console',
  'virtio_blk',
  // The cloud-init seed disk (ISO 9660, see scripts/guest-init.sh).
  'cdrom',
  'isofs',
];

/** The repository's root (this file is in packages/testing/src or packages/testing/dist). */
const packageRoot = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const repoRoot = resolve(packageRoot, '..', '..');

/** Options for {@link buildTestImage}. */
export interface TestImageOptions {
  /** Where built images are kept, one directory per input hash. @default <repo>/.cache/test-image */
  cacheDir?: string;
  /** Size of the root file system image. @default 268435456 (256 MiB, sparse) */
  rootSizeBytes?: number;
}

/** A built test machine: boot `kernel` with `rootImage` as the first NVMe disk. */
export interface TestImage {
  /** The Debian cloud kernel (bzImage), booted without an initrd. */
  kernel: string;
  /** The root file system, a raw ext4 image. Never boot it directly: use an overlay. */
  rootImage: string;
  /** Kernel release, e.g. `6.1.0-56-cloud-amd64`. */
  kernelRelease: string;
  /** The cache key (hash of every input) naming the directory the image lives in. */
  key: string;
}

/** Kernel command-line settings of the test machine's init (see scripts/guest-init.sh). */
export interface TestImageAppendOptions {
  /** Host name printed in the boot marker. @default 'lifeboat-test' */
  hostname?: string;
  /** Text the guest writes durably to /var/lifeboat/marker after boot. @default none */
  mark?: string;
  /** Run the continuous file writer. @default false */
  writer?: boolean;
  /** Pause between the writer's files in milliseconds. @default 100 */
  writerIntervalMs?: number;
  /** Block device the writer stamps each counter on. @default the second NVMe disk if any */
  stampDisk?: string;
  /** Static address `A.B.C.D/N` on eth0 instead of DHCP. @default DHCP */
  ip?: string;
  /** Default gateway with `ip`. @default none */
  gateway?: string;
  /** More kernel arguments, appended as they are. @default none */
  extra?: string;
}

/** The kernel command line that boots the test image from the first NVMe disk. */
export function testImageAppend(options: TestImageAppendOptions = {}): string {
  const args = [
    'console=ttyS0',
    'root=/dev/nvme0n1',
    'rootfstype=ext4',
    'rootwait',
    'rw',
    'init=/init',
    'panic=-1',
    // Warnings and worse reach the console (NVMe I/O timeouts, clock and timer calibration
    // trouble under a loaded host), so a boot that stalls says why; info messages stay out:
    // at loglevel 7 the serial console's 23 KB cost TCG boots 5-9 s (measured).
    'loglevel=5',
    // Skips the slow, pointless timer check under TCG.
    'no_timer_check',
  ];
  const word = (name: string, value: string): void => {
    if (/\s/.test(value)) {
      throw new LifeboatError(
        'LB_TESTING_BAD_OPTION',
        `Kernel argument ${name} must not contain white space: "${value}". Use a single word.`,
      );
    }
    args.push(`${name}=${value}`);
  };
  if (options.hostname !== undefined) word('lifeboat.hostname', options.hostname);
  if (options.mark !== undefined) word('lifeboat.mark', options.mark);
  if (options.writer) args.push('lifeboat.writer=1');
  if (options.writerIntervalMs !== undefined) {
    word('lifeboat.writer-interval-ms', String(Math.max(0, Math.round(options.writerIntervalMs))));
  }
  if (options.stampDisk !== undefined) word('lifeboat.stamp-disk', options.stampDisk);
  if (options.ip !== undefined) word('lifeboat.ip', options.ip);
  if (options.gateway !== undefined) word('lifeboat.gw', options.gateway);
  if (options.extra !== undefined) args.push(options.extra);
  return args.join(' ');
}

const inFlight = new Map<string, Promise<TestImage>>();

/**
 * Builds (or finds in the cache) the bootable test machine: the Debian cloud kernel from
 * `linux-image-cloud-amd64`'s dependency, and an ext4 root file system (`mke2fs -d`) holding
 * busybox-static, the QEMU guest agent with its libraries, a few virtio modules and the init
 * script. Safe when several processes build at once: each builds in its own temporary
 * directory and renames it into place; the loser uses the winner's.
 */
export async function buildTestImage(options: TestImageOptions = {}): Promise<TestImage> {
  const cacheDir = options.cacheDir ?? join(repoRoot, '.cache', 'test-image');
  const rootSize = options.rootSizeBytes ?? 256 * 1024 * 1024;
  // Asking apt for versions takes seconds on a busy machine; while apt's lists and the
  // scripts are unchanged, the last build's key still names the right image.
  const quickKey = await quickCacheKey(rootSize);
  const remembered = join(cacheDir, `quick-${quickKey}.json`);
  try {
    const { key } = JSON.parse(await readFile(remembered, 'utf8')) as { key: string };
    if (existsSync(join(cacheDir, key, 'manifest.json')))
      return readManifest(join(cacheDir, key), key);
  } catch {
    // Not remembered yet: resolve the inputs with apt.
  }
  const inputs = await resolveInputs();
  const key = createHash('sha256')
    .update(
      JSON.stringify({ BUILDER_VERSION, rootSize, ...inputs.versions, scripts: inputs.scripts }),
    )
    .digest('hex')
    .slice(0, 16);
  const cacheKey = `${cacheDir}:${key}`;
  let pending = inFlight.get(cacheKey);
  if (!pending) {
    pending = buildOrFind(cacheDir, key, rootSize, inputs).finally(() => inFlight.delete(cacheKey));
    inFlight.set(cacheKey, pending);
  }
  const image = await pending;
  const tmp = `${remembered}.${process.pid}.tmp`;
  await writeFile(tmp, JSON.stringify({ key }));
  await rename(tmp, remembered);
  return image;
}

/** A key from what changes when apt's answers could: its lists' time, the scripts, the size. */
async function quickCacheKey(rootSize: number): Promise<string> {
  const h = createHash('sha256').update(`${BUILDER_VERSION}\n${rootSize}\n`);
  try {
    h.update(String((await stat('/var/lib/apt/lists')).mtimeMs));
  } catch {
    h.update('no-apt-lists');
  }
  for (const name of ['guest-init.sh', 'udhcpc.script']) {
    h.update(await readFile(join(packageRoot, 'scripts', name)));
  }
  return h.digest('hex').slice(0, 16);
}

interface Inputs {
  kernelPackage: string;
  versions: Record<string, string>;
  scripts: Record<string, string>;
}

async function resolveInputs(): Promise<Inputs> {
  const depends = await runCommand('apt-cache', ['depends', KERNEL_METAPACKAGE]).catch(
    (cause: unknown) => {
      throw new LifeboatError(
        'LB_TESTING_IMAGE_BUILD',
        `Cannot resolve the Debian cloud kernel (${KERNEL_METAPACKAGE}) with apt-cache. Run apt-get update, or check that this is a Debian machine with its package lists.`,
        { cause },
      );
    },
  );
  const kernelPackage = /Depends:\s*(linux-image-[^\s]+-cloud-amd64)/.exec(depends.stdout)?.[1];
  if (!kernelPackage) {
    throw new LifeboatError(
      'LB_TESTING_IMAGE_BUILD',
      `${KERNEL_METAPACKAGE} does not depend on a linux-image-*-cloud-amd64 package. Check the apt sources (Debian main for amd64).`,
      { details: { output: depends.stdout } },
    );
  }
  const versions: Record<string, string> = {};
  for (const pkg of [kernelPackage, 'busybox-static', 'qemu-guest-agent']) {
    versions[pkg] = await candidateVersion(pkg);
  }
  const scripts: Record<string, string> = {};
  for (const name of ['guest-init.sh', 'udhcpc.script']) {
    scripts[name] = createHash('sha256')
      .update(await readFile(join(packageRoot, 'scripts', name)))
      .digest('hex');
  }
  return { kernelPackage, versions, scripts };
}

async function candidateVersion(pkg: string): Promise<string> {
  const { stdout } = await runCommand('apt-cache', ['show', '--no-all-versions', pkg]);
  const version = /^Version:\s*(\S+)/m.exec(stdout)?.[1];
  if (!version) {
    throw new LifeboatError(
      'LB_TESTING_IMAGE_BUILD',
      `apt-cache knows no version of ${pkg}. Run apt-get update.`,
      { details: { package: pkg } },
    );
  }
  return version;
}

async function buildOrFind(
  cacheDir: string,
  key: string,
  rootSize: number,
  inputs: Inputs,
): Promise<TestImage> {
  const finalDir = join(cacheDir, key);
  const manifestPath = join(finalDir, 'manifest.json');
  if (existsSync(manifestPath)) return readManifest(finalDir, key);
  await mkdir(cacheDir, { recursive: true });
  const work = join(cacheDir, `.build-${process.pid}-${randomBytes(4).toString('hex')}`);
  await mkdir(work);
  try {
    const release = await buildInto(work, rootSize, inputs);
    await writeFile(
      join(work, 'manifest.json'),
      JSON.stringify({ kernelRelease: release, inputs, builtAt: new Date().toISOString() }),
    );
    try {
      await rename(work, finalDir);
    } catch (err) {
      // Another process finished first: its image is as good as ours.
      if (!existsSync(manifestPath)) throw err;
    }
  } finally {
    await rm(work, { recursive: true, force: true });
  }
  return readManifest(finalDir, key);
}

async function readManifest(dir: string, key: string): Promise<TestImage> {
  const manifest = JSON.parse(await readFile(join(dir, 'manifest.json'), 'utf8')) as {
    kernelRelease: string;
  };
  return {
    kernel: join(dir, 'vmlinuz'),
    rootImage: join(dir, 'root.raw'),
    kernelRelease: manifest.kernelRelease,
    key,
  };
}

async function buildInto(work: string, rootSize: number, inputs: Inputs): Promise<string> {
  const debs = join(work, 'debs');
  await mkdir(debs);
  await runCommand(
    'apt-get',
    ['download', '-q', inputs.kernelPackage, 'busybox-static', 'qemu-guest-agent'],
    { cwd: debs },
  ).catch((cause: unknown) => {
    throw new LifeboatError(
      'LB_TESTING_IMAGE_BUILD',
      `Downloading the test image's Debian packages failed. Check access to the Debian mirror (apt-get update).`,
      { cause },
    );
  });
  const extracted = join(work, 'x');
  for (const deb of await readdir(debs)) {
    await runCommand('dpkg', ['-x', join(debs, deb), extracted]);
  }

  const bootDir = join(extracted, 'boot');
  const vmlinuz = (await readdir(bootDir)).find((n) => n.startsWith('vmlinuz-'));
  if (!vmlinuz) {
    throw new LifeboatError(
      'LB_TESTING_IMAGE_BUILD',
      `${inputs.kernelPackage} holds no /boot/vmlinuz-*. The package layout changed; update test-image.ts.`,
    );
  }
  const release = vmlinuz.slice('vmlinuz-'.length);
  await copyFile(join(bootDir, vmlinuz), join(work, 'vmlinuz'));

  const root = join(work, 'root');
  for (const d of ['bin', 'dev', 'proc', 'sys', 'tmp', 'run', 'etc', 'var/lifeboat/files']) {
    await mkdir(join(root, d), { recursive: true });
  }
  await mkdir(join(root, 'lib', 'modules'), { recursive: true });
  await copyFile(join(extracted, 'bin', 'busybox'), join(root, 'bin', 'busybox'));
  const { stdout: applets } = await runCommand(join(root, 'bin', 'busybox'), ['--list']);
  for (const applet of applets.split('\n').filter((a) => a && a !== 'busybox')) {
    await symlink('busybox', join(root, 'bin', applet));
  }
  await copyFile(join(packageRoot, 'scripts', 'guest-init.sh'), join(root, 'init'));
  await chmod(join(root, 'init'), 0o755);
  await copyFile(join(packageRoot, 'scripts', 'udhcpc.script'), join(root, 'etc', 'udhcpc.script'));
  await chmod(join(root, 'etc', 'udhcpc.script'), 0o755);
  await writeFile(join(root, 'etc', 'passwd'), 'root:x:0:0:root:/:/bin/sh\n');
  await writeFile(join(root, 'etc', 'group'), 'root:x:0:\n');

  const moduleDir = join(extracted, 'lib', 'modules', release, 'kernel');
  const { stdout: found } = await runCommand('find', [moduleDir, '-name', '*.ko']);
  const byName = new Map(found.split('\n').map((p) => [basename(p, '.ko'), p] as const));
  for (const m of MODULES) {
    const path = byName.get(m);
    // Modules built into a given kernel are simply absent; the init script ignores them.
    if (path) await copyFile(path, join(root, 'lib', 'modules', `${m}.ko`));
  }

  // The guest agent is dynamically linked: copy it with the host's copies of its libraries
  // (the same Debian release, as the packages come from the host's apt sources).
  const qga = join(extracted, 'usr', 'sbin', 'qemu-ga');
  await copyFile(qga, join(root, 'bin', 'qemu-ga'));
  await chmod(join(root, 'bin', 'qemu-ga'), 0o755);
  const { stdout: ldd } = await runCommand('ldd', [qga]);
  for (const line of ldd.split('\n')) {
    const lib = /(\/\S+)\s+\(0x/.exec(line)?.[1];
    if (!lib) continue;
    const dest = join(root, lib);
    await mkdir(dirname(dest), { recursive: true });
    await copyFile(lib, dest);
  }

  await runCommand('mke2fs', [
    '-q',
    '-F',
    '-t',
    'ext4',
    '-L',
    'lifeboat-root',
    '-d',
    root,
    join(work, 'root.raw'),
    `${Math.floor(rootSize / 1024)}k`,
  ]);
  await rm(root, { recursive: true, force: true });
  await rm(extracted, { recursive: true, force: true });
  await rm(debs, { recursive: true, force: true });
  return release;
}

/**
 * Creates a qcow2 overlay at `path` whose backing file is the image's read-only root: a fresh,
 * writable root disk for one test that costs nothing to make.
 */
export async function createRootOverlay(image: TestImage, path: string): Promise<string> {
  await runCommand('qemu-img', [
    'create',
    '-q',
    '-f',
    'qcow2',
    '-F',
    'raw',
    '-b',
    image.rootImage,
    path,
  ]);
  return path;
}

/** Copies the root image to `path` as a standalone `qcow2` or `raw` file (sparse). */
export async function copyRootImage(
  image: TestImage,
  path: string,
  format: 'qcow2' | 'raw',
): Promise<string> {
  await runCommand('qemu-img', ['convert', '-q', '-f', 'raw', '-O', format, image.rootImage, path]);
  return path;
}
