/** The vault's error body, `{ code, message, details }`, as a thrown error. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly details: Record<string, unknown>,
  ) {
    super(message);
    this.name = 'ApiError';
  }

  /** The request field the vault named (`body.username` → `username`), if any. */
  get field(): string | undefined {
    const f = this.details['field'];
    return typeof f === 'string' ? f.replace(/^(body|query|params)\./, '') : undefined;
  }
}

/** A role of a user, weakest last. */
export type Role = 'admin' | 'operator' | 'viewer';

/** Who is logged in, kept for the browser tab only (sessionStorage). */
export interface Session {
  token: string;
  username: string;
  role: Role;
  expiresAt: string | null;
}

/** One page of a list, as every list route returns it. */
export interface Page<T> {
  items: T[];
  nextCursor: string | null;
  total: number;
}

const KEY = 'lifeboat.session';
const listeners = new Set<() => void>();
let current: Session | null = readStored();

function readStored(): Session | null {
  try {
    const raw = sessionStorage.getItem(KEY);
    return raw === null ? null : (JSON.parse(raw) as Session);
  } catch {
    return null;
  }
}

/** The current session, or null when logged out. */
export function getSession(): Session | null {
  return current;
}

/** Replaces the session (null logs out) and tells subscribers. */
export function setSession(session: Session | null): void {
  current = session;
  if (session === null) sessionStorage.removeItem(KEY);
  else sessionStorage.setItem(KEY, JSON.stringify(session));
  for (const l of listeners) l();
}

/** Calls `listener` whenever the session changes; returns the unsubscribe function. */
export function onSessionChange(listener: () => void): () => void {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

/** True when the role is at least `min` (admin > operator > viewer). */
export function roleAtLeast(role: Role | undefined, min: Role): boolean {
  const rank: Record<Role, number> = { viewer: 0, operator: 1, admin: 2 };
  return role !== undefined && rank[role] >= rank[min];
}

/** Builds a query string from defined, non-empty values. */
export function query(params: Record<string, string | number | boolean | undefined>): string {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== '') q.set(k, String(v));
  }
  const s = q.toString();
  return s === '' ? '' : `?${s}`;
}

/**
 * Calls the vault's API with the session's bearer token. A 401 on anything but the login ends
 * the session (the token expired or was revoked), which sends the user back to the login page.
 */
export async function api<T>(
  method: string,
  path: string,
  body?: unknown,
  signal?: AbortSignal,
): Promise<T> {
  const headers: Record<string, string> = { accept: 'application/json' };
  const session = current;
  if (session !== null) headers['authorization'] = `Bearer ${session.token}`;
  if (body !== undefined) headers['content-type'] = 'application/json';
  let res: Response;
  try {
    res = await fetch(path, {
      method,
      headers,
      ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
      ...(signal !== undefined ? { signal } : {}),
    });
  } catch (err) {
    if (signal?.aborted === true) throw err;
    throw new ApiError(
      0,
      'LB_WEB_UNREACHABLE',
      'The vault does not answer. Check that it runs and that this browser can reach it.',
      {},
    );
  }
  const text = await res.text();
  let parsed: unknown = undefined;
  try {
    parsed = text === '' ? undefined : JSON.parse(text);
  } catch {
    parsed = undefined;
  }
  if (!res.ok) {
    const e = (parsed ?? {}) as { code?: string; message?: string; details?: unknown };
    if (res.status === 401 && path !== '/api/auth/login' && current !== null) setSession(null);
    throw new ApiError(
      res.status,
      e.code ?? `HTTP_${res.status}`,
      e.message ?? `The vault answered ${res.status} ${res.statusText}.`,
      typeof e.details === 'object' && e.details !== null
        ? (e.details as Record<string, unknown>)
        : {},
    );
  }
  return parsed as T;
}

/**
 * GETs bytes from the vault with the session's token (an artifact: a screenshot, a console
 * log), which an `<img src>` could not send.
 */
export async function apiBytes(path: string, signal?: AbortSignal): Promise<Blob> {
  const session = current;
  const res = await fetch(path, {
    headers: session === null ? {} : { authorization: `Bearer ${session.token}` },
    ...(signal !== undefined ? { signal } : {}),
  });
  if (!res.ok) {
    const e = (await res.json().catch(() => ({}))) as { code?: string; message?: string };
    if (res.status === 401 && current !== null) setSession(null);
    throw new ApiError(
      res.status,
      e.code ?? `HTTP_${res.status}`,
      e.message ?? `The vault answered ${res.status} ${res.statusText}.`,
      {},
    );
  }
  return res.blob();
}
