// Child process (or worker thread) of store-writers.test.ts: begins a write session of one
// disk and holds it (a second writer of the disk elsewhere) until it is killed.
// Usage: node --import tsx disk-holder.ts <store-dir> <passphrase> <machine> <disk>
import { parentPort } from 'node:worker_threads';
import { DirectoryBackend } from './directory-backend.js';
import { Store } from './store.js';

const [dir, passphrase, machine, disk] = process.argv.slice(2);
if (dir === undefined || passphrase === undefined || machine === undefined || disk === undefined) {
  process.stderr.write('usage: disk-holder <dir> <passphrase> <machine> <disk>\n');
  process.exit(2);
}
const store = await Store.open({ backend: new DirectoryBackend({ path: dir }), passphrase });
const session = await store.beginWrite({ machine, disk, size: 1024 * 1024 });
await session.write(0, Buffer.alloc(4096, 1));
if (parentPort !== null) parentPort.postMessage('HOLDING');
else process.stdout.write('HOLDING\n');
// Held until killed: the lock's heartbeat keeps it live.
setInterval(() => undefined, 1000);
