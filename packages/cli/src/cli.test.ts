import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { existsSync } from 'node:fs';
import { cp, mkdtemp, open, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { CliInput } from './cli-context.js';
import { DirectoryBackend, Store } from '@lifeboat/store';
import { runCli } from './main.js';

const exec = promisify(execFile);
const MiB = 1024 * 1024;
const K = 1024;

interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

let dir: string;
let storeDir: string;
const PASS = 'correct horse battery staple';

/** Runs `lifeboat <args>` in-process against the temp store, capturing its output. */
async function lifeboat(args: string[], env: Record<string, string> = {}): Promise<RunResult> {
  let stdout = '';
  let stderr = '';
  const stdin = Object.assign(new EventEmitter(), {
    isTTY: false,
    resume: () => undefined,
    pause: () => undefined,
  }) as CliInput;
  const code = await runCli(args, {
    io: {
      stdout: { write: (s: string) => (stdout += s) },
      stderr: { write: (s: string) => (stderr += s), isTTY: false },
      stdin,
      env: { LIFEBOAT_STORE: storeDir, LIFEBOAT_PASSPHRASE: PASS, ...env },
      cwd: dir,
    },
  });
  return { code, stdout, stderr };
}

async function json<T = Record<string, unknown>>(
  args: string[],
  env?: Record<string, string>,
): Promise<T> {
  const r = await lifeboat([...args, '--json'], env);
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  return JSON.parse(r.stdout) as T;
}

async function pwrite(path: string, offset: number, data: Buffer): Promise<void> {
  const fh = await open(path, 'r+');
  try {
    await fh.write(data, 0, data.length, offset);
  } finally {
    await fh.close();
  }
}

async function expectSameBytes(a: string, b: string): Promise<void> {
  const [x, y] = await Promise.all([readFile(a), readFile(b)]);
  expect(x.length).toBe(y.length);
  // Buffer.equals, not toEqual: a diff of megabytes is useless, the offset is what helps.
  if (!x.equals(y)) {
    let i = 0;
    while (x[i] === y[i]) i++;
    expect.fail(`${a} and ${b} differ first at byte ${i}`);
  }
}

interface PointJson {
  id: string;
  machine: string;
  disk: string;
  parent?: string;
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lifeboat-cli-'));
  storeDir = join(dir, 'store');
  const init = await json<{ id: string; chunkSize: number }>([
    'store',
    'init',
    '--kdf-cost',
    '1024',
  ]);
  expect(init.chunkSize).toBe(64 * K);
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('lifeboat store', () => {
  let rawPath: string;
  let firstPoint: PointJson;

  it('imports a raw image (skipping holes and zeros) and restores it byte-exact and sparse', async () => {
    rawPath = join(dir, 'disk.raw');
    const img = Buffer.alloc(8 * MiB);
    randomBytes(2 * MiB).copy(img, 0);
    randomBytes(MiB).copy(img, 5 * MiB);
    img.copy(img, 7 * MiB, 0, MiB); // a duplicate of the first MiB
    await writeFile(rawPath, img);
    // Punch holes back: a sparse file is what qemu-img map reports as unallocated.
    await exec('fallocate', ['--dig-holes', rawPath]);

    const r = await json<{ point: PointJson; bytesRead: number; format: string }>([
      'store',
      'import',
      rawPath,
    ]);
    expect(r.format).toBe('raw');
    expect(r.point).toMatchObject({ machine: 'disk.raw', disk: 'disk.raw' });
    expect(r.bytesRead).toBe(4 * MiB);
    firstPoint = r.point;

    const out = join(dir, 'restored.raw');
    const restore = await lifeboat(['store', 'restore', firstPoint.id.slice(0, 8), out]);
    expect(restore.stderr).toBe('');
    expect(restore.code).toBe(0);
    expect(restore.stdout).toContain(`restored point ${firstPoint.id}`);
    await expectSameBytes(rawPath, out);
    const st = await stat(out);
    expect(st.blocks * 512).toBeLessThanOrEqual(4 * MiB + 64 * K);

    const again = await lifeboat(['store', 'restore', firstPoint.id, out]);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/^error LB_CLI_RESTORE_TARGET: .*--force/);
  });

  it('imports only the changed extents on top of the latest point', async () => {
    const before = join(dir, 'before.raw');
    await cp(rawPath, before);
    const a = randomBytes(100 * K);
    const b = randomBytes(4 * K);
    await pwrite(rawPath, 3 * MiB + 512, a); // into a zero region, unaligned
    await pwrite(rawPath, 5 * MiB, b);
    await pwrite(rawPath, 0, Buffer.alloc(64 * K)); // data becomes zeros
    await pwrite(rawPath, 8 * MiB, randomBytes(256 * K)); // the disk grows: not listed, still imported
    const extents = join(dir, 'changes.txt');
    await writeFile(
      extents,
      `# offset length\n${3 * MiB + 512} ${a.length}\n${5 * MiB} 4096\n0 65536\n`,
    );

    const r = await json<{ point: PointJson; base: string; bytesRead: number }>([
      'store',
      'import',
      rawPath,
      '--changed-extents',
      extents,
    ]);
    expect(r.base).toBe(firstPoint.id);
    expect(r.point.disk).toBe('disk.raw');
    // Only the chunks around the changes are read, never the whole disk.
    expect(r.bytesRead).toBeLessThanOrEqual(4 * 64 * K + 256 * K);

    const latest = join(dir, 'latest.raw');
    expect(
      (await lifeboat(['store', 'restore', 'latest', latest, '--disk', 'disk.raw'])).code,
    ).toBe(0);
    await expectSameBytes(rawPath, latest);
    const old = join(dir, 'old.raw');
    expect((await lifeboat(['store', 'restore', firstPoint.id, old])).code).toBe(0);
    await expectSameBytes(before, old);

    const { points } = await json<{ points: PointJson[] }>([
      'store',
      'points',
      '--disk',
      'disk.raw',
    ]);
    expect(points.map((p) => p.id)).toEqual([firstPoint.id, r.point.id]);
  });

  it('rejects a bad changed-extents line, naming it, and commits nothing', async () => {
    const extents = join(dir, 'bad.txt');
    await writeFile(extents, '0 4096\n4096 lots\n');
    const r = await lifeboat(['store', 'import', rawPath, '--changed-extents', extents]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('error LB_CLI_BAD_EXTENTS: ');
    expect(r.stderr).toContain('line 2');
    // The store opened meanwhile (the key unwraps while the file is read) is closed again: the
    // disk's write lock, taken early, is not left behind to block the next gc or prune.
    expect((await readdir(join(storeDir, 'locks'))).filter((n) => !n.startsWith('.'))).toEqual([]);
    const { points } = await json<{ points: PointJson[] }>([
      'store',
      'points',
      '--disk',
      'disk.raw',
    ]);
    expect(points).toHaveLength(2);
  });

  it('imports qcow2 images (plain, compressed, with a backing file) byte-exact', async () => {
    const base = join(dir, 'vm.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', base, '16M']);
    await exec('qemu-io', [
      '-f',
      'qcow2',
      '-c',
      'write -P 0x5a 0 1M',
      '-c',
      'write -P 0x11 3M 192k',
      '-c',
      'write -z 4M 64k',
      '-c',
      'write -P 0x22 15M 512k',
      base,
    ]);
    const compressed = join(dir, 'vm-compressed.qcow2');
    await exec('qemu-img', ['convert', '-c', '-O', 'qcow2', base, compressed]);
    const overlay = join(dir, 'vm-overlay.qcow2');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', overlay]);
    await exec('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x77 64k 128k', overlay]);

    for (const image of [base, compressed, overlay]) {
      const r = await json<{ point: PointJson; format: string }>([
        'store',
        'import',
        image,
        '--machine',
        'vm1',
      ]);
      expect(r.format).toBe('qcow2');
      const reference = `${image}.reference.raw`;
      await exec('qemu-img', ['convert', '-O', 'raw', image, reference]);
      const out = `${image}.restored.raw`;
      const restore = await lifeboat(['store', 'restore', r.point.id, out]);
      expect(restore.stderr).toBe('');
      await expectSameBytes(reference, out);
    }
    // No qemu-nbd is left behind by the compressed and overlay imports.
    const { stdout } = await exec('ps', ['-eo', 'args']);
    expect(stdout).not.toContain(dir);
  });

  it('refuses what it cannot import with a clear code, committing nothing', async () => {
    const vmdk = join(dir, 'disk.vmdk');
    await exec('qemu-img', ['create', '-q', '-f', 'vmdk', vmdk, '1M']);
    const unsupported = await lifeboat(['store', 'import', vmdk]);
    expect(unsupported.code).toBe(1);
    expect(unsupported.stderr).toMatch(/^error LB_CLI_UNSUPPORTED_FORMAT: .*qemu-img convert/);
    const missing = await lifeboat(['store', 'import', join(dir, 'nope.raw')]);
    expect(missing.stderr).toMatch(/^error LB_CLI_IMAGE_NOT_FOUND: /);
    const odd = join(dir, 'odd.raw');
    await writeFile(odd, Buffer.alloc(1000, 1));
    expect((await lifeboat(['store', 'import', odd])).stderr).toMatch(/^error LB_CLI_IMAGE_SIZE: /);
    const extents = join(dir, 'one.txt');
    await writeFile(extents, '0 512\n');
    const noBase = await lifeboat([
      'store',
      'import',
      rawPath,
      '--disk',
      'new-disk',
      '--changed-extents',
      extents,
    ]);
    expect(noBase.code).toBe(1);
    expect(noBase.stderr).toMatch(/^error LB_CLI_NO_BASE_POINT: /);
    const usageJson = await lifeboat(['store', 'import', '--json']);
    expect(usageJson.code).toBe(2);
    expect(JSON.parse(usageJson.stdout)).toMatchObject({ error: { code: 'LB_CLI_USAGE' } });
    const { points } = await json<{ points: PointJson[] }>(['store', 'points']);
    expect(points).toHaveLength(5);
  });

  it('lists points, stats and prune as JSON', async () => {
    const { points } = await json<{ points: PointJson[] }>(['store', 'points']);
    expect(points.length).toBe(5);
    const stats = await json<{ points: number; dedupRatio: number; chunkSize: number }>([
      'store',
      'stats',
    ]);
    expect(stats.points).toBe(5);
    expect(stats.chunkSize).toBe(64 * K);
    const prune = await json<{ dryRun: boolean; kept: PointJson[]; removed: PointJson[] }>([
      'store',
      'prune',
      '--keep',
      '1h',
      '--dry-run',
    ]);
    expect(prune.dryRun).toBe(true);
    expect(prune.kept.length + prune.removed.length).toBe(5);
    const human = await lifeboat(['store', 'points']);
    expect(human.code).toBe(0);
    expect(human.stdout.split('\n')[0]).toMatch(/^ID\s+TIME\s+KIND\s+MACHINE\s+DISK\s+SIZE/);
  });

  it('lists the points of one cut', async () => {
    const other = join(dir, 'cut-store');
    const store = await Store.init({
      backend: new DirectoryBackend({ path: other }),
      passphrase: PASS,
      kdfCost: 1024,
    });
    try {
      for (const [disk, cut] of [
        ['vda', 'c1'],
        ['vdb', 'c1'],
        ['vda', 'c2'],
      ] as const) {
        const s = await store.beginWrite({ machine: 'web', disk, size: 64 * K });
        await s.write(0, randomBytes(64 * K));
        await s.commit({ cut });
      }
    } finally {
      await store.close();
    }
    const env = { LIFEBOAT_STORE: other };
    const one = await json<{ points: Array<PointJson & { cut?: string }> }>(
      ['store', 'points', '--cut', 'c1'],
      env,
    );
    expect(one.points.map((p) => `${p.disk} ${p.cut}`).sort()).toEqual(['vda c1', 'vdb c1']);
    const none = await json<{ points: PointJson[] }>(['store', 'points', '--cut', 'c9'], env);
    expect(none.points).toEqual([]);
  });

  it('prunes old points by policy', async () => {
    const img = join(dir, 'small.raw');
    await writeFile(img, randomBytes(256 * K));
    const now = Date.now();
    for (const hoursAgo of [50, 49.9, 49.8, 2, 1]) {
      const time = new Date(now - hoursAgo * 3600_000).toISOString();
      await json(['store', 'import', img, '--time', time]);
    }
    const r = await json<{ removed: PointJson[]; kept: PointJson[] }>([
      'store',
      'prune',
      '--keep',
      '24h',
      '--keep',
      '7d:1d',
      '--machine',
      'small.raw',
    ]);
    // 24h keeps the two recent points; 7d:1d keeps at most one per day of the three taken
    // within 12 minutes of each other, so at least one of them goes.
    expect(r.kept.length).toBeGreaterThanOrEqual(3);
    expect(r.removed.length).toBeGreaterThanOrEqual(1);
    const { points } = await json<{ points: PointJson[] }>([
      'store',
      'points',
      '--machine',
      'small.raw',
    ]);
    expect(points.length).toBe(r.kept.length);
  });

  it('says clearly when the passphrase is wrong or missing, without a stack trace', async () => {
    const wrong = await lifeboat(['store', 'points'], { LIFEBOAT_PASSPHRASE: 'not it' });
    expect(wrong.code).toBe(1);
    expect(wrong.stderr).toMatch(/^error LB_STORE_WRONG_PASSPHRASE: /);
    expect(wrong.stderr).not.toMatch(/\n\s+at /);
    const wrongJson = await lifeboat(['store', 'points', '--json'], {
      LIFEBOAT_PASSPHRASE: 'not it',
    });
    expect(JSON.parse(wrongJson.stdout)).toMatchObject({
      error: { code: 'LB_STORE_WRONG_PASSPHRASE' },
    });

    const none = await lifeboat(['store', 'points'], { LIFEBOAT_PASSPHRASE: '' });
    expect(none.code).toBe(1);
    expect(none.stderr).toMatch(/^error LB_CLI_NO_PASSPHRASE: .*LIFEBOAT_PASSPHRASE/);
  });

  it('exits 2 on usage errors', async () => {
    const unknown = await lifeboat(['store', 'points', '--bogus']);
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toMatch(/^error LB_CLI_USAGE: unknown option '--bogus'/);
    const missingArg = await lifeboat(['store', 'restore', 'latest']);
    expect(missingArg.code).toBe(2);
    const noStore = await lifeboat(['store', 'points'], { LIFEBOAT_STORE: '' });
    expect(noStore.code).toBe(2);
    expect(noStore.stderr).toMatch(/^error LB_CLI_NO_STORE: /);
    const badKeep = await lifeboat(['store', 'prune', '--keep', 'forever']);
    expect(badKeep.code).toBe(2);
    const help = await lifeboat(['store', '--help']);
    expect(help.code).toBe(0);
    expect(help.stdout).toContain('import');
  });

  it('changes the passphrase', async () => {
    const next = join(dir, 'next-pass');
    await writeFile(next, 'a new passphrase\n', { mode: 0o600 });
    expect((await lifeboat(['store', 'passwd', '--new-passphrase-file', next])).code).toBe(0);
    expect((await lifeboat(['store', 'stats'])).code).toBe(1);
    expect((await lifeboat(['store', 'stats', '--passphrase-file', next])).code).toBe(0);
    await writeFile(join(dir, 'old-pass'), PASS);
    expect(
      (
        await lifeboat(['store', 'passwd', '--passphrase-file', next], {
          LIFEBOAT_NEW_PASSPHRASE: PASS,
        })
      ).code,
    ).toBe(0);
  });

  it('verify exits 0 on a sound store and 3 naming the affected points after a flipped byte', async () => {
    const ok = await lifeboat(['store', 'verify']);
    expect(ok.stderr).toBe('');
    expect(ok.code).toBe(0);
    expect(ok.stdout).toContain('no faults');

    const packs = await findFiles(storeDir, (p) => p.includes('pack'));
    expect(packs.length).toBeGreaterThan(0);
    const victim = packs[0] as string;
    const fh = await open(victim, 'r+');
    try {
      const size = (await fh.stat()).size;
      const at = Math.floor(size / 2);
      const b = Buffer.alloc(1);
      await fh.read(b, 0, 1, at);
      b[0] = (b[0] as number) ^ 0x01;
      await fh.write(b, 0, 1, at);
    } finally {
      await fh.close();
    }
    const bad = await lifeboat(['store', 'verify']);
    expect(bad.code).toBe(3);
    expect(bad.stdout).toMatch(/fault/);
    const report = await lifeboat(['store', 'verify', '--json']);
    expect(report.code).toBe(3);
    const parsed = JSON.parse(report.stdout) as {
      ok: boolean;
      faults: Array<{ points: string[] }>;
    };
    expect(parsed.ok).toBe(false);
    expect(parsed.faults[0]?.points.length).toBeGreaterThan(0);
  });

  it('points and verify show a point object that cannot be read, and exit 3', async () => {
    const before = await lifeboat(['store', 'points', '--json']);
    const listed = (JSON.parse(before.stdout) as { points: PointJson[] }).points;
    const victim = listed[listed.length - 1] as PointJson;
    const file = join(storeDir, 'points', victim.id);
    const buf = await readFile(file);
    buf[buf.length - 3] = (buf[buf.length - 3] as number) ^ 0x10;
    await writeFile(file, buf);
    const human = await lifeboat(['store', 'points']);
    expect(human.code).toBe(3);
    expect(human.stdout).toContain('1 point object(s) could not be read');
    expect(human.stdout).toContain(`points/${victim.id}`);
    expect(human.stdout).toContain('LB_STORE_CORRUPT_POINT');
    const asJson = await lifeboat(['store', 'points', '--json']);
    expect(asJson.code).toBe(3);
    const parsed = JSON.parse(asJson.stdout) as {
      points: PointJson[];
      damaged: Array<{ id: string; object: string; code: string }>;
    };
    expect(parsed.points.map((p) => p.id)).not.toContain(victim.id);
    expect(parsed.damaged).toEqual([
      expect.objectContaining({
        id: victim.id,
        object: `points/${victim.id}`,
        code: 'LB_STORE_CORRUPT_POINT',
      }),
    ]);
    const report = await lifeboat(['store', 'verify', '--json']);
    expect(report.code).toBe(3);
    const faults = (
      JSON.parse(report.stdout) as {
        faults: Array<{ code: string; object: string; points: string[] }>;
      }
    ).faults;
    expect(faults).toContainEqual(
      expect.objectContaining({
        code: 'LB_STORE_CORRUPT_POINT',
        object: `points/${victim.id}`,
        points: [victim.id],
      }),
    );
  });
});

async function findFiles(root: string, match: (path: string) => boolean): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(root, { withFileTypes: true, recursive: true })) {
    const path = join(e.parentPath, e.name);
    if (e.isFile() && match(path.slice(root.length))) out.push(path);
  }
  return out.sort();
}

const bin = new URL('../bin/lifeboat.js', import.meta.url).pathname;
const built = existsSync(new URL('../dist/main.js', import.meta.url));

// The installed command (bin -> dist) as users run it; dist exists after `tsc -b` (test.sh).
describe.skipIf(!built)('bin/lifeboat.js', () => {
  it('runs the built CLI with exit codes and no stack trace', async () => {
    const help = await exec(process.execPath, [bin, '--help']);
    expect(help.stdout).toContain('store');
    const usage = await exec(process.execPath, [bin, 'store', 'points', '--bogus']).catch(
      (e: { code: number; stderr: string }) => e,
    );
    expect(usage).toMatchObject({ code: 2 });
    expect((usage as { stderr: string }).stderr).toMatch(/^error LB_CLI_USAGE: /);
  });

  it('imports and restores a disk big enough for the crypto threads, and exits 0 each time', async () => {
    // 96 MiB: past the store's 64 MiB threshold, so its threads start, work and are ended at
    // exit (a thread that answered late once let the process end before they had: exit 13).
    const where = await mkdtemp(join(tmpdir(), 'lifeboat-bin-'));
    try {
      const env = {
        ...process.env,
        LIFEBOAT_STORE: join(where, 'store'),
        LIFEBOAT_PASSPHRASE: PASS,
      };
      const image = join(where, 'disk.raw');
      const data = randomBytes(96 * 1024 * 1024);
      data.fill(0, 16 * 1024 * 1024, 24 * 1024 * 1024);
      await writeFile(image, data);
      await exec(process.execPath, [bin, 'store', 'init', '--kdf-cost', '1024'], { env });
      for (let i = 0; i < 3; i++) {
        await exec(process.execPath, [bin, 'store', 'import', image, '--disk', `d${i}`, '--json'], {
          env,
        });
        const out = join(where, `out${i}.raw`);
        await exec(process.execPath, [bin, 'store', 'restore', 'latest', out, '--disk', `d${i}`], {
          env,
        });
        await expectSameBytes(image, out);
      }
    } finally {
      await rm(where, { recursive: true, force: true });
    }
  }, 120_000);

  it('ends quietly when the reader of its output goes away (| head)', async () => {
    // `lifeboat failover start --help | true`: the reader is gone before the help is written.
    const { stderr, code } = await new Promise<{ stderr: string; code: number | null }>(
      (done, fail) => {
        const child = spawn(
          'bash',
          ['-c', `set -o pipefail; "${process.execPath}" "${bin}" failover start --help | true`],
          { stdio: ['ignore', 'ignore', 'pipe'] },
        );
        let err = '';
        child.stderr.on('data', (c: Buffer) => (err += c.toString()));
        child.once('error', fail);
        child.once('exit', (c) => done({ stderr: err, code: c }));
      },
    );
    expect(stderr).not.toMatch(/EPIPE|Unhandled/);
    expect(code).toBe(0);
  });
});
