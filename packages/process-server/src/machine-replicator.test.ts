import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { LifeboatError } from '@lifeboat/protocol';
import { DirectoryBackend, Store } from '@lifeboat/store';
import type { WriteSession } from '@lifeboat/store';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Journal, JournalRecord } from './journal.js';
import { MachineReplicator } from './machine-replicator.js';
import type { CommittedCut, MachineReplicatorDeps } from './machine-replicator.js';
import type { MachineState } from './machine-state-store.js';
import { Semaphore } from './semaphore.js';

const CHUNK = 65536;

/** Waits (polling) until `what` holds, and fails the test if it never does. */
async function until(what: () => boolean): Promise<void> {
  for (let i = 0; i < 400 && !what(); i++) await new Promise((r) => setTimeout(r, 10));
  expect(what()).toBe(true);
}

/** Pushes journal records of one machine's disk `d` into a replicator, keeping their bodies. */
function recordsOf(
  machine: string,
  bodies: Map<JournalRecord, Buffer>,
  target: () => MachineReplicator,
): (kind: 'data' | 'cut', body: Buffer, at?: number) => void {
  let seq = 0;
  return (kind, body, at = 0) => {
    const r: JournalRecord = {
      kind,
      machine,
      disk: kind === 'cut' ? '' : 'd',
      seq: ++seq,
      a: at,
      b: 0,
      segment: 0,
      bodyPosition: 0,
      bodyLength: body.length,
      recordBytes: body.length + 64,
    };
    bodies.set(r, body);
    target().push(r);
  };
}

/** A machine new to the server, with one disk `d` of `chunks` chunks. */
function freshState(machine: string, chunks = 4): MachineState {
  return { machine, releasedSeq: 0, disks: { d: { size: chunks * CHUNK } }, points: {} };
}

/** A journal whose bodies are the ones kept in `bodies` (a copy each read), releasing nothing. */
function journalOver(bodies: Map<JournalRecord, Buffer>): Journal {
  return {
    readBody: async (r: JournalRecord) => Buffer.from(bodies.get(r)!),
    release: async () => undefined,
  } as unknown as Journal;
}

/**
 * What the server does when a machine's backlog is damaged: it marks the machine for resync,
 * which drops the backlog. Keeps the reports.
 */
function resyncOnDamage(
  reports: LifeboatError[],
  rep: () => MachineReplicator,
): (err: LifeboatError) => void {
  return (err) => {
    reports.push(err);
    void rep().dropBacklog();
  };
}

/** What a replicator needs, with one apply slot, no-op saves and quick retries. */
function depsFor(
  store: Store,
  more: Partial<MachineReplicatorDeps> & Pick<MachineReplicatorDeps, 'journal' | 'onCommitted'>,
): MachineReplicatorDeps {
  return {
    store: {
      beginWrite: (o: Parameters<Store['beginWrite']>[0]) => store.beginWrite(o),
      listPoints: (f: Parameters<Store['listPoints']>[0]) => store.listPoints(f),
      findCutPoint: (m: string, d: string, c: string) => store.findCutPoint(m, d, c),
    },
    storeLimit: new Semaphore(8),
    applySlots: new Semaphore(1),
    logger: pino({ level: 'silent' }),
    saveState: async () => undefined,
    retryInitialMs: 10,
    retryMaxMs: 100,
    ...more,
  };
}

describe('MachineReplicator', () => {
  let dir: string;
  let store: Store;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'lb-replicator-'));
    store = await Store.init({
      backend: new DirectoryBackend({ path: dir }),
      passphrase: 'replicator',
      kdfCost: 1024,
    });
  });
  afterAll(async () => {
    await store?.close();
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });

  it('starts a cut before its marker while a slot is idle, gives the slot back when another machine waits, and commits every record at the cut', async () => {
    const bodies = new Map<JournalRecord, Buffer>();
    const journal = journalOver(bodies);
    const events: string[] = [];
    const committed: CommittedCut[] = [];
    const replicatorStore = {
      beginWrite: async (o: Parameters<Store['beginWrite']>[0]): Promise<WriteSession> => {
        events.push(`begin ${o.machine}`);
        const s = await store.beginWrite(o);
        const abort = s.abort.bind(s);
        s.abort = async () => {
          events.push(`abort ${o.machine}`);
          return abort();
        };
        return s;
      },
      listPoints: (f: Parameters<Store['listPoints']>[0]) => store.listPoints(f),
      findCutPoint: (m: string, d: string, c: string) => store.findCutPoint(m, d, c),
    };
    const slots = new Semaphore(1);
    const make = (machine: string): MachineReplicator => {
      return new MachineReplicator(
        freshState(machine),
        depsFor(store, {
          store: replicatorStore,
          journal,
          applySlots: slots,
          onCommitted: (c) => committed.push(c),
        }),
      );
    };
    const a = make('a');
    const b = make('b');
    const pushA = recordsOf('a', bodies, () => a);
    const pushB = recordsOf('b', bodies, () => b);
    const cutMeta = (id: string): Buffer =>
      Buffer.from(JSON.stringify({ cutId: id, kind: 'crash', time: 1 }));
    a.start();
    b.start();
    try {
      const dataA = randomBytes(CHUNK);
      // No cut yet, the only slot idle: a begins its session at once.
      pushA('data', dataA, CHUNK);
      await until(() => events.includes('begin a'));
      // b's whole cut waits for the slot: a gives it back (its session aborted) and b commits.
      pushB('data', randomBytes(CHUNK));
      pushB('cut', cutMeta('cut-b'));
      await until(() => committed.some((c) => c.machine === 'b'));
      expect(events.slice(0, 3)).toEqual(['begin a', 'abort a', 'begin b']);
      expect(committed.some((c) => c.machine === 'a')).toBe(false);
      // a's cut arrives: its records are applied again from the first and committed.
      const moreA = randomBytes(CHUNK);
      pushA('data', moreA, 2 * CHUNK);
      pushA('cut', cutMeta('cut-a'));
      await until(() => committed.some((c) => c.machine === 'a'));
      const point = committed.find((c) => c.machine === 'a')!.points[0]!;
      const reader = await store.openPoint(point.id);
      expect(Buffer.from(await reader.readAt(0, 3 * CHUNK))).toEqual(
        Buffer.concat([Buffer.alloc(CHUNK), dataA, moreA]),
      );
      expect(a.backlogRecords).toBe(0);
    } finally {
      await a.stop();
      await b.stop();
    }
  });

  it('does not retry a record the journal found damaged: it reports it once, and nothing of that backlog is committed', async () => {
    const damaged = new LifeboatError(
      'LB_PS_JOURNAL_CORRUPT',
      'Journal segment 0 fails its CRC-32 check',
    );
    let reads = 0;
    const journal = {
      readBody: async () => {
        reads++;
        throw damaged;
      },
      release: async () => undefined,
    } as unknown as Journal;
    const reports: LifeboatError[] = [];
    const committed: CommittedCut[] = [];
    const rep: MachineReplicator = new MachineReplicator(
      freshState('z'),
      depsFor(store, {
        journal,
        onCommitted: (c) => committed.push(c),
        onJournalDamage: resyncOnDamage(reports, () => rep),
      }),
    );
    const rec = (seq: number, kind: 'data' | 'cut'): JournalRecord => ({
      kind,
      machine: 'z',
      disk: kind === 'cut' ? '' : 'd',
      seq,
      a: 0,
      b: 0,
      segment: 0,
      bodyPosition: 0,
      bodyLength: 100,
      recordBytes: 164,
    });
    rep.start();
    try {
      rep.push(rec(1, 'data'));
      rep.push(rec(2, 'cut'));
      for (let i = 0; i < 200 && rep.backlogRecords > 0; i++)
        await new Promise((r) => setTimeout(r, 10));
      expect(rep.backlogRecords).toBe(0);
      // A while later: no retries of the damaged record, one report, no point.
      await new Promise((r) => setTimeout(r, 200));
      expect(reports).toEqual([damaged]);
      expect(reads).toBe(1);
      expect(committed).toEqual([]);
      expect(await store.listPoints({ machine: 'z' })).toEqual([]);
    } finally {
      await rep.stop();
    }
  });

  it('reads bodies ahead, applies the next cut while the last one is saved, and a failed save costs neither a point nor a duplicate', async () => {
    const bodies = new Map<JournalRecord, Buffer>();
    let reading = 0;
    let mostReading = 0;
    const released: number[] = [];
    const journal = {
      readBody: async (r: JournalRecord) => {
        mostReading = Math.max(mostReading, ++reading);
        await new Promise((res) => setTimeout(res, 5));
        reading--;
        return Buffer.from(bodies.get(r)!);
      },
      release: async (_m: string, seq: number) => void released.push(seq),
    } as unknown as Journal;
    const events: string[] = [];
    const replicatorStore = {
      beginWrite: async (o: Parameters<Store['beginWrite']>[0]): Promise<WriteSession> => {
        const s = await store.beginWrite(o);
        const write = s.write.bind(s);
        s.write = async (offset, data) => {
          events.push(`write ${offset / CHUNK}`);
          return write(offset, data);
        };
        const commit = s.commit.bind(s);
        s.commit = async (opts) => {
          events.push(`commit ${opts?.cut}`);
          return commit(opts);
        };
        return s;
      },
      listPoints: (f: Parameters<Store['listPoints']>[0]) => store.listPoints(f),
      findCutPoint: (m: string, d: string, c: string) => store.findCutPoint(m, d, c),
    };
    // The first save waits for the test; the second fails once.
    let openGate: () => void = () => undefined;
    const gate = new Promise<void>((res) => (openGate = res));
    let saves = 0;
    const saved: MachineState[] = [];
    const committed: CommittedCut[] = [];
    const state = freshState('s', 16);
    const rep = new MachineReplicator(
      state,
      depsFor(store, {
        store: replicatorStore,
        journal,
        saveState: async (st) => {
          const n = ++saves;
          const snapshot = structuredClone(st);
          events.push(`save ${snapshot.lastCut?.cutId}`);
          if (n === 1) await gate;
          if (n === 2) throw new Error('disk full');
          saved.push(snapshot);
          events.push(`saved ${snapshot.lastCut?.cutId}`);
        },
        onCommitted: (c) => committed.push(c),
      }),
    );
    const expected = Buffer.alloc(16 * CHUNK);
    const push = recordsOf('s', bodies, () => rep);
    const pushCut = (first: number, id: string): void => {
      for (let i = first; i < first + 4; i++) {
        const data = randomBytes(CHUNK);
        data.copy(expected, i * CHUNK);
        push('data', data, i * CHUNK);
      }
      push('cut', Buffer.from(JSON.stringify({ cutId: id, kind: 'crash', time: first + 1 })));
    };
    rep.start();
    try {
      pushCut(0, 'c1');
      pushCut(4, 'c2');
      pushCut(8, 'c3');
      // c1 committed and its save held: c2's records go into the store meanwhile, its commit waits.
      await until(() => events.filter((e) => e === 'write 7').length > 0);
      await new Promise((r) => setTimeout(r, 50));
      expect(events.includes('commit c2')).toBe(false);
      expect(released).toEqual([]);
      openGate();
      // c2's save fails: the drain retries from c3's first record, c2 is not committed again.
      await until(() => committed.length === 3 && saved.length === 2);
      expect(events.filter((e) => e.startsWith('commit'))).toEqual([
        'commit c1',
        'commit c2',
        'commit c3',
      ]);
      expect(events.indexOf('saved c1')).toBeLessThan(events.indexOf('commit c2'));
      expect(saved.map((s) => s.releasedSeq)).toEqual([5, 15]);
      expect(released).toEqual([5, 15]);
      expect(rep.lastError).toBeUndefined();
      expect(mostReading).toBeGreaterThan(1);
      for (const id of ['c1', 'c2', 'c3'])
        expect(await store.listPoints({ machine: 's', cut: id })).toHaveLength(1);
      const last = committed[2]!.points[0]!;
      const reader = await store.openPoint(last.id);
      expect(Buffer.from(await reader.readAt(0, 16 * CHUNK))).toEqual(expected);
    } finally {
      await rep.stop();
    }
  });

  it('writes on the point it committed last, not on a newer one written by someone else, and resyncs when that point is deleted', async () => {
    const bodies = new Map<JournalRecord, Buffer>();
    const journal = journalOver(bodies);
    const committed: CommittedCut[] = [];
    const reports: LifeboatError[] = [];
    const state = freshState('q');
    const rep: MachineReplicator = new MachineReplicator(
      state,
      depsFor(store, {
        journal,
        onCommitted: (c) => committed.push(c),
        onJournalDamage: resyncOnDamage(reports, () => rep),
      }),
    );
    const push = recordsOf('q', bodies, () => rep);
    let time = 0;
    const cutMeta = (id: string): Buffer =>
      Buffer.from(JSON.stringify({ cutId: id, kind: 'crash', time: ++time }));
    rep.start();
    try {
      const first = randomBytes(CHUNK);
      push('data', first, 0);
      push('cut', cutMeta('q1'));
      await until(() => committed.length === 1);
      // Another writer puts a newer point on the same disk (a mistaken import, say).
      const other = await store.beginWrite({ machine: 'q', disk: 'd', size: 4 * CHUNK });
      await other.write(CHUNK, randomBytes(CHUNK));
      const foreign = await other.commit({ time: new Date(), kind: 'crash' });
      const second = randomBytes(CHUNK);
      push('data', second, 2 * CHUNK);
      push('cut', cutMeta('q2'));
      await until(() => committed.length === 2);
      const p2 = committed[1]!.points[0]!;
      expect(p2.id).not.toBe(foreign.id);
      const reader = await store.openPoint(p2.id);
      expect(Buffer.from(await reader.readAt(0, 4 * CHUNK))).toEqual(
        Buffer.concat([first, Buffer.alloc(CHUNK), second, Buffer.alloc(CHUNK)]),
      );
      // That point deleted by hand: the next changes have nothing to go on, the machine resyncs.
      await store.deletePoints([p2.id]);
      push('data', randomBytes(CHUNK), 3 * CHUNK);
      push('cut', cutMeta('q3'));
      await until(() => reports.length === 1 && rep.backlogRecords === 0);
      expect(reports[0]!.code).toBe('LB_PS_BASE_POINT_MISSING');
      expect(state.points.d).toBeUndefined();
      expect(committed).toHaveLength(2);
      expect(await store.listPoints({ machine: 'q', cut: 'q3' })).toEqual([]);
    } finally {
      await rep.stop();
    }
  });
  it('after a restart finds a cut it committed before the crash by one read, not a listing of every point, and commits it once', async () => {
    const bodies = new Map<JournalRecord, Buffer>();
    const journal = journalOver(bodies);
    // A store with a history: points of other machines, and of this one.
    for (let i = 0; i < 20; i++) {
      const s = await store.beginWrite({ machine: `other-${i}`, disk: 'd', size: CHUNK });
      await s.write(0, randomBytes(CHUNK));
      await s.commit({ cut: `other-cut-${i}` });
    }
    const data = randomBytes(CHUNK);
    const meta = Buffer.from(JSON.stringify({ cutId: 'r1', kind: 'crash', time: 1 }));
    const run = async (): Promise<{ cut: CommittedCut; listed: number }> => {
      let listed = 0;
      const committed: CommittedCut[] = [];
      // What a restarted server knows: nothing saved of the cut it committed before the crash.
      const rep: MachineReplicator = new MachineReplicator(
        freshState('r'),
        depsFor(store, {
          store: {
            beginWrite: (o) => store.beginWrite(o),
            listPoints: (f) => {
              listed++;
              return store.listPoints(f);
            },
            findCutPoint: (m, d, c) => store.findCutPoint(m, d, c),
          },
          journal,
          onCommitted: (c) => committed.push(c),
        }),
      );
      const push = recordsOf('r', bodies, () => rep);
      rep.start();
      try {
        push('data', data, CHUNK);
        push('cut', meta);
        await until(() => committed.length === 1);
      } finally {
        await rep.stop();
      }
      return { cut: committed[0]!, listed };
    };
    const before = await run();
    const after = await run();
    expect(after.cut.points.map((p) => p.id)).toEqual(before.cut.points.map((p) => p.id));
    expect(after.listed + before.listed).toBe(0);
    expect(await store.listPoints({ machine: 'r', cut: 'r1' })).toHaveLength(1);
    const reader = await store.openPoint(after.cut.points[0]!.id);
    expect(Buffer.from(await reader.readAt(CHUNK, CHUNK))).toEqual(data);
  });
  it("tells a disk's new session the cut's extents, so it reads their base leaves at once", async () => {
    const bodies = new Map<JournalRecord, Buffer>();
    const journal = journalOver(bodies);
    const hinted: Array<Array<{ offset: number; length: number }>> = [];
    const committed: CommittedCut[] = [];
    const rep: MachineReplicator = new MachineReplicator(
      freshState('h', 64),
      depsFor(store, {
        store: {
          beginWrite: async (o) => {
            const s = await store.beginWrite(o);
            const prefetch = s.prefetch!.bind(s);
            s.prefetch = (ranges) => {
              hinted.push(ranges.map((r) => ({ ...r })));
              return prefetch(ranges);
            };
            return s;
          },
          listPoints: (f) => store.listPoints(f),
          findCutPoint: (m, d, c) => store.findCutPoint(m, d, c),
        },
        journal,
        onCommitted: (c) => committed.push(c),
      }),
    );
    const push = recordsOf('h', bodies, () => rep);
    const expected = Buffer.alloc(64 * CHUNK);
    const cut = (id: string, chunks: number[]): void => {
      for (const c of chunks) {
        const data = randomBytes(CHUNK);
        data.copy(expected, c * CHUNK);
        push('data', data, c * CHUNK);
      }
      push('cut', Buffer.from(JSON.stringify({ cutId: id, kind: 'crash', time: chunks[0] })));
    };
    // The whole cut is journaled before the replicator starts: its session sees every extent.
    cut('h1', [3, 40, 17]);
    rep.start();
    try {
      await until(() => committed.length === 1);
      cut('h2', [5, 60]);
      await until(() => committed.length === 2);
      expect(hinted[0]).toEqual([
        { offset: 3 * CHUNK, length: CHUNK },
        { offset: 40 * CHUNK, length: CHUNK },
        { offset: 17 * CHUNK, length: CHUNK },
      ]);
      // The second cut's session may begin before all of its records are in: a prefix of them.
      for (const r of hinted[1] ?? []) expect([5 * CHUNK, 60 * CHUNK]).toContain(r.offset);
      const reader = await store.openPoint(committed[1]!.points[0]!.id);
      expect(Buffer.from(await reader.readAt(0, 64 * CHUNK))).toEqual(expected);
    } finally {
      await rep.stop();
    }
  });
  it('does not report a store failure when its backlog was dropped under a write (the session was aborted, not the store down)', async () => {
    const bodies = new Map<JournalRecord, Buffer>();
    let entered = false;
    let openGate: () => void = () => undefined;
    const gate = new Promise<void>((res) => (openGate = res));
    const gatedStore = {
      beginWrite: async (o: Parameters<Store['beginWrite']>[0]): Promise<WriteSession> => {
        const s = await store.beginWrite(o);
        const write = s.write.bind(s);
        s.write = async (offset, data) => {
          entered = true;
          await gate;
          return write(offset, data);
        };
        return s;
      },
      listPoints: (f: Parameters<Store['listPoints']>[0]) => store.listPoints(f),
      findCutPoint: (m: string, d: string, c: string) => store.findCutPoint(m, d, c),
    };
    const rep = new MachineReplicator(
      freshState('dropped'),
      depsFor(store, {
        store: gatedStore,
        journal: journalOver(bodies),
        onCommitted: () => undefined,
      }),
    );
    const push = recordsOf('dropped', bodies, () => rep);
    push('data', randomBytes(CHUNK), 0);
    push('cut', Buffer.from(JSON.stringify({ cutId: 'c-dropped', kind: 'crash', time: 1 })));
    rep.start();
    try {
      await until(() => entered);
      // The server drops the backlog (overflow, resync) while the write waits: the session
      // is aborted under it, and the write then fails on the closed session.
      await rep.dropBacklog();
      openGate();
      await new Promise((r) => setTimeout(r, 100));
      expect(rep.lastError).toBeUndefined();
    } finally {
      openGate();
      await rep.stop();
    }
  });
});
