import { useEffect, useState } from 'react';
import { api, query, type Page } from './api';
import type { Machine, ProtectedItem } from './types';

// The protected-item list names machines by id only; machines are looked up once per id and
// kept for the tab's life (a page shows at most one page of rows, so this stays small). The ids
// a render asks for are fetched together, a hundred to a request (`GET /api/machines?ids=`),
// not one request a row.
const cache = new Map<string, Promise<Machine | undefined>>();
const BATCH = 100;
let queued = new Map<string, (m: Machine | undefined) => void>();

function flush(): void {
  const batch = [...queued];
  queued = new Map();
  for (let i = 0; i < batch.length; i += BATCH) {
    const part = batch.slice(i, i + BATCH);
    const ids = part.map(([id]) => id);
    api<Page<Machine>>('GET', `/api/machines${query({ ids: ids.join(','), limit: BATCH })}`).then(
      (page) => {
        const found = new Map(page.items.map((m) => [m.id, m]));
        for (const [id, resolve] of part) {
          const m = found.get(id);
          if (m === undefined) cache.delete(id);
          resolve(m);
        }
      },
      () => {
        for (const [id, resolve] of part) {
          cache.delete(id);
          resolve(undefined);
        }
      },
    );
  }
}

function machineOf(id: string): Promise<Machine | undefined> {
  let p = cache.get(id);
  if (p === undefined) {
    if (queued.size === 0) queueMicrotask(flush);
    p = new Promise<Machine | undefined>((resolve) => queued.set(id, resolve));
    cache.set(id, p);
  }
  return p;
}

function machineName(id: string): Promise<string> {
  return machineOf(id).then((m) => m?.name ?? id);
}

/** The machines of the given ids, as they arrive. */
export function useMachines(ids: string[]): Record<string, Machine> {
  const [machines, setMachines] = useState<Record<string, Machine>>({});
  const key = ids.join(',');
  useEffect(() => {
    let live = true;
    const wanted = key === '' ? [] : key.split(',');
    void Promise.all(wanted.map(async (id) => [id, await machineOf(id)] as const)).then((pairs) => {
      const found = pairs.filter((p): p is readonly [string, Machine] => p[1] !== undefined);
      if (live) setMachines((old) => ({ ...old, ...Object.fromEntries(found) }));
    });
    return () => {
      live = false;
    };
  }, [key]);
  return machines;
}

/** Names of the given machine ids (the id until the name arrives). */
export function useMachineNames(ids: string[]): Record<string, string> {
  const machines = useMachines(ids);
  return Object.fromEntries(Object.entries(machines).map(([id, m]) => [id, m.name]));
}

const itemCache = new Map<string, Promise<string>>();

function itemMachineName(itemId: string): Promise<string> {
  let p = itemCache.get(itemId);
  if (p === undefined) {
    p = api<ProtectedItem>('GET', `/api/protected-items/${encodeURIComponent(itemId)}`).then(
      (i) => machineName(i.machineId),
      () => {
        itemCache.delete(itemId);
        return itemId;
      },
    );
    itemCache.set(itemId, p);
  }
  return p;
}

/** Machine names of the given protected item ids (the id until the name arrives). */
export function useItemMachineNames(itemIds: string[]): Record<string, string> {
  const [names, setNames] = useState<Record<string, string>>({});
  const key = [...new Set(itemIds)].join(',');
  useEffect(() => {
    let live = true;
    const wanted = key === '' ? [] : key.split(',');
    void Promise.all(wanted.map(async (id) => [id, await itemMachineName(id)] as const)).then(
      (pairs) => {
        if (live) setNames((old) => ({ ...old, ...Object.fromEntries(pairs) }));
      },
    );
    return () => {
      live = false;
    };
  }, [key]);
  return names;
}
