import { LifeboatError } from '@lifeboat/protocol';

/** 404: no `what` with this id. */
export function notFound(what: string, id: string): LifeboatError {
  return new LifeboatError(
    'LB_VAULT_NOT_FOUND',
    `No ${what} with id "${id}". List them to find the right id.`,
    { details: { what, id } },
  );
}

/** 400 naming the invalid field (`body.siteId`, `query.cursor`). */
export function invalid(field: string, message: string): LifeboatError {
  return new LifeboatError('LB_VAULT_INVALID_INPUT', `Invalid ${field}: ${message}`, {
    details: { field },
  });
}

/** 409: the change conflicts with what exists (a duplicate name, a wrong state). */
export function conflict(code: string, message: string, details: Record<string, unknown> = {}) {
  return new LifeboatError(code, message, { details });
}

/** True when a database error is a unique-constraint violation, on SQLite or PostgreSQL. */
export function isUniqueViolation(err: unknown): boolean {
  const code = (err as { code?: unknown }).code;
  return (
    code === '23505' ||
    code === 'SQLITE_CONSTRAINT_UNIQUE' ||
    code === 'SQLITE_CONSTRAINT_PRIMARYKEY'
  );
}
