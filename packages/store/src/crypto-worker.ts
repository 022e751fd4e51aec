// Entry point of a store crypto thread (see crypto-pool.ts): keyed chunk ids, sealing
// (zstd + AES-256-GCM) and opening of data chunks, on bytes in the pool's shared slots or in
// transferred buffers. It holds keys only in memory and imports nothing but the crypto code.
import { parentPort, workerData } from 'node:worker_threads';
import { collectYoungGarbage } from './gc-hint.js';
import { BlobType, StoreCrypto } from './store-crypto.js';
import type { CryptoReply, CryptoRequest, CryptoWorkerData } from './crypto-protocol.js';

const init = workerData as CryptoWorkerData;
const port = parentPort;
if (port === null) throw new Error('crypto-worker runs only as a worker thread');
const arena = Buffer.from(init.arena);
const keys = new Map<number, StoreCrypto>();
// Bytes sealed or opened between two young-generation collections.
const COLLECT_EVERY = 8 * 1024 * 1024;
let sealedBytes = 0;

function slot(index: number, length: number): Buffer {
  const at = index * init.slotBytes;
  return arena.subarray(at, at + length);
}

function crypto(key: number): StoreCrypto {
  const c = keys.get(key);
  if (c === undefined) throw new Error(`unknown key ${key}`);
  return c;
}

function handle(req: CryptoRequest): { reply: CryptoReply; transfer: ArrayBuffer[] } {
  switch (req.t) {
    case 'key':
      keys.set(req.key, new StoreCrypto(Buffer.from(req.master), req.storeId, req.level));
      return { reply: { id: req.id, ok: true }, transfer: [] };
    case 'unkey':
      keys.delete(req.key);
      return { reply: { id: req.id, ok: true }, transfer: [] };
    case 'hash': {
      const c = crypto(req.key);
      const ids = new Uint8Array(32 * req.slots.length);
      for (let i = 0; i < req.slots.length; i++) {
        ids.set(c.chunkId(slot(req.slots[i] as number, req.lens[i] as number)), 32 * i);
      }
      return { reply: { id: req.id, ok: true, ids }, transfer: [ids.buffer] };
    }
    case 'seal': {
      const c = crypto(req.key);
      const sealed = new Int32Array(req.slots.length);
      for (let i = 0; i < req.slots.length; i++) {
        const s = req.slots[i] as number;
        const plain = slot(s, req.lens[i] as number);
        const id = Buffer.from(req.ids.buffer, req.ids.byteOffset + 32 * i, 32);
        // Every part is computed before the first is copied over the plaintext it came from.
        const parts = c.sealChunkParts(BlobType.Data, id, plain);
        let n = 0;
        for (const p of parts) n += p.length;
        if (n > init.slotBytes) throw new Error(`sealed chunk of ${n} bytes exceeds its slot`);
        const out = slot(s, n);
        let pos = 0;
        for (const p of parts) pos += p.copy(out, pos);
        sealed[i] = n;
        sealedBytes += n;
      }
      // The ciphertext buffers just copied are garbage: collect them while they are young, in
      // this thread, so its allocator reuses their memory (see gc-hint.ts).
      if (sealedBytes >= COLLECT_EVERY) {
        sealedBytes = 0;
        collectYoungGarbage();
      }
      return { reply: { id: req.id, ok: true, sealed }, transfer: [] };
    }
    case 'open': {
      const c = crypto(req.key);
      let total = 0;
      for (let i = 0; i < req.raws.length; i++) total += req.raws[i] as number;
      const given = req.out !== undefined && req.out.byteLength === total;
      const out = given ? (req.out as Uint8Array) : new Uint8Array(total);
      const outBuf = Buffer.from(out.buffer, out.byteOffset, out.byteLength);
      const data = Buffer.from(req.data.buffer, req.data.byteOffset, req.data.byteLength);
      const errors: Array<string | null> = [];
      let failed = false;
      let pos = 0;
      for (let i = 0; i < req.raws.length; i++) {
        const raw = req.raws[i] as number;
        const off = req.offs[i] as number;
        const id = Buffer.from(req.ids.buffer, req.ids.byteOffset + 32 * i, 32);
        try {
          const plain = c.openChunk(
            BlobType.Data,
            id,
            data.subarray(off, off + (req.lens[i] as number)),
          );
          if (plain.length !== raw) throw new Error(`length ${plain.length}, expected ${raw}`);
          plain.copy(outBuf, pos);
          errors.push(null);
        } catch (err) {
          failed = true;
          errors.push((err as Error).message);
        }
        pos += raw;
      }
      // The plaintexts just copied are garbage too (see 'seal').
      sealedBytes += total;
      if (sealedBytes >= COLLECT_EVERY) {
        sealedBytes = 0;
        collectYoungGarbage();
      }
      if (given)
        return { reply: { id: req.id, ok: true, errors: failed ? errors : null }, transfer: [] };
      return {
        reply: { id: req.id, ok: true, out, errors: failed ? errors : null },
        transfer: [out.buffer as ArrayBuffer],
      };
    }
    case 'die':
      // Tests: a thread that ends abruptly in the middle of its work.
      process.exit(1);
  }
}

port.on('message', (req: CryptoRequest) => {
  let result: { reply: CryptoReply; transfer: ArrayBuffer[] };
  try {
    result = handle(req);
  } catch (err) {
    result = { reply: { id: req.id, ok: false, error: (err as Error).message }, transfer: [] };
  }
  port.postMessage(result.reply, result.transfer);
});
port.postMessage({ id: 0, ok: true, ready: true } satisfies CryptoReply);
