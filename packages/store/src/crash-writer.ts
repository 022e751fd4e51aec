// Child process of crash.test.ts: commits points in a loop until it is killed with SIGKILL.
// Usage: node --import tsx crash-writer.ts <store-dir> <passphrase> <disk-size> [disk-name]
import { randomInt } from 'node:crypto';
import { applyToSession, deltaOps } from './crash-model.js';
import { DirectoryBackend } from './directory-backend.js';
import { Store } from './store.js';

const [dir, passphrase, sizeText, diskName = 'vda'] = process.argv.slice(2);
if (dir === undefined || passphrase === undefined || sizeText === undefined) {
  process.stderr.write('usage: crash-writer <dir> <passphrase> <size>\n');
  process.exit(2);
}
const size = Number(sizeText);
// Small index batches so kills also land between mid-session index objects.
const store = await Store.open({
  backend: new DirectoryBackend({ path: dir }),
  passphrase,
  indexEveryBlobs: 4,
});
process.stdout.write('READY\n');
for (;;) {
  const seed = randomInt(1, 2 ** 31);
  const session = await store.beginWrite({ machine: 'crash', disk: diskName, size });
  await applyToSession(session, deltaOps(seed, size, store.chunkSize));
  const point = await session.commit({ labels: { seed: String(seed) } });
  process.stdout.write(`COMMITTED ${point.id}\n`);
}
