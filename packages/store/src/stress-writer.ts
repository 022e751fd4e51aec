// Child process of store-concurrency.test.ts: one Store instance (like one process-server
// worker) that commits points of several disks at once, in a loop, until its time is up.
// Each point carries the SHA-256 of the content it must read back as (label `sha`).
// Usage: node --import tsx stress-writer.ts <store-dir> <passphrase> <machine> <ms> <disk:size>...
import { createHash, randomInt } from 'node:crypto';
import { applyToBuffer, applyToSession, deltaOps } from './crash-model.js';
import { DirectoryBackend } from './directory-backend.js';
import { Store } from './store.js';

const [dir, passphrase, machine, msText, ...diskArgs] = process.argv.slice(2);
if (
  dir === undefined ||
  passphrase === undefined ||
  machine === undefined ||
  msText === undefined
) {
  process.stderr.write('usage: stress-writer <dir> <passphrase> <machine> <ms> <disk:size>...\n');
  process.exit(2);
}
const machineName: string = machine;
const deadline = Date.now() + Number(msText);
// Small index batches: sessions publish index objects mid-session as well as at commit.
const store = await Store.open({
  backend: new DirectoryBackend({ path: dir }),
  passphrase,
  indexEveryBlobs: 8,
});
process.stdout.write('READY\n');

async function writeDisk(disk: string, size: number): Promise<void> {
  const model = Buffer.alloc(size);
  // At least one point per disk, however slow the machine is.
  for (let n = 0; n === 0 || Date.now() < deadline; n++) {
    const ops = deltaOps(randomInt(1, 2 ** 31), size, store.chunkSize);
    const session = await store.beginWrite({ machine: machineName, disk, size });
    await applyToSession(session, ops);
    applyToBuffer(model, ops);
    const sha = createHash('sha256').update(model).digest('hex');
    const point = await session.commit({ labels: { sha } });
    process.stdout.write(`COMMITTED ${point.id} ${sha}\n`);
  }
}

await Promise.all(
  diskArgs.map((arg) => {
    const [disk, sizeText] = arg.split(':');
    return writeDisk(disk as string, Number(sizeText));
  }),
);
await store.close();
process.stdout.write('DONE\n');
