import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, open, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { LifeboatError } from '@lifeboat/protocol';
import { GuestAgentClient } from '@lifeboat/qmp';
import { DirectoryBackend, Store, type PointInfo } from '@lifeboat/store';
import { buildTestImage, importRaw, testImageAppend, type TestImage } from '@lifeboat/testing';
import { Failover } from './failover.js';
import { listeningSockets } from './listening-sockets.js';
import { pngSize } from './png.js';
import { RecoveryHost } from './recovery-host.js';
import { exportUri } from './recovery-machine.js';
import { runTestFailover, type TestFailover } from './test-failover.js';

const run = promisify(execFile);

// Real QEMU (TCG when KVM does not work) booting the project's test image from points of a
// real directory store, through the recovery host's own NBD exports.

let dir: string;
let image: TestImage;
let store: Store;
let host: RecoveryHost;
let storeDir: string;
let pointA: PointInfo;
let pointB: PointInfo;

/** A copy of the test image's root with `text` in /var/lifeboat/marker (what the source wrote). */
async function markedRoot(text: string): Promise<string> {
  const path = join(dir, `root-${text}.raw`);
  await run('cp', ['--sparse=always', image.rootImage, path]);
  const marker = join(dir, `marker-${text}`);
  await writeFile(marker, `${text}\n`);
  await run('debugfs', ['-w', '-R', `write ${marker} /var/lifeboat/marker`, path]);
  return path;
}

const boot = (extra: Parameters<typeof testImageAppend>[0] = {}) => ({
  kernel: image.kernel,
  append: testImageAppend(extra),
});

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lb-rh-'));
  image = await buildTestImage();
  storeDir = join(dir, 'store');
  store = await Store.init({
    backend: new DirectoryBackend({ path: storeDir }),
    passphrase: 'recovery test',
    kdfCost: 1024,
  });
  pointA = await importRaw(store, await markedRoot('MARK-A'), 'web', 'root');
  pointB = await importRaw(store, await markedRoot('MARK-B'), 'web', 'root');
  host = await RecoveryHost.start({ runDir: join(dir, 'run'), bootTimeoutMs: 180_000 });
}, 600_000);

afterAll(async () => {
  await host?.close();
  await store?.close();
  await rm(dir, { recursive: true, force: true });
});

describe('point export', () => {
  it('reads byte-exact with nbdcopy and reports the zero ranges to nbdinfo --map', async () => {
    const e = await host.exportPoint(store, pointA.id);
    try {
      const uri = exportUri(e);
      const copy = join(dir, 'nbdcopy.raw');
      await run('nbdcopy', [uri, copy]);
      await run('cmp', [copy, join(dir, 'root-MARK-A.raw')]);
      await rm(copy);
      const { stdout } = await run('nbdinfo', ['--map', '--json', uri]);
      const map = JSON.parse(stdout) as Array<{ offset: number; length: number; type: number }>;
      // Holes of the sparse root file system are reported as zero (type bit 2), data as data.
      expect(map.some((x) => (x.type & 2) !== 0)).toBe(true);
      expect(map.some((x) => x.type === 0)).toBe(true);
      expect(map.reduce((n, x) => n + x.length, 0)).toBe(pointA.size);
      expect(e.faults).toEqual([]);
    } finally {
      await host.closeExport(e);
    }
  });
});

describe('test failover', () => {
  it('boots a point through the NBD export, verifies console, port and screenshot, exposes nothing, and cleans up', async () => {
    const tf: TestFailover = await runTestFailover(host, store, {
      machines: [
        {
          name: 'web',
          points: { machine: 'web', disk: 'root', at: pointA.time },
          boot: boot(),
          memoryMiB: 256,
          // The network mapping's static address, for guests that run cloud-init.
          seed: { instanceId: 'tf-web', hostname: 'web', addresses: [{ address: '10.9.8.7/24' }] },
        },
      ],
      verify: {
        console: /LIFEBOAT-BOOT-OK \S+ MARK-A/,
        port: { guestPort: 22, expect: /LIFEBOAT-TCP-OK/ },
        screenshot: true,
      },
    });
    try {
      expect(tf.job.state).toBe('succeeded');
      expect(tf.job.steps.map((s) => s.name)).toEqual([
        'select points',
        'boot web',
        'console of web',
        'port 22 of web',
        'screenshot of web',
        'isolation of web',
      ]);
      expect(tf.job.steps.every((s) => typeof s.durationMs === 'number')).toBe(true);
      expect(tf.job.steps[0]?.detail?.['web']).toEqual([pointA.id]);
      // The screenshot is a real PNG of the VGA text console (80x25 cells of 9x16 pixels).
      const png = await readFile(tf.job.artifacts['web-screenshot']!);
      expect(pngSize(png)).toEqual({ width: 720, height: 400 });
      // Independently of the job's own check: QEMU listens on nothing but loopback forwards.
      const m = tf.machines[0]!.machine;
      const listening = await listeningSockets(m.pid!);
      expect(listening.length).toBe(1);
      expect(listening.every((l) => l.address === '127.0.0.1' && l.port === m.ports.get(22))).toBe(
        true,
      );
      const { stdout } = await run('ss', ['-ltnpH']);
      const qemuLines = stdout.split('\n').filter((l) => l.includes(`pid=${m.pid},`));
      expect(qemuLines.every((l) => l.includes('127.0.0.1:'))).toBe(true);
      // The seed disk is attached as a read-only virtio disk, its network-config for the NIC's
      // MAC; the guest took that address (the test image's cloud-init stand-in), and the port
      // was verified through user networking serving that subnet.
      const seed = tf.machines[0]!.seedDisk!;
      const blocks = (await m.qmp.execute('query-block')) as Array<{
        qdev?: string;
        inserted?: { file: string; ro: boolean };
      }>;
      expect(blocks.find((b) => b.qdev?.includes('seed-dev') === true)?.inserted).toMatchObject({
        file: seed,
        ro: true,
      });
      const { stdout: net } = await run('isoinfo', ['-i', seed, '-J', '-x', '/network-config']);
      expect(net).toContain(`macaddress: "${m.macs[0]}"`);
      expect(net).toContain('10.9.8.7/24');
      expect(await m.consoleText()).toContain(`LIFEBOAT-NET-SEED eth0 ${m.macs[0]} 10.9.8.7/24`);
      // The writes went to the overlay; the point is untouched.
      const overlay = m.disks[0]!.overlay;
      expect(existsSync(overlay)).toBe(true);
      const { stdout: info } = await run('qemu-img', ['info', '-U', '--output=json', overlay]);
      expect(JSON.parse(info)['backing-filename']).toBe(exportUri(m.disks[0]!.export));
    } finally {
      const pid = tf.machines[0]!.machine.pid!;
      const overlay = tf.machines[0]!.machine.disks[0]!.overlay;
      const cleanup = await tf.cleanup();
      expect(cleanup.state).toBe('succeeded');
      const removed = cleanup.steps.flatMap((s) => (s.detail?.['removed'] as string[]) ?? []);
      expect(removed.some((r) => r.startsWith('machine web'))).toBe(true);
      expect(removed.some((r) => r.startsWith('export web-d0'))).toBe(true);
      expect(removed.some((r) => r.startsWith(`overlay ${overlay}`))).toBe(true);
      expect(existsSync(overlay)).toBe(false);
      expect(existsSync(`/proc/${pid}`)).toBe(false);
      expect(await readdir(join(dir, 'run', 'x'))).toEqual([]);
    }
  }, 300_000);

  it('two machines of one consistency group reach each other over their private segment and nothing else', async () => {
    const cut = `cut-${randomBytes(4).toString('hex')}`;
    const root = await markedRoot('GROUP');
    await importRaw(store, root, 'app', 'root', { consistencyGroup: 'shop', cut });
    await importRaw(store, root, 'db', 'root', { consistencyGroup: 'shop', cut });
    const tf = await runTestFailover(host, store, {
      network: 'segment',
      machines: [
        {
          name: 'app',
          points: { consistencyGroup: 'shop', machine: 'app' },
          boot: boot({ hostname: 'app', ip: '10.77.0.1/24' }),
          memoryMiB: 256,
          guestAgent: true,
        },
        {
          name: 'db',
          points: { consistencyGroup: 'shop', machine: 'db' },
          boot: boot({ hostname: 'db', ip: '10.77.0.2/24' }),
          memoryMiB: 256,
          guestAgent: true,
        },
      ],
      verify: { console: /LIFEBOAT-READY/, screenshot: false },
    });
    const agents: GuestAgentClient[] = [];
    try {
      expect(tf.job.state).toBe('succeeded');
      const [app, db] = tf.machines.map((b) => b.machine);
      for (const m of [app!, db!]) {
        const a = new GuestAgentClient(m.qgaSocket!, 15_000);
        agents.push(a);
        await a.waitUntilReady(120_000);
        // No TCP listener at all: the segment is a UNIX socket of the recovery host.
        expect(await m.listening()).toEqual([]);
      }
      // busybox nc, not wget: the static busybox's wget crashes in this guest (no NSS).
      const connectTo = (a: GuestAgentClient, ip: string, port: number) =>
        a.exec('/bin/nc', ['-w', '3', ip, String(port)], 30_000);
      expect((await connectTo(agents[0]!, '10.77.0.2', 22)).stdout).toMatch(/LIFEBOAT-TCP-OK db/);
      expect((await connectTo(agents[1]!, '10.77.0.1', 22)).stdout).toMatch(/LIFEBOAT-TCP-OK app/);
      // Nothing else: not QEMU's user-network gateway, not a public address.
      for (const ip of ['10.0.2.2', '192.0.2.1']) {
        const r = await connectTo(agents[0]!, ip, 22);
        expect(r.exitCode).not.toBe(0);
        expect(r.stdout).toBe('');
      }
      expect(tf.segment!.framesForwarded).toBeGreaterThan(0);
    } finally {
      const cleanup = await tf.cleanup();
      expect(cleanup.state).toBe('succeeded');
      expect(existsSync(tf.segment!.socketPath)).toBe(false);
    }
  }, 300_000);
});

describe('failover', () => {
  it('unplanned failover, change of point, commit, then hydration while the guest runs', async () => {
    const f = await Failover.start(host, store, {
      name: 'fo',
      pointIds: [pointA.id],
      // The guest keeps writing files (each fsynced) the whole time, hydration included.
      boot: boot({ mark: 'WRITTEN-BY-GUEST', writer: true, writerIntervalMs: 100 }),
      memoryMiB: 256,
      // Network mapping: the source network "prod" lands on an isolated network here, and
      // the NIC keeps its source MAC and gets its static target address through cloud-init.
      sourceNics: [{ network: 'prod', mac: '52:54:00:0a:0b:0c' }],
      networkMappings: [
        {
          source: 'prod',
          target: { kind: 'isolated-user', forwardPorts: [80] },
          addresses: {
            '52:54:00:0a:0b:0c': { address: '192.168.50.10/24', gateway: '192.168.50.1' },
          },
        },
      ],
    });
    try {
      await f.machine.waitForConsole(/LIFEBOAT-BOOT-OK \S+ MARK-A/, 180_000);
      // A boot timeout says whether the guest's disk was waiting for its export.
      const late = (await f.machine.waitForConsole(/NEVER-ON-THE-CONSOLE/, 1).then(
        () => undefined,
        (e: unknown) => e,
      )) as LifeboatError;
      expect(late.code).toBe('LB_RECOVERY_BOOT_TIMEOUT');
      expect(late.message).toMatch(/disk reads not answered yet: disk0 \d+/);
      expect(late.details['unansweredReads']).toEqual([
        { disk: 'disk0', count: expect.any(Number), oldestMs: expect.any(Number) },
      ]);
      expect(f.machine.macs).toEqual(['52:54:00:0a:0b:0c']);
      const { stdout: net } = await run('isoinfo', [
        '-i',
        f.booted.seedDisk!,
        '-J',
        '-x',
        '/network-config',
      ]);
      expect(net).toContain('macaddress: "52:54:00:0a:0b:0c"');
      expect(net).toContain('addresses: ["192.168.50.10/24"]');
      await f.changePoint([pointB.id]);
      await f.machine.waitForConsole(
        /LIFEBOAT-BOOT-OK \S+ MARK-B[\s\S]*LIFEBOAT-MARK-WRITTEN WRITTEN-BY-GUEST[\s\S]*LIFEBOAT-READY/,
        180_000,
      );
      await f.commit();
      await expect(f.changePoint([pointA.id])).rejects.toMatchObject({
        code: 'LB_RECOVERY_FAILOVER_STATE',
      });
      const bootsBefore = (await f.machine.consoleText()).split('Linux version').length;
      const local = join(dir, 'local');
      const hydration = await f.hydrate({ dir: local, format: 'qcow2', verify: true });
      expect(hydration.state).toBe('succeeded');
      const target = f.localDisks[0]!;
      // The guest never restarted, it still serves, and the store's export is gone.
      expect((await f.machine.consoleText()).split('Linux version').length).toBe(bootsBefore);
      expect(existsSync(f.booted.exports[0]!.socketPath)).toBe(false);
      await f.machine.waitForPort(80, 60_000, {
        send: 'GET / HTTP/1.0\r\n\r\n',
        expect: /LIFEBOAT-HTTP-OK/,
      });
      // It kept writing after the switch, onto the local file.
      const afterSwitch = (await f.machine.consoleText()).length;
      await f.machine.waitForConsole(/LIFEBOAT-WROTE \d+/, 60_000, afterSwitch);
      const { stdout: info } = await run('qemu-img', ['info', '-U', '--output=json', target]);
      expect(JSON.parse(info)['backing-filename']).toBeUndefined();
      // Byte-exact: verified inside the job (paused guest, mirrors in sync, qemu-img compare).
      expect(
        hydration.steps.find((s) => s.name === 'verify copies')?.detail?.['identical'],
      ).toEqual([target]);
      // ...and the local file holds what the guest wrote, which the point does not.
      const raw = join(dir, 'local.raw');
      await f.machine.qmp.execute('stop');
      const wrote = [...(await f.machine.consoleText()).matchAll(/LIFEBOAT-WROTE (\d+)/g)];
      const last = wrote.at(-1)![1]!;
      await run('qemu-img', ['convert', '-U', '-O', 'raw', target, raw]);
      await f.machine.qmp.execute('cont');
      expect((await readFile(raw)).includes('WRITTEN-BY-GUEST')).toBe(true);
      // The newest file the guest reported durable before the pause is in the local file.
      expect((await readFile(raw)).includes(`LIFEBOAT-FILE ${last}\n`)).toBe(true);
      await rm(raw);
    } finally {
      const c = await f.cleanup();
      expect(c.state).toBe('succeeded');
    }
    expect(existsSync(f.localDisks[0]!)).toBe(true);
  }, 300_000);

  it('a corrupted chunk: the export answers EIO for that range (never zeros) and the hydration job names point and range', async () => {
    const data = randomBytes(4 * 1024 * 1024);
    const dataPath = join(dir, 'data.raw');
    await writeFile(dataPath, data);
    const packsBefore = new Set(await listFiles(storeDir));
    const damaged = await importRaw(store, dataPath, 'fo2', 'data');
    const newPacks = (await listFiles(storeDir)).filter(
      (f) => !packsBefore.has(f) && f.includes('pack'),
    );
    const sized = await Promise.all(newPacks.map(async (f) => ({ f, size: (await stat(f)).size })));
    const pack = sized.sort((a, b) => b.size - a.size)[0]!.f;
    const fh = await open(pack, 'r+');
    const at = Math.floor((await fh.stat()).size / 2);
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, at);
    b[0] = b[0]! ^ 0xff;
    await fh.write(b, 0, 1, at);
    await fh.close();
    // A fresh store (no cached chunks) finds which chunk is damaged.
    const fresh = await Store.open({
      backend: new DirectoryBackend({ path: storeDir }),
      passphrase: 'recovery test',
    });
    const reader = await fresh.openPoint(damaged.id);
    const bad: number[] = [];
    for (let off = 0; off < data.length; off += fresh.chunkSize) {
      await reader.readAt(off, fresh.chunkSize).catch(() => bad.push(off));
    }
    expect(bad.length).toBe(1);
    const badOffset = bad[0]!;
    const e = await host.exportPoint(fresh, damaged.id);
    try {
      const uri = exportUri(e);
      const io = (cmd: string) =>
        run('qemu-io', ['-r', '-f', 'raw', '-c', cmd, uri]).then(
          (r) => r.stdout + r.stderr,
          (err: { stdout?: string; stderr?: string }) => `${err.stdout ?? ''}${err.stderr ?? ''}`,
        );
      expect(await io(`read ${badOffset} 4096`)).toMatch(/Input\/output error/);
      const good = badOffset === 0 ? fresh.chunkSize : 0;
      expect(await io(`read -P ${data[good]} ${good} 1`)).toMatch(/read 1\/1 bytes/);
      expect(e.faults[0]).toMatchObject({ pointId: damaged.id, code: 'LB_STORE_CORRUPT_CHUNK' });
    } finally {
      await host.closeExport(e);
    }
    const f = await Failover.start(host, fresh, {
      name: 'fo2',
      pointIds: [pointA.id, damaged.id],
      boot: boot(),
      memoryMiB: 256,
    });
    try {
      await f.machine.waitForConsole(/LIFEBOAT-READY/, 180_000);
      await f.commit();
      const err = await f.hydrate({ dir: join(dir, 'local2') }).then(
        () => undefined,
        (x: unknown) => x,
      );
      expect(err).toMatchObject({ code: 'LB_RECOVERY_POINT_DAMAGED' });
      const job = f.jobs.at(-1)!;
      expect(job.state).toBe('failed');
      expect(job.error?.message).toContain(damaged.id);
      const faults = job.error?.details?.['faults'] as Array<{
        pointId: string;
        offset: number;
        length: number;
      }>;
      expect(
        faults.some(
          (x) =>
            x.pointId === damaged.id &&
            x.offset <= badOffset + fresh.chunkSize - 1 &&
            x.offset + x.length > badOffset,
        ),
      ).toBe(true);
      // The machine still runs from the store after the failed hydration.
      expect(f.machine.exit).toBeUndefined();
    } finally {
      await f.cleanup();
      await fresh.close();
    }
  }, 300_000);
});

async function listFiles(root: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(root, { withFileTypes: true, recursive: true })) {
    if (e.isFile()) out.push(join(e.parentPath, e.name));
  }
  return out;
}
