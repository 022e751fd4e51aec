import { mkdtemp, open, readdir, rm, stat, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { frameBufferPool } from '@lifeboat/protocol';
import { Journal } from './journal.js';
import type { JournalInput, JournalOptions, JournalRecord } from './journal.js';

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lb-journal-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

function data(machine: string, seq: number, bytes: number): JournalInput {
  return {
    kind: 'data',
    machine,
    disk: 'vda',
    seq,
    a: seq * 4096,
    b: 0,
    body: Buffer.alloc(bytes, seq & 0xff),
  };
}

// Every test runs with direct writes (the default, where the file system takes them: segments
// end in zero padding to 4 KiB) and through the page cache.
describe.each([true, false])('Journal (direct I/O %s)', (direct) => {
  const openJournal = (o: Omit<JournalOptions, 'direct'>) => Journal.open({ ...o, direct });

  it('gives a recyclable body back to the frame pool, detached, once durable and not held', async () => {
    const { journal } = await openJournal({ dir, holdBytes: 300 * 1024 });
    const body = (seq: number): Buffer => frameBufferPool.take(256 * 1024).fill(seq);
    const before = frameBufferPool.counters.given;
    const b1 = body(1);
    const r1 = await journal.append({ ...data('m', 1, 0), body: b1, recycle: true });
    // Not held: detached (every view reads as empty) and back in the pool; read from disk.
    expect(b1.length).toBe(0);
    expect(frameBufferPool.counters.given).toBe(before + 1);
    expect((await journal.readBody(r1)).equals(Buffer.alloc(256 * 1024, 1))).toBe(true);
    // Held: untouched, and the reader gets those very bytes.
    const b2 = body(2);
    const r2 = await journal.append({ ...data('m', 2, 0), body: b2, hold: true, recycle: true });
    expect(b2.length).toBe(256 * 1024);
    expect(await journal.readBody(r2)).toBe(b2);
    // Held beyond holdBytes: recycled like any other.
    const b3 = body(3);
    const b4 = body(4);
    const [r3, r4] = await Promise.all([
      journal.append({ ...data('m', 3, 0), body: b3, hold: true, recycle: true }),
      journal.append({ ...data('m', 4, 0), body: b4, hold: true, recycle: true }),
    ]);
    expect(b3.length).toBe(256 * 1024);
    expect(b4.length).toBe(0);
    expect(await journal.readBody(r3)).toBe(b3);
    expect((await journal.readBody(r4)).equals(Buffer.alloc(256 * 1024, 4))).toBe(true);
    // Without recycle nothing is detached.
    const b5 = body(5);
    await journal.append({ ...data('m', 5, 0), body: b5 });
    expect(b5.length).toBe(256 * 1024);
    await journal.close();
  });

  it('makes appends durable in group commits and replays them in order after reopen', async () => {
    const { journal } = await openJournal({ dir });
    const appended = await Promise.all(
      Array.from({ length: 200 }, (_, i) => journal.append(data(i % 2 ? 'm1' : 'm2', i + 1, 1000))),
    );
    expect(journal.counters.appends).toBe(200);
    // Concurrent appends share fsyncs.
    expect(journal.counters.syncs).toBeLessThan(200);
    expect(await journal.readBody(appended[7]!)).toEqual(Buffer.alloc(1000, 8));
    await journal.close();
    const again = await openJournal({ dir });
    expect(again.records.map((r) => r.seq)).toEqual(appended.map((r) => r.seq));
    expect(await again.journal.readBody(again.records[199]!)).toEqual(Buffer.alloc(1000, 200));
    await again.journal.close();
  });

  it('drops a torn tail (crash in the middle of an append) and keeps every whole record', async () => {
    const { journal } = await openJournal({ dir });
    let last: JournalRecord | undefined;
    for (let i = 1; i <= 5; i++) last = await journal.append(data('m', i, 5000));
    await journal.close();
    const seg = (await readdir(dir)).sort()[0]!;
    // Cut into the last record's body (past the padding a direct write leaves after it).
    await truncate(join(dir, seg), last!.bodyPosition + last!.bodyLength - 100);
    const again = await openJournal({ dir });
    expect(again.records.map((r) => r.seq)).toEqual([1, 2, 3, 4]);
    expect(again.corruptSegments).toEqual([]);
    // New appends go after the valid prefix and replay too.
    await again.journal.append(data('m', 5, 10));
    await again.journal.close();
    const third = await openJournal({ dir });
    expect(third.records.map((r) => r.seq)).toEqual([1, 2, 3, 4, 5]);
    await third.journal.close();
  });

  it('deletes segments once all their records are released and reports space', async () => {
    const { journal } = await openJournal({
      dir,
      maxBytes: 4 * 1024 * 1024,
      segmentBytes: 1024 * 1024,
    });
    let seq = 0;
    while (!journal.full) await journal.append(data('m', ++seq, 64 * 1024));
    expect(journal.segmentCount).toBeGreaterThan(2);
    let spaced = false;
    journal.once('space', () => (spaced = true));
    await journal.release('m', seq - 1);
    expect(spaced).toBe(true);
    expect(journal.usedBytes).toBeLessThan(2 * 1024 * 1024);
    await journal.release('m', seq);
    expect(journal.usedBytes).toBe(0);
    await journal.close();
    const again = await openJournal({ dir });
    expect(again.records).toEqual([]);
    await again.journal.close();
  });

  it('keeps bodies in memory after their fsync up to holdBytes, then reads them back', async () => {
    const { journal } = await openJournal({ dir, holdBytes: 2500 });
    const recs = await Promise.all(
      [1, 2, 3].map((seq) => journal.append({ ...data('m', seq, 1000), hold: true })),
    );
    // Only bodies asked to be held are.
    const unheld = await journal.append(data('m', 10, 1000));
    // Two bodies fit in 2500 bytes; the third is read back from the segment.
    expect(journal.heldBodyBytes).toBe(2000);
    for (const r of [...recs, unheld])
      expect(await journal.readBody(r)).toEqual(Buffer.alloc(1000, r.seq));
    expect(journal.heldBodyBytes).toBe(0);
    // A body is let go once read: asked again (the record applied again), it comes from disk.
    expect(await journal.readBody(recs[0]!)).toEqual(Buffer.alloc(1000, 1));
    // Released records free their held bodies too (a dropped backlog).
    const more = await journal.append({ ...data('m', 4, 1000), hold: true });
    await journal.append({ ...data('other', 1, 1000), hold: true });
    expect(journal.heldBodyBytes).toBe(2000);
    await journal.release('m', 4);
    expect(journal.heldBodyBytes).toBe(1000);
    expect(await journal.readBody(more)).toEqual(Buffer.alloc(1000, 4));
    await journal.close();
  });

  it('journals a decoded DATA frame with the CRC the decoder computed, valid after reopen', async () => {
    const { FrameDecoder, encodeFrameBuffer } = await import('@lifeboat/protocol');
    const bytes = Buffer.alloc(50_000);
    for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 7919) & 0xff;
    const [f] = new FrameDecoder().push(
      encodeFrameBuffer({ type: 'data', seq: 1, disk: 0, offset: 0, data: bytes }),
    );
    if (f?.type !== 'data') throw new Error('not data');
    const { journal } = await openJournal({ dir, holdBytes: 0 });
    await journal.append({ ...data('m', 1, 0), body: f.data });
    await journal.close();
    const again = await openJournal({ dir });
    expect(again.corruptSegments).toEqual([]);
    expect(again.records).toHaveLength(1);
    expect(await again.journal.readBody(again.records[0]!)).toEqual(bytes);
    await again.journal.close();
  });

  it("tells the zero padding after a segment's last record from damage, and finds damage", async () => {
    const { journal } = await openJournal({ dir, segmentBytes: 1024 * 1024, maxBytes: 64 << 20 });
    expect(journal.directIo).toBe(direct);
    // Odd sizes, one batch each: every batch ends mid-block and the next rewrites that block.
    const sizes = Array.from({ length: 40 }, (_, i) => 1000 + 7919 * i);
    for (const [i, n] of sizes.entries()) await journal.append(data('m', i + 1, n));
    await journal.close();
    const names = (await readdir(dir)).sort();
    expect(names.length).toBeGreaterThan(2);
    if (direct) {
      for (const n of names) expect((await stat(join(dir, n))).size % 4096).toBe(0);
    }
    const again = await openJournal({ dir, segmentBytes: 1024 * 1024, maxBytes: 64 << 20 });
    expect(again.corruptSegments).toEqual([]);
    expect(again.records.map((r) => r.seq)).toEqual(sizes.map((_, i) => i + 1));
    for (const [i, r] of again.records.entries()) {
      // equals(), not toEqual: a deep compare of 300 KiB takes seconds.
      expect(
        (await again.journal.readBody(r)).equals(Buffer.alloc(sizes[i]!, (i + 1) & 0xff)),
      ).toBe(true);
    }
    await again.journal.close();
    // A flipped byte in an older segment's record is damage, padding or not.
    const older = join(dir, names[0]!);
    const fh = await open(older, 'r+');
    await fh.write(Buffer.from([0x5a]), 0, 1, 100);
    await fh.close();
    const third = await openJournal({ dir, segmentBytes: 1024 * 1024, maxBytes: 64 << 20 });
    expect(third.corruptSegments.map((c) => c.segment)).toEqual([
      Number(/\d+/.exec(names[0]!)![0]),
    ]);
    await third.journal.close();
  });

  it('writes a batch larger than the direct-write buffer whole', async () => {
    const { journal } = await openJournal({ dir });
    // 48 appends of 256 KiB at once: one group commit of 12 MiB, more than the 8 MiB buffer.
    const recs = await Promise.all(
      Array.from({ length: 48 }, (_, i) => journal.append(data('m', i + 1, 256 * 1024 + i))),
    );
    expect(journal.counters.syncs).toBeLessThan(48);
    // A body larger than a direct read's buffer is read back through the page cache.
    const large = await journal.append(data('m', 49, 3 * 1024 * 1024 + 5));
    expect((await journal.readBody(large)).equals(Buffer.alloc(3 * 1024 * 1024 + 5, 49))).toBe(
      true,
    );
    await journal.close();
    const again = await openJournal({ dir });
    expect(again.records.map((r) => r.seq)).toEqual([...recs.map((r) => r.seq), 49]);
    for (const [i, r] of again.records.slice(0, 48).entries()) {
      const want = Buffer.alloc(256 * 1024 + i, (i + 1) & 0xff);
      expect((await again.journal.readBody(r)).equals(want)).toBe(true);
    }
    await again.journal.close();
  });

  it('refuses a body read back from disk that the disk changed after it was acknowledged', async () => {
    const { journal } = await openJournal({ dir, holdBytes: 0 });
    const good = await journal.append(data('m', 1, 5000));
    const bad = await journal.append(data('m', 2, 5000));
    // A flipped bit in the second body, as a failing disk would leave it.
    const seg = join(dir, (await readdir(dir)).sort()[0]!);
    const fh = await open(seg, 'r+');
    const b = Buffer.alloc(1);
    await fh.read(b, 0, 1, bad.bodyPosition + 10);
    await fh.write(Buffer.from([b[0]! ^ 0x01]), 0, 1, bad.bodyPosition + 10);
    await fh.close();
    expect((await journal.readBody(good)).equals(Buffer.alloc(5000, 1))).toBe(true);
    await expect(journal.readBody(bad)).rejects.toMatchObject({
      code: 'LB_PS_JOURNAL_CORRUPT',
      details: { machine: 'm', seq: 2 },
    });
    await journal.close();
  });
});
