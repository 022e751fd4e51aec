import type { Kysely } from 'kysely';
import type { VaultDatabase } from '../db/schema.js';
import { newId, nowIso } from '../ids.js';
import type { Principal } from './principal.js';

// Fields never written to the audit log, whatever the resource.
const SECRET = /password|passphrase|secret|token|key|connection/i;

/** A copy of `value` with secret-looking fields replaced, for the audit log. */
export function redact(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(redact);
  if (value !== null && typeof value === 'object') {
    return Object.fromEntries(
      Object.entries(value).map(([k, v]) => [
        k,
        SECRET.test(k) && typeof v === 'string' ? '[redacted]' : redact(v),
      ]),
    );
  }
  return value;
}

/** Records one change: who, what, on which target, and a before/after summary. */
export async function audit(
  db: Kysely<VaultDatabase>,
  actor: Principal,
  action: string,
  target: { type: string; id: string },
  change: { before?: unknown; after?: unknown } = {},
): Promise<void> {
  await db
    .insertInto('audit')
    .values({
      id: newId('aud'),
      time: nowIso(),
      actorType: actor.type,
      actorId: actor.id,
      actorName: actor.name,
      action,
      targetType: target.type,
      targetId: target.id,
      summary: JSON.stringify({
        ...(change.before !== undefined ? { before: redact(change.before) } : {}),
        ...(change.after !== undefined ? { after: redact(change.after) } : {}),
      }),
    })
    .execute();
}
