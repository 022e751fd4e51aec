import { crc32 } from 'node:zlib';
import { frameBufferPool, isPooledView } from './buffer-pool.js';
import { crc32Combine, rememberCrc32 } from './crc32-combine.js';
import { LifeboatError } from './lifeboat-error.js';

/** First four bytes of every frame: ASCII `LBRP`. */
export const FRAME_MAGIC = 0x4c425250;
/** The newest wire format version this code speaks (what it proposes in a hello). */
export const PROTOCOL_VERSION = 2;
/** The oldest wire format version this code still speaks. */
export const MIN_PROTOCOL_VERSION = 1;
/** Bytes of one entry of a BASELINE_DIGESTS frame: kind (0 zero, 1 data) and a 16-byte digest. */
export const BASELINE_ENTRY_BYTES = 17;
/** Bytes of a resync baseline digest (HMAC-SHA-256 truncated). */
export const BASELINE_DIGEST_BYTES = 16;
/** Bytes before the entries in a BASELINE_DIGESTS frame's payload (request, reserved, first chunk). */
export const BASELINE_DIGESTS_PREFIX_BYTES = 16;
/** Bytes of the fixed frame header. */
export const FRAME_HEADER_BYTES = 24;
/** Bytes before the data in a DATA frame's payload (disk, reserved, offset). */
export const DATA_PREFIX_BYTES = 12;
/** Default largest payload a peer accepts: 4 MiB of data plus the DATA prefix. */
export const DEFAULT_MAX_PAYLOAD_BYTES = 4 * 1024 * 1024 + DATA_PREFIX_BYTES;
/** Largest sequence number: sequence numbers are JavaScript-safe integers. */
export const MAX_SEQ = Number.MAX_SAFE_INTEGER;

/** Frame type numbers on the wire. */
export const FrameType = {
  hello: 1,
  welcome: 2,
  data: 3,
  zero: 4,
  trim: 5,
  resize: 6,
  cut: 7,
  ack: 8,
  error: 9,
  committed: 10,
  discard: 11,
  baselineRequest: 12,
  baseline: 13,
  baselineDigests: 14,
} as const;

/** The oldest protocol version that has each frame type (types not listed are in version 1). */
const TYPE_SINCE: Readonly<Record<number, number>> = {
  [FrameType.baselineRequest]: 2,
  [FrameType.baseline]: 2,
  [FrameType.baselineDigests]: 2,
};

/** One disk of a machine as announced in a hello. */
export interface HelloDisk {
  /** Name of the disk within the machine (`vda`). */
  name: string;
  /** Logical size in bytes, a multiple of 512. */
  size: number;
}

/** Client → server, first frame of a session. */
export interface HelloFrame {
  type: 'hello';
  /** The protected machine's id. */
  machine: string;
  /** The machine's disks; frames name a disk by its index in this list. */
  disks: HelloDisk[];
  /** The oldest sequence number the client still holds unacknowledged, or null when it holds none. */
  oldestUnackedSeq: number | null;
  /** Free-form identification of the agent, for logs. */
  agent?: string;
  /** Protocol version of the frame header: the newest version the agent speaks. @default PROTOCOL_VERSION */
  version?: number;
}

/** Server → client, answer to hello. */
export interface WelcomeFrame {
  type: 'welcome';
  /** Id of this session, for logs on both sides. */
  sessionId: string;
  /** Highest sequence number of this machine durable on the server (0 when none); the client sends from lastSeq + 1. */
  lastSeq: number;
  /** Largest payload the server accepts. */
  maxPayloadBytes: number;
  /** True when the server dropped this machine's backlog (journal overflow): the agent must resync. */
  resyncRequired: boolean;
  /**
   * With `resyncRequired`: the machine's last sequence number when the server dropped its
   * backlog. The same value on a later welcome means the same request (the resync it asked for
   * has not committed a cut yet), which a client that already started that resync resumes
   * instead of starting again. Absent from older servers.
   */
  resyncAtSeq?: number;
  /** The machine's newest committed cut (its points exist in the store), or null. */
  latestCut: CommittedCutInfo | null;
  /** Protocol version of the frame header: the session's version (the lower of both sides'). @default PROTOCOL_VERSION */
  version?: number;
}

/** A cut whose points are committed. */
export interface CommittedCutInfo {
  /** The cut's sequence number. */
  seq: number;
  cutId: string;
  /** The agent's time of the cut, ms since the epoch. */
  time: number;
}

/** Server → agent: the points of every cut up to `seq` are committed in the store. */
export interface CommittedFrame {
  type: 'committed';
  seq: number;
  cutId: string;
  time: number;
}

/** Agent → server: drop the disk's frames since the last cut (its change tracking was lost; a resync follows). */
export interface DiscardFrame {
  type: 'discard';
  seq: number;
  disk: number;
}

/**
 * Agent → server (version 2): asks for the resync baseline of a disk, the latest committed
 * point's per-chunk digests under a key of this request. The server answers once every cut
 * it received before this frame is committed.
 */
export interface BaselineRequestFrame {
  type: 'baseline-request';
  /** Disk index in the session's hello. */
  disk: number;
  /** Chosen by the agent; the answer carries it. */
  request: number;
}

/**
 * Server → agent (version 2): the head of a baseline answer. `chunks` entries follow in
 * BASELINE_DIGESTS frames, in chunk order; none when there is no point (or on `error`).
 */
export interface BaselineFrame {
  type: 'baseline';
  request: number;
  disk: number;
  /** Id of the point the digests describe, or null when the disk has no point yet. */
  point: string | null;
  /** Store chunk size: digests are per aligned chunk of this size. */
  chunkSize: number;
  /** The point's logical size. */
  size: number;
  /** Entries that follow: ceil(size / chunkSize), or 0. */
  chunks: number;
  /** The 32-byte HMAC-SHA-256 key of this answer's digests (hex), random per request. */
  key: string;
  /** Why no digests could be computed (the agent then sends every allocated range). */
  error?: { code: string; message: string };
}

/** Server → agent (version 2): digests of consecutive chunks of a baseline, from chunk `first`. */
export interface BaselineDigestsFrame {
  type: 'baseline-digests';
  request: number;
  /** Index of the first chunk described. */
  first: number;
  /** `BASELINE_ENTRY_BYTES` per chunk: kind (0 zero chunk, 1 data), then the digest (zeros for kind 0). */
  entries: Buffer;
}

/** Changed bytes of one disk. */
export interface DataFrame {
  type: 'data';
  seq: number;
  disk: number;
  offset: number;
  data: Buffer;
}

/** A range that reads as zeros (`zero`) or is discarded (`trim`). */
export interface RangeFrame {
  type: 'zero' | 'trim';
  seq: number;
  disk: number;
  offset: number;
  length: number;
}

/** A disk's new logical size. */
export interface ResizeFrame {
  type: 'resize';
  seq: number;
  disk: number;
  size: number;
}

/** A consistent cut of all disks of the machine: everything sequenced before it belongs to the point. */
export interface CutFrame {
  type: 'cut';
  seq: number;
  /** Id shared by the points of all disks of this cut. */
  cutId: string;
  /** Crash- or app-consistent. */
  kind: 'crash' | 'app';
  /** When the agent took the cut, milliseconds since the epoch. */
  time: number;
  /** Consistency group of the machine, if any. */
  consistencyGroup?: string;
  /** Labels of the points (at most 32; keys and values up to 128 characters), e.g. marking a partial initial sync. */
  labels?: Record<string, string>;
}

/** Server → client: every frame up to `seq` is durable. */
export interface AckFrame {
  type: 'ack';
  seq: number;
}

/** Server → client: the session is rejected; the server closes it after this frame. */
export interface ErrorFrame {
  type: 'error';
  code: string;
  message: string;
  details: Record<string, unknown>;
}

/** Frames that carry a sequence number and are journaled. */
export type SequencedFrame = DataFrame | RangeFrame | ResizeFrame | CutFrame | DiscardFrame;

/** Every frame of the replication protocol. */
export type Frame =
  | HelloFrame
  | WelcomeFrame
  | SequencedFrame
  | AckFrame
  | ErrorFrame
  | CommittedFrame
  | BaselineRequestFrame
  | BaselineFrame
  | BaselineDigestsFrame;

const NAME_RE = /^[A-Za-z0-9._:@-]{1,128}$/;
const CODE_RE = /^LB_[A-Z0-9_]{1,60}$/;
const MAX_DISKS = 256;
const MAX_JSON_BYTES = 64 * 1024;

function malformed(what: string, details: Record<string, unknown> = {}): LifeboatError {
  return new LifeboatError(
    'LB_PROTO_MALFORMED',
    `Malformed frame: ${what}. The peer speaks a different or broken protocol; upgrade both sides to the same Lifeboat version.`,
    { details },
  );
}

function isSafeUint(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

function checkName(v: unknown, what: string): string {
  if (typeof v !== 'string' || !NAME_RE.test(v))
    throw malformed(`${what} must be 1-128 characters of A-Z a-z 0-9 . _ : @ -`);
  return v;
}

function checkLabels(v: unknown): Record<string, string> {
  if (typeof v !== 'object' || v === null || Array.isArray(v))
    throw malformed('cut labels must be an object');
  const entries = Object.entries(v);
  if (entries.length > 32) throw malformed('at most 32 cut labels');
  const out: Record<string, string> = {};
  for (const [k, val] of entries) {
    if (k.length === 0 || k.length > 128 || typeof val !== 'string' || val.length > 128)
      throw malformed('cut label keys and values must be strings of up to 128 characters');
    out[k] = val;
  }
  return out;
}

function parseJson(payload: Buffer): Record<string, unknown> {
  if (payload.length > MAX_JSON_BYTES) throw malformed('control frame larger than 64 KiB');
  let v: unknown;
  try {
    v = JSON.parse(payload.toString('utf8'));
  } catch (cause) {
    throw new LifeboatError(
      'LB_PROTO_MALFORMED',
      'Malformed frame: control payload is not JSON. Upgrade both sides to the same Lifeboat version.',
      { cause },
    );
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v))
    throw malformed('control payload is not a JSON object');
  return v as Record<string, unknown>;
}

function rangePayload(disk: number, offset: number, value: number | null): Buffer {
  const p = Buffer.alloc(value === null ? DATA_PREFIX_BYTES : DATA_PREFIX_BYTES + 8);
  p.writeUInt16BE(disk, 0);
  p.writeBigUInt64BE(BigInt(offset), 4);
  if (value !== null) p.writeBigUInt64BE(BigInt(value), 12);
  return p;
}

function jsonPayload(v: unknown): Buffer {
  return Buffer.from(JSON.stringify(v), 'utf8');
}

/**
 * Encodes a frame as a list of buffers (header first) so large DATA frames are never copied;
 * write them in order (or `Buffer.concat` them). `version` is the session's protocol version
 * (a hello or welcome carries its own `version` instead); a frame type newer than it is a bug
 * of the sender and throws.
 */
export function encodeFrame(frame: Frame, version: number = PROTOCOL_VERSION): Buffer[] {
  let type: number;
  let seq = 0;
  let payload: Buffer[];
  if ((frame.type === 'hello' || frame.type === 'welcome') && frame.version !== undefined)
    version = frame.version;
  switch (frame.type) {
    case 'hello': {
      type = FrameType.hello;
      const body: Record<string, unknown> = {
        machine: frame.machine,
        disks: frame.disks,
        oldestUnackedSeq: frame.oldestUnackedSeq,
      };
      if (frame.agent !== undefined) body.agent = frame.agent;
      payload = [jsonPayload(body)];
      break;
    }
    case 'welcome':
      type = FrameType.welcome;
      payload = [
        jsonPayload({
          sessionId: frame.sessionId,
          lastSeq: frame.lastSeq,
          maxPayloadBytes: frame.maxPayloadBytes,
          resyncRequired: frame.resyncRequired,
          ...(frame.resyncAtSeq === undefined ? {} : { resyncAtSeq: frame.resyncAtSeq }),
          latestCut: frame.latestCut,
        }),
      ];
      break;
    case 'committed':
      type = FrameType.committed;
      seq = frame.seq;
      payload = [jsonPayload({ cutId: frame.cutId, time: frame.time })];
      break;
    case 'discard': {
      type = FrameType.discard;
      seq = frame.seq;
      const p = Buffer.alloc(4);
      p.writeUInt16BE(frame.disk, 0);
      payload = [p];
      break;
    }
    case 'data':
      type = FrameType.data;
      seq = frame.seq;
      payload = [rangePayload(frame.disk, frame.offset, null), frame.data];
      break;
    case 'zero':
    case 'trim':
      type = frame.type === 'zero' ? FrameType.zero : FrameType.trim;
      seq = frame.seq;
      payload = [rangePayload(frame.disk, frame.offset, frame.length)];
      break;
    case 'resize':
      type = FrameType.resize;
      seq = frame.seq;
      payload = [rangePayload(frame.disk, frame.size, null)];
      break;
    case 'cut': {
      type = FrameType.cut;
      seq = frame.seq;
      const body: Record<string, unknown> = {
        cutId: frame.cutId,
        kind: frame.kind,
        time: frame.time,
      };
      if (frame.consistencyGroup !== undefined) body.consistencyGroup = frame.consistencyGroup;
      if (frame.labels !== undefined) body.labels = frame.labels;
      payload = [jsonPayload(body)];
      break;
    }
    case 'ack':
      type = FrameType.ack;
      seq = frame.seq;
      payload = [];
      break;
    case 'error':
      type = FrameType.error;
      payload = [jsonPayload({ code: frame.code, message: frame.message, details: frame.details })];
      break;
    case 'baseline-request': {
      type = FrameType.baselineRequest;
      const p = Buffer.alloc(8);
      p.writeUInt16BE(frame.disk, 0);
      p.writeUInt32BE(frame.request, 4);
      payload = [p];
      break;
    }
    case 'baseline': {
      type = FrameType.baseline;
      const body: Record<string, unknown> = {
        request: frame.request,
        disk: frame.disk,
        point: frame.point,
        chunkSize: frame.chunkSize,
        size: frame.size,
        chunks: frame.chunks,
        key: frame.key,
      };
      if (frame.error !== undefined) body.error = frame.error;
      payload = [jsonPayload(body)];
      break;
    }
    case 'baseline-digests': {
      type = FrameType.baselineDigests;
      const p = Buffer.alloc(BASELINE_DIGESTS_PREFIX_BYTES);
      p.writeUInt32BE(frame.request, 0);
      p.writeBigUInt64BE(BigInt(frame.first), 8);
      payload = [p, frame.entries];
      break;
    }
  }
  if (
    version < MIN_PROTOCOL_VERSION ||
    version > PROTOCOL_VERSION ||
    (TYPE_SINCE[type] ?? 1) > version
  )
    throw new LifeboatError(
      'LB_PROTO_MALFORMED',
      `A ${frame.type} frame cannot be sent in protocol version ${version}; this is a bug in the sender.`,
      { details: { type: frame.type, version } },
    );
  // Only the length is needed here: a concat copied every DATA frame's bytes once more.
  let payloadLength = 0;
  for (const part of payload) payloadLength += part.length;
  if (!isSafeUint(seq))
    throw new LifeboatError(
      'LB_PROTO_MALFORMED',
      'Sequence number out of range; this is a bug in the sender.',
      { details: { seq } },
    );
  const header = Buffer.allocUnsafe(FRAME_HEADER_BYTES);
  header.writeUInt32BE(FRAME_MAGIC, 0);
  header.writeUInt8(version, 4);
  header.writeUInt8(type, 5);
  header.writeUInt16BE(0, 6);
  header.writeUInt32BE(payloadLength, 8);
  header.writeBigUInt64BE(BigInt(seq), 12);
  let crc = crc32(header.subarray(0, 20));
  for (const part of payload) crc = crc32(part, crc);
  header.writeUInt32BE(crc, 20);
  return [header, ...payload];
}

/** Encodes a frame into one buffer. */
export function encodeFrameBuffer(frame: Frame): Buffer {
  return Buffer.concat(encodeFrame(frame));
}

function readU64(buf: Buffer, at: number, what: string): number {
  const v = buf.readBigUInt64BE(at);
  if (v > BigInt(MAX_SEQ)) throw malformed(`${what} exceeds 2^53-1`, { [what]: v.toString() });
  return Number(v);
}

function checkU32(v: unknown, what: string): number {
  if (!isSafeUint(v) || v > 0xffffffff)
    throw malformed(`${what} must be a 32-bit unsigned integer`);
  return v;
}

function decodeBaseline(payload: Buffer): BaselineFrame {
  const j = parseJson(payload);
  const request = checkU32(j.request, 'baseline request');
  if (!isSafeUint(j.disk) || j.disk > 0xffff) throw malformed('baseline disk');
  const point = j.point === null ? null : checkName(j.point, 'baseline point');
  const { chunkSize, size, chunks } = j;
  if (!isSafeUint(chunkSize) || chunkSize < 512 || chunkSize > 64 * 1024 * 1024 || chunkSize % 512)
    throw malformed('baseline chunkSize must be a multiple of 512 up to 64 MiB');
  if (!isSafeUint(size) || size % 512 !== 0)
    throw malformed('baseline size must be a multiple of 512');
  if (typeof j.key !== 'string' || !/^[0-9a-f]{64}$/.test(j.key))
    throw malformed('baseline key must be 64 hex digits');
  const out: BaselineFrame = {
    type: 'baseline',
    request,
    disk: j.disk,
    point,
    chunkSize,
    size,
    chunks: 0,
    key: j.key,
  };
  if (j.error !== undefined) {
    const e = j.error as Record<string, unknown> | null;
    if (
      typeof e !== 'object' ||
      e === null ||
      Array.isArray(e) ||
      typeof e.code !== 'string' ||
      !CODE_RE.test(e.code) ||
      typeof e.message !== 'string' ||
      e.message.length > 4096 ||
      Object.keys(e).length !== 2
    )
      throw malformed('baseline error must be { code, message }');
    out.error = { code: e.code, message: e.message };
  }
  const expected = point === null || out.error !== undefined ? 0 : Math.ceil(size / chunkSize);
  if (chunks !== expected)
    throw malformed('baseline chunks must be ceil(size / chunkSize), or 0 without a point', {
      chunks,
      expected,
    });
  out.chunks = expected;
  return out;
}

function decodeBaselineDigests(payload: Buffer): BaselineDigestsFrame {
  const n = payload.length - BASELINE_DIGESTS_PREFIX_BYTES;
  if (n < BASELINE_ENTRY_BYTES || n % BASELINE_ENTRY_BYTES !== 0)
    throw malformed('BASELINE_DIGESTS must hold one or more 17-byte entries');
  if (payload.readUInt32BE(4) !== 0) throw malformed('reserved field is not zero');
  const first = readU64(payload, 8, 'first');
  const entries = payload.subarray(BASELINE_DIGESTS_PREFIX_BYTES);
  for (let at = 0; at < entries.length; at += BASELINE_ENTRY_BYTES) {
    const kind = entries[at];
    if (kind === 1) continue;
    if (kind !== 0) throw malformed('baseline entry kind must be 0 (zero) or 1 (data)');
    for (let i = 1; i < BASELINE_ENTRY_BYTES; i++)
      if (entries[at + i] !== 0) throw malformed('a zero chunk entry must have a zero digest');
  }
  return { type: 'baseline-digests', request: payload.readUInt32BE(0), first, entries };
}

function decodePayload(type: number, seq: number, payload: Buffer, version: number): Frame {
  if ((TYPE_SINCE[type] ?? 1) > version)
    throw malformed(`frame type ${type} does not exist in protocol version ${version}`, {
      type,
      version,
    });
  const sequenced =
    type === FrameType.data ||
    type === FrameType.zero ||
    type === FrameType.trim ||
    type === FrameType.resize ||
    type === FrameType.cut ||
    type === FrameType.discard;
  if (sequenced && seq < 1) throw malformed('sequenced frame with sequence number 0');
  if (!sequenced && type !== FrameType.ack && type !== FrameType.committed && seq !== 0)
    throw malformed('control frame with a sequence number');
  switch (type) {
    case FrameType.hello: {
      const j = parseJson(payload);
      const machine = checkName(j.machine, 'machine');
      if (!Array.isArray(j.disks) || j.disks.length > MAX_DISKS)
        throw malformed(`disks must be a list of at most ${MAX_DISKS}`);
      const names = new Set<string>();
      const disks = j.disks.map((d: unknown): HelloDisk => {
        if (typeof d !== 'object' || d === null) throw malformed('disk entry is not an object');
        const rec = d as Record<string, unknown>;
        const name = checkName(rec.name, 'disk name');
        if (names.has(name)) throw malformed('duplicate disk name', { disk: name });
        names.add(name);
        if (!isSafeUint(rec.size) || rec.size % 512 !== 0)
          throw malformed('disk size must be a non-negative multiple of 512', { disk: name });
        return { name, size: rec.size };
      });
      const o = j.oldestUnackedSeq;
      if (o !== null && (!isSafeUint(o) || o < 1))
        throw malformed('oldestUnackedSeq must be null or a positive integer');
      const hello: HelloFrame = { type: 'hello', machine, disks, oldestUnackedSeq: o, version };
      if (j.agent !== undefined) {
        if (typeof j.agent !== 'string' || j.agent.length > 256)
          throw malformed('agent must be a string of at most 256 characters');
        hello.agent = j.agent;
      }
      return hello;
    }
    case FrameType.welcome: {
      const j = parseJson(payload);
      if (typeof j.sessionId !== 'string' || j.sessionId.length > 128)
        throw malformed('welcome sessionId');
      if (!isSafeUint(j.lastSeq)) throw malformed('welcome lastSeq');
      if (!isSafeUint(j.maxPayloadBytes) || j.maxPayloadBytes < 4096 + DATA_PREFIX_BYTES)
        throw malformed('welcome maxPayloadBytes');
      if (typeof j.resyncRequired !== 'boolean') throw malformed('welcome resyncRequired');
      if (j.resyncAtSeq !== undefined && !isSafeUint(j.resyncAtSeq))
        throw malformed('welcome resyncAtSeq');
      const lc = j.latestCut;
      let latestCut: CommittedCutInfo | null = null;
      if (lc !== null) {
        if (typeof lc !== 'object' || Array.isArray(lc)) throw malformed('welcome latestCut');
        const o = lc as Record<string, unknown>;
        if (!isSafeUint(o.seq) || !isSafeUint(o.time))
          throw malformed('welcome latestCut seq and time');
        latestCut = { seq: o.seq, cutId: checkName(o.cutId, 'cutId'), time: o.time };
      }
      const welcome: WelcomeFrame = {
        type: 'welcome',
        sessionId: j.sessionId,
        lastSeq: j.lastSeq,
        maxPayloadBytes: j.maxPayloadBytes,
        resyncRequired: j.resyncRequired,
        latestCut,
        version,
      };
      if (j.resyncAtSeq !== undefined) welcome.resyncAtSeq = j.resyncAtSeq;
      return welcome;
    }
    case FrameType.committed: {
      const j = parseJson(payload);
      if (!isSafeUint(j.time)) throw malformed('committed time');
      return { type: 'committed', seq, cutId: checkName(j.cutId, 'cutId'), time: j.time };
    }
    case FrameType.discard:
      if (payload.length !== 4) throw malformed('DISCARD payload must be 4 bytes');
      if (payload.readUInt16BE(2) !== 0) throw malformed('reserved field is not zero');
      return { type: 'discard', seq, disk: payload.readUInt16BE(0) };
    case FrameType.data: {
      if (payload.length < DATA_PREFIX_BYTES + 1)
        throw malformed('DATA frame shorter than its prefix plus one byte');
      if (payload.readUInt16BE(2) !== 0) throw malformed('DATA reserved field is not zero');
      const offset = readU64(payload, 4, 'offset');
      const data = payload.subarray(DATA_PREFIX_BYTES);
      if (offset + data.length > MAX_SEQ) throw malformed('DATA extent ends beyond 2^53-1');
      return { type: 'data', seq, disk: payload.readUInt16BE(0), offset, data };
    }
    case FrameType.zero:
    case FrameType.trim: {
      if (payload.length !== DATA_PREFIX_BYTES + 8)
        throw malformed('ZERO/TRIM payload must be 20 bytes');
      if (payload.readUInt16BE(2) !== 0) throw malformed('reserved field is not zero');
      const offset = readU64(payload, 4, 'offset');
      const length = readU64(payload, 12, 'length');
      if (length === 0 || offset + length > MAX_SEQ)
        throw malformed('range length must be positive and end below 2^53');
      return {
        type: type === FrameType.zero ? 'zero' : 'trim',
        seq,
        disk: payload.readUInt16BE(0),
        offset,
        length,
      };
    }
    case FrameType.resize: {
      if (payload.length !== DATA_PREFIX_BYTES) throw malformed('RESIZE payload must be 12 bytes');
      if (payload.readUInt16BE(2) !== 0) throw malformed('reserved field is not zero');
      const size = readU64(payload, 4, 'size');
      if (size % 512 !== 0) throw malformed('disk size must be a multiple of 512', { size });
      return { type: 'resize', seq, disk: payload.readUInt16BE(0), size };
    }
    case FrameType.cut: {
      const j = parseJson(payload);
      const cutId = checkName(j.cutId, 'cutId');
      if (j.kind !== 'crash' && j.kind !== 'app')
        throw malformed("cut kind must be 'crash' or 'app'");
      if (!isSafeUint(j.time)) throw malformed('cut time must be milliseconds since the epoch');
      const cut: CutFrame = { type: 'cut', seq, cutId, kind: j.kind, time: j.time };
      if (j.consistencyGroup !== undefined)
        cut.consistencyGroup = checkName(j.consistencyGroup, 'consistencyGroup');
      if (j.labels !== undefined) cut.labels = checkLabels(j.labels);
      return cut;
    }
    case FrameType.ack:
      if (payload.length !== 0) throw malformed('ACK has a payload');
      return { type: 'ack', seq };
    case FrameType.error: {
      const j = parseJson(payload);
      if (typeof j.code !== 'string' || !CODE_RE.test(j.code)) throw malformed('error code');
      if (typeof j.message !== 'string' || j.message.length > 4096)
        throw malformed('error message');
      const details = j.details;
      if (
        details !== undefined &&
        (typeof details !== 'object' || details === null || Array.isArray(details))
      )
        throw malformed('error details');
      return {
        type: 'error',
        code: j.code,
        message: j.message,
        details: (details as Record<string, unknown> | undefined) ?? {},
      };
    }
    case FrameType.baselineRequest:
      if (payload.length !== 8) throw malformed('BASELINE_REQUEST payload must be 8 bytes');
      if (payload.readUInt16BE(2) !== 0) throw malformed('reserved field is not zero');
      return {
        type: 'baseline-request',
        disk: payload.readUInt16BE(0),
        request: payload.readUInt32BE(4),
      };
    case FrameType.baseline:
      return decodeBaseline(payload);
    case FrameType.baselineDigests:
      return decodeBaselineDigests(payload);
    default:
      throw malformed('unknown frame type', { type });
  }
}

/** Options for {@link FrameDecoder}. */
export interface FrameDecoderOptions {
  /** Largest payload accepted; a larger length field is rejected before any byte of it is buffered. @default DEFAULT_MAX_PAYLOAD_BYTES */
  maxPayloadBytes?: number;
}

function unsupportedVersion(version: number, expected?: number): LifeboatError {
  return new LifeboatError(
    'LB_PROTO_UNSUPPORTED_VERSION',
    expected === undefined
      ? `Protocol version ${version} is not supported (this side speaks ${MIN_PROTOCOL_VERSION}-${PROTOCOL_VERSION}). Upgrade the older side.`
      : `A frame of protocol version ${version} arrived in a session of version ${expected}; the peer is broken. Upgrade both sides to the same Lifeboat version.`,
    { details: { version, supported: PROTOCOL_VERSION, minSupported: MIN_PROTOCOL_VERSION } },
  );
}

/** Buffers the decoder allocated for exactly one frame each. */
const ownFrames = new WeakSet<ArrayBufferLike>();
/** DATA bytes whose buffer holds only their own frame (see {@link frameOwnsBuffer}). */
const ownData = new WeakSet<Uint8Array>();

/**
 * True when these decoded DATA bytes are the only data in their ArrayBuffer (the rest is their
 * frame's header): a receiver done with the frame may transfer the buffer to a worker thread
 * instead of copying the bytes. False for frames that were views of a larger network read.
 */
export function frameOwnsBuffer(data: Uint8Array): boolean {
  return ownData.has(data) || isPooledView(data);
}

/**
 * Strict incremental decoder: feed it bytes as they arrive, it returns whole frames. Any
 * violation (magic, version, flags, size, checksum, layout, field ranges) throws a
 * {@link LifeboatError} with an `LB_PROTO_*` code; after that the decoder must be discarded.
 * Memory is bounded by the largest accepted frame.
 */
export class FrameDecoder {
  private readonly maxPayload: number;
  private chunks: Buffer[] = [];
  private buffered = 0;
  private failed: LifeboatError | undefined;
  private locked: number | undefined;

  constructor(options: FrameDecoderOptions = {}) {
    this.maxPayload = options.maxPayloadBytes ?? DEFAULT_MAX_PAYLOAD_BYTES;
  }

  /** Bytes held of an incomplete frame. */
  get pendingBytes(): number {
    return this.buffered;
  }

  /**
   * Fixes the session's protocol version once the hello and welcome agreed on it: every later
   * frame must carry exactly this version (`LB_PROTO_UNSUPPORTED_VERSION` otherwise).
   */
  lockVersion(version: number): void {
    this.locked = version;
  }

  /** Adds bytes and returns every frame now complete. */
  push(chunk: Buffer): Frame[] {
    if (this.failed) throw this.failed;
    if (chunk.length > 0) {
      this.chunks.push(chunk);
      this.buffered += chunk.length;
    }
    const out: Frame[] = [];
    try {
      for (;;) {
        if (this.buffered < FRAME_HEADER_BYTES) break;
        const header = this.peek(FRAME_HEADER_BYTES);
        const magic = header.readUInt32BE(0);
        if (magic !== FRAME_MAGIC) {
          throw new LifeboatError(
            'LB_PROTO_BAD_MAGIC',
            'The peer did not send a Lifeboat replication frame. Check that the agent points at a process server port (9443 by default).',
            {
              details: { magic: magic.toString(16) },
            },
          );
        }
        const version = header.readUInt8(4);
        if (version < MIN_PROTOCOL_VERSION || version > PROTOCOL_VERSION)
          throw unsupportedVersion(version);
        if (this.locked !== undefined && version !== this.locked)
          throw unsupportedVersion(version, this.locked);
        if (header.readUInt16BE(6) !== 0) throw malformed('flags are not zero');
        const length = header.readUInt32BE(8);
        if (length > this.maxPayload) {
          throw new LifeboatError(
            'LB_PROTO_FRAME_TOO_LARGE',
            `A frame of ${length} bytes exceeds the limit of ${this.maxPayload}. Split extents into smaller frames (the welcome says the limit).`,
            {
              details: { length, max: this.maxPayload },
            },
          );
        }
        if (this.buffered < FRAME_HEADER_BYTES + length) break;
        const whole = this.take(FRAME_HEADER_BYTES + length);
        const payload = whole.subarray(FRAME_HEADER_BYTES);
        const expected = whole.readUInt32BE(20);
        // A DATA frame's extent bytes get their own CRC, combined with the rest's: the journal
        // then reuses it (knownCrc32) instead of a second pass over the same bytes.
        const type = whole.readUInt8(5);
        let dataCrc: number | undefined;
        let actual: number;
        if (type === FrameType.data && payload.length > DATA_PREFIX_BYTES) {
          const head = crc32(payload.subarray(0, DATA_PREFIX_BYTES), crc32(whole.subarray(0, 20)));
          dataCrc = crc32(payload.subarray(DATA_PREFIX_BYTES));
          actual = crc32Combine(head, dataCrc, payload.length - DATA_PREFIX_BYTES);
        } else {
          actual = crc32(payload, crc32(whole.subarray(0, 20)));
        }
        if (expected !== actual) {
          throw new LifeboatError(
            'LB_PROTO_BAD_CHECKSUM',
            'A frame failed its CRC-32 check: bytes were damaged in transit. The session is closed; the agent resends from its last acknowledged frame.',
            {
              details: { expected, actual },
            },
          );
        }
        const seq = readU64(whole, 12, 'seq');
        const frame = decodePayload(type, seq, payload, version);
        if (dataCrc !== undefined && frame.type === 'data') rememberCrc32(frame.data, dataCrc);
        if (frame.type === 'data' && ownFrames.has(frame.data.buffer)) ownData.add(frame.data);
        out.push(frame);
      }
    } catch (err) {
      this.failed =
        err instanceof LifeboatError
          ? err
          : new LifeboatError('LB_PROTO_MALFORMED', 'Malformed frame.', { cause: err });
      throw this.failed;
    }
    return out;
  }

  /** Call when the byte stream ends: throws `LB_PROTO_TRUNCATED` if a frame was cut short. */
  end(): void {
    if (this.failed) throw this.failed;
    if (this.buffered > 0) {
      this.failed = new LifeboatError(
        'LB_PROTO_TRUNCATED',
        'The connection ended in the middle of a frame. The partial frame was discarded; the agent resends it after reconnecting.',
        {
          details: { pendingBytes: this.buffered },
        },
      );
      throw this.failed;
    }
  }

  private peek(n: number): Buffer {
    const first = this.chunks[0]!;
    if (first.length >= n) return first.subarray(0, n);
    // A header split between reads: copy just its bytes (merging every chunk held copied a
    // whole frame's worth, and made its bytes a view of a buffer shared with the next frame).
    let have = 0;
    let k = 0;
    while (have < n) have += this.chunks[k++]!.length;
    return Buffer.concat(this.chunks.slice(0, k), n);
  }

  private take(n: number): Buffer {
    const first = this.chunks[0]!;
    if (first.length < n) {
      // Gather only as many chunks as the frame needs, and copy exactly the frame's bytes: its
      // buffer then holds nothing else, and its DATA bytes can move to a worker thread whole.
      let have = 0;
      let k = 0;
      while (have < n) have += this.chunks[k++]!.length;
      const last = this.chunks[k - 1]!;
      // A large frame's buffer comes from the pool: the process server gets it back from the
      // store worker it moves to, instead of every frame faulting in fresh memory.
      const whole = frameBufferPool.take(n);
      let at = 0;
      for (let i = 0; i < k; i++) {
        const c = this.chunks[i]!;
        at += c.copy(whole, at, 0, Math.min(c.length, n - at));
      }
      const rest = have - n;
      if (rest > 0) this.chunks.splice(0, k, last.subarray(last.length - rest));
      else this.chunks.splice(0, k);
      this.buffered -= n;
      ownFrames.add(whole.buffer);
      return whole;
    }
    const out = first.subarray(0, n);
    if (first.length === n) this.chunks.shift();
    else this.chunks[0] = first.subarray(n);
    this.buffered -= n;
    return out;
  }
}
