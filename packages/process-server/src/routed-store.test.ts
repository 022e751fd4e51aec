import { createHmac, randomBytes } from 'node:crypto';
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DirectoryBackend, Store } from '@lifeboat/store';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { RoutedStore } from './routed-store.js';

describe('RoutedStore', () => {
  let tmp: { path: string };
  const passphrase = 'routed-store-passphrase';
  beforeAll(async () => {
    tmp = { path: await mkdtemp(join(tmpdir(), 'lb-routed-')) };
    for (const name of ['a', 'b']) {
      const s = await Store.init({
        backend: new DirectoryBackend({ path: join(tmp.path, name) }),
        passphrase,
        kdfCost: 1024,
      });
      await s.close();
    }
  });
  afterAll(async () => {
    if (tmp !== undefined) await rm(tmp.path, { recursive: true, force: true });
  });

  const spec = (id: string) => ({
    id,
    kind: 'directory' as const,
    path: join(tmp.path, id),
    container: null,
    connectionString: null,
    passphrase,
  });

  it("sends each machine's points to its item's store, and remembers that across a restart without the vault", async () => {
    const logger = pino({ level: 'silent' });
    const first = new RoutedStore({ stateDir: join(tmp.path, 'state'), workers: 0, logger });
    await first.load();
    // Before the assignments name a store, a machine's writes wait (a retryable store error).
    await expect(
      first.beginWrite({ machine: 'vm1', disk: 'd', size: 1 << 20 }),
    ).rejects.toMatchObject({ code: 'LB_PS_STORE_UNKNOWN' });
    await first.update(
      [spec('a'), spec('b')],
      [
        { storeMachine: 'vm1', targetStoreId: 'a', desired: 'replicate' },
        { storeMachine: 'vm2', targetStoreId: 'b', desired: 'replicate' },
      ],
    );
    expect((await stat(join(tmp.path, 'state', 'stores.json'))).mode & 0o777).toBe(0o600);
    await first.close();

    // A restart before the vault answers: the journal's machines still reach their stores.
    const again = new RoutedStore({ stateDir: join(tmp.path, 'state'), workers: 0, logger });
    await again.load();
    expect(again.storeIdOf('vm1')).toBe('a');
    for (const machine of ['vm1', 'vm2']) {
      const w = await again.beginWrite({ machine, disk: 'd', size: 1 << 20 });
      await w.write(0, Buffer.alloc(65536, machine === 'vm1' ? 1 : 2));
      await w.commit({ cut: `cut-${machine}` });
    }
    expect((await again.listPoints({ machine: 'vm1' })).map((p) => p.cut)).toEqual(['cut-vm1']);
    await again.close();
    for (const [name, machine] of [
      ['a', 'vm1'],
      ['b', 'vm2'],
    ] as const) {
      const s = await Store.open({
        backend: new DirectoryBackend({ path: join(tmp.path, name) }),
        passphrase,
      });
      expect((await s.listPoints()).map((p) => p.machine)).toEqual([machine]);
      await s.close();
    }
  });

  it("computes a resync baseline from the machine's own store, on its worker thread", async () => {
    const logger = pino({ level: 'silent' });
    const routed = new RoutedStore({ stateDir: join(tmp.path, 'state-w'), workers: 1, logger });
    await routed.load();
    expect(routed.workerHealth()).toBeNull();
    await routed.update(
      [spec('a'), spec('b')],
      [{ storeMachine: 'vm3', targetStoreId: 'b', desired: 'replicate' }],
    );
    try {
      const data = randomBytes(65536);
      const w = await routed.beginWrite({ machine: 'vm3', disk: 'd', size: 2 * 65536 });
      // The worker pool transfers whole buffers to its thread: write a copy, keep the original.
      await w.write(65536, Buffer.from(data));
      const point = await w.commit({ cut: 'cut-vm3' });
      const key = randomBytes(32);
      const d = await routed.pointDigests('vm3', point.id, key);
      const entries = Buffer.from(d.entries);
      expect(entries.subarray(0, 17).equals(Buffer.alloc(17))).toBe(true);
      expect(entries[17]).toBe(1);
      const want = createHmac('sha256', key).update(data).digest().subarray(0, 16);
      expect(entries.subarray(18, 34).equals(want)).toBe(true);
      expect(routed.workerHealth()).toMatchObject({ count: 2, alive: 2, restarts: 0 });
    } finally {
      await routed.close();
    }
  });
});
