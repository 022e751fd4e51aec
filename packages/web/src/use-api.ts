import { useCallback, useEffect, useRef, useState } from 'react';
import { api, ApiError } from './api';

/** What {@link useApi} gives a page. */
export interface ApiState<T> {
  data: T | undefined;
  error: ApiError | undefined;
  loading: boolean;
  reload: () => void;
}

/**
 * GETs `path` (null = nothing yet) and keeps the last good answer while reloading, so a live
 * refresh never blanks the page. A newer request supersedes an older one still in flight.
 */
export function useApi<T>(path: string | null): ApiState<T> {
  const [data, setData] = useState<T | undefined>(undefined);
  const [error, setError] = useState<ApiError | undefined>(undefined);
  const [loading, setLoading] = useState(path !== null);
  const [tick, setTick] = useState(0);
  const shownPath = useRef<string | null>(null);
  useEffect(() => {
    if (path === null) return;
    const abort = new AbortController();
    // A different resource is not the same data refreshed: clear it rather than show stale rows.
    if (shownPath.current !== path) setData(undefined);
    setLoading(true);
    api<T>('GET', path, undefined, abort.signal).then(
      (d) => {
        shownPath.current = path;
        setData(d);
        setError(undefined);
        setLoading(false);
      },
      (e: unknown) => {
        if (abort.signal.aborted) return;
        setError(e instanceof ApiError ? e : new ApiError(0, 'LB_WEB_ERROR', String(e), {}));
        setLoading(false);
      },
    );
    return () => abort.abort();
  }, [path, tick]);
  const reload = useCallback(() => setTick((t) => t + 1), []);
  return { data, error, loading, reload };
}
