import { parentPort, workerData } from 'node:worker_threads';
import type { StoreApi, WriteSession } from '@lifeboat/store';
import { computePointDigests } from './point-digests.js';
import { serializeError } from './store-worker-protocol.js';
import type { StoreWorkerRequest, StoreWorkerResponse } from './store-worker-protocol.js';

// Entry point of a store worker thread: opens its own Store with the module the server was
// configured with, and runs the requests of the machines assigned to it. Hashing, zstd and
// AES-GCM of those machines happen here, off the ingest thread.

interface WorkerInit {
  module: string;
  options: unknown;
  /** See StoreWorkerOptions.memLogFile. */
  memLogFile?: string;
}

const init = workerData as WorkerInit;
// Diagnostics (benchmarks): with memLogFile each thread appends a JSON line of its V8 heap and
// ArrayBuffer bytes to that file every 200 ms (the server's main thread is logged by the
// benchmark, with the process's RSS).
const memLog = init.memLogFile;
if (memLog) {
  const { appendFileSync } = await import('node:fs');
  const { getHeapStatistics } = await import('node:v8');
  const { threadId } = await import('node:worker_threads');
  setInterval(() => {
    const m = process.memoryUsage();
    const line = {
      t: Date.now(),
      thread: threadId,
      heapTotal: m.heapTotal,
      heapUsed: m.heapUsed,
      external: m.external,
      arrayBuffers: m.arrayBuffers,
      heapPhysical: getHeapStatistics().total_physical_size,
    };
    appendFileSync(memLog, `${JSON.stringify(line)}\n`);
  }, 200).unref();
}
const port = parentPort!;
const sessions = new Map<number, WriteSession>();
let nextSession = 1;

const storePromise: Promise<StoreApi> = import(init.module).then(
  (m: { openWorkerStore: (o: unknown) => Promise<StoreApi> }) => m.openWorkerStore(init.options),
);

async function handle(req: StoreWorkerRequest): Promise<unknown> {
  const store = await storePromise;
  const session = (id: number): WriteSession => {
    const s = sessions.get(id);
    if (!s) throw new Error(`unknown write session ${id}`);
    return s;
  };
  switch (req.op) {
    case 'beginWrite': {
      const s = await store.beginWrite(req.args);
      const id = nextSession++;
      sessions.set(id, s);
      return { session: id, size: s.size };
    }
    case 'write':
      return session(req.session).write(req.offset, req.data);
    case 'writeZeroes':
      return session(req.session).writeZeroes(req.offset, req.length);
    case 'prefetch':
      // Started, not awaited: the session's next writes run meanwhile, each waiting only for
      // the leaf it needs.
      void session(req.session).prefetch?.(req.ranges);
      return undefined;
    case 'trim':
      return session(req.session).trim(req.offset, req.length);
    case 'resize':
      return session(req.session).resize(req.size);
    case 'commit': {
      const s = session(req.session);
      sessions.delete(req.session);
      return s.commit(req.options);
    }
    case 'abort': {
      const s = sessions.get(req.session);
      sessions.delete(req.session);
      return s?.abort();
    }
    case 'listPoints':
      return store.listPoints(req.filter);
    case 'findCutPoint':
      return store.findCutPoint(req.machine, req.disk, req.cut);
    case 'pointDigests':
      return computePointDigests(store, req.point, req.key);
    case 'close':
      for (const s of sessions.values()) await s.abort().catch(() => undefined);
      sessions.clear();
      await store.close();
      return undefined;
  }
}

// Requests of one write session run strictly in order, one at a time (the process server
// pipelines writes without waiting for each); after a failure the session's later requests fail
// with the same error, so a commit never follows a lost write.
const chains = new Map<number, Promise<unknown>>();

function ordered(req: StoreWorkerRequest): Promise<unknown> {
  if (!('session' in req)) return handle(req);
  const prev = chains.get(req.session) ?? Promise.resolve();
  if (req.op === 'abort') {
    // The session ends here, and an abort runs even after a failure, to release it. (It was
    // once chained like the other requests as well: after a failed write that second promise
    // rejected with nobody to hear it, and the unhandled rejection killed the thread.)
    chains.delete(req.session);
    return prev
      .catch(() => undefined)
      .then(() => handle(req))
      .finally(() => sessions.delete(req.session));
  }
  const next = prev.then(() => handle(req));
  if (req.op === 'commit') {
    chains.delete(req.session);
    return next.finally(() => sessions.delete(req.session));
  }
  chains.set(req.session, next);
  return next;
}

port.on('message', (req: StoreWorkerRequest) => {
  ordered(req).then(
    (value) => {
      // A write's bytes are copied into the session's chunks and pack once it resolves, and
      // nothing here keeps them: the buffer goes back to the server's pool for the next frame
      // (freed here instead, it left the memory in glibc's arenas and the next frame faulted
      // in fresh pages).
      const ab = req.op === 'write' ? req.data.buffer : undefined;
      if (ab instanceof ArrayBuffer && ab.byteLength > 0) {
        port.postMessage(
          { id: req.id, ok: true, value: value ?? null, buffer: ab } satisfies StoreWorkerResponse,
          [ab],
        );
        return;
      }
      port.postMessage({
        id: req.id,
        ok: true,
        value: value ?? null,
      } satisfies StoreWorkerResponse);
    },
    (err: unknown) =>
      port.postMessage({
        id: req.id,
        ok: false,
        error: serializeError(err),
      } satisfies StoreWorkerResponse),
  );
});
