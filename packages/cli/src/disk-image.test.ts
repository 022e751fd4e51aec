import { execFile } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DiskImage, looksRaw } from './disk-image.js';
import { readFile } from 'node:fs/promises';

const exec = promisify(execFile);
let dir: string;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lifeboat-disk-image-'));
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function head(path: string): Promise<Buffer> {
  return (await readFile(path)).subarray(0, 512);
}

describe('DiskImage raw sniffing (changed-extents import)', () => {
  it('never takes an image of another format qemu-img knows for raw', async () => {
    for (const format of ['qcow2', 'qed', 'vmdk', 'vdi', 'vhdx', 'vpc', 'parallels']) {
      // Names without the format's extension, so the signature alone must decide.
      const path = join(dir, `image-${format}.img`);
      await exec('qemu-img', ['create', '-q', '-f', format, path, '4M']);
      expect(looksRaw(await head(path), path), format).toBe(false);
    }
    // A vmdk descriptor is text, starting with a comment line.
    expect(looksRaw(Buffer.from('# Disk DescriptorFile\nversion=1\n'.padEnd(512)), 'x')).toBe(
      false,
    );
    expect(looksRaw(Buffer.alloc(512), 'disk.qcow2')).toBe(false);
  });

  it('opens a plain raw file without qemu-img, and still asks it about anything else', async () => {
    const raw = join(dir, 'disk.img');
    const data = Buffer.alloc(1024 * 1024);
    data.write('an ordinary boot sector', 0);
    await writeFile(raw, data);
    expect(looksRaw(data.subarray(0, 512), raw)).toBe(true);
    // PATH without qemu-img: a sniffed raw image must not need it.
    const saved = process.env['PATH'];
    process.env['PATH'] = '/nonexistent';
    try {
      const image = await DiskImage.open(raw, { sniffRaw: true });
      expect(image.info).toEqual({
        path: raw,
        format: 'raw',
        size: data.length,
        encrypted: false,
        externalDataFile: false,
      });
      const got = await image.read(
        { start: 0, length: data.length, zero: false, data: true, depth: 0 },
        0,
        4096,
      );
      expect(got.equals(data.subarray(0, 4096))).toBe(true);
      await image.close();
    } finally {
      process.env['PATH'] = saved;
    }

    const qcow2 = join(dir, 'disk2.img');
    await exec('qemu-img', ['create', '-q', '-f', 'qcow2', qcow2, '8M']);
    const q = await DiskImage.open(qcow2, { sniffRaw: true });
    expect(q.info.format).toBe('qcow2');
    expect(q.info.size).toBe(8 * 1024 * 1024);
    await q.close();

    const vmdk = join(dir, 'disk3.img');
    await exec('qemu-img', ['create', '-q', '-f', 'vmdk', vmdk, '1M']);
    await expect(DiskImage.open(vmdk, { sniffRaw: true })).rejects.toMatchObject({
      code: 'LB_CLI_UNSUPPORTED_FORMAT',
    });
  });
});
