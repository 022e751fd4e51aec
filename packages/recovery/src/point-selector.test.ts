import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DirectoryBackend, Store, type CommitOptions, type PointInfo } from '@lifeboat/store';
import { selectPoints } from './point-selector.js';

let dir: string;
let store: Store;
const t = (s: number) => new Date(Date.UTC(2026, 10, 25, 10, 0, s));

async function point(machine: string, disk: string, commit: CommitOptions): Promise<PointInfo> {
  const s = await store.beginWrite({ machine, disk, size: 65536, base: null });
  await s.write(0, Buffer.from(`${machine}/${disk}@${commit.time?.toISOString()}`));
  return s.commit(commit);
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lb-select-'));
  store = await Store.init({
    backend: new DirectoryBackend({ path: dir }),
    passphrase: 'p',
    kdfCost: 1024,
  });
});
afterAll(async () => {
  await store.close();
  await rm(dir, { recursive: true, force: true });
});

describe('selectPoints', () => {
  it('picks latest, latest app-consistent, at a time, and one cut for a group', async () => {
    const a1 = await point('web', 'root', { time: t(1), kind: 'app' });
    const a2 = await point('web', 'root', { time: t(2), kind: 'crash' });
    expect((await selectPoints(store, { machine: 'web' })).map((p) => p.id)).toEqual([a2.id]);
    expect(
      (await selectPoints(store, { machine: 'web', pick: 'latest-app' })).map((p) => p.id),
    ).toEqual([a1.id]);
    expect((await selectPoints(store, { machine: 'web', at: t(1) })).map((p) => p.id)).toEqual([
      a1.id,
    ]);
    expect((await selectPoints(store, { pointId: a1.id }))[0]?.id).toBe(a1.id);

    // Group "g": the newest cut covering both machines wins, not each machine's newest point.
    const c1app = await point('app', 'root', { time: t(10), cut: 'c1', consistencyGroup: 'g' });
    const c1db = await point('db', 'root', { time: t(10), cut: 'c1', consistencyGroup: 'g' });
    await point('app', 'root', { time: t(11), cut: 'c2', consistencyGroup: 'g' });
    expect((await selectPoints(store, { consistencyGroup: 'g' })).map((p) => p.id)).toEqual([
      c1app.id,
      c1db.id,
    ]);
  });

  it('says when nothing matches, with LB_RECOVERY_NO_POINT', async () => {
    await expect(selectPoints(store, { machine: 'nobody' })).rejects.toMatchObject({
      code: 'LB_RECOVERY_NO_POINT',
    });
    await expect(selectPoints(store, {})).rejects.toMatchObject({
      code: 'LB_RECOVERY_BAD_SELECTOR',
    });
  });
});
