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
  private readonly compressor = new Compressor();
  private readonly decompressor = new Decompressor();

  constructor(masterKey: Buffer, storeId: string, compressionLevel = 1) {
    const derive = (info: string): Buffer =>
      Buffer.from(hkdfSync('sha256', masterKey, Buffer.from(storeId, 'utf8'), info, 32));
    this.idKey = derive('lifeboat/v1/chunk-id');
    this.treeKey = derive('lifeboat/v1/tree-id');
    this.dataKey = derive('lifeboat/v1/data');
    this.configKey = derive('lifeboat/v1/config');
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

  /** HMAC of the config's canonical text. */
  configMac(text: string): string {
    return createHmac('sha256', this.configKey).update(text, 'utf8').digest('hex');
  }

  /** Compresses (when it pays) and encrypts one blob; the id and type are authenticated. */
  sealChunk(type: BlobType, id: Buffer, plain: Uint8Array): Buffer {
    let body: Uint8Array = plain;
    let flag = RAW;
    // Try a 4 KiB sample first: on incompressible (encrypted, already compressed) data that
    // saves most of zstd's cost. Data stored raw also skips decompression on every read.
    const sample = plain.length > 16384 ? plain.subarray(0, 4096) : undefined;
    if (
      sample === undefined ||
      this.compressor.compress(sample).length < sample.length - (sample.length >> 5)
    ) {
      const packed = this.compressor.compress(plain);
      if (packed.length < plain.length - (plain.length >> 5)) {
        body = packed;
        flag = ZSTD;
      }
    }
    const out = Buffer.allocUnsafe(NONCE_BYTES + 1 + body.length + TAG_BYTES);
    const nonce = randomBytes(NONCE_BYTES);
    nonce.copy(out, 0);
    const cipher = createCipheriv('aes-256-gcm', this.dataKey, nonce);
    cipher.setAAD(chunkAad(type, id));
    let pos = NONCE_BYTES;
    pos += cipher.update(Buffer.of(flag)).copy(out, pos);
    pos += cipher.update(body).copy(out, pos);
    pos += cipher.final().copy(out, pos);
    cipher.getAuthTag().copy(out, pos);
    return out;
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
    const nonce = randomBytes(NONCE_BYTES);
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
    return Buffer.concat([decipher.update(body), decipher.final()]);
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
