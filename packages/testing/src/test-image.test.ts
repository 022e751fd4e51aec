import { mkdtemp, open, rm } from 'node:fs/promises';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checkExt4, listExt4Dir, readExt4File, replayExt4Journal } from './guest-files.js';
import { runCommand } from './run-command.js';
import { startVm } from './start-vm.js';
import type { TestVm } from './start-vm.js';
import { buildTestImage, createRootOverlay, testImageAppend } from './test-image.js';
import type { TestImage } from './test-image.js';

function readBanner(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = connect(port, '127.0.0.1');
    let data = '';
    const timer = setTimeout(() => {
      s.destroy();
      resolve(data);
    }, 20_000);
    s.on('data', (b: Buffer) => (data += b.toString()));
    s.on('end', () => {
      clearTimeout(timer);
      resolve(data);
    });
    s.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });
}

describe('test image (Debian cloud kernel + busybox root, booted with QEMU under TCG)', () => {
  let dir: string;
  let image: TestImage;
  let vm: TestVm | undefined;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'lifeboat-test-image-'));
    image = await buildTestImage();
  });
  afterAll(async () => {
    await vm?.stop({ kill: true });
    await rm(dir, { recursive: true, force: true });
  });

  it('builds once and finds the build in the cache the second time', async () => {
    const again = await buildTestImage();
    expect(again).toEqual(image);
    expect(image.kernelRelease).toMatch(/-cloud-amd64$/);
  });

  it('rejects a kernel argument with white space', () => {
    expect(() => testImageAppend({ mark: 'two words' })).toThrow(/white space/);
  });

  it('boots, answers on a TCP port, and the writer finishes files on both disks', async () => {
    const root = await createRootOverlay(image, join(dir, 'root.qcow2'));
    const second = join(dir, 'data.raw');
    await runCommand('qemu-img', ['create', '-q', '-f', 'raw', second, '4M']);
    vm = await startVm({
      kernel: image.kernel,
      disks: [{ path: root }, { path: second, format: 'raw' }],
      append: testImageAppend({ hostname: 'tiny', mark: 'hello-42', writer: true }),
      accel: 'tcg',
      net: 'user-restrict',
      forwardPorts: [22],
    });
    await vm.waitForConsole('LIFEBOAT-BOOT-OK tiny none');
    await vm.waitForConsole('LIFEBOAT-MARK-WRITTEN hello-42');
    await vm.waitForConsole(/LIFEBOAT-NET 10\.0\.2\.15/);
    await vm.waitForConsole('LIFEBOAT-WROTE 5');
    expect(await readBanner(vm.ports.get(22) as number)).toContain('LIFEBOAT-TCP-OK tiny');
    await vm.stop();
    vm = undefined;

    // What the guest finished is on its disks: the index names a file that exists with the
    // right content, the file system is clean enough for e2fsck -n, and disk 2 has the stamp.
    const raw = join(dir, 'root.raw');
    await runCommand('qemu-img', ['convert', '-q', '-O', 'raw', root, raw]);
    await replayExt4Journal(raw);
    const index = Number((await readExt4File(raw, '/var/lifeboat/index'))?.toString().trim());
    expect(index).toBeGreaterThanOrEqual(5);
    const file = await readExt4File(raw, `/var/lifeboat/files/${index}.dat`);
    expect(file?.length).toBe(16384);
    expect(file?.toString().startsWith(`LIFEBOAT-FILE ${index}\n`)).toBe(true);
    expect(await listExt4Dir(raw, '/var/lifeboat/files')).toContain(`${index}.dat`);
    expect((await readExt4File(raw, '/var/lifeboat/marker'))?.toString()).toBe('hello-42\n');
    const check = await checkExt4(raw);
    expect(check.clean, check.output).toBe(true);
    const fh = await open(second, 'r');
    const sector = Buffer.alloc(512);
    await fh.read(sector, 0, 512, 0);
    await fh.close();
    const stamp = Number(/LIFEBOAT-STAMP (\d+)/.exec(sector.toString('latin1'))?.[1]);
    // The stamp is written after the index, so it is the index or, if cut between, one less.
    expect([index - 1, index]).toContain(stamp);
  }, 240_000);

  it('says what the guest was doing when a wait for its console fails', async () => {
    const root = await createRootOverlay(image, join(dir, 'stuck.qcow2'));
    // -S: the vCPU never runs, so the console stays empty, as in a hung boot.
    const stuck = await startVm({
      kernel: image.kernel,
      disks: [{ path: root }],
      append: testImageAppend({ hostname: 'stuck' }),
      accel: 'tcg',
      extraArgs: ['-S'],
    });
    try {
      const err = await stuck.waitForConsole('LIFEBOAT-BOOT-OK', 1500).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: 'LB_TESTING_TIMEOUT' });
      const message = (err as Error).message;
      expect(message).toMatch(/console 0 bytes/);
      // The run state, the vCPUs and their registers, and the disks' I/O counters.
      expect(message).toMatch(/status: prelaunch/);
      expect(message).toMatch(/[ER]IP=[0-9a-f]+/);
      expect(message).toMatch(/disk0-dev\S*: reads 0 \(0 B\), writes 0/);
    } finally {
      await stuck.stop({ kill: true });
    }
  });
});
