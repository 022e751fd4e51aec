// Benchmark of the agent's achieved RPO. A writer writes random 4-64 KiB blocks through a second
// NBD export of qemu-storage-daemon (the same block node the agent tracks) at fixed rates; the
// agent cuts every --interval and streams through the ReplicationClient (mutual TLS) to a
// process server committing points to a directory store. Per rate, in one run:
//   - RPO: age of the newest committed point (agent's cut time), sampled every second: p50, p99;
//   - the writer's throughput with replication on, against the same writer with it off
//     (reference, measured first in the same run);
//   - bytes sent by the agent against bytes written (amplification of 64 KiB tracking).
//
//   npx tsx bench/agent-rpo.ts [--rates 5,20,50] [--seconds 120] [--ref-seconds 30]
//                              [--interval-ms 2000] [--size-mib 2048] [--workers 2]
//                              [--catch-up-s 60] [--trace] [--crypto-threads N]
//
// The process server runs its store work on --workers threads, as `lifeboat process-server
// start` does (0: on the ingest thread). After each writer phase the benchmark waits at most
// --catch-up-s for a point that covers the last write; a rate the server cannot follow is
// reported with the backlog it still held then, instead of never finishing.
//
// Everything lives in a temp dir under bench/out/ and is removed at the end.
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { cpus, loadavg } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { Agent } from '@lifeboat/agent';
import type { CutReport } from '@lifeboat/agent';
import { NbdClient } from '@lifeboat/nbd';
import { ProcessServer } from '@lifeboat/process-server';
import type { CommittedCut } from '@lifeboat/process-server';
import { ReplicationClient } from '@lifeboat/protocol';
import { DirectoryBackend, Store } from '@lifeboat/store';
import { startStorageDaemon } from '@lifeboat/testing';

const exec = promisify(execFile);
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const args = process.argv.slice(2);
const arg = (name: string, def: string): string => {
  const i = args.indexOf(name);
  return i >= 0 ? (args[i + 1] ?? def) : def;
};
const RATES = arg('--rates', '5,20,50').split(',').map(Number);
const SECONDS = Number(arg('--seconds', '120'));
const REF_SECONDS = Number(arg('--ref-seconds', '30'));
const INTERVAL_MS = Number(arg('--interval-ms', '2000'));
const SIZE_MIB = Number(arg('--size-mib', '2048'));
const WORKERS = Number(arg('--workers', '2'));
const CATCH_UP_S = Number(arg('--catch-up-s', '60'));
const TRACE = args.includes('--trace');
const CRYPTO = args.includes('--crypto-threads')
  ? { cryptoThreads: Number(arg('--crypto-threads', '0')) }
  : {};
const MB = 1e6;

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] ?? NaN;
}

async function pki(dir: string): Promise<{
  ca: Buffer;
  server: { cert: Buffer; key: Buffer };
  client: { cert: Buffer; key: Buffer };
}> {
  const ossl = (a: string[]): Promise<unknown> => exec('openssl', a);
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes'];
  await ossl([
    'req',
    '-x509',
    ...ec,
    '-keyout',
    join(dir, 'ca.key'),
    '-out',
    join(dir, 'ca.crt'),
    '-days',
    '2',
    '-subj',
    '/CN=bench-ca',
  ]);
  const leaf = async (name: string, ext: string): Promise<{ cert: Buffer; key: Buffer }> => {
    await writeFile(join(dir, `${name}.ext`), ext);
    await ossl([
      'req',
      ...ec,
      '-keyout',
      join(dir, `${name}.key`),
      '-out',
      join(dir, `${name}.csr`),
      '-subj',
      `/CN=${name}`,
    ]);
    await ossl([
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
      '2',
      '-extfile',
      join(dir, `${name}.ext`),
    ]);
    return {
      cert: await readFile(join(dir, `${name}.crt`)),
      key: await readFile(join(dir, `${name}.key`)),
    };
  };
  return {
    ca: await readFile(join(dir, 'ca.crt')),
    server: await leaf(
      'server',
      'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n',
    ),
    client: await leaf('agent', 'extendedKeyUsage=clientAuth\n'),
  };
}

/** Random 4-64 KiB writes at `rate` MB/s (up to 8 in flight) for `seconds`; returns bytes written. */
async function write(
  nbd: NbdClient,
  rate: number,
  seconds: number,
  sizeBytes: number,
): Promise<number> {
  const pool = randomBytes(64 * 1024 + 4096 * 64);
  const start = performance.now();
  const end = start + seconds * 1000;
  let written = 0;
  const inFlight = new Set<Promise<void>>();
  while (performance.now() < end) {
    // Pace: never ahead of rate x elapsed time.
    const allowed = ((performance.now() - start) / 1000) * rate * MB;
    if (written > allowed) {
      await new Promise((r) =>
        setTimeout(r, Math.min(20, ((written - allowed) / (rate * MB)) * 1000)),
      );
      continue;
    }
    const len = 4096 * (1 + Math.floor(Math.random() * 16));
    const offset = 4096 * Math.floor(Math.random() * ((sizeBytes - len) / 4096));
    const at = 4096 * Math.floor(Math.random() * 64);
    const p = nbd.write(offset, pool.subarray(at, at + len)).then(() => {
      inFlight.delete(p);
    });
    inFlight.add(p);
    written += len;
    if (inFlight.size >= 8) await Promise.race(inFlight);
  }
  await Promise.all(inFlight);
  return written / ((performance.now() - start) / 1000);
}

async function main(): Promise<void> {
  await mkdir(join(ROOT, 'bench/out'), { recursive: true });
  const dir = await mkdtemp(join(ROOT, 'bench/out/agent-rpo-'));
  const certs = await pki(dir);
  const store = await Store.init({
    backend: new DirectoryBackend({ path: join(dir, 'store') }),
    passphrase: 'bench',
    kdfCost: 1024,
  });
  if (WORKERS > 0) await store.close();
  const server = await ProcessServer.start({
    ...(WORKERS > 0
      ? {
          storeWorkers: {
            count: WORKERS,
            spec: {
              kind: 'directory' as const,
              path: join(dir, 'store'),
              passphrase: 'bench',
              ...CRYPTO,
            },
          },
        }
      : { store }),
    journalDir: join(dir, 'journal'),
    tls: { cert: certs.server.cert, key: certs.server.key, ca: certs.ca },
    host: '127.0.0.1',
    port: 0,
    healthPort: null,
    logLevel: 'silent',
  });
  const rows: string[] = [];
  console.log(
    `agent RPO benchmark: rates ${RATES.join(', ')} MB/s, ${SECONDS} s each (reference ${REF_SECONDS} s), interval ${INTERVAL_MS} ms, ${SIZE_MIB} MiB qcow2, ${WORKERS} store worker threads; ${cpus().length} CPUs, load ${loadavg()
      .map((l) => l.toFixed(1))
      .join(' ')}`,
  );
  try {
    for (const rate of RATES) {
      const size = SIZE_MIB * 1024 * 1024;
      // Reference: the same writer on its own disk, nothing tracking it.
      const refImg = join(dir, `ref-${rate}.qcow2`);
      await exec('qemu-img', ['create', '-q', '-f', 'qcow2', refImg, `${SIZE_MIB}M`]);
      const refQsd = await startStorageDaemon({ disks: [{ path: refImg, exportName: 'guest' }] });
      const refNbd = await NbdClient.connect(
        { path: refQsd.nbdSocket as string },
        { exportName: 'guest' },
      );
      const refRate = await write(refNbd, rate, REF_SECONDS, size);
      await refNbd.close();
      await refQsd.stop();
      await rm(refImg, { force: true });

      const img = join(dir, `disk-${rate}.qcow2`);
      await exec('qemu-img', ['create', '-q', '-f', 'qcow2', img, `${SIZE_MIB}M`]);
      const qsd = await startStorageDaemon({ disks: [{ path: img, exportName: 'guest' }] });
      const nbd = await NbdClient.connect(
        { path: qsd.nbdSocket as string },
        { exportName: 'guest' },
      );
      const machine = `bench-${rate}`;
      const client = new ReplicationClient({
        host: '127.0.0.1',
        port: server.port,
        servername: 'localhost',
        ca: certs.ca,
        cert: certs.client.cert,
        key: certs.client.key,
        machine,
        disks: [{ name: 'disk0', size }],
      });
      await client.start();
      const agent = new Agent({
        qmpSocket: qsd.qmpSocket,
        nbdSocket: qsd.nbdSocket as string,
        machine,
        sink: client,
        stateDir: join(dir, `agent-${rate}`),
        intervalMs: INTERVAL_MS,
      });
      let newest = 0;
      const commitDelay: number[] = [];
      const onCommit = (c: CommittedCut): void => {
        if (c.machine !== machine) return;
        newest = Math.max(newest, c.time.getTime());
        commitDelay.push((Date.now() - c.time.getTime()) / 1000);
        // --trace: when each point committed and how old its cut was then, to find stalls.
        if (TRACE)
          console.error(
            `trace ${rate} MB/s: ${new Date().toISOString()} cut age at commit ${((Date.now() - c.time.getTime()) / 1000).toFixed(1)} s`,
          );
      };
      server.on('committed', onCommit);
      let lagged = 0;
      const parts = { cut: [] as number[], send: [] as number[], ack: [] as number[] };
      agent.on('cut', (c: CutReport) => {
        if (c.lagMs > 0) lagged++;
        parts.cut.push(c.cutMs);
        parts.send.push(c.sendMs);
        parts.ack.push(c.ackMs);
      });
      await agent.start();
      while (newest === 0) await new Promise((r) => setTimeout(r, 50));
      const sentBefore = agent.bytesSent;
      const rpo: number[] = [];
      const sampler = setInterval(() => rpo.push((Date.now() - newest) / 1000), 1000);
      const onRate = await write(nbd, rate, SECONDS, size);
      clearInterval(sampler);
      // Let the last writes reach a point, so the bytes sent cover the bytes written; a server
      // that cannot follow this rate gets CATCH_UP_S, then its backlog is reported.
      const doneAt = Date.now();
      while (newest < doneAt && Date.now() - doneAt < CATCH_UP_S * 1000)
        await new Promise((r) => setTimeout(r, 50));
      const caughtUp = newest >= doneAt;
      const catchUpS = (Date.now() - doneAt) / 1000;
      const mh = server.healthReport().machines.find((m) => m.machine === machine);
      const backlogMiB = (mh?.backlogBytes ?? 0) / 1024 / 1024;
      const endRpo = (Date.now() - newest) / 1000;
      const sent = agent.bytesSent - sentBefore;
      await agent.stop();
      server.off('committed', onCommit);
      await client.close();
      await nbd.close();
      await qsd.stop();
      await rm(img, { force: true });
      const written = onRate * SECONDS;
      const row = `| ${rate} | ${pct(rpo, 50).toFixed(1)} | ${pct(rpo, 99).toFixed(1)} | ${(refRate / MB).toFixed(1)} | ${(onRate / MB).toFixed(1)} | ${(onRate / refRate).toFixed(3)} | ${(sent / written).toFixed(2)} | ${lagged} | ${pct(parts.cut, 50).toFixed(0)} / ${pct(parts.send, 50).toFixed(0)} / ${pct(parts.ack, 50).toFixed(0)} | ${pct(commitDelay, 50).toFixed(1)} / ${pct(commitDelay, 99).toFixed(1)} | ${caughtUp ? `yes, ${catchUpS.toFixed(1)} s` : `no: ${backlogMiB.toFixed(0)} MiB backlog, RPO ${endRpo.toFixed(0)} s after ${catchUpS.toFixed(0)} s`} |`;
      rows.push(row);
      console.log(
        `${row}  (load ${loadavg()
          .map((l) => l.toFixed(1))
          .join(' ')})`,
      );
    }
  } finally {
    await server.stop();
    await store.close();
    await rm(dir, { recursive: true, force: true });
  }
  console.log(
    '\n| writer MB/s (target) | RPO p50 s | RPO p99 s | writer MB/s, replication off | writer MB/s, on | on/off | bytes sent / written | late cycles | agent cycle p50 ms: cut / send / ack | cut to committed s, p50 / p99 | caught up after the writer |',
  );
  console.log('|---|---|---|---|---|---|---|---|---|---|---|');
  for (const r of rows) console.log(r);
}

await main();
