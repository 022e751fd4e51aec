import { randomBytes } from 'node:crypto';
import { isLifeboatError } from '@lifeboat/protocol/errors';
import { ChunkIndex } from './chunk-index.js';
import { mapLimit } from './map-limit.js';
import {
  FormatError,
  ObjectKind,
  PACK_TAIL_BYTES,
  decodePackTrailer,
  encodeIndex,
  indexKey,
  packKey,
  packTrailerLength,
  sealObject,
} from './object-format.js';
import type { BlobLocation, PackEntry } from './object-format.js';
import { PackWriter } from './pack-writer.js';
import type { PointRecord } from './point-record.js';
import { selectKept } from './retention.js';
import { BlobType } from './store-crypto.js';
import { storeError } from './store-error.js';
import type { Store } from './store.js';
import type {
  GcReport,
  PointInfo,
  Progress,
  PruneReport,
  RetentionPolicy,
  StoreStats,
  VerifyFault,
  VerifyReport,
} from './store-types.js';
import { getRef } from './tree-node.js';

// A pack whose live bytes are below this share of its size is rewritten by gc.
const REPACK_BELOW = 0.5;
// Entries per index object written by gc (45 bytes each, so about 9 MiB).
const INDEX_ENTRIES_PER_OBJECT = 200_000;
const MAX_READ = 8 * 1024 * 1024;

/** Walks every point's tree once per distinct node (points share subtrees). */
async function walkTrees(
  store: Store,
  records: readonly PointRecord[],
  onData: (key: string) => void,
  onNodeError?: (err: unknown, id: Buffer, level: number, point: string) => void,
  onNode?: (key: string) => void,
): Promise<void> {
  const visited = new Set<string>();
  const walk = async (id: Buffer, level: number, point: string, offset: number): Promise<void> => {
    const key = id.toString('latin1');
    if (visited.has(key)) return;
    visited.add(key);
    onNode?.(key);
    let refs: Buffer;
    try {
      refs = await store.readNode(id, level, { point, offset });
    } catch (err) {
      if (onNodeError === undefined) throw err;
      onNodeError(err, id, level, point);
      return;
    }
    const span = (store.pow[level] as number) * store.chunkSize;
    for (let c = 0; c < store.fanout; c++) {
      const child = getRef(refs, c);
      if (child === null) continue;
      if (level === 0) onData(child.toString('latin1'));
      else await walk(Buffer.from(child), level - 1, point, offset + c * span);
    }
  };
  for (const r of records) if (r.root !== null) await walk(r.root, r.height - 1, r.info.id, 0);
}

/** stats, verify, prune and gc: the store's whole-store work. */
export class StoreMaintenance {
  constructor(private readonly store: Store) {}

  private async records(): Promise<PointRecord[]> {
    await this.store.refreshPoints();
    const out: PointRecord[] = [];
    for (const p of await this.store.listPoints()) out.push(await this.store.loadPoint(p.id));
    return out;
  }

  async stats(): Promise<StoreStats> {
    const store = this.store;
    await store.refreshIndex();
    const records = await this.records();
    const data = new Set<string>();
    await walkTrees(store, records, (k) => data.add(k));
    let uniqueBytes = 0;
    for (const k of data) uniqueBytes += store.index.get(Buffer.from(k, 'latin1'))?.rawLength ?? 0;
    let storedBytes = 0;
    let packs = 0;
    for await (const o of store.backend.list('')) {
      storedBytes += o.size;
      if (o.key.startsWith('packs/')) packs++;
    }
    const logicalBytes = records.reduce((s, r) => s + r.info.size, 0);
    return {
      points: records.length,
      machines: new Set(records.map((r) => r.info.machine)).size,
      disks: new Set(records.map((r) => `${r.info.machine}\u0000${r.info.disk}`)).size,
      logicalBytes,
      uniqueBytes,
      storedBytes,
      dedupRatio: storedBytes === 0 ? 0 : logicalBytes / storedBytes,
      packs,
      chunks: data.size,
    };
  }

  async verify(onProgress?: (p: Progress) => void): Promise<VerifyReport> {
    const store = this.store;
    await store.refreshIndex(true);
    const records = await this.records();
    const faults: Array<VerifyFault & { nodes: Set<string>; chunks: Set<string> }> = [];
    const faultByObject = new Map<string, number>();
    const addFault = (
      err: unknown,
      object: string,
      key: { node?: string; chunk?: string },
      points: string[] = [],
    ): void => {
      const code = isLifeboatError(err) ? err.code : 'LB_STORE_CORRUPT_CHUNK';
      const id = `${code} ${object}`;
      let idx = faultByObject.get(id);
      if (idx === undefined) {
        idx = faults.length;
        faultByObject.set(id, idx);
        faults.push({
          code,
          message: (err as Error).message,
          object,
          points: [...points],
          nodes: new Set(),
          chunks: new Set(),
        });
      }
      const f = faults[idx];
      if (f === undefined) return;
      if (key.node !== undefined) f.nodes.add(key.node);
      if (key.chunk !== undefined) f.chunks.add(key.chunk);
    };
    for (const d of store.damagedPointObjects()) {
      const code = isLifeboatError(d.error) ? d.error.code : 'LB_STORE_CORRUPT_POINT';
      faults.push({
        code,
        message: d.error.message,
        object: d.object,
        points: [d.id],
        nodes: new Set(),
        chunks: new Set(),
      });
    }
    for (const [key, err] of store.index.damaged) {
      faults.push({
        code: 'LB_STORE_CORRUPT_INDEX',
        message: `Index object ${key} is damaged (${err.message}). Run gc to rebuild the index from the packs.`,
        object: key,
        points: [],
        nodes: new Set(),
        chunks: new Set(),
      });
    }
    const data = new Set<string>();
    await walkTrees(
      store,
      records,
      (k) => data.add(k),
      (err, id) => {
        const object = objectOf(err) ?? `tree node ${id.toString('hex')}`;
        addFault(err, object, { node: id.toString('latin1') });
      },
    );
    // Check every data chunk, reading each pack in large sequential ranges.
    const byPack = new Map<string, Array<{ key: string; loc: BlobLocation }>>();
    for (const key of data) {
      const id = Buffer.from(key, 'latin1');
      const loc = store.index.get(id);
      if (loc === undefined) {
        const err = store.notLocated(id, BlobType.Data, {});
        addFault(err, objectOf(err) ?? `chunk ${id.toString('hex')}`, { chunk: key });
        continue;
      }
      let list = byPack.get(loc.pack);
      if (list === undefined) byPack.set(loc.pack, (list = []));
      list.push({ key, loc });
    }
    let totalBytes = 0;
    for (const list of byPack.values()) for (const it of list) totalBytes += it.loc.rawLength;
    let bytesChecked = 0;
    let chunksChecked = 0;
    for (const [pack, list] of byPack) {
      list.sort((x, y) => x.loc.offset - y.loc.offset);
      for (let i = 0; i < list.length;) {
        const first = list[i] as { key: string; loc: BlobLocation };
        let j = i + 1;
        while (
          j < list.length &&
          (list[j]?.loc.offset ?? 0) + (list[j]?.loc.length ?? 0) - first.loc.offset <= MAX_READ
        )
          j++;
        const group = list.slice(i, j);
        i = j;
        const last = group[group.length - 1] as { key: string; loc: BlobLocation };
        let buf: Buffer | undefined;
        try {
          buf = await store.backend.getRange(
            packKey(pack),
            first.loc.offset,
            last.loc.offset + last.loc.length - first.loc.offset,
          );
        } catch (err) {
          if (!isLifeboatError(err, 'LB_BACKEND_RANGE')) {
            const e = store.blobReadError(
              err,
              Buffer.from(first.key, 'latin1'),
              BlobType.Data,
              first.loc,
              {},
            );
            if (e === err) throw err;
            for (const it of group) addFault(e, packKey(pack), { chunk: it.key });
            continue;
          }
        }
        for (const it of group) {
          const id = Buffer.from(it.key, 'latin1');
          try {
            let sealed: Buffer;
            if (buf !== undefined) {
              const rel = it.loc.offset - first.loc.offset;
              sealed = buf.subarray(rel, rel + it.loc.length);
            } else {
              // The group's range ran past a truncated end: check blob by blob.
              try {
                sealed = await store.backend.getRange(packKey(pack), it.loc.offset, it.loc.length);
              } catch (err) {
                throw store.blobReadError(err, id, BlobType.Data, it.loc, {});
              }
            }
            const plain = store.openBlob(sealed, id, BlobType.Data, it.loc, {});
            if (!store.crypto.chunkId(plain).equals(id)) {
              throw store.corruptBlob(
                id,
                BlobType.Data,
                it.loc,
                {},
                'content does not match its id',
              );
            }
            chunksChecked++;
          } catch (err) {
            if (!isLifeboatError(err)) throw err;
            addFault(err, packKey(pack), { chunk: it.key });
          }
          bytesChecked += it.loc.rawLength;
        }
        onProgress?.({ done: bytesChecked, total: totalBytes, unit: 'bytes' });
      }
    }
    if (faults.some((f) => f.nodes.size > 0 || f.chunks.size > 0))
      await this.attribute(records, faults);
    return {
      ok: faults.length === 0,
      pointsChecked: records.length,
      chunksChecked,
      bytesChecked,
      faults: faults.map((f) => ({
        code: f.code,
        message: f.message,
        object: f.object,
        points: [...new Set(f.points)].sort(),
      })),
    };
  }

  /** Finds, for each fault, the points whose trees reach a faulty node or chunk. */
  private async attribute(
    records: readonly PointRecord[],
    faults: Array<VerifyFault & { nodes: Set<string>; chunks: Set<string> }>,
  ): Promise<void> {
    const store = this.store;
    const nodeFault = new Map<string, number[]>();
    const chunkFault = new Map<string, number[]>();
    faults.forEach((f, i) => {
      for (const n of f.nodes) nodeFault.set(n, [...(nodeFault.get(n) ?? []), i]);
      for (const c of f.chunks) chunkFault.set(c, [...(chunkFault.get(c) ?? []), i]);
    });
    const memo = new Map<string, Set<number>>();
    const reach = async (id: Buffer, level: number): Promise<Set<number>> => {
      const key = id.toString('latin1');
      const hit = memo.get(key);
      if (hit !== undefined) return hit;
      const found = new Set<number>(nodeFault.get(key) ?? []);
      if (found.size === 0) {
        const refs = await store.readNode(id, level, {});
        for (let c = 0; c < store.fanout; c++) {
          const child = getRef(refs, c);
          if (child === null) continue;
          const sub =
            level === 0
              ? (chunkFault.get(child.toString('latin1')) ?? [])
              : await reach(Buffer.from(child), level - 1);
          for (const i of sub) found.add(i);
        }
      }
      memo.set(key, found);
      return found;
    };
    for (const r of records) {
      if (r.root === null) continue;
      for (const i of await reach(r.root, r.height - 1)) faults[i]?.points.push(r.info.id);
    }
  }

  async prune(
    policy: RetentionPolicy,
    options: { now?: Date; dryRun?: boolean; machine?: string },
  ): Promise<PruneReport> {
    const all = await this.store.listPoints(
      options.machine === undefined ? {} : { machine: options.machine },
    );
    const groups = new Map<string, PointInfo[]>();
    for (const p of all) {
      const k = `${p.machine}\u0000${p.disk}`;
      groups.set(k, [...(groups.get(k) ?? []), p]);
    }
    const kept: PointInfo[] = [];
    const removed: PointInfo[] = [];
    const now = options.now ?? new Date();
    for (const points of groups.values()) {
      const keep = selectKept(points, policy, now);
      for (const p of points) (keep.has(p.id) ? kept : removed).push(p);
    }
    if (options.dryRun !== true) await this.store.deletePoints(removed.map((p) => p.id));
    return { kept, removed };
  }

  async gc(onProgress?: (p: Progress) => void): Promise<GcReport> {
    const store = this.store;
    const lock = await store.locks.acquire(true, 'gc');
    try {
      return await this.gcLocked(onProgress, async () => lock.check());
    } finally {
      store.gcOverlay = undefined;
      await lock.release();
    }
  }

  private async gcLocked(
    onProgress: ((p: Progress) => void) | undefined,
    checkLock: () => Promise<void>,
  ): Promise<GcReport> {
    const store = this.store;
    const backend = store.backend;
    // Before anything is deleted: writers that skip listing index/ while this mark stays the
    // same (see Store.refreshIndexForWrite) list it again, and notice what this gc removes.
    await store.markGc();
    await store.refreshIndex(true);
    const records = await this.records();
    const damaged = store.damagedPointObjects();
    if (damaged.length > 0) {
      throw storeError(
        'LB_STORE_CORRUPT_POINT',
        `gc will not run while point object(s) ${damaged.map((d) => d.object).join(', ')} are damaged: it could not tell which data they need. Delete those points (deletePoints) or restore the objects, then run gc again.`,
        { objects: damaged.map((d) => d.object), points: damaged.map((d) => d.id) },
      );
    }
    // Every pack, and the entries of packs no readable index lists (a crashed writer's packs,
    // or packs of a damaged index), read from their own trailers.
    const packSizes = new Map<string, number>();
    for await (const o of backend.list('packs/')) {
      const id = o.key.slice(o.key.lastIndexOf('/') + 1);
      if (/^[0-9a-f]{32}$/.test(id)) packSizes.set(id, o.size);
    }
    const packEntries = new Map<string, PackEntry[]>();
    for (const [id, loc] of store.index.entries()) {
      let list = packEntries.get(loc.pack);
      if (list === undefined) packEntries.set(loc.pack, (list = []));
      list.push({
        id,
        type: loc.type,
        offset: loc.offset,
        length: loc.length,
        rawLength: loc.rawLength,
      });
    }
    const unreadable = new Set<string>();
    let recovered = 0;
    // Blobs of packs no index lists: a crashed writer's garbage, or data whose index object is
    // damaged or lost. The tree walk below finds the latter through this overlay, so such data
    // is kept and indexed again, never deleted; what no point reaches is garbage.
    const overlay = new ChunkIndex();
    store.gcOverlay = overlay;
    await mapLimit(
      [...packSizes].filter(([p]) => !packEntries.has(p)),
      4,
      async ([pack, size]) => {
        try {
          const tail = await backend.getRange(
            packKey(pack),
            size - PACK_TAIL_BYTES,
            PACK_TAIL_BYTES,
          );
          const len = packTrailerLength(tail);
          const sealed = await backend.getRange(packKey(pack), size - PACK_TAIL_BYTES - len, len);
          const entries = decodePackTrailer(store.crypto, pack, sealed);
          packEntries.set(pack, entries);
          overlay.addPack(pack, entries);
          recovered++;
        } catch (err) {
          if (!(err instanceof FormatError) && !isLifeboatError(err, 'LB_BACKEND_RANGE')) throw err;
          // Keep what cannot be read: it may be evidence, and no index points into it.
          unreadable.add(pack);
        }
      },
    );
    // What the kept points reference. A tree that cannot be read stops gc: it cannot tell
    // what that tree needs.
    const live = new Set<string>();
    await walkTrees(
      store,
      records,
      (k) => live.add(k),
      undefined,
      (k) => live.add(k),
    );
    // One location per live blob: the indexed one when it exists (its pack is durable and known).
    const chosen = new Map<string, string>();
    for (const [id, loc] of store.index.entries()) {
      const k = id.toString('latin1');
      if (live.has(k) && packSizes.has(loc.pack)) chosen.set(k, loc.pack);
    }
    for (const [pack, entries] of packEntries) {
      if (!packSizes.has(pack)) continue;
      for (const e of entries) {
        const k = e.id.toString('latin1');
        if (live.has(k) && !chosen.has(k)) chosen.set(k, pack);
      }
    }
    const missing = [...live].filter((k) => !chosen.has(k));
    if (missing.length > 0) {
      const id = Buffer.from(missing[0] as string, 'latin1');
      throw storeError(
        'LB_STORE_MISSING_CHUNK',
        `gc found ${missing.length} referenced blob(s) in no pack (e.g. ${id.toString('hex')}); it stops so nothing more is lost. Run verify to list the affected points, delete them, then run gc.`,
        { chunk: id.toString('hex'), count: missing.length },
      );
    }
    // Decide per pack: keep, repack (sparse) or delete (dead).
    const keepIndex: Array<{ pack: string; entries: PackEntry[] }> = [];
    const toDelete: string[] = [];
    const toRepack: Array<{ pack: string; entries: PackEntry[] }> = [];
    for (const [pack, entries] of packEntries) {
      const size = packSizes.get(pack);
      if (size === undefined) continue;
      const liveEntries = entries.filter((e) => chosen.get(e.id.toString('latin1')) === pack);
      // Drop duplicates inside one pack.
      const seen = new Set<string>();
      const unique = liveEntries.filter((e) => {
        const k = e.id.toString('latin1');
        if (seen.has(k)) return false;
        seen.add(k);
        return true;
      });
      const liveBytes = unique.reduce((s, e) => s + e.length, 0);
      if (unique.length === 0) toDelete.push(pack);
      else if (liveBytes < size * REPACK_BELOW) toRepack.push({ pack, entries: unique });
      else keepIndex.push({ pack, entries: unique });
    }
    const oldIndexes: string[] = [];
    for await (const o of backend.list('index/')) oldIndexes.push(o.key);
    const changed =
      toDelete.length > 0 ||
      toRepack.length > 0 ||
      recovered > 0 ||
      oldIndexes.length > 1 ||
      store.index.damaged.size > 0;
    let bytesFreed = 0;
    let repackedBytes = 0;
    let objectsDeleted = 0;
    if (changed) {
      // 1. Copy the live blobs of sparse packs into new packs (sealed bytes as they are).
      const writer = new PackWriter(backend, store.crypto, store.config.packSize);
      let done = 0;
      for (const { pack, entries } of toRepack) {
        entries.sort((a, b) => a.offset - b.offset);
        for (const e of entries) {
          const sealed = await backend.getRange(packKey(pack), e.offset, e.length);
          // Check before copying: a repack must not launder a damaged blob into a new pack.
          const plain = store.openBlob(sealed, e.id, e.type, { pack, ...e }, {});
          if (e.type === BlobType.Data && !store.crypto.chunkId(plain).equals(e.id)) {
            throw store.corruptBlob(
              e.id,
              e.type,
              { pack, ...e },
              {},
              'content does not match its id',
            );
          }
          await writer.addSealed(e.type, e.id, e.rawLength, sealed);
        }
        onProgress?.({ done: ++done, total: toRepack.length, unit: 'objects' });
      }
      const newPacks = await writer.finish();
      repackedBytes = writer.uploadedBytes;
      // 2. New index objects listing every live blob, then 3. delete the old indexes, then
      // 4. the dead packs: a crash between steps leaves extra objects, never a dangling reference.
      const all = [...keepIndex, ...newPacks];
      const batches: Array<Array<{ pack: string; entries: PackEntry[] }>> = [];
      let batch: Array<{ pack: string; entries: PackEntry[] }> = [];
      let count = 0;
      for (const p of all) {
        batch.push(p);
        count += p.entries.length;
        if (count >= INDEX_ENTRIES_PER_OBJECT) {
          batches.push(batch);
          batch = [];
          count = 0;
        }
      }
      if (batch.length > 0) batches.push(batch);
      const supersedes = oldIndexes
        .map((k) => k.slice('index/'.length))
        .filter((k) => /^[0-9a-f]{32}$/.test(k));
      await checkLock();
      for (const b of batches) {
        const key = indexKey(randomBytes(16).toString('hex'));
        await backend.put(
          key,
          sealObject(store.crypto, ObjectKind.Index, key, encodeIndex({ supersedes, packs: b })),
        );
      }
      await checkLock();
      for (const key of oldIndexes) {
        await backend.delete(key);
        objectsDeleted++;
      }
      for (const pack of [...toDelete, ...toRepack.map((p) => p.pack)]) {
        await backend.delete(packKey(pack));
        bytesFreed += packSizes.get(pack) ?? 0;
        objectsDeleted++;
      }
    }
    // Locks of dead holders are left behind by crashes; they would block the next gc.
    for (const other of await store.locks.others()) {
      if (other.stale) {
        await backend.delete(other.key);
        objectsDeleted++;
      }
    }
    await store.refreshIndex(true);
    return {
      packsDeleted: toDelete.length,
      packsRepacked: toRepack.length,
      bytesFreed: Math.max(0, bytesFreed - repackedBytes),
      objectsDeleted,
    };
  }
}

function objectOf(err: unknown): string | undefined {
  if (isLifeboatError(err) && typeof err.details['object'] === 'string')
    return err.details['object'];
  return undefined;
}
