/** Options for constructing a {@link LifeboatError}. */
export interface LifeboatErrorOptions {
  /** The underlying error, if any. */
  cause?: unknown;
  /** Structured facts about the fault (ids, offsets, object keys) for logs and API clients. */
  details?: Record<string, unknown>;
}

/**
 * The one base error of Lifeboat. `code` is stable (documented in docs/errors.md and never
 * reused for another meaning); `message` says what is wrong and what to do about it.
 */
export class LifeboatError extends Error {
  /** Stable machine-readable code, `LB_<AREA>_<WHAT>`. */
  readonly code: string;
  /** Structured facts about the fault. */
  readonly details: Record<string, unknown>;

  constructor(code: string, message: string, options: LifeboatErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'LifeboatError';
    this.code = code;
    this.details = options.details ?? {};
  }

  /** A plain object for JSON logs and API responses. */
  toJSON(): { code: string; message: string; details: Record<string, unknown> } {
    return { code: this.code, message: this.message, details: this.details };
  }
}

/** True when `err` is a {@link LifeboatError}, optionally with the given code. */
export function isLifeboatError(err: unknown, code?: string): err is LifeboatError {
  return err instanceof LifeboatError && (code === undefined || err.code === code);
}
