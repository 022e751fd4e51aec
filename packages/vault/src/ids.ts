import { createHash, randomBytes } from 'node:crypto';

let lastMs = 0;
let counter = 0;

/**
 * A new id that sorts by creation time (base-36 milliseconds, a counter, then randomness), so
 * keyset pagination on `id` lists rows in creation order on SQLite and PostgreSQL alike.
 */
export function newId(prefix: string): string {
  const now = Date.now();
  if (now === lastMs) counter++;
  else {
    lastMs = now;
    counter = 0;
  }
  return `${prefix}_${now.toString(36).padStart(9, '0')}${counter.toString(36).padStart(3, '0')}${randomBytes(5).toString('hex')}`;
}

/** A new secret bearer token with a prefix telling its kind (`lbs` session, `lbt` API, `lbc` component, `lbk` registration key). */
export function newSecret(prefix: string): string {
  return `${prefix}_${randomBytes(32).toString('base64url')}`;
}

/** SHA-256 of a token: tokens are stored hashed, so a database dump reveals none. */
export function hashToken(token: string): string {
  return createHash('sha256').update(token).digest('hex');
}

/** The current time as the ISO 8601 text the database stores. */
export function nowIso(now: Date = new Date()): string {
  return now.toISOString();
}
