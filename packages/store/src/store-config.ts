import { createCipheriv, createDecipheriv, createHash, randomBytes } from 'node:crypto';
import { scryptKek } from './kdf.js';
import { storeError } from './store-error.js';

/** The store's plaintext `config` object: what a reader must know before it has the key. */
export interface StoreConfig {
  format: 'lifeboat-store';
  version: number;
  id: string;
  chunkSize: number;
  packSize: number;
  treeFanout: number;
  compressionLevel: number;
  createdAt: string;
}

/** The format version this code writes and reads. */
export const STORE_VERSION = 1;

/** Canonical text of a config, the input of its MAC. */
export function configText(c: StoreConfig): string {
  return JSON.stringify({
    format: c.format,
    version: c.version,
    id: c.id,
    chunkSize: c.chunkSize,
    packSize: c.packSize,
    treeFanout: c.treeFanout,
    compressionLevel: c.compressionLevel,
    createdAt: c.createdAt,
  });
}

/** Parses the config object; rejects with LB_STORE_CORRUPT_CONFIG or LB_STORE_UNSUPPORTED_VERSION. */
export function parseConfig(data: Buffer, location: string): StoreConfig & { mac: string } {
  let raw: unknown;
  try {
    raw = JSON.parse(data.toString('utf8'));
  } catch (err) {
    throw corruptConfig(location, 'it is not valid JSON', err);
  }
  if (typeof raw !== 'object' || raw === null) throw corruptConfig(location, 'it is not an object');
  const c = raw as Record<string, unknown>;
  if (c['format'] !== 'lifeboat-store')
    throw corruptConfig(location, 'it is not a Lifeboat store config');
  if (c['version'] !== STORE_VERSION) {
    throw storeError(
      'LB_STORE_UNSUPPORTED_VERSION',
      `The store at ${location} has format version ${JSON.stringify(c['version'])}; this Lifeboat reads version ${STORE_VERSION}. Use a Lifeboat release that supports that version.`,
      { object: 'config', version: c['version'], supported: [STORE_VERSION], location },
    );
  }
  const isInt = (v: unknown): v is number =>
    typeof v === 'number' && Number.isSafeInteger(v) && v > 0;
  if (
    typeof c['id'] !== 'string' ||
    !isInt(c['chunkSize']) ||
    !isInt(c['packSize']) ||
    !isInt(c['treeFanout']) ||
    typeof c['compressionLevel'] !== 'number' ||
    typeof c['createdAt'] !== 'string' ||
    typeof c['mac'] !== 'string'
  ) {
    throw corruptConfig(location, 'a field is missing or has the wrong type');
  }
  return c as unknown as StoreConfig & { mac: string };
}

function corruptConfig(location: string, why: string, cause?: unknown): Error {
  return storeError(
    'LB_STORE_CORRUPT_CONFIG',
    `The config object of the store at ${location} is damaged: ${why}. Restore it from a copy of the store; the data cannot be read without it.`,
    { object: 'config', location },
    cause,
  );
}

/** A key object (`keys/<id>`): the master key wrapped under a passphrase. */
export interface KeyFile {
  version: number;
  kdf: 'scrypt';
  N: number;
  r: number;
  p: number;
  salt: string;
  nonce: string;
  wrapped: string;
  createdAt: string;
  /** SHA-256 of the other fields, to tell a damaged key object from a wrong passphrase. */
  check: string;
}

function keyFileText(k: Omit<KeyFile, 'check'>): string {
  return JSON.stringify([k.version, k.kdf, k.N, k.r, k.p, k.salt, k.nonce, k.wrapped, k.createdAt]);
}

function kek(passphrase: string, salt: Buffer, N: number, r: number, p: number): Promise<Buffer> {
  // A derivation started early (key-prefetch.ts) with the same inputs is taken over.
  return scryptKek(passphrase, salt, N, r, p);
}

function wrapAad(storeId: string): Buffer {
  return Buffer.from(`lifeboat/v1/master-key/${storeId}`, 'utf8');
}

/** Wraps the master key under a passphrase. */
export async function wrapMasterKey(
  masterKey: Buffer,
  passphrase: string,
  storeId: string,
  N: number,
): Promise<KeyFile> {
  const salt = randomBytes(16);
  const nonce = randomBytes(12);
  const key = await kek(passphrase, salt, N, 8, 1);
  const cipher = createCipheriv('aes-256-gcm', key, nonce);
  cipher.setAAD(wrapAad(storeId));
  const wrapped = Buffer.concat([cipher.update(masterKey), cipher.final(), cipher.getAuthTag()]);
  const body: Omit<KeyFile, 'check'> = {
    version: STORE_VERSION,
    kdf: 'scrypt',
    N,
    r: 8,
    p: 1,
    salt: salt.toString('base64'),
    nonce: nonce.toString('base64'),
    wrapped: wrapped.toString('base64'),
    createdAt: new Date().toISOString(),
  };
  return { ...body, check: createHash('sha256').update(keyFileText(body)).digest('hex') };
}

/** Parses a key object; rejects with LB_STORE_CORRUPT_KEY or LB_STORE_UNSUPPORTED_VERSION. */
export function parseKeyFile(data: Buffer, key: string, location: string): KeyFile {
  const damaged = (why: string, cause?: unknown): Error =>
    storeError(
      'LB_STORE_CORRUPT_KEY',
      `The key object ${key} of the store at ${location} is damaged (${why}). Another key object may still open the store; otherwise restore it from a copy.`,
      { object: key, location },
      cause,
    );
  let k: KeyFile;
  try {
    k = JSON.parse(data.toString('utf8')) as KeyFile;
  } catch (err) {
    throw damaged('not valid JSON', err);
  }
  if (typeof k !== 'object' || k === null) throw damaged('not an object');
  if (k.version !== STORE_VERSION) {
    throw storeError(
      'LB_STORE_UNSUPPORTED_VERSION',
      `The key object ${key} has format version ${JSON.stringify(k.version)}; this Lifeboat reads version ${STORE_VERSION}. Use a Lifeboat release that supports it.`,
      { object: key, version: k.version, supported: [STORE_VERSION], location },
    );
  }
  if (k.check !== createHash('sha256').update(keyFileText(k)).digest('hex'))
    throw damaged('checksum mismatch');
  if (k.kdf !== 'scrypt') throw damaged(`unknown kdf ${String(k.kdf)}`);
  return k;
}

/** Unwraps the master key; undefined when the passphrase is wrong. */
export async function unwrapMasterKey(
  k: KeyFile,
  passphrase: string,
  storeId: string,
): Promise<Buffer | undefined> {
  const key = await kek(passphrase, Buffer.from(k.salt, 'base64'), k.N, k.r, k.p);
  const wrapped = Buffer.from(k.wrapped, 'base64');
  try {
    const decipher = createDecipheriv('aes-256-gcm', key, Buffer.from(k.nonce, 'base64'));
    decipher.setAAD(wrapAad(storeId));
    decipher.setAuthTag(wrapped.subarray(wrapped.length - 16));
    return Buffer.concat([
      decipher.update(wrapped.subarray(0, wrapped.length - 16)),
      decipher.final(),
    ]);
  } catch {
    return undefined;
  }
}
