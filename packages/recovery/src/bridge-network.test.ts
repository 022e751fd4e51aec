import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readlink, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DirectoryBackend, Store, type PointInfo } from '@lifeboat/store';
import { buildTestImage, importRaw, testImageAppend, type TestImage } from '@lifeboat/testing';
import { Failover } from './failover.js';
import { RecoveryHost } from './recovery-host.js';
import { cleanupRunDir } from './run-dir-cleanup.js';

const run = promisify(execFile);

// A failed-over machine on a recovery-site network that is a real Linux bridge of the host:
// the recovery host (root) gives it a tap on the bridge, the guest takes its static address
// from the cloud-init seed, and the host reaches the guest's port over the bridge. Needs root
// (CI runs as root), as the recovery host itself does for bridge networks.

const root = process.getuid?.() === 0;
const suffix = randomBytes(2).toString('hex');
const bridge = `lbbr-${suffix}`;
const subnet = `10.213.${(parseInt(suffix, 16) % 200) + 20}`;
let dir: string;
let image: TestImage;
let store: Store;
let host: RecoveryHost;
let point: PointInfo;

describe.skipIf(!root)('bridge network', () => {
  beforeAll(async () => {
    await run('ip', ['link', 'add', bridge, 'type', 'bridge']);
    await run('ip', ['addr', 'add', `${subnet}.1/24`, 'dev', bridge]);
    await run('ip', ['link', 'set', bridge, 'up']);
    dir = await mkdtemp(join(tmpdir(), 'lb-br-'));
    image = await buildTestImage();
    store = await Store.init({
      backend: new DirectoryBackend({ path: join(dir, 'store') }),
      passphrase: 'bridge test',
      kdfCost: 1024,
    });
    point = await importRaw(store, image.rootImage, 'web', 'root');
    host = await RecoveryHost.start({
      runDir: join(dir, 'run'),
      networks: {
        dr: { kind: 'bridge', bridge },
        gone: { kind: 'bridge', bridge: `lbno-${suffix}` },
      },
    });
  }, 600_000);

  afterAll(async () => {
    await host?.close();
    await store?.close();
    await run('ip', ['link', 'del', bridge]).catch(() => undefined);
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });

  it('a failover on a bridge: static address from the seed, port 22 answers from the host, the tap goes with QEMU', async () => {
    const f = await Failover.start(host, store, {
      name: 'bfo',
      pointIds: [point.id],
      boot: { kernel: image.kernel, append: testImageAppend({ hostname: 'bfo' }) },
      memoryMiB: 256,
      nics: [host.networkNic('dr', 'bfo')],
      seed: {
        instanceId: 'bfo-1',
        hostname: 'bfo',
        addresses: [{ address: `${subnet}.10/24`, gateway: `${subnet}.1` }],
      },
    });
    try {
      expect(f.jobs[0]!.steps.find((s) => s.name === 'boot bfo')?.detail?.['networks']).toEqual([
        `bridge ${bridge}`,
      ]);
      const [tap] = f.machine.tapDevices;
      expect(tap).toMatch(/^lbt-[0-9a-f]{10}$/);
      expect(basename(await readlink(`/sys/class/net/${tap!}/master`))).toBe(bridge);
      // Straight to the guest's address over the bridge: no port forwarding, no user network.
      expect(f.machine.ports.size).toBe(0);
      const banner = await f.machine.waitForPort(22, 60_000, { expect: /LIFEBOAT-TCP-OK/ });
      expect(banner).toMatch(/LIFEBOAT-TCP-OK bfo/);
      expect(await f.machine.listening()).toEqual([]);
      // QEMU dies (not stopped by Lifeboat): its tap is removed all the same.
      process.kill(f.machine.pid!, 'SIGKILL');
      const deadline = Date.now() + 10_000;
      while (existsSync(`/sys/class/net/${tap!}`) && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 100));
      }
      expect(existsSync(`/sys/class/net/${tap!}`)).toBe(false);
    } finally {
      await f.cleanup();
    }
    expect((await run('ip', ['-o', 'link', 'show', 'master', bridge])).stdout).toBe('');
  }, 60_000);

  it('a network the host does not declare, or whose bridge is missing, is a clear error', () => {
    expect(() => host.networkNic('prod', 'x')).toThrow(
      expect.objectContaining({ code: 'LB_RECOVERY_NO_NETWORK' }) as Error,
    );
    expect(() => host.networkNic('gone', 'x')).toThrow(
      expect.objectContaining({ code: 'LB_RECOVERY_NO_BRIDGE' }) as Error,
    );
    expect(host.networkReport()).toEqual([
      { name: 'dr', kind: 'bridge', bridge, present: true },
      { name: 'gone', kind: 'bridge', bridge: `lbno-${suffix}`, present: false },
    ]);
  });

  it('a crashed recovery host: cleanupRunDir removes the taps its machines listed, and only lbt- taps', async () => {
    const runDir = join(dir, 'crashed');
    const tap = `lbt-${randomBytes(5).toString('hex')}`;
    await run('ip', ['tuntap', 'add', 'dev', tap, 'mode', 'tap']);
    await mkdir(join(runDir, 'm', 'gone'), { recursive: true });
    await writeFile(join(runDir, 'm', 'gone', 'taps'), `${tap}\nlo\n`);
    const removed = await cleanupRunDir(runDir);
    expect(removed).toContain(`tap ${tap} of gone`);
    expect(existsSync(`/sys/class/net/${tap}`)).toBe(false);
    expect(existsSync('/sys/class/net/lo')).toBe(true);
  });
});
