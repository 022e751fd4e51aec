// Benchmark of the Azure Blob Storage backend on Azurite (started here), each figure against a
// reference measured in the same run:
//   - pack-sized objects (16 MiB): AzureBlobBackend put/get against the bare SDK
//     (BlockBlobClient.uploadData / downloadToBuffer with the SDK's defaults) on the same Azurite,
//     and against DirectoryBackend on the repository's disk;
//   - small objects (64 KiB, like index and tree objects): the request cap (maxConcurrency 1, 8, 32);
//   - a store write of random data through the Store API on Azure against the same on a directory.
// Azurite is a single Node.js process on this machine, so these figures say what the backend
// costs around the SDK and how the store behaves on it, not what Azure itself delivers.
//
//   npx tsx bench/store-azure.ts [--mib 256]
//
// Run after the README's setup (the packages must be built).
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { cpus } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { BlobServiceClient } from '@azure/storage-blob';
import { DirectoryBackend, Store, type ObjectBackend } from '@lifeboat/store';
import { AzureBlobBackend } from '@lifeboat/store-azure';
import { startAzurite } from '@lifeboat/testing';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const MiB = 1024 * 1024;
const args = process.argv.slice(2);
const mibArg = args.indexOf('--mib');
const TOTAL = (mibArg >= 0 ? Number(args[mibArg + 1]) : 256) * MiB;
const PACK = 16 * MiB;
const IN_FLIGHT = 4;

/** Runs `tasks` with at most `limit` at once. */
async function pool<T>(
  items: T[],
  limit: number,
  fn: (item: T, i: number) => Promise<void>,
): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(limit, items.length) }, async () => {
      while (next < items.length) {
        const i = next++;
        await fn(items[i] as T, i);
      }
    }),
  );
}

async function seconds(fn: () => Promise<void>): Promise<number> {
  const start = performance.now();
  await fn();
  return (performance.now() - start) / 1000;
}

function rate(bytes: number, s: number): string {
  return `${(bytes / MiB / s).toFixed(1)} MiB/s`;
}

async function main(): Promise<void> {
  await mkdir(join(ROOT, 'bench/out'), { recursive: true });
  const work = await mkdtemp(join(ROOT, 'bench/out/store-azure-'));
  const azurite = await startAzurite();
  const rows: string[][] = [];
  try {
    const service = BlobServiceClient.fromConnectionString(azurite.connectionString);
    const packs = Array.from({ length: Math.max(1, Math.round(TOTAL / PACK)) }, () =>
      randomBytes(PACK),
    );
    const bytes = packs.length * PACK;

    // Pack-sized objects: the bare SDK, the backend, the directory.
    const sdkContainer = service.getContainerClient('bench-sdk');
    await sdkContainer.create();
    const sdkPut = await seconds(() =>
      pool(packs, IN_FLIGHT, async (p, i) => {
        await sdkContainer.getBlockBlobClient(`packs/${i}`).uploadData(p);
      }),
    );
    const sdkGet = await seconds(() =>
      pool(packs, IN_FLIGHT, async (_, i) => {
        await sdkContainer.getBlockBlobClient(`packs/${i}`).downloadToBuffer();
      }),
    );
    const azure = new AzureBlobBackend({
      connectionString: azurite.connectionString,
      container: 'bench-backend',
      createContainer: true,
    });
    const dir = new DirectoryBackend({ path: join(work, 'dir') });
    const timeBackend = async (b: ObjectBackend): Promise<{ put: number; get: number }> => {
      const put = await seconds(() => pool(packs, IN_FLIGHT, (p, i) => b.put(`packs/${i}`, p)));
      const get = await seconds(() =>
        pool(packs, IN_FLIGHT, async (p, i) => {
          if (!(await b.get(`packs/${i}`)).equals(p)) throw new Error(`pack ${i} differs`);
        }),
      );
      return { put, get };
    };
    const az = await timeBackend(azure);
    const dr = await timeBackend(dir);
    rows.push(
      [
        'put 16 MiB objects',
        rate(bytes, sdkPut),
        rate(bytes, az.put),
        (sdkPut / az.put).toFixed(2),
        rate(bytes, dr.put),
      ],
      [
        'get 16 MiB objects',
        rate(bytes, sdkGet),
        rate(bytes, az.get),
        (sdkGet / az.get).toFixed(2),
        rate(bytes, dr.get),
      ],
    );

    // Small objects under the request cap.
    const small = Array.from({ length: 600 }, () => randomBytes(64 * 1024));
    const capRows: string[][] = [];
    let base = 0;
    for (const cap of [1, 8, 32]) {
      const b = new AzureBlobBackend({
        connectionString: azurite.connectionString,
        container: `bench-cap-${cap}`,
        createContainer: true,
        maxConcurrency: cap,
      });
      // Everything is offered at once: only the cap limits what is in flight.
      const s = await seconds(async () => {
        await Promise.all(small.map((d, i) => b.put(`index/${i}`, d)));
      });
      await b.close();
      const perSecond = small.length / s;
      if (cap === 1) base = perSecond;
      capRows.push([
        `maxConcurrency ${cap}`,
        `${perSecond.toFixed(0)} puts/s`,
        (perSecond / base).toFixed(2),
      ]);
    }

    // The store on each backend: one disk of random data, written and committed, then read.
    const storeBytes = Math.min(TOTAL, 128 * MiB);
    const disk = randomBytes(storeBytes);
    const storeRun = async (
      backend: () => ObjectBackend,
    ): Promise<{ write: number; stream: number; readAt: number }> => {
      const opened: Store[] = [];
      const open = async (): Promise<Store> => {
        const st = await Store.open({ backend: backend(), passphrase: 'bench' });
        opened.push(st);
        return st;
      };
      const store = await Store.init({ backend: backend(), passphrase: 'bench', kdfCost: 1024 });
      opened.push(store);
      try {
        let pointId = '';
        const write = await seconds(async () => {
          const s = await store.beginWrite({ machine: 'bench', disk: 'vda', size: storeBytes });
          for (let at = 0; at < storeBytes; at += 4 * MiB) {
            await s.write(at, disk.subarray(at, at + 4 * MiB));
          }
          pointId = (await s.commit()).id;
        });
        // Sequential streaming (restore, hydration), then random access in 1 MiB reads (what an
        // NBD client booting the point does), each from a fresh opening so no cache helps.
        const stream = await seconds(async () => {
          const r = await (await open()).openPoint(pointId);
          const parts: Buffer[] = [];
          for await (const c of r.stream()) parts.push(c as Buffer);
          if (!Buffer.concat(parts).equals(disk)) throw new Error('store stream differs');
        });
        const readAt = await seconds(async () => {
          const r = await (await open()).openPoint(pointId);
          for (let at = 0; at < storeBytes; at += MiB) {
            if (!(await r.readAt(at, MiB)).equals(disk.subarray(at, at + MiB))) {
              throw new Error('store readAt differs');
            }
          }
        });
        return { write, stream, readAt };
      } finally {
        for (const st of opened) await st.close();
      }
    };
    const onAzure = await storeRun(
      () =>
        new AzureBlobBackend({
          connectionString: azurite.connectionString,
          container: 'bench-store',
          createContainer: true,
        }),
    );
    const onDir = await storeRun(() => new DirectoryBackend({ path: join(work, 'store') }));

    // A changed-extents session on a 2 GiB disk with data in every leaf of its tree: one 64 KiB
    // chunk changed per leaf (128), each round from a fresh opening (no node cached), the
    // session told the ranges first (WriteSession.prefetch: leaves read 8 at a time) or not
    // (read one at a time as the writes reach them); alternated, medians of ROUNDS.
    const ROUNDS = 5;
    const sparseSize = 2048 * MiB;
    const leafSpan = 256 * 64 * 1024;
    const changedRun = async (
      backend: () => ObjectBackend,
    ): Promise<{ off: number; on: number }> => {
      const init = await Store.init({ backend: backend(), passphrase: 'bench', kdfCost: 1024 });
      const w = await init.beginWrite({ machine: 'bench', disk: 'sparse', size: sparseSize });
      for (let at = 0; at < sparseSize; at += leafSpan) await w.write(at, randomBytes(64 * 1024));
      await w.commit();
      await init.close();
      const times: Record<'off' | 'on', number[]> = { off: [], on: [] };
      for (let round = 0; round < ROUNDS; round++) {
        const order: Array<'off' | 'on'> = round % 2 === 0 ? ['off', 'on'] : ['on', 'off'];
        for (const mode of order) {
          const store = await Store.open({ backend: backend(), passphrase: 'bench' });
          try {
            const ranges = Array.from({ length: sparseSize / leafSpan }, (_, l) => ({
              offset: l * leafSpan + (1 + ((round * 7 + l) % 255)) * 64 * 1024,
              length: 64 * 1024,
            }));
            times[mode].push(
              await seconds(async () => {
                const s = await store.beginWrite({
                  machine: 'bench',
                  disk: 'sparse',
                  size: sparseSize,
                });
                if (mode === 'on') void s.prefetch?.(ranges);
                for (const r of ranges) await s.write(r.offset, randomBytes(r.length));
                await s.commit();
              }),
            );
          } finally {
            await store.close();
          }
        }
      }
      const median = (a: number[]): number => [...a].sort((x, y) => x - y)[a.length >> 1] as number;
      return { off: median(times.off), on: median(times.on) };
    };
    const changedAzure = await changedRun(
      () =>
        new AzureBlobBackend({
          connectionString: azurite.connectionString,
          container: 'bench-changed',
          createContainer: true,
        }),
    );
    const changedDir = await changedRun(
      () => new DirectoryBackend({ path: join(work, 'changed') }),
    );
    await azure.close();

    console.log(
      `machine: ${cpus().length} vCPU, Node.js ${process.version}; ${packs.length} × 16 MiB objects, ${IN_FLIGHT} in flight`,
    );
    console.log('\n| measure | bare SDK | AzureBlobBackend | backend / SDK | DirectoryBackend |');
    console.log('|---|---|---|---|---|');
    for (const r of rows) console.log(`| ${r.join(' | ')} |`);
    console.log('\n| 600 puts of 64 KiB offered at once | rate | vs maxConcurrency 1 |');
    console.log('|---|---|---|');
    for (const r of capRows) console.log(`| ${r.join(' | ')} |`);
    console.log(
      `\n| Store, ${storeBytes / MiB} MiB random disk | on Azurite | on a directory | Azure / directory |`,
    );
    console.log('|---|---|---|---|');
    console.log(
      `| write + commit | ${rate(storeBytes, onAzure.write)} | ${rate(storeBytes, onDir.write)} | ${(onDir.write / onAzure.write).toFixed(2)} |`,
    );
    console.log(
      `| read (stream) | ${rate(storeBytes, onAzure.stream)} | ${rate(storeBytes, onDir.stream)} | ${(onDir.stream / onAzure.stream).toFixed(2)} |`,
    );
    console.log(
      `| read (readAt, 1 MiB at a time) | ${rate(storeBytes, onAzure.readAt)} | ${rate(storeBytes, onDir.readAt)} | ${(onDir.readAt / onAzure.readAt).toFixed(2)} |`,
    );
    console.log(
      '\n| 128 chunks changed in 128 leaves of a 2 GiB disk, fresh open | leaves read as the writes reach them | told first (prefetch) | prefetch / without |',
    );
    console.log('|---|---|---|---|');
    for (const [name, r] of [
      ['on Azurite', changedAzure],
      ['on a directory', changedDir],
    ] as const) {
      console.log(
        `| ${name} | ${(r.off * 1000).toFixed(0)} ms | ${(r.on * 1000).toFixed(0)} ms | ${(r.on / r.off).toFixed(2)} |`,
      );
    }
  } finally {
    await azurite.stop();
    await rm(work, { recursive: true, force: true });
  }
}

await main();
