import type { BlobType, StoreCrypto } from './store-crypto.js';

/** Where one blob (a data chunk or a tree node) lives. */
export interface BlobLocation {
  /** The pack's id (32 hex). */
  pack: string;
  /** Byte offset of the sealed blob in the pack. */
  offset: number;
  /** Length of the sealed blob. */
  length: number;
  /** Length of the plaintext. */
  rawLength: number;
  type: BlobType;
}

/** One blob of a pack, as listed in index objects and in the pack's own trailer. */
export interface PackEntry {
  id: Buffer;
  type: BlobType;
  offset: number;
  length: number;
  rawLength: number;
}

/** Current version of every sealed object and of tree nodes. */
export const FORMAT_VERSION = 1;

/** Kind byte of a sealed object's header. */
export const ObjectKind = { Index: 1, Point: 2 } as const;
/** {@link ObjectKind} as a type. */
export type ObjectKind = (typeof ObjectKind)[keyof typeof ObjectKind];

const OBJ_MAGIC = Buffer.from('LBO', 'latin1');
const PACK_MAGIC = Buffer.from('LBP1', 'latin1');
const ENTRY_BYTES = 32 + 1 + 4 + 4 + 4;

/** Key of a pack object. */
export function packKey(pack: string): string {
  return `packs/${pack.slice(0, 2)}/${pack}`;
}

/** Key of an index object. */
export function indexKey(id: string): string {
  return `index/${id}`;
}

/** Key of a point object. */
export function pointKey(id: string): string {
  return `points/${id}`;
}

/** Thrown by decoders; the store turns it into a coded error naming the object. */
export class FormatError extends Error {
  constructor(
    message: string,
    readonly unsupportedVersion?: number,
  ) {
    super(message);
    this.name = 'FormatError';
  }
}

/** Seals an index or point object: `LBO`, version, kind, then AES-GCM bound to the key. */
export function sealObject(
  crypto: StoreCrypto,
  kind: ObjectKind,
  key: string,
  plain: Uint8Array,
): Buffer {
  const head = Buffer.concat([OBJ_MAGIC, Buffer.of(FORMAT_VERSION, kind)]);
  return Buffer.concat([head, crypto.seal(plain, Buffer.concat([head, Buffer.from(key, 'utf8')]))]);
}

/** Opens what {@link sealObject} made; throws FormatError on a bad header or failed authentication. */
export function openObject(
  crypto: StoreCrypto,
  kind: ObjectKind,
  key: string,
  data: Buffer,
): Buffer {
  if (data.length < 5 || !data.subarray(0, 3).equals(OBJ_MAGIC)) {
    throw new FormatError('not a Lifeboat object (bad magic)');
  }
  const version = data[3] ?? 0;
  if (version !== FORMAT_VERSION) throw new FormatError(`format version ${version}`, version);
  if (data[4] !== kind) throw new FormatError(`object kind ${String(data[4])}, expected ${kind}`);
  const head = data.subarray(0, 5);
  try {
    return crypto.open(data.subarray(5), Buffer.concat([head, Buffer.from(key, 'utf8')]));
  } catch (err) {
    throw new FormatError(`authentication failed (${(err as Error).message})`);
  }
}

function writeEntry(buf: Buffer, pos: number, e: PackEntry): number {
  e.id.copy(buf, pos);
  buf[pos + 32] = e.type;
  buf.writeUInt32LE(e.offset, pos + 33);
  buf.writeUInt32LE(e.length, pos + 37);
  buf.writeUInt32LE(e.rawLength, pos + 41);
  return pos + ENTRY_BYTES;
}

function readEntry(buf: Buffer, pos: number): PackEntry {
  const type = buf[pos + 32];
  if (type !== 0 && type !== 1) throw new FormatError(`unknown blob type ${String(type)}`);
  return {
    id: Buffer.from(buf.subarray(pos, pos + 32)),
    type,
    offset: buf.readUInt32LE(pos + 33),
    length: buf.readUInt32LE(pos + 37),
    rawLength: buf.readUInt32LE(pos + 41),
  };
}

/** Plaintext of an index object: which blobs each pack holds, and which indexes it replaces. */
export interface IndexContent {
  supersedes: string[];
  packs: Array<{ pack: string; entries: PackEntry[] }>;
}

/** Encodes an index object's plaintext. */
export function encodeIndex(content: IndexContent): Buffer {
  let size = 8 + content.supersedes.length * 16 + 4;
  for (const p of content.packs) size += 16 + 4 + p.entries.length * ENTRY_BYTES;
  const buf = Buffer.alloc(size);
  let pos = 0;
  buf.writeUInt32LE(content.supersedes.length, pos);
  pos += 8;
  for (const s of content.supersedes) pos += Buffer.from(s, 'hex').copy(buf, pos);
  buf.writeUInt32LE(content.packs.length, pos);
  pos += 4;
  for (const p of content.packs) {
    pos += Buffer.from(p.pack, 'hex').copy(buf, pos);
    buf.writeUInt32LE(p.entries.length, pos);
    pos += 4;
    for (const e of p.entries) pos = writeEntry(buf, pos, e);
  }
  return buf;
}

/** Decodes an index object's plaintext. */
export function decodeIndex(buf: Buffer): IndexContent {
  const need = (pos: number, n: number): void => {
    if (pos + n > buf.length) throw new FormatError('index ends early');
  };
  let pos = 0;
  need(pos, 8);
  const nSup = buf.readUInt32LE(pos);
  pos += 8;
  need(pos, nSup * 16);
  const supersedes: string[] = [];
  for (let i = 0; i < nSup; i++, pos += 16) supersedes.push(buf.toString('hex', pos, pos + 16));
  need(pos, 4);
  const nPacks = buf.readUInt32LE(pos);
  pos += 4;
  const packs: IndexContent['packs'] = [];
  for (let i = 0; i < nPacks; i++) {
    need(pos, 20);
    const pack = buf.toString('hex', pos, pos + 16);
    const n = buf.readUInt32LE(pos + 16);
    pos += 20;
    need(pos, n * ENTRY_BYTES);
    const entries: PackEntry[] = [];
    for (let j = 0; j < n; j++, pos += ENTRY_BYTES) entries.push(readEntry(buf, pos));
    packs.push({ pack, entries });
  }
  if (pos !== buf.length) throw new FormatError('index has trailing bytes');
  return { supersedes, packs };
}

/** The trailer that makes a pack self-describing: sealed entry list, its length, magic. */
export function encodePackTrailer(crypto: StoreCrypto, pack: string, entries: PackEntry[]): Buffer {
  const plain = Buffer.alloc(4 + entries.length * ENTRY_BYTES);
  plain.writeUInt32LE(entries.length, 0);
  let pos = 4;
  for (const e of entries) pos = writeEntry(plain, pos, e);
  const sealed = crypto.seal(plain, Buffer.concat([PACK_MAGIC, Buffer.from(pack, 'hex')]));
  const tail = Buffer.alloc(8);
  tail.writeUInt32LE(sealed.length, 0);
  PACK_MAGIC.copy(tail, 4);
  return Buffer.concat([sealed, tail]);
}

/** Bytes to read from a pack's end to find its trailer's length. */
export const PACK_TAIL_BYTES = 8;

/** Reads the sealed trailer's length from a pack's last 8 bytes. */
export function packTrailerLength(tail: Buffer): number {
  if (tail.length !== 8 || !tail.subarray(4).equals(PACK_MAGIC))
    throw new FormatError('pack has no trailer');
  return tail.readUInt32LE(0);
}

/** Decodes a pack's sealed trailer. */
export function decodePackTrailer(crypto: StoreCrypto, pack: string, sealed: Buffer): PackEntry[] {
  let plain: Buffer;
  try {
    plain = crypto.open(sealed, Buffer.concat([PACK_MAGIC, Buffer.from(pack, 'hex')]));
  } catch (err) {
    throw new FormatError(`pack trailer authentication failed (${(err as Error).message})`);
  }
  if (plain.length < 4) throw new FormatError('pack trailer too short');
  const n = plain.readUInt32LE(0);
  if (plain.length !== 4 + n * ENTRY_BYTES) throw new FormatError('pack trailer length mismatch');
  const entries: PackEntry[] = [];
  for (let i = 0, pos = 4; i < n; i++, pos += ENTRY_BYTES) entries.push(readEntry(plain, pos));
  return entries;
}
