// Benchmark of issue 3 (the process server): N agents (1, 10, 100 machines) stream random
// changed extents over loopback mutual TLS into a process server (its own Node.js process)
// writing to a directory store. Prints, in one run:
// - the store's own import rate (WriteSession.write + commit, no protocol, no journal) as the
//   reference, measured before and after each phase, and the process server's sustained rate
//   end to end (acked, journaled, committed) against the mean of the two around it;
// - both against 23 MB/s (the commercial service's 2 TB/day process server);
// - commit latency cut -> committed point (p50, p99) with 10 machines at half the sustained rate;
// - peak RSS of the process server with 100 machines.
//
//   npx tsx bench/process-server-ingest.ts [--seconds 10] [--machines 1,10,100] [--workers 2]
//     [--crypto-threads N]   (crypto threads of each worker's store; default the server's)
//     [--cpu-prof DIR]   (CPU profiles of the process server and its worker threads, in DIR)
//     [--from-sources]   (the server from TypeScript through tsx; default: built dist/, as the CLI runs it)
//     [--mem-log FILE]   (memory of the server's threads every 200 ms, JSON lines; see logMemory)
//
// Everything lives in a temp dir under bench/out/ and is removed at the end.
import { spawn } from 'node:child_process';
import type { ChildProcess } from 'node:child_process';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { cpus } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const SELF = fileURLToPath(import.meta.url);
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const MiB = 1024 * 1024;
const DISK = 1024 * MiB;
const EXTENT = 256 * 1024;
const CUT_EVERY = 4 * MiB;
/** Rates are in MB/s (10^6 bytes), as the commercial figure is: 2 TB a day is 23.1 MB/s. */
const MB = 1e6;
const REF_MB_S = 2e12 / 86_400 / MB;
const WORKERS = Number(
  process.argv.includes('--workers') ? process.argv[process.argv.indexOf('--workers') + 1] : 2,
);
const run = promisify(execFile);

const args = process.argv.slice(2);
const arg = (name: string, dflt: string): string => {
  const i = args.indexOf(name);
  return i >= 0 ? (args[i + 1] ?? dflt) : dflt;
};

interface ServeConfig {
  storeDir: string;
  journalDir: string;
  certPath: string;
  keyPath: string;
  caPath: string;
  workers: number;
  cryptoThreads?: number;
}

/** The process server child. */
async function serve(cfg: ServeConfig): Promise<void> {
  const { ProcessServer } = await import('@lifeboat/process-server');
  const { DirectoryBackend, Store } = await import('@lifeboat/store');
  // Store work on worker threads, as `lifeboat process-server start` does by default (--workers 0: on the ingest thread).
  const store =
    cfg.workers === 0
      ? await Store.open({
          backend: new DirectoryBackend({ path: cfg.storeDir, directWrites: true }),
          passphrase: 'bench',
        })
      : undefined;
  const server = await ProcessServer.start({
    ...(store
      ? { store }
      : {
          storeWorkers: {
            count: cfg.workers,
            ...(process.env['LIFEBOAT_MEM_LOG']
              ? { memLogFile: process.env['LIFEBOAT_MEM_LOG'] }
              : {}),
            spec: {
              kind: 'directory' as const,
              path: cfg.storeDir,
              passphrase: 'bench',
              ...(cfg.cryptoThreads === undefined ? {} : { cryptoThreads: cfg.cryptoThreads }),
            },
          },
        }),
    journalDir: cfg.journalDir,
    tls: {
      cert: await readFile(cfg.certPath),
      key: await readFile(cfg.keyPath),
      ca: await readFile(cfg.caPath),
    },
    host: '127.0.0.1',
    port: 0,
    healthPort: 0,
    journalMaxBytes: 2048 * MiB,
    logLevel: 'warn',
  });
  const memLog = process.env['LIFEBOAT_MEM_LOG'];
  if (memLog) await logMemory(memLog);
  process.stdout.write(`${JSON.stringify({ port: server.port, healthPort: server.healthPort })}\n`);
  process.on('SIGTERM', () => {
    void server
      .stop()
      .then(() => store?.close())
      .finally(() => process.exit(0));
  });
}

/**
 * `--mem-log FILE`: the server's main thread appends a JSON line every 200 ms (RSS, anonymous
 * and file-backed RSS, V8 heap, ArrayBuffers, the frame pool's counters), its store worker
 * threads theirs (store-worker-main.ts); at exit, /proc/self/smaps of the highest RSS seen goes
 * to FILE.smaps.PID (which mappings hold it: glibc's heap and arenas, V8 pages, files).
 */
async function logMemory(file: string): Promise<void> {
  const { appendFileSync, readFileSync } = await import('node:fs');
  const { getHeapStatistics } = await import('node:v8');
  const { frameBufferPool } = await import('@lifeboat/protocol');
  const peak = { rss: 0, smaps: '' };
  process.on('SIGTERM', () => appendFileSync(`${file}.smaps.${process.pid}`, peak.smaps));
  setInterval(() => {
    const m = process.memoryUsage();
    const status = readFileSync('/proc/self/status', 'utf8');
    const kib = (k: string): number =>
      Number(new RegExp(`${k}:\\s+(\\d+)`).exec(status)?.[1] ?? 0) * 1024;
    if (m.rss > peak.rss) {
      peak.rss = m.rss;
      peak.smaps = readFileSync('/proc/self/smaps', 'utf8');
    }
    const line = {
      t: Date.now(),
      thread: 0,
      rss: m.rss,
      rssAnon: kib('RssAnon'),
      rssFile: kib('RssFile'),
      heapTotal: m.heapTotal,
      heapUsed: m.heapUsed,
      external: m.external,
      arrayBuffers: m.arrayBuffers,
      heapPhysical: getHeapStatistics().total_physical_size,
      pool: { ...frameBufferPool.counters, heldBytes: frameBufferPool.heldBytes },
    };
    appendFileSync(file, `${JSON.stringify(line)}\n`);
  }, 200).unref();
}

/** A pool of random bytes; each extent is a slice with a unique counter stamped in every 64 KiB so nothing dedups. */
class ExtentSource {
  private readonly pool = randomBytes(64 * MiB);
  private n = 0;
  next(length: number): Buffer {
    const at = Math.floor((Math.random() * (this.pool.length - length)) / 4096) * 4096;
    const b = Buffer.from(this.pool.subarray(at, at + length));
    for (let o = 0; o < length; o += 65536) b.writeDoubleLE(++this.n + Math.random(), o);
    return b;
  }
}

async function pki(dir: string): Promise<{
  ca: Buffer;
  caPath: string;
  certPath: string;
  keyPath: string;
  client: { cert: Buffer; key: Buffer };
}> {
  const o = (...a: string[]): Promise<unknown> => run('openssl', a);
  await o(
    'req',
    '-x509',
    '-newkey',
    'ec',
    '-pkeyopt',
    'ec_paramgen_curve:P-256',
    '-nodes',
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
      '-newkey',
      'ec',
      '-pkeyopt',
      'ec_paramgen_curve:P-256',
      '-nodes',
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
  return {
    ca: await readFile(join(dir, 'ca.crt')),
    caPath: join(dir, 'ca.crt'),
    certPath: join(dir, 'server.crt'),
    keyPath: join(dir, 'server.key'),
    client: {
      cert: await readFile(join(dir, 'agent.crt')),
      key: await readFile(join(dir, 'agent.key')),
    },
  };
}

interface Health {
  process: { rssBytes: number; cpuPercent: number };
  journal: { usedBytes: number; framesPerSync: number };
  ingest: { commitLatencyMs: { p50: number; p99: number; samples: number } };
  machines: Array<{ machine: string; backlogBytes: number; lastSeq: number; committedSeq: number }>;
}

async function startServer(
  cfg: ServeConfig,
): Promise<{ child: ChildProcess; port: number; health: () => Promise<Health> }> {
  const prof = args.includes('--cpu-prof')
    ? ['--cpu-prof', '--cpu-prof-dir', arg('--cpu-prof', '')]
    : [];
  // The server runs the packages as `lifeboat process-server start` does: built JavaScript
  // (dist/, from `npx tsc -b`), its store worker threads too. Only this script itself goes
  // through tsx. `--from-sources` runs them from TypeScript as before 2026-12-02 23:00 UTC
  // (every worker thread then loads tsx and its compiler: tens of MiB each).
  const sources = args.includes('--from-sources') ? ['--conditions=source'] : [];
  if (
    sources.length === 0 &&
    !existsSync(new URL('../packages/process-server/dist/index.js', import.meta.url))
  )
    throw new Error('The packages are not built: run "npx tsc -b" first (or pass --from-sources).');
  const child = spawn(
    process.execPath,
    [...prof, ...sources, '--import', 'tsx', SELF, '--serve', JSON.stringify(cfg)],
    {
      stdio: ['ignore', 'pipe', 'inherit'],
      env: args.includes('--mem-log')
        ? { ...process.env, LIFEBOAT_MEM_LOG: arg('--mem-log', '') }
        : process.env,
    },
  );
  const line = await new Promise<string>((resolve, reject) => {
    createInterface({ input: child.stdout! }).once('line', resolve);
    child.once('exit', (c) => reject(new Error(`server exited ${c}`)));
  });
  const { port, healthPort } = JSON.parse(line) as { port: number; healthPort: number };
  return {
    child,
    port,
    health: async () =>
      (await (await fetch(`http://127.0.0.1:${healthPort}/health`)).json()) as Health,
  };
}

async function stopServer(child: ChildProcess): Promise<void> {
  const gone = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  await gone;
}

async function newStore(dir: string): Promise<void> {
  const { DirectoryBackend, Store } = await import('@lifeboat/store');
  const s = await Store.init({
    backend: new DirectoryBackend({ path: dir }),
    passphrase: 'bench',
    kdfCost: 1024,
  });
  await s.close();
}

/** The reference: the store's own import rate for the same extents, in this process. */
async function storeImportRate(dir: string, seconds: number, src: ExtentSource): Promise<number> {
  const { DirectoryBackend, Store } = await import('@lifeboat/store');
  // Packs past the page cache, as the process server writes them (openWorkerStore): the
  // reference measures the same store, not a slower one (buffered, it ran 110-116 MB/s here
  // where direct it ran 139).
  const store = await Store.open({
    backend: new DirectoryBackend({ path: dir, directWrites: true }),
    passphrase: 'bench',
  });
  const start = performance.now();
  let bytes = 0;
  // Each session names the point before it as its base, as the process server does (it
  // knows the point it committed last); the default, the disk's latest point, lists every
  // point of the store on each begin, which made this reference slower the longer it ran.
  let session = await store.beginWrite({ machine: 'ref', disk: 'vda', size: DISK });
  let sinceCut = 0;
  while (performance.now() - start < seconds * 1000) {
    const data = src.next(EXTENT);
    await session.write(Math.floor(Math.random() * (DISK / EXTENT)) * EXTENT, data);
    bytes += data.length;
    sinceCut += data.length;
    if (sinceCut >= CUT_EVERY) {
      const point = await session.commit();
      session = await store.beginWrite({ machine: 'ref', disk: 'vda', size: DISK, base: point.id });
      sinceCut = 0;
    }
  }
  await session.commit();
  const rate = bytes / MB / ((performance.now() - start) / 1000);
  await store.close();
  return rate;
}

interface PhaseResult {
  machines: number;
  ackMBs: number;
  endToEndMBs: number;
  peakRssMiB: number;
  framesPerSync: number;
  /** CPU seconds of the server process (every thread) per GB ingested. */
  cpuSecondsPerGB: number;
  latency?: { p50: number; p99: number; samples: number };
}

/** N agents stream for `seconds` (optionally paced to `paceMBs` in all); returns rates and peak RSS. */
async function phase(
  base: string,
  p: Awaited<ReturnType<typeof pki>>,
  machines: number,
  seconds: number,
  src: ExtentSource,
  paceMBs?: number,
): Promise<PhaseResult> {
  const { ReplicationClient } = await import('@lifeboat/protocol');
  const dir = await mkdtemp(join(base, `n${machines}-`));
  await newStore(join(dir, 'store'));
  const server = await startServer({
    storeDir: join(dir, 'store'),
    journalDir: join(dir, 'journal'),
    certPath: p.certPath,
    keyPath: p.keyPath,
    caPath: p.caPath,
    workers: WORKERS,
    ...(args.includes('--crypto-threads')
      ? { cryptoThreads: Number(arg('--crypto-threads', '0')) }
      : {}),
  });
  let peakRss = 0;
  let last: Health | undefined;
  const sampler = setInterval(() => {
    void server
      .health()
      .then((h) => {
        last = h;
        peakRss = Math.max(peakRss, h.process.rssBytes);
      })
      .catch(() => undefined);
  }, 250);
  const clients = Array.from(
    { length: machines },
    (_, i) =>
      new ReplicationClient({
        host: '127.0.0.1',
        port: server.port,
        ca: p.ca,
        cert: p.client.cert,
        key: p.client.key,
        machine: `bench-${i}`,
        disks: [{ name: 'vda', size: DISK }],
        maxInFlightBytes: machines >= 100 ? 2 * MiB : 16 * MiB,
      }),
  );
  await Promise.all(clients.map((c) => c.start()));
  const start = performance.now();
  let sent = 0;
  let stop = false;
  const perMachineBytesPerMs = paceMBs === undefined ? undefined : (paceMBs * MB) / machines / 1000;
  await Promise.all(
    clients.map(async (c) => {
      let mine = 0;
      let sinceCut = 0;
      let lastCut = performance.now();
      while (!stop) {
        if (performance.now() - start > seconds * 1000) stop = true;
        const data = src.next(EXTENT);
        await c.write('vda', Math.floor(Math.random() * (DISK / EXTENT)) * EXTENT, data);
        mine += data.length;
        sent += data.length;
        sinceCut += data.length;
        // Unpaced: a cut every 4 MiB per machine. Paced: a cut every second, like an agent.
        if (
          perMachineBytesPerMs === undefined
            ? sinceCut >= CUT_EVERY
            : performance.now() - lastCut >= 1000
        ) {
          await c.cut();
          sinceCut = 0;
          lastCut = performance.now();
        }
        if (perMachineBytesPerMs !== undefined) {
          const ahead = mine / perMachineBytesPerMs - (performance.now() - start);
          if (ahead > 0) await new Promise((r) => setTimeout(r, ahead));
        }
      }
      await c.cut();
    }),
  );
  await Promise.all(clients.map((c) => c.waitForAck()));
  const acked = (performance.now() - start) / 1000;
  for (;;) {
    const h = await server.health();
    last = h;
    peakRss = Math.max(peakRss, h.process.rssBytes);
    if (
      h.machines.length === machines &&
      h.machines.every((m) => m.backlogBytes === 0 && m.committedSeq === m.lastSeq)
    )
      break;
    await new Promise((r) => setTimeout(r, 100));
  }
  const drained = (performance.now() - start) / 1000;
  clearInterval(sampler);
  // The server's CPU time (all its threads), from /proc: per GB it varies less with the load of
  // a shared machine than the rates do.
  const stat = (await readFile(`/proc/${server.child.pid}/stat`, 'utf8'))
    .split(') ')[1]!
    .split(' ');
  const cpuSeconds = (Number(stat[11]) + Number(stat[12])) / 100;
  for (const c of clients) await c.close();
  await stopServer(server.child);
  await rm(dir, { recursive: true, force: true });
  const result: PhaseResult = {
    machines,
    ackMBs: sent / MB / acked,
    endToEndMBs: sent / MB / drained,
    peakRssMiB: peakRss / MiB,
    framesPerSync: last?.journal.framesPerSync ?? 0,
    cpuSecondsPerGB: cpuSeconds / (sent / 1e9),
  };
  if (paceMBs !== undefined && last) result.latency = last.ingest.commitLatencyMs;
  return result;
}

async function main(): Promise<void> {
  const seconds = Number(arg('--seconds', '10'));
  const counts = arg('--machines', '1,10,100').split(',').map(Number);
  await mkdir(join(ROOT, 'bench', 'out'), { recursive: true });
  const base = await mkdtemp(join(ROOT, 'bench', 'out', 'ps-ingest-'));
  try {
    const p = await pki(base);
    const src = new ExtentSource();
    console.log(
      `process server ingest: ${cpus().length} CPUs, ${WORKERS} store worker threads, ${seconds} s per phase, extents of ${EXTENT / 1024} KiB (random, no dedup), cut every ${CUT_EVERY / MiB} MiB per machine`,
    );
    // The reference runs before every phase and once after the last, each in a fresh store,
    // and a phase is compared with the mean of the runs just before and after it: on this
    // shared VM the store's own rate drifted from 103 to 165 MB/s between runs minutes apart,
    // and one reference at the start made the ratios of later phases a matter of luck.
    let refRuns = 0;
    const reference = async (): Promise<number> => {
      const dir = join(base, `ref-${refRuns++}`);
      await newStore(dir);
      const rate = await storeImportRate(dir, seconds, src);
      await rm(dir, { recursive: true, force: true });
      console.log(`reference: the store's own import rate ${rate.toFixed(1)} MB/s`);
      return rate;
    };
    const results: Array<PhaseResult & { ref: number }> = [];
    const refs = [await reference()];
    const pending: PhaseResult[] = [];
    for (const n of counts) {
      pending.push(await phase(base, p, n, seconds, src));
      refs.push(await reference());
    }
    for (const [i, r] of pending.entries()) {
      const ref = (refs[i]! + refs[i + 1]!) / 2;
      results.push({ ...r, ref });
      console.log(
        `${r.machines} machines: acked ${r.ackMBs.toFixed(1)} MB/s, end to end ${r.endToEndMBs.toFixed(1)} MB/s (${(r.endToEndMBs / ref).toFixed(2)}x the store's import of ${ref.toFixed(1)} MB/s around it, ${(r.endToEndMBs / REF_MB_S).toFixed(1)}x 23.1 MB/s), peak RSS ${r.peakRssMiB.toFixed(0)} MiB, ${r.framesPerSync.toFixed(1)} frames per fsync, server CPU ${r.cpuSecondsPerGB.toFixed(1)} s/GB`,
      );
    }
    const ten = results.find((r) => r.machines === 10) ?? results[0]!;
    const half = ten.endToEndMBs / 2;
    const lat = await phase(base, p, 10, Math.max(seconds, 10), src, half);
    console.log(
      `commit latency, 10 machines at ${half.toFixed(1)} MB/s (half the sustained rate), a cut per machine per second: p50 ${lat.latency?.p50.toFixed(0)} ms, p99 ${lat.latency?.p99.toFixed(0)} ms over ${lat.latency?.samples} cuts; server CPU ${lat.cpuSecondsPerGB.toFixed(1)} s/GB, peak RSS ${lat.peakRssMiB.toFixed(0)} MiB`,
    );
    console.log(
      '\n| machines | acked MB/s | end to end MB/s | store import MB/s (around) | vs store import | vs 23.1 MB/s | peak RSS MiB | frames/fsync | server CPU s/GB |',
    );
    console.log('|---|---|---|---|---|---|---|---|---|');
    for (const r of results)
      console.log(
        `| ${r.machines} | ${r.ackMBs.toFixed(1)} | ${r.endToEndMBs.toFixed(1)} | ${r.ref.toFixed(1)} | ${(r.endToEndMBs / r.ref).toFixed(2)} | ${(r.endToEndMBs / REF_MB_S).toFixed(1)}x | ${r.peakRssMiB.toFixed(0)} | ${r.framesPerSync.toFixed(1)} | ${r.cpuSecondsPerGB.toFixed(1)} |`,
      );
  } finally {
    await rm(base, { recursive: true, force: true });
  }
}

// The packages are imported from their TypeScript sources: re-run under the "source" condition.
if (!process.execArgv.some((a) => a.includes('conditions=source')) && !args.includes('--serve')) {
  const c = spawn(process.execPath, ['--conditions=source', '--import', 'tsx', SELF, ...args], {
    stdio: 'inherit',
  });
  c.on('exit', (code) => process.exit(code ?? 1));
} else if (args.includes('--serve')) {
  await serve(JSON.parse(arg('--serve', '{}')) as ServeConfig);
} else {
  await main();
}
