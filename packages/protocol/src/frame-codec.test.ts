import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { FrameDecoder, encodeFrameBuffer, FRAME_HEADER_BYTES } from './frame-codec.js';
import type { Frame } from './frame-codec.js';
import { LifeboatError } from './lifeboat-error.js';

const name = fc.stringMatching(/^[A-Za-z0-9._:@-]{1,20}$/);
const u = fc.integer({ min: 0, max: 2 ** 40 });
const seq = fc.integer({ min: 1, max: Number.MAX_SAFE_INTEGER });

const frameArb: fc.Arbitrary<Frame> = fc.oneof(
  fc.record({
    type: fc.constant('hello' as const),
    machine: name,
    disks: fc.uniqueArray(fc.record({ name, size: u.map((n) => n * 512) }), {
      selector: (d) => d.name,
      maxLength: 4,
    }),
    oldestUnackedSeq: fc.option(seq, { nil: null }),
  }),
  fc.record({
    type: fc.constant('welcome' as const),
    sessionId: name,
    lastSeq: u,
    maxPayloadBytes: fc.integer({ min: 5000, max: 2 ** 30 }),
    resyncRequired: fc.boolean(),
    latestCut: fc.option(fc.record({ seq: u, cutId: name, time: u }), { nil: null }),
  }),
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
    const wrongVersion = Buffer.from(bytes);
    wrongVersion[4] = 2;
    expect(decodeAll(wrongVersion, [])).toMatchObject({ code: 'LB_PROTO_UNSUPPORTED_VERSION' });
  });
});
