import {
  createCipheriv,
  createDecipheriv,
  createHmac,
  hkdfSync,
  randomBytes,
  timingSafeEqual,
} from 'node:crypto';
import { Compressor, Decompressor } from 'zstd-napi';

/** Bytes of the AES-GCM nonce at the start of every sealed blob. */
export const NONCE_BYTES = 12;
/** Bytes of the AES-GCM tag at the end of every sealed blob. */
export const TAG_BYTES = 16;
/** Bytes added by sealing: nonce + tag. */
export const SEAL_OVERHEAD = NONCE_BYTES + TAG_BYTES;

/** What a blob in a pack holds; part of the blob's authenticated data and of index entries. */
export const BlobType = { Data: 0, Tree: 1 } as const;
/** {@link BlobType} as a type. */
export type BlobType = (typeof BlobType)[keyof typeof BlobType];

// Plaintext of a chunk blob starts with one byte saying how the rest is encoded.
const RAW = 0;
const ZSTD = 1;

/** The keys every store object is protected with, all derived from the random master key. */
export class StoreCrypto {
  /** HMAC-SHA-256 key for data chunk ids (keyed, so ids reveal nothing about content). */
  private readonly idKey: Buffer;
  /** HMAC-SHA-256 key for tree node ids (separate, so a node never aliases a data chunk). */
  private readonly treeKey: Buffer;
  /** AES-256-GCM key for every sealed blob and object. */
  private readonly dataKey: Buffer;
  /** HMAC-SHA-256 key authenticating the plaintext config object. */
  readonly configKey: Buffer;
  /** HMAC-SHA-256 key naming the point of a cut (machine, disk, cut id). */
  private readonly cutKey: Buffer;
  private readonly compressor = new Compressor();
  private readonly decompressor = new Decompressor();
  /** Random bytes drawn in bulk for nonces: one call to the CSPRNG per 256 nonces, not per chunk. */
  private nonces = Buffer.alloc(0);
  private noncePos = 0;

  constructor(masterKey: Buffer, storeId: string, compressionLevel = 1) {
    const derive = (info: string): Buffer =>
      Buffer.from(hkdfSync('sha256', masterKey, Buffer.from(storeId, 'utf8'), info, 32));
    this.idKey = derive('lifeboat/v1/chunk-id');
    this.treeKey = derive('lifeboat/v1/tree-id');
    this.dataKey = derive('lifeboat/v1/data');
    this.configKey = derive('lifeboat/v1/config');
    this.cutKey = derive('lifeboat/v1/cut-point-id');
    this.compressor.setParameters({ compressionLevel });
  }

  /** The keyed id of a data chunk's plaintext. */
  chunkId(data: Uint8Array): Buffer {
    return createHmac('sha256', this.idKey).update(data).digest();
  }

  /** The keyed id of a tree node's plaintext. */
  treeId(node: Uint8Array): Buffer {
    return createHmac('sha256', this.treeKey).update(node).digest();
  }

  /**
   * The id (32 hex) of the point of cut `cut` of a machine's disk: keyed, so the object's name
   * tells nobody without the key which machine, disk or cut it is.
   */
  cutPointId(machine: string, disk: string, cut: string): string {
    return createHmac('sha256', this.cutKey)
      .update(JSON.stringify([machine, disk, cut]), 'utf8')
      .digest()
      .subarray(0, 16)
      .toString('hex');
  }

  /** HMAC of the config's canonical text. */
  configMac(text: string): string {
    return createHmac('sha256', this.configKey).update(text, 'utf8').digest('hex');
  }

  /** Compresses (when it pays) and encrypts one blob; the id and type are authenticated. */
  sealChunk(type: BlobType, id: Buffer, plain: Uint8Array): Buffer {
    const { flag, body } = this.encode(plain);
    return Buffer.concat(this.sealParts(type, id, flag, body));
  }

  /**
   * Like {@link sealChunk}, but returns the sealed blob as consecutive parts (nonce, ciphertext
   * pieces, tag) so a pack writer can copy them straight into its pack buffer.
   */
  sealChunkParts(type: BlobType, id: Buffer, plain: Uint8Array): Buffer[] {
    const { flag, body } = this.encode(plain);
    return this.sealParts(type, id, flag, body);
  }

  /** A fresh random 96-bit nonce (a copy: it must not change once used). */
  private nonce(): Buffer {
    if (this.noncePos + NONCE_BYTES > this.nonces.length) {
      this.nonces = randomBytes(NONCE_BYTES * 256);
      this.noncePos = 0;
    }
    const n = Buffer.from(this.nonces.subarray(this.noncePos, this.noncePos + NONCE_BYTES));
    this.noncePos += NONCE_BYTES;
    return n;
  }

  private sealParts(type: BlobType, id: Buffer, flag: number, body: Uint8Array): Buffer[] {
    const nonce = this.nonce();
    const cipher = createCipheriv('aes-256-gcm', this.dataKey, nonce);
    cipher.setAAD(chunkAad(type, id));
    const parts = [nonce, cipher.update(Buffer.of(flag)), cipher.update(body), cipher.final()];
    parts.push(cipher.getAuthTag());
    return parts;
  }

  /** Chooses raw or zstd for a plaintext. */
  private encode(plain: Uint8Array): { flag: number; body: Uint8Array } {
    // Try a 4 KiB sample first: on incompressible (encrypted, already compressed) data that
    // saves most of zstd's cost. Data stored raw also skips decompression on every read.
    const sample = plain.length > 16384 ? plain.subarray(0, 4096) : undefined;
    if (
      sample === undefined ||
      this.compressor.compress(sample).length < sample.length - (sample.length >> 5)
    ) {
      const packed = this.compressor.compress(plain);
      if (packed.length < plain.length - (plain.length >> 5)) return { flag: ZSTD, body: packed };
    }
    return { flag: RAW, body: plain };
  }

  /** Decrypts and decompresses one blob; throws when it fails authentication. */
  openChunk(type: BlobType, id: Buffer, blob: Buffer): Buffer {
    const plain = this.open(blob, chunkAad(type, id));
    if (plain.length < 1) throw new Error('empty chunk plaintext');
    const body = plain.subarray(1);
    if (plain[0] === RAW) return body;
    if (plain[0] === ZSTD) return this.decompressor.decompress(body);
    throw new Error(`unknown chunk encoding ${String(plain[0])}`);
  }

  /** Encrypts a whole object (index, point, pack header); `aad` binds it to its name. */
  seal(plain: Uint8Array, aad: Uint8Array): Buffer {
    const nonce = this.nonce();
    const cipher = createCipheriv('aes-256-gcm', this.dataKey, nonce);
    cipher.setAAD(aad);
    const body = Buffer.concat([cipher.update(plain), cipher.final()]);
    return Buffer.concat([nonce, body, cipher.getAuthTag()]);
  }

  /** Decrypts what {@link seal} made; throws when it fails authentication. */
  open(blob: Buffer, aad: Uint8Array): Buffer {
    if (blob.length < SEAL_OVERHEAD) throw new Error('sealed blob too short');
    const decipher = createDecipheriv('aes-256-gcm', this.dataKey, blob.subarray(0, NONCE_BYTES));
    decipher.setAAD(aad);
    decipher.setAuthTag(blob.subarray(blob.length - TAG_BYTES));
    const body = blob.subarray(NONCE_BYTES, blob.length - TAG_BYTES);
    const head = decipher.update(body);
    const tail = decipher.final();
    // GCM's final() yields no bytes; skip the copy concat would make.
    return tail.length === 0 ? head : Buffer.concat([head, tail]);
  }
}

function chunkAad(type: BlobType, id: Buffer): Buffer {
  const aad = Buffer.allocUnsafe(1 + id.length);
  aad[0] = type;
  id.copy(aad, 1);
  return aad;
}

/** Constant-time comparison of two MACs or ids. */
export function sameBytes(a: Buffer, b: Buffer): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}
