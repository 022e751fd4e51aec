import { LifeboatError } from '@lifeboat/protocol/errors';

/** Builds a {@link LifeboatError} for the store; a tiny helper so every throw site stays one line. */
export function storeError(
  code: string,
  message: string,
  details: Record<string, unknown> = {},
  cause?: unknown,
): LifeboatError {
  return new LifeboatError(code, message, cause === undefined ? { details } : { details, cause });
}
