import { connect, createServer } from 'node:tls';
import type { TLSSocket } from 'node:tls';
import { crc32 } from 'node:zlib';
import type { ProcessServer } from '@lifeboat/process-server';
import {
  FRAME_MAGIC,
  FrameDecoder,
  PROTOCOL_VERSION,
  ReplicationClient,
  encodeFrame,
  encodeFrameBuffer,
} from '@lifeboat/protocol';
import type { Frame } from '@lifeboat/protocol';
import type { LifeboatError } from '@lifeboat/protocol';
import type { Store } from '@lifeboat/store';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  RawSession,
  SourceMachine,
  startTestProcessServer,
  prng,
  verifyPoints,
  waitUntil,
} from './process-server-fixtures.js';
import type { TestPki, TestProcessServer } from './process-server-fixtures.js';

let pki: TestPki;
let store: Store;
let server: ProcessServer;
let ps: TestProcessServer | undefined;
const raws: RawSession[] = [];
const clients: ReplicationClient[] = [];

// A well-behaved agent streams through every fault below; it must never notice them.
const bystanderSrc = new SourceMachine('bystander', [{ name: 'vda', size: 256 * 1024 }]);
let bystander: ReplicationClient;
let bystanderDisconnects = 0;
let bystanderStop = false;
let bystanderLoop: Promise<void>;

beforeAll(async () => {
  ps = await startTestProcessServer('lb-ps-faults-', {
    helloTimeoutMs: 1000,
  });
  ({ pki, store, server } = ps);
  bystander = agent(bystanderSrc);
  bystander.on('disconnected', () => bystanderDisconnects++);
  await bystander.start();
  bystanderLoop = (async () => {
    const rnd = prng(42);
    while (!bystanderStop) {
      for (let i = 0; i < 8; i++) {
        const off = Math.floor(rnd() * 500) * 512;
        const data = Buffer.alloc(512 * (1 + Math.floor(rnd() * 10)), Math.floor(rnd() * 256));
        const len = Math.min(data.length, 256 * 1024 - off);
        await bystander.write('vda', off, data.subarray(0, len));
        bystanderSrc.write('vda', off, data.subarray(0, len));
      }
      const { cutId } = await bystander.cut();
      bystanderSrc.cut(cutId);
      await bystander.waitForAck();
      // An agent's cycle every 100 ms keeps the point count (and the final check) small.
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  })();
});

afterAll(async () => {
  bystanderStop = true;
  await bystanderLoop?.catch(() => undefined);
  for (const r of raws) r.destroy();
  for (const c of clients) await c.close();
  await ps?.stop();
});

function agent(src: SourceMachine, id = pki.client): ReplicationClient {
  const c = new ReplicationClient({
    host: '127.0.0.1',
    port: server.port,
    servername: 'localhost',
    ca: pki.ca,
    cert: id.cert,
    key: id.key,
    machine: src.machine,
    disks: src.helloDisks(),
    reconnectInitialDelayMs: 50,
    reconnectMaxDelayMs: 500,
  });
  clients.push(c);
  return c;
}

async function raw(
  machine?: string,
  disks = [{ name: 'vda', size: 64 * 1024 }],
): Promise<RawSession> {
  const r = await RawSession.connect(server.port, pki.ca, pki.client);
  raws.push(r);
  if (machine !== undefined) {
    r.send({ type: 'hello', machine, disks, oldestUnackedSeq: null });
    const w = await r.waitFor((f) => f.type === 'welcome');
    expect(w?.type).toBe('welcome');
  }
  return r;
}

/** A frame with a correct header and CRC around an arbitrary payload (in the session's version). */
function frameWith(type: number, seq: number, payload: Buffer, length = payload.length): Buffer {
  const h = Buffer.alloc(24);
  h.writeUInt32BE(FRAME_MAGIC, 0);
  h.writeUInt8(PROTOCOL_VERSION, 4);
  h.writeUInt8(type, 5);
  h.writeUInt32BE(length, 8);
  h.writeBigUInt64BE(BigInt(seq), 12);
  h.writeUInt32BE(crc32(payload, crc32(h.subarray(0, 20))), 20);
  return Buffer.concat([h, payload]);
}

describe('process server faults', () => {
  it('refuses a client without a certificate and one from another CA', async () => {
    // A connection without a certificate gets an ERROR frame naming the reason, then a close.
    const noCert = connect({
      host: '127.0.0.1',
      port: server.port,
      ca: pki.ca,
      servername: 'localhost',
      minVersion: 'TLSv1.3',
    });
    const got: Buffer[] = [];
    noCert.on('data', (c: Buffer) => got.push(c));
    noCert.on('error', () => undefined);
    await new Promise((resolve) => noCert.on('close', resolve));
    const frames = new FrameDecoder().push(Buffer.concat(got));
    expect(frames[0]).toMatchObject({ type: 'error', code: 'LB_PROTO_UNAUTHORIZED' });

    // The agent library reports the same code (and keeps retrying: the certificate may be renewed).
    const intruder = agent(
      new SourceMachine('intruder', [{ name: 'vda', size: 4096 }]),
      pki.foreign,
    );
    const seen = new Promise<LifeboatError>((resolve) => intruder.once('server-error', resolve));
    void intruder.start().catch(() => undefined);
    const e = await seen;
    expect(e.code).toBe('LB_PROTO_UNAUTHORIZED');
    expect(e.message).toMatch(/CA/);
    expect(server.healthReport().machines.map((m) => m.machine)).not.toContain('intruder');
    await intruder.close();
  });

  it('rejects frames before the hello, and a silent connection', async () => {
    const r = await raw();
    r.send({ type: 'ack', seq: 1 });
    expect(await r.errorCode()).toBe('LB_PROTO_UNEXPECTED_FRAME');
    const silent = await raw();
    expect(await silent.errorCode()).toBe('LB_PS_HELLO_TIMEOUT');
  });

  it('rejects garbage, malformed, oversized and damaged frames with their codes', async () => {
    const garbage = await raw('m-garbage');
    garbage.sendBytes(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
    expect(await garbage.errorCode()).toBe('LB_PROTO_BAD_MAGIC');

    const malformed = await raw('m-malformed');
    malformed.sendBytes(frameWith(4, 1, Buffer.alloc(5)));
    expect(await malformed.errorCode()).toBe('LB_PROTO_MALFORMED');

    const big = await raw('m-big');
    big.sendBytes(frameWith(3, 1, Buffer.alloc(0), 200 * 1024 * 1024));
    expect(await big.errorCode()).toBe('LB_PROTO_FRAME_TOO_LARGE');

    const damaged = await raw('m-damaged');
    const f = encodeFrameBuffer({
      type: 'data',
      seq: 1,
      disk: 0,
      offset: 0,
      data: Buffer.alloc(4096, 7),
    });
    f[f.length - 10] = f[f.length - 10]! ^ 0x40;
    damaged.sendBytes(f);
    expect(await damaged.errorCode()).toBe('LB_PROTO_BAD_CHECKSUM');
  });

  it('rejects a sequence gap, an unknown disk and a resume gap', async () => {
    const gap = await raw('m-gap');
    gap.send({ type: 'zero', seq: 1, disk: 0, offset: 0, length: 512 });
    gap.send({ type: 'zero', seq: 3, disk: 0, offset: 0, length: 512 });
    expect(await gap.errorCode()).toBe('LB_PROTO_SEQUENCE_GAP');

    const unknown = await raw('m-unknown');
    unknown.send({ type: 'data', seq: 1, disk: 3, offset: 0, data: Buffer.alloc(512) });
    expect(await unknown.errorCode()).toBe('LB_PROTO_UNKNOWN_DISK');

    // m-gap is known with one durable frame; claiming to hold only frames from 10 on is a gap.
    const resume = await raw();
    resume.send({
      type: 'hello',
      machine: 'm-gap',
      disks: [{ name: 'vda', size: 64 * 1024 }],
      oldestUnackedSeq: 10,
    });
    expect(await resume.errorCode()).toBe('LB_PROTO_RESUME_GAP');
  });

  it('rejects a write past the disk end; the agent sees the code, stops and logs it', async () => {
    const logged: unknown[] = [];
    const src = new SourceMachine('m-past-end', [{ name: 'vda', size: 64 * 1024 }]);
    const c = new ReplicationClient({
      host: '127.0.0.1',
      port: server.port,
      servername: 'localhost',
      ca: pki.ca,
      cert: pki.client.cert,
      key: pki.client.key,
      machine: src.machine,
      disks: src.helloDisks(),
      logger: { info() {}, warn() {}, error: (o) => logged.push(o) },
    });
    clients.push(c);
    const failed = new Promise<LifeboatError>((resolve) => c.once('failed', resolve));
    await c.start();
    await c.write('vda', 63 * 1024, Buffer.alloc(2048));
    const err = await failed;
    expect(err.code).toBe('LB_PROTO_OUT_OF_RANGE');
    expect(err.details).toMatchObject({
      disk: 'vda',
      offset: 63 * 1024,
      length: 2048,
      size: 64 * 1024,
    });
    await expect(c.waitForAck()).rejects.toMatchObject({ code: 'LB_PROTO_OUT_OF_RANGE' });
    expect(JSON.stringify(logged)).toContain('LB_PROTO_OUT_OF_RANGE');
  });

  it('keeps what arrived before a session vanished mid-frame; the agent resumes there', async () => {
    const r = await raw('m-vanish');
    for (let seq = 1; seq <= 3; seq++)
      r.send({
        type: 'data',
        seq,
        disk: 0,
        offset: (seq - 1) * 4096,
        data: Buffer.alloc(4096, seq),
      });
    await r.waitFor((f) => f.type === 'ack' && f.seq === 3);
    const fourth = encodeFrameBuffer({
      type: 'data',
      seq: 4,
      disk: 0,
      offset: 0,
      data: Buffer.alloc(4096, 9),
    });
    r.sendBytes(fourth.subarray(0, 1000));
    await new Promise((res) => setTimeout(res, 100));
    r.destroy();
    const src = new SourceMachine('m-vanish', [{ name: 'vda', size: 64 * 1024 }]);
    for (let seq = 1; seq <= 3; seq++) src.write('vda', (seq - 1) * 4096, Buffer.alloc(4096, seq));
    const c = agent(src);
    await c.start();
    expect(c.nextSeq).toBe(4);
    const { cutId } = await c.cut();
    src.cut(cutId);
    await c.waitForAck();
    await waitUntil(
      async () => (await store.listPoints({ machine: 'm-vanish' })).length === 1,
      'the point of m-vanish',
    );
    expect(await verifyPoints(store, src)).toBe(1);
  });

  it('survives a client that stops reading its acknowledgements', async () => {
    const r = await raw('m-deaf', [{ name: 'vda', size: 1024 * 1024 }]);
    r.socket.pause();
    for (let seq = 1; seq <= 3000; seq++)
      r.send({ type: 'zero', seq, disk: 0, offset: (seq % 2048) * 512, length: 512 });
    r.send({ type: 'cut', seq: 3001, cutId: 'deaf-1', kind: 'crash', time: Date.now() });
    await waitUntil(
      () =>
        server.healthReport().machines.find((m) => m.machine === 'm-deaf')?.committedSeq === 3001,
      'the deaf client cut committed',
    );
    r.socket.resume();
    expect(await r.waitFor((f) => f.type === 'ack' && f.seq === 3001)).toBeDefined();
  });

  it('closes a session whose agent stops reading for longer than stallTimeoutMs, with LB_PROTO_STALLED', async () => {
    // A server of its own, with a short stall limit; the bystander's server is not touched.
    const stallPs = await startTestProcessServer('lb-ps-stall-', { stallTimeoutMs: 1500 });
    try {
      const r = await RawSession.connect(stallPs.server.port, stallPs.pki.ca, stallPs.pki.client);
      raws.push(r);
      // A big, all-zero disk: its baseline is 17 bytes per 64 KiB chunk, 34 MiB for 128 GiB,
      // more than loopback's socket buffers hold, so the server's writes back up.
      const size = 128 * 1024 * 1024 * 1024;
      r.send({
        type: 'hello',
        machine: 'm-stall',
        disks: [{ name: 'vda', size }],
        oldestUnackedSeq: null,
      });
      await r.waitFor((f) => f.type === 'welcome');
      r.send({ type: 'cut', seq: 1, cutId: 'stall-1', kind: 'crash', time: Date.now() });
      await r.waitFor((f) => f.type === 'committed');
      r.socket.pause();
      r.send({ type: 'baseline-request', disk: 0, request: 1 });
      const t0 = Date.now();
      await waitUntil(
        () => stallPs.server.healthReport().ingest.sessions === 0,
        'the stalled session to be closed',
        60_000,
      );
      expect(Date.now() - t0).toBeGreaterThanOrEqual(1500);
      // What the agent reads when it reads again: the digests that fitted, then the code.
      r.socket.resume();
      await waitUntil(() => r.closed, 'the connection to close', 30_000);
      const err = r.frames.find((f) => f.type === 'error');
      expect(err).toMatchObject({ type: 'error', code: 'LB_PROTO_STALLED' });
      // The server still takes sessions.
      const again = await RawSession.connect(
        stallPs.server.port,
        stallPs.pki.ca,
        stallPs.pki.client,
      );
      raws.push(again);
      again.send({
        type: 'hello',
        machine: 'm-stall',
        disks: [{ name: 'vda', size }],
        oldestUnackedSeq: null,
      });
      expect(await again.waitFor((f) => f.type === 'welcome')).toMatchObject({ lastSeq: 1 });
    } finally {
      await stallPs.stop();
    }
  });

  it('speaks protocol version 1 to an old agent, and holds the session to it', async () => {
    const r = await raw();
    r.send({
      type: 'hello',
      machine: 'm-v1',
      disks: [{ name: 'vda', size: 64 * 1024 }],
      oldestUnackedSeq: null,
      version: 1,
    });
    expect(await r.waitFor((f) => f.type === 'welcome')).toMatchObject({ version: 1, lastSeq: 0 });
    for (const p of encodeFrame({ type: 'zero', seq: 1, disk: 0, offset: 0, length: 512 }, 1))
      r.socket.write(p);
    expect(await r.waitFor((f) => f.type === 'ack')).toMatchObject({ seq: 1 });
    // A version-2 frame in a version-1 session.
    r.send({ type: 'baseline-request', disk: 0, request: 1 });
    expect(await r.errorCode()).toBe('LB_PROTO_UNSUPPORTED_VERSION');
    // A hello of a version nobody speaks yet is refused naming the newest this server speaks.
    const future = await raw();
    const hello = encodeFrameBuffer({
      type: 'hello',
      machine: 'm-v9',
      disks: [],
      oldestUnackedSeq: null,
    });
    hello[4] = 9;
    hello.writeUInt32BE(crc32(hello.subarray(24), crc32(hello.subarray(0, 20))), 20);
    future.sendBytes(hello);
    const e = await future.waitFor((f) => f.type === 'error');
    expect(e).toMatchObject({
      code: 'LB_PROTO_UNSUPPORTED_VERSION',
      details: { supported: PROTOCOL_VERSION },
    });
  });

  it('the agent library falls back to version 1 against a version-1 server, and resyncs without a baseline there', async () => {
    // A stand-in for a process server of the previous release: it refuses version 2 as that
    // release did (an error frame in version 1 naming the version it supports), then speaks 1.
    const hellos: number[] = [];
    const old = createServer({
      cert: pki.server.cert,
      key: pki.server.key,
      ca: pki.ca,
      requestCert: true,
      minVersion: 'TLSv1.3',
    });
    old.on('secureConnection', (s: TLSSocket) => {
      s.on('error', () => undefined);
      s.once('data', (chunk: Buffer) => {
        const version = chunk[4]!;
        hellos.push(version);
        const reply: Frame =
          version === 1
            ? {
                type: 'welcome',
                sessionId: 'old',
                lastSeq: 0,
                maxPayloadBytes: 1024 * 1024,
                resyncRequired: false,
                latestCut: null,
                version: 1,
              }
            : {
                type: 'error',
                code: 'LB_PROTO_UNSUPPORTED_VERSION',
                message: 'Protocol version 2 is not supported (this side speaks 1).',
                details: { version, supported: 1 },
              };
        for (const p of encodeFrame(reply, 1)) s.write(p);
        if (version !== 1) s.end();
      });
    });
    await new Promise<void>((resolve) => old.listen(0, '127.0.0.1', resolve));
    const addr = old.address();
    const c = new ReplicationClient({
      host: '127.0.0.1',
      port: typeof addr === 'object' && addr ? addr.port : 0,
      servername: 'localhost',
      ca: pki.ca,
      cert: pki.client.cert,
      key: pki.client.key,
      machine: 'm-old-server',
      disks: [{ name: 'vda', size: 4096 }],
      reconnectInitialDelayMs: 20,
    });
    try {
      await c.start();
      expect(hellos).toEqual([2, 1]);
      expect(await c.resyncBaseline('vda')).toBeUndefined();
    } finally {
      await c.close();
      await new Promise<void>((resolve) => {
        old.close(() => resolve());
        setTimeout(resolve, 1000).unref();
      });
    }
  });

  it('left the bystander undisturbed: no disconnect, every point exact', async () => {
    bystanderStop = true;
    await bystanderLoop;
    expect(bystanderDisconnects).toBe(0);
    await waitUntil(
      async () =>
        (await store.listPoints({ machine: 'bystander' })).length === bystanderSrc.cuts.size,
      'bystander points',
    );
    expect(await verifyPoints(store, bystanderSrc)).toBeGreaterThan(0);
  });
});
