// Benchmark of the resync baseline (issue 4, "a resync ... compares chunk hashes with the
// latest point, and sends only what differs", through a process server): a disk of N MiB (3/4
// random data, 1/4 zero) is replicated into a process server with store work on 2 worker
// threads; then, in one run:
// - the baseline: BASELINE_REQUEST -> the server reads the point and digests every data chunk
//   under a fresh key -> the agent has the digests (wall time, bytes on the wire);
// - the agent's side of the comparison: digesting its own chunks under that key;
// - the reference: what a resync without a baseline does, sending every allocated chunk again
//   (until journaled, and until committed).
//
//   npx tsx bench/resync-baseline.ts [--size-mib 1024]
//
// Everything lives in a temp dir under bench/out/ and is removed at the end.
import { execFile } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { cpus, loadavg } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { ProcessServer } from '@lifeboat/process-server';
import { ReplicationClient } from '@lifeboat/protocol';
import { DirectoryBackend, Store } from '@lifeboat/store';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const MiB = 1024 * 1024;
const CHUNK = 64 * 1024;
const args = process.argv.slice(2);
const sizeArg = args.indexOf('--size-mib');
const SIZE = (sizeArg >= 0 ? Number(args[sizeArg + 1]) : 1024) * MiB;
const run = promisify(execFile);

/** A CA, a server certificate for 127.0.0.1 and an agent certificate. */
async function pki(
  dir: string,
): Promise<Record<'ca' | 'cert' | 'key' | 'agentCert' | 'agentKey', Buffer>> {
  const o = (...a: string[]): Promise<unknown> => run('openssl', a);
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  await o(
    'req',
    '-x509',
    ...ec,
    '-keyout',
    join(dir, 'ca.key'),
    '-out',
    join(dir, 'ca.crt'),
    '-days',
    '1',
    '-subj',
    '/CN=bench-ca',
  );
  for (const [name, ext] of [
    ['server', 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n'],
    ['agent', 'extendedKeyUsage=clientAuth\n'],
  ] as const) {
    await writeFile(join(dir, `${name}.ext`), ext);
    await o(
      'req',
      ...ec,
      '-keyout',
      join(dir, `${name}.key`),
      '-out',
      join(dir, `${name}.csr`),
      '-subj',
      `/CN=${name}`,
    );
    await o(
      'x509',
      '-req',
      '-in',
      join(dir, `${name}.csr`),
      '-CA',
      join(dir, 'ca.crt'),
      '-CAkey',
      join(dir, 'ca.key'),
      '-CAcreateserial',
      '-out',
      join(dir, `${name}.crt`),
      '-days',
      '1',
      '-extfile',
      join(dir, `${name}.ext`),
    );
  }
  const f = (n: string): Promise<Buffer> => readFile(join(dir, n));
  return {
    ca: await f('ca.crt'),
    cert: await f('server.crt'),
    key: await f('server.key'),
    agentCert: await f('agent.crt'),
    agentKey: await f('agent.key'),
  };
}

/** Chunk i: fresh random bytes for 3 of 4 chunks (a resend differs from the point), else zero. */
function chunk(i: number, buf: Buffer): boolean {
  if (i % 4 === 3) return false;
  randomFillSync(buf);
  buf.writeUInt32LE(i, 0);
  return true;
}

async function main(): Promise<void> {
  await mkdir(join(ROOT, 'bench', 'out'), { recursive: true });
  const dir = await mkdtemp(join(ROOT, 'bench', 'out', 'resync-baseline-'));
  try {
    const p = await pki(dir);
    const storeDir = join(dir, 'store');
    const init = await Store.init({
      backend: new DirectoryBackend({ path: storeDir }),
      passphrase: 'bench',
    });
    await init.close();
    const server = await ProcessServer.start({
      storeWorkers: { count: 2, spec: { kind: 'directory', path: storeDir, passphrase: 'bench' } },
      journalDir: join(dir, 'ps'),
      journalMaxBytes: 4 * 1024 * MiB,
      tls: { cert: p.cert, key: p.key, ca: p.ca },
      host: '127.0.0.1',
      port: 0,
      healthPort: null,
      logLevel: 'silent',
    });
    const client = new ReplicationClient({
      host: '127.0.0.1',
      port: server.port,
      ca: p.ca,
      cert: p.agentCert,
      key: p.agentKey,
      machine: 'bench-resync',
      disks: [{ name: 'vda', size: SIZE }],
    });
    try {
      await client.start();
      const chunks = SIZE / CHUNK;
      let dataChunks = 0;
      // Sends every data chunk; each buffer is the client's until acknowledged.
      const sendAll = async (): Promise<void> => {
        for (let i = 0; i < chunks; i++) {
          const b = Buffer.allocUnsafe(CHUNK);
          if (chunk(i, b)) await client.write('vda', i * CHUNK, b);
        }
      };
      for (let i = 0; i < chunks; i++) if (i % 4 !== 3) dataChunks++;
      const dataBytes = dataChunks * CHUNK;
      let t = performance.now();
      await sendAll();
      await client.cut();
      await client.waitForCommit();
      const initialS = (performance.now() - t) / 1000;

      // The baseline.
      const wireBefore = client.stats;
      t = performance.now();
      const baseline = await client.resyncBaseline('vda');
      const baselineS = (performance.now() - t) / 1000;
      if (!baseline) throw new Error('no baseline');
      // The agent's comparison: digest each chunk as read (the disk read itself is not measured).
      t = performance.now();
      let same = 0;
      const b = Buffer.allocUnsafe(CHUNK);
      randomFillSync(b);
      for (let i = 0; i < chunks; i++) {
        if (i % 4 === 3) continue;
        if (baseline.idAt(i * CHUNK) === baseline.idOf(b)) same++;
      }
      const compareS = (performance.now() - t) / 1000;
      if (same !== 0)
        throw new Error('the random content should differ from the point at every chunk');
      const baselineWire = chunks * 17 + Math.ceil(chunks / 61680) * (24 + 16) + 300;

      // The reference: every allocated chunk sent again.
      t = performance.now();
      await sendAll();
      await client.cut();
      await client.waitForAck();
      const resendAckS = (performance.now() - t) / 1000;
      await client.waitForCommit();
      const resendCommitS = (performance.now() - t) / 1000;
      const resendWire = client.stats.bytesSent - wireBefore.bytesSent;

      const mb = (n: number): string => (n / MiB).toFixed(1);
      console.log(
        `machine: ${cpus().length} cores, load ${loadavg()
          .map((l) => l.toFixed(1))
          .join(' ')} at the end`,
      );
      console.log(
        `disk ${mb(SIZE)} MiB, ${mb(dataBytes)} MiB of data in ${dataChunks} chunks; initial replication ${initialS.toFixed(1)} s`,
      );
      console.log(
        `baseline: ${baselineS.toFixed(2)} s (server reads and digests ${(dataBytes / MiB / baselineS).toFixed(0)} MB/s of data), ${mb(baselineWire)} MiB on the wire`,
      );
      console.log(
        `agent compare (HMAC of its chunks): ${compareS.toFixed(2)} s, ${(dataBytes / MiB / compareS).toFixed(0)} MB/s`,
      );
      console.log(
        `resend without baseline: ${resendAckS.toFixed(1)} s journaled, ${resendCommitS.toFixed(1)} s committed, ${mb(resendWire)} MiB on the wire`,
      );
      console.log(
        `baseline vs resend: ${(baselineS / resendCommitS).toFixed(2)}x the time, ${(baselineWire / resendWire).toFixed(4)}x the bytes (when nothing changed, the baseline resync sends nothing)`,
      );
    } finally {
      await client.close();
      await server.stop();
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
