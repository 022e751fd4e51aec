import { describe, expect, it } from 'vitest';
import { FrameBufferPool, POOL_MIN_BYTES, isPooledView } from './buffer-pool.js';

describe('FrameBufferPool', () => {
  it('hands a given-back buffer out again, for the same or a slightly smaller size', () => {
    const pool = new FrameBufferPool(1024 * 1024);
    const a = pool.take(262_180); // a 256 KiB DATA frame with its header
    expect(a.length).toBe(262_180);
    expect(a.byteOffset).toBe(0);
    expect(isPooledView(a)).toBe(true);
    const ab = a.buffer as ArrayBuffer;
    pool.give(ab);
    expect(pool.heldBytes).toBe(ab.byteLength);
    // The journal's body of the same extent is 36 bytes shorter, in the class below.
    const b = pool.take(262_144);
    expect(b.buffer).toBe(ab);
    expect(pool.heldBytes).toBe(0);
    expect(pool.counters).toMatchObject({ taken: 2, given: 1, allocated: 1 });
  });

  it('allocates when nothing of the class is free, and leaves small sizes to Node', () => {
    const pool = new FrameBufferPool(1024 * 1024);
    const a = pool.take(300_000);
    const b = pool.take(300_000);
    expect(a.buffer).not.toBe(b.buffer);
    expect(pool.counters.allocated).toBe(2);
    const small = pool.take(POOL_MIN_BYTES - 1);
    expect(isPooledView(small)).toBe(false);
    pool.give(small.buffer as ArrayBuffer);
    expect(pool.heldBytes).toBe(0);
  });

  it('keeps at most maxFreeBytes, drops the rest, and ignores detached or odd-sized buffers', () => {
    const pool = new FrameBufferPool(600 * 1024);
    const bufs = [pool.take(256 * 1024), pool.take(256 * 1024), pool.take(256 * 1024)];
    for (const b of bufs) pool.give(b.buffer as ArrayBuffer);
    expect(pool.heldBytes).toBe(512 * 1024);
    expect(pool.counters.dropped).toBe(1);
    const detached = new ArrayBuffer(256 * 1024);
    structuredClone(detached, { transfer: [detached] });
    pool.give(detached);
    pool.give(new ArrayBuffer(256 * 1024 + 1));
    expect(pool.heldBytes).toBe(512 * 1024);
    pool.clear();
    expect(pool.heldBytes).toBe(0);
  });
});
