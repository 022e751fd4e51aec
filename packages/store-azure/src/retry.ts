import { setTimeout as sleep } from 'node:timers/promises';
import type { RequestLimiter } from './request-limiter.js';

/** Retry policy for transient faults (timeouts, throttling, service errors, dropped connections). */
export interface RetryOptions {
  /** Attempts in all, the first included. @default 10 */
  maxAttempts?: number;
  /** Backoff before the first retry in ms; it doubles with each retry, with jitter. @default 200 */
  initialDelayMs?: number;
  /** Cap on one backoff delay in ms. @default 10000 */
  maxDelayMs?: number;
  /**
   * No retry starts later than this many ms after the first attempt began, so a store that is
   * down fails the operation after about this long (plus at most one `tryTimeoutMs`). @default 60000
   */
  totalTimeoutMs?: number;
  /** One attempt that has not finished after this many ms is abandoned and retried. @default 120000 */
  tryTimeoutMs?: number;
}

/** {@link RetryOptions} with every default applied. */
export type ResolvedRetryOptions = Readonly<Required<RetryOptions>>;

/** The defaults of {@link RetryOptions}. */
export const DEFAULT_RETRY: ResolvedRetryOptions = Object.freeze({
  maxAttempts: 10,
  initialDelayMs: 200,
  maxDelayMs: 10_000,
  totalTimeoutMs: 60_000,
  tryTimeoutMs: 120_000,
});

/** Thrown into an attempt's signal when it ran longer than `tryTimeoutMs`. */
export class TryTimeoutError extends Error {
  /** Marks the error as a timeout for classification. */
  readonly code = 'ETIMEDOUT';
  constructor(readonly timeoutMs: number) {
    super(`the request did not finish within ${timeoutMs} ms`);
    this.name = 'TryTimeoutError';
  }
}

/** How one retried operation ended when every attempt failed transiently. */
export interface GiveUp {
  /** The last attempt's error. */
  lastError: unknown;
  attempts: number;
  elapsedMs: number;
}

/** What {@link withRetry} needs besides the operation. */
export interface RetryContext {
  options: ResolvedRetryOptions;
  /** True when `err` is worth another attempt. */
  isTransient: (err: unknown) => boolean;
  /** Builds the error to throw when the retries are exhausted. */
  giveUp: (g: GiveUp) => Error;
  /** Each attempt holds a slot while it runs (not while it backs off). */
  limiter?: RequestLimiter;
  /** The caller's signal: aborting it ends the operation at once with the signal's reason. */
  signal?: AbortSignal | undefined;
  /** The delay the service asked for (a `Retry-After` header), if any; a floor for the backoff. */
  retryAfterMs?: (err: unknown) => number | undefined;
  /** Source of randomness for jitter, for tests. @default Math.random */
  random?: () => number;
}

/**
 * Backoff before retry number `retry` (1-based): exponential, capped, with "equal jitter" (half
 * fixed, half random) so that many clients hit by one outage do not retry in lockstep.
 */
export function backoffDelay(
  retry: number,
  options: ResolvedRetryOptions,
  random: () => number = Math.random,
): number {
  const base = Math.min(options.maxDelayMs, options.initialDelayMs * 2 ** (retry - 1));
  return Math.round(base / 2 + (random() * base) / 2);
}

/**
 * Runs `attempt` until it succeeds, fails with a non-transient error (rethrown as is), or the
 * retry budget is spent (then `ctx.giveUp`'s error). Each attempt gets its own signal, aborted
 * by the caller's signal or by the per-try timeout.
 */
export async function withRetry<T>(
  attempt: (signal: AbortSignal, n: number) => Promise<T>,
  ctx: RetryContext,
): Promise<T> {
  const { options, signal } = ctx;
  let start: number | undefined;
  for (let n = 1; ; n++) {
    signal?.throwIfAborted();
    const release = ctx.limiter === undefined ? undefined : await ctx.limiter.acquire(signal);
    // Time spent queueing for the first slot is the caller's concurrency, not an outage.
    start ??= performance.now();
    const controller = new AbortController();
    const onAbort = (): void => controller.abort(signal?.reason);
    signal?.addEventListener('abort', onAbort, { once: true });
    const timer = setTimeout(
      () => controller.abort(new TryTimeoutError(options.tryTimeoutMs)),
      options.tryTimeoutMs,
    );
    let failure: unknown;
    try {
      return await attempt(controller.signal, n);
    } catch (err) {
      failure = err;
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      release?.();
    }
    if (signal?.aborted) throw signal.reason;
    const timedOut = controller.signal.aborted;
    const lastError = timedOut ? (controller.signal.reason as unknown) : failure;
    if (!timedOut && !ctx.isTransient(failure)) throw failure;
    const elapsedMs = performance.now() - start;
    const asked = timedOut ? undefined : ctx.retryAfterMs?.(failure);
    const delay = Math.max(backoffDelay(n, options, ctx.random), asked ?? 0);
    if (n >= options.maxAttempts || elapsedMs + delay > options.totalTimeoutMs) {
      throw ctx.giveUp({ lastError, attempts: n, elapsedMs: Math.round(elapsedMs) });
    }
    try {
      await sleep(delay, undefined, signal === undefined ? undefined : { signal });
    } catch (err) {
      if (signal?.aborted) throw signal.reason;
      throw err;
    }
  }
}
