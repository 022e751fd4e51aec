import { crc32 } from 'node:zlib';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  BASELINE_ENTRY_BYTES,
  FrameDecoder,
  encodeFrame,
  encodeFrameBuffer,
  FRAME_HEADER_BYTES,
  PROTOCOL_VERSION,
} from './frame-codec.js';
import type { BaselineFrame, Frame } from './frame-codec.js';
import { LifeboatError } from './lifeboat-error.js';

const name = fc.stringMatching(/^[A-Za-z0-9._:@-]{1,20}$/);
const u = fc.integer({ min: 0, max: 2 ** 40 });
const seq = fc.integer({ min: 1, max: Number.MAX_SAFE_INTEGER });
const version = fc.constantFrom(1, 2);
const u32 = fc.integer({ min: 0, max: 0xffffffff });

/** A baseline head whose chunk count agrees with its point, size and error. */
const baselineArb: fc.Arbitrary<BaselineFrame> = fc
  .record(
    {
      request: u32,
      disk: fc.integer({ min: 0, max: 65535 }),
      point: fc.option(name, { nil: null }),
      chunkSize: fc.integer({ min: 1, max: 128 }).map((n) => n * 512),
      size: fc.integer({ min: 0, max: 2 ** 24 }).map((n) => n * 512),
      key: fc
        .uint8Array({ minLength: 32, maxLength: 32 })
        .map((a) => Buffer.from(a).toString('hex')),
      error: fc.record({ code: fc.constant('LB_STORE_X'), message: fc.string({ maxLength: 30 }) }),
    },
    { requiredKeys: ['request', 'disk', 'point', 'chunkSize', 'size', 'key'] },
  )
  .map((b) => ({
    type: 'baseline' as const,
    ...b,
    chunks: b.point === null || b.error !== undefined ? 0 : Math.ceil(b.size / b.chunkSize),
  }));

/** Baseline entries: kind 0 with a zero digest, or kind 1 with any digest. */
const entriesArb = fc
  .array(fc.option(fc.uint8Array({ minLength: 16, maxLength: 16 }), { nil: null }), {
    minLength: 1,
    maxLength: 20,
  })
  .map((list) =>
    Buffer.concat(
      list.map((d) => (d === null ? Buffer.alloc(17) : Buffer.concat([Buffer.of(1), d]))),
    ),
  );

const frameArb: fc.Arbitrary<Frame> = fc.oneof(
  fc.record({
    type: fc.constant('hello' as const),
    machine: name,
    disks: fc.uniqueArray(fc.record({ name, size: u.map((n) => n * 512) }), {
      selector: (d) => d.name,
      maxLength: 4,
    }),
    oldestUnackedSeq: fc.option(seq, { nil: null }),
    version,
  }),
  fc.record(
    {
      type: fc.constant('welcome' as const),
      sessionId: name,
      lastSeq: u,
      maxPayloadBytes: fc.integer({ min: 5000, max: 2 ** 30 }),
      resyncRequired: fc.boolean(),
      resyncAtSeq: u,
      latestCut: fc.option(fc.record({ seq: u, cutId: name, time: u }), { nil: null }),
      version,
    },
    {
      requiredKeys: [
        'type',
        'sessionId',
        'lastSeq',
        'maxPayloadBytes',
        'resyncRequired',
        'latestCut',
        'version',
      ],
    },
  ),
  fc.record({ type: fc.constant('committed' as const), seq: u, cutId: name, time: u }),
  fc.record({
    type: fc.constant('discard' as const),
    seq,
    disk: fc.integer({ min: 0, max: 65535 }),
  }),
  fc.record({
    type: fc.constant('data' as const),
    seq,
    disk: fc.integer({ min: 0, max: 65535 }),
    offset: u,
    data: fc.uint8Array({ minLength: 1, maxLength: 300 }).map((a) => Buffer.from(a)),
  }),
  fc.record({
    type: fc.constantFrom('zero' as const, 'trim' as const),
    seq,
    disk: fc.integer({ min: 0, max: 65535 }),
    offset: u,
    length: fc.integer({ min: 1, max: 2 ** 40 }),
  }),
  fc.record({
    type: fc.constant('resize' as const),
    seq,
    disk: fc.integer({ min: 0, max: 65535 }),
    size: u.map((n) => n * 512),
  }),
  fc.record(
    {
      type: fc.constant('cut' as const),
      seq,
      cutId: name,
      kind: fc.constantFrom('crash' as const, 'app' as const),
      time: u,
      consistencyGroup: name,
      labels: fc.dictionary(name, fc.string({ maxLength: 20 }), { maxKeys: 3 }),
    },
    { requiredKeys: ['type', 'seq', 'cutId', 'kind', 'time'] },
  ),
  fc.record({
    type: fc.constant('ack' as const),
    seq: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
  }),
  fc.record({
    type: fc.constant('error' as const),
    code: fc.constantFrom('LB_PROTO_MALFORMED', 'LB_X_Y'),
    message: fc.string({ maxLength: 50 }),
    details: fc.dictionary(name, fc.integer()),
  }),
  fc.record({
    type: fc.constant('baseline-request' as const),
    disk: fc.integer({ min: 0, max: 65535 }),
    request: u32,
  }),
  baselineArb,
  fc.record({
    type: fc.constant('baseline-digests' as const),
    request: u32,
    first: u,
    entries: entriesArb,
  }),
);

/** Feeds bytes in random pieces and returns the frames, or the error thrown. */
function decodeAll(bytes: Buffer, cuts: number[], maxPayloadBytes?: number): Frame[] | unknown {
  const d = new FrameDecoder(maxPayloadBytes === undefined ? {} : { maxPayloadBytes });
  const out: Frame[] = [];
  try {
    let at = 0;
    for (const c of [...cuts.map((x) => x % (bytes.length + 1))].sort((a, b) => a - b)) {
      out.push(...d.push(bytes.subarray(at, Math.max(at, c))));
      at = Math.max(at, c);
    }
    out.push(...d.push(bytes.subarray(at)));
    d.end();
    return out;
  } catch (err) {
    return err;
  }
}

describe('frame codec', () => {
  it('round-trips every frame type, split at any byte boundary', () => {
    fc.assert(
      fc.property(
        fc.array(frameArb, { minLength: 1, maxLength: 5 }),
        fc.array(fc.nat(), { maxLength: 6 }),
        (frames, cuts) => {
          const bytes = Buffer.concat(frames.map((f) => encodeFrameBuffer(f)));
          const got = decodeAll(bytes, cuts);
          expect(got).toEqual(frames);
        },
      ),
      { numRuns: 300 },
    );
  });

  it('never crashes on random bytes: every failure is a LifeboatError with an LB_PROTO code', () => {
    fc.assert(
      fc.property(
        fc.uint8Array({ maxLength: 2000 }),
        fc.array(fc.nat(), { maxLength: 4 }),
        (arr, cuts) => {
          const got = decodeAll(Buffer.from(arr), cuts, 1024);
          if (!Array.isArray(got)) {
            expect(got).toBeInstanceOf(LifeboatError);
            expect((got as LifeboatError).code).toMatch(/^LB_PROTO_/);
          }
        },
      ),
      { numRuns: 1000 },
    );
  });

  it('rejects mutated valid frames with a LifeboatError, never a crash or a silently different frame', () => {
    fc.assert(
      fc.property(frameArb, fc.nat(), fc.integer({ min: 1, max: 255 }), (frame, pos, xor) => {
        const bytes = encodeFrameBuffer(frame);
        const i = pos % bytes.length;
        bytes[i] = bytes[i]! ^ xor;
        const got = decodeAll(bytes, []);
        // A single damaged byte is always caught (CRC-32 detects every burst of up to 32 bits).
        expect(got).toBeInstanceOf(LifeboatError);
        expect((got as LifeboatError).code).toMatch(/^LB_PROTO_/);
      }),
      { numRuns: 1000 },
    );
  });

  it('rejects a truncated frame at end of stream with LB_PROTO_TRUNCATED', () => {
    fc.assert(
      fc.property(frameArb, fc.nat(), (frame, n) => {
        const bytes = encodeFrameBuffer(frame);
        const cut = 1 + (n % (bytes.length - 1));
        const got = decodeAll(bytes.subarray(0, cut), []);
        expect((got as LifeboatError).code).toBe('LB_PROTO_TRUNCATED');
      }),
    );
  });

  it('rejects an oversized frame from its header alone', () => {
    const bytes = encodeFrameBuffer({
      type: 'data',
      seq: 1,
      disk: 0,
      offset: 0,
      data: Buffer.alloc(5000),
    });
    const d = new FrameDecoder({ maxPayloadBytes: 4096 });
    expect(() => d.push(bytes.subarray(0, FRAME_HEADER_BYTES))).toThrow(
      expect.objectContaining({ code: 'LB_PROTO_FRAME_TOO_LARGE' }),
    );
  });

  it('names the wrong magic and the wrong version', () => {
    const bytes = encodeFrameBuffer({ type: 'ack', seq: 3 });
    const wrongMagic = Buffer.from(bytes);
    wrongMagic.write('GET ', 0, 'latin1');
    expect(decodeAll(wrongMagic, [])).toMatchObject({ code: 'LB_PROTO_BAD_MAGIC' });
    for (const v of [0, PROTOCOL_VERSION + 1, 255]) {
      const wrongVersion = Buffer.from(bytes);
      wrongVersion[4] = v;
      expect(decodeAll(wrongVersion, [])).toMatchObject({
        code: 'LB_PROTO_UNSUPPORTED_VERSION',
        details: { version: v, supported: PROTOCOL_VERSION, minSupported: 1 },
      });
    }
  });

  it('speaks version 1 and 2: version-2 frame types do not exist in a version-1 frame, on either side', () => {
    const request: Frame = { type: 'baseline-request', disk: 0, request: 7 };
    expect(() => encodeFrame(request, 1)).toThrow(
      expect.objectContaining({ code: 'LB_PROTO_MALFORMED' }),
    );
    // Forge a version-1 header on a version-2 type, with a valid CRC: the decoder refuses it.
    const v2 = encodeFrameBuffer(request);
    const forged = Buffer.from(v2);
    forged[4] = 1;
    forged.writeUInt32BE(
      crc32(forged.subarray(FRAME_HEADER_BYTES), crc32(forged.subarray(0, 20))),
      20,
    );
    expect(decodeAll(forged, [])).toMatchObject({ code: 'LB_PROTO_MALFORMED' });
    // The same frame in version 2 decodes; a version-1 ack decodes too.
    expect(decodeAll(v2, [])).toEqual([request]);
    expect(decodeAll(encodeFrameBuffer({ type: 'ack', seq: 4 }), [])).toEqual([
      { type: 'ack', seq: 4 },
    ]);
    expect(decodeAll(Buffer.concat(encodeFrame({ type: 'ack', seq: 4 }, 1)), [])).toEqual([
      { type: 'ack', seq: 4 },
    ]);
  });

  it('holds a session to the version it agreed: a frame of another version is refused', () => {
    const d = new FrameDecoder();
    d.lockVersion(2);
    expect(d.push(Buffer.concat(encodeFrame({ type: 'ack', seq: 1 }, 2)))).toHaveLength(1);
    expect(() => d.push(Buffer.concat(encodeFrame({ type: 'ack', seq: 2 }, 1)))).toThrow(
      expect.objectContaining({ code: 'LB_PROTO_UNSUPPORTED_VERSION' }),
    );
  });

  it('rejects inconsistent baseline frames', () => {
    const head: Frame = {
      type: 'baseline',
      request: 1,
      disk: 0,
      point: 'p1',
      chunkSize: 65536,
      size: 65536 * 3,
      chunks: 3,
      key: 'ab'.repeat(32),
    };
    expect(decodeAll(encodeFrameBuffer(head), [])).toEqual([head]);
    const bad: Array<[string, Frame]> = [
      ['chunk count', { ...head, chunks: 2 }],
      ['chunks without a point', { ...head, point: null }],
      ['chunks with an error', { ...head, error: { code: 'LB_X', message: 'no' } }],
      ['short key', { ...head, key: 'ab' }],
      ['chunk size', { ...head, chunkSize: 1000, chunks: 197 }],
    ];
    for (const [what, f] of bad)
      expect(decodeAll(encodeFrameBuffer(f), []), what).toMatchObject({
        code: 'LB_PROTO_MALFORMED',
      });
    const entries = Buffer.alloc(2 * BASELINE_ENTRY_BYTES);
    entries[BASELINE_ENTRY_BYTES] = 1;
    const ok: Frame = { type: 'baseline-digests', request: 1, first: 0, entries };
    expect(decodeAll(encodeFrameBuffer(ok), [])).toEqual([ok]);
    const kind2 = Buffer.from(entries);
    kind2[0] = 2;
    const zeroWithDigest = Buffer.from(entries);
    zeroWithDigest[5] = 1;
    for (const [what, e] of [
      ['kind 2', kind2],
      ['a zero entry with a digest', zeroWithDigest],
      ['a partial entry', entries.subarray(0, 20)],
      ['no entry', Buffer.alloc(0)],
    ] as const)
      expect(decodeAll(encodeFrameBuffer({ ...ok, entries: e }), []), what).toMatchObject({
        code: 'LB_PROTO_MALFORMED',
      });
  });
});
