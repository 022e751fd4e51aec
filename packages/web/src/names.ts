import { useEffect, useState } from 'react';
import { api } from './api';
import type { Machine, ProtectedItem } from './types';

// The protected-item list names machines by id only; names are looked up once per machine and
// kept for the tab's life (a page shows at most one page of rows, so this stays small).
const cache = new Map<string, Promise<string>>();

function machineName(id: string): Promise<string> {
  let p = cache.get(id);
  if (p === undefined) {
    p = api<Machine>('GET', `/api/machines/${encodeURIComponent(id)}`).then(
      (m) => m.name,
      () => {
        cache.delete(id);
        return id;
      },
    );
    cache.set(id, p);
  }
  return p;
}

/** Names of the given machine ids (the id until the name arrives). */
export function useMachineNames(ids: string[]): Record<string, string> {
  const [names, setNames] = useState<Record<string, string>>({});
  const key = ids.join(',');
  useEffect(() => {
    let live = true;
    const wanted = key === '' ? [] : key.split(',');
    void Promise.all(wanted.map(async (id) => [id, await machineName(id)] as const)).then(
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
