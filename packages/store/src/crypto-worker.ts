// Entry point of a store crypto thread (see crypto-pool.ts): keyed chunk ids, sealing
// (zstd + AES-256-GCM) and opening of data chunks, on bytes in the pool's shared slots or in
// transferred buffers. It holds keys only in memory and imports nothing but the crypto code.
import { parentPort, workerData } from 'node:worker_threads';
import { BlobType, NONCE_BYTES, StoreCrypto, TAG_BYTES } from './store-crypto.js';
import type { CryptoReply, CryptoRequest, CryptoWorkerData } from './crypto-protocol.js';

const init = workerData as CryptoWorkerData;
const port = parentPort;
if (port === null) throw new Error('crypto-worker runs only as a worker thread');
const arena = Buffer.from(init.arena);
const keys = new Map<number, StoreCrypto>();
// Nonce and the encrypted flag byte that starts every chunk's plaintext.
const HEAD_BYTES = NONCE_BYTES + 1;

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
      const n = req.slots.length;
      const heads = new Uint8Array(HEAD_BYTES * n);
      const tails = new Uint8Array(TAG_BYTES * n);
      const bodies: Uint8Array[] = [];
      const transfer: ArrayBuffer[] = [heads.buffer, tails.buffer];
      for (let i = 0; i < n; i++) {
        const plain = slot(req.slots[i] as number, req.lens[i] as number);
        const id = Buffer.from(req.ids.buffer, req.ids.byteOffset + 32 * i, 32);
        const [nonce, flag, body, ...rest] = c.sealChunkParts(BlobType.Data, id, plain);
        const tail = Buffer.concat(rest);
        if (
          nonce?.length !== NONCE_BYTES ||
          flag?.length !== 1 ||
          body === undefined ||
          tail.length !== TAG_BYTES
        )
          throw new Error('unexpected sealed chunk layout');
        heads.set(nonce, HEAD_BYTES * i);
        heads.set(flag, HEAD_BYTES * i + NONCE_BYTES);
        tails.set(tail, TAG_BYTES * i);
        // The ciphertext goes back as it is when it owns its memory (it does: a fresh output).
        const own =
          body.byteOffset === 0 &&
          body.byteLength === body.buffer.byteLength &&
          body.buffer instanceof ArrayBuffer &&
          !transfer.includes(body.buffer);
        const out = own ? new Uint8Array(body.buffer) : new Uint8Array(body);
        bodies.push(out);
        transfer.push(out.buffer as ArrayBuffer);
      }
      return { reply: { id: req.id, ok: true, heads, bodies, tails }, transfer };
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
      if (given) return { reply: { id: req.id, ok: true, errors: failed ? errors : null }, transfer: [] };
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
