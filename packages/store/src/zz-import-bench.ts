import { mkdtemp, rm, open } from 'node:fs/promises';
import { join } from 'node:path';
import { Store, DirectoryBackend } from './index.js';

const img = process.argv[2] as string;
const dir = await mkdtemp(join('/tmp/h1bench', 's-'));
const store = await Store.init({
  backend: new DirectoryBackend({ path: dir }),
  passphrase: 'x',
  kdfCost: 1024,
});
const fh = await open(img, 'r');
const size = (await fh.stat()).size;
const cpu0 = process.cpuUsage();
let t0 = performance.now();
const s = await store.beginWrite({ machine: 'm', disk: 'd', size });
const buf = Buffer.alloc(4 * 1024 * 1024);
for (let off = 0; off < size; off += buf.length) {
  const { bytesRead } = await fh.read(buf, 0, buf.length, off);
  await s.write(off, buf.subarray(0, bytesRead));
}
const p = await s.commit();
let t1 = performance.now();
const cpu1 = process.cpuUsage(cpu0);
console.log(
  'import s',
  ((t1 - t0) / 1000).toFixed(2),
  'MB/s',
  (size / 1048576 / ((t1 - t0) / 1000)).toFixed(0),
  'cpu user s',
  (cpu1.user / 1e6).toFixed(2),
  'sys',
  (cpu1.system / 1e6).toFixed(2),
  'rss MiB',
  (process.memoryUsage().rss / 1048576).toFixed(0),
);
await fh.close();
const out = await open(join(dir, '..', 'restored.raw'), 'w');
t0 = performance.now();
const cpu2 = process.cpuUsage();
const r = await store.openPoint(p.id);
let pos = 0;
for await (const c of r.stream()) {
  await out.write(c as Buffer, 0, (c as Buffer).length, pos);
  pos += (c as Buffer).length;
}
await out.sync();
await out.close();
t1 = performance.now();
const cpu3 = process.cpuUsage(cpu2);
console.log(
  'restore s',
  ((t1 - t0) / 1000).toFixed(2),
  'MB/s',
  (size / 1048576 / ((t1 - t0) / 1000)).toFixed(0),
  'cpu user s',
  (cpu3.user / 1e6).toFixed(2),
  'sys',
  (cpu3.system / 1e6).toFixed(2),
  'rss MiB',
  (process.memoryUsage().rss / 1048576).toFixed(0),
);
await store.close();
await rm(dir, { recursive: true, force: true });
