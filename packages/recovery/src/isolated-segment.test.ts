import { mkdtemp, rm } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { IsolatedSegment } from './isolated-segment.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lb-seg-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

function frame(payload: string): Buffer {
  const b = Buffer.from(payload);
  const h = Buffer.alloc(4);
  h.writeUInt32BE(b.length);
  return Buffer.concat([h, b]);
}

async function port(path: string): Promise<{ s: Socket; got: () => string }> {
  const s = connect(path);
  let data = Buffer.alloc(0);
  s.on('data', (d: Buffer) => (data = Buffer.concat([data, d])));
  await new Promise((r) => s.once('connect', r));
  return { s, got: () => data.toString('latin1') };
}

describe('IsolatedSegment', () => {
  it('repeats each length-prefixed frame to every other port, whole, and not to the sender', async () => {
    const seg = await IsolatedSegment.start(join(dir, 'seg.sock'));
    const [a, b, c] = [
      await port(seg.socketPath),
      await port(seg.socketPath),
      await port(seg.socketPath),
    ];
    // A frame split across writes is forwarded once it is complete.
    const f = frame('hello-from-a');
    a.s.write(f.subarray(0, 5));
    await new Promise((r) => setTimeout(r, 50));
    a.s.write(Buffer.concat([f.subarray(5), frame('second')]));
    const deadline = Date.now() + 5000;
    while ((!b.got().includes('second') || !c.got().includes('second')) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 20));
    }
    expect(b.got()).toBe(`${f.toString('latin1')}${frame('second').toString('latin1')}`);
    expect(c.got()).toBe(b.got());
    expect(a.got()).toBe('');
    expect(seg.framesForwarded).toBe(2);
    expect(seg.connected).toBe(3);
    await seg.close();
    for (const p of [a, b, c]) p.s.destroy();
  });
});
