import { describe, expect, it } from 'vitest';
import { RequestLimiter } from './request-limiter.js';
import {
  backoffDelay,
  DEFAULT_RETRY,
  TryTimeoutError,
  withRetry,
  type RetryContext,
} from './retry.js';

const fast = Object.freeze({
  maxAttempts: 5,
  initialDelayMs: 1,
  maxDelayMs: 4,
  totalTimeoutMs: 10_000,
  tryTimeoutMs: 10_000,
});

function transientError(): Error {
  return Object.assign(new Error('connect ECONNREFUSED'), { code: 'ECONNREFUSED' });
}

function ctx(overrides: Partial<RetryContext> = {}): RetryContext {
  return {
    options: fast,
    isTransient: (err) => (err as { code?: string }).code === 'ECONNREFUSED',
    giveUp: (g) => Object.assign(new Error(`gave up after ${g.attempts}`), { giveUp: g }),
    ...overrides,
  };
}

describe('backoffDelay', () => {
  it('doubles per retry, caps at maxDelayMs and jitters within [base/2, base]', () => {
    const o = { ...DEFAULT_RETRY, initialDelayMs: 100, maxDelayMs: 1000 };
    expect(backoffDelay(1, o, () => 0)).toBe(50);
    expect(backoffDelay(1, o, () => 1)).toBe(100);
    expect(backoffDelay(3, o, () => 1)).toBe(400);
    expect(backoffDelay(10, o, () => 1)).toBe(1000);
    expect(backoffDelay(10, o, () => 0)).toBe(500);
  });
});

describe('withRetry', () => {
  it('retries transient failures until the operation succeeds', async () => {
    let calls = 0;
    const result = await withRetry(async () => {
      calls++;
      if (calls < 3) throw transientError();
      return 'ok';
    }, ctx());
    expect(result).toBe('ok');
    expect(calls).toBe(3);
  });

  it('rethrows a permanent failure at once', async () => {
    let calls = 0;
    const permanent = new Error('403');
    await expect(
      withRetry(async () => {
        calls++;
        throw permanent;
      }, ctx()),
    ).rejects.toBe(permanent);
    expect(calls).toBe(1);
  });

  it('gives up after maxAttempts with the last error', async () => {
    let calls = 0;
    const err = await withRetry(async () => {
      calls++;
      throw transientError();
    }, ctx()).catch((e: unknown) => e as { giveUp: { attempts: number; lastError: Error } });
    expect(calls).toBe(5);
    expect(err.giveUp.attempts).toBe(5);
    expect(err.giveUp.lastError.message).toContain('ECONNREFUSED');
  });

  it('gives up when the next backoff would pass totalTimeoutMs', async () => {
    let calls = 0;
    const options = {
      ...fast,
      maxAttempts: 1000,
      initialDelayMs: 50,
      maxDelayMs: 50,
      totalTimeoutMs: 120,
    };
    const err = await withRetry(async () => {
      calls++;
      throw transientError();
    }, ctx({ options })).catch(
      (e: unknown) => e as { giveUp: { attempts: number; elapsedMs: number } },
    );
    expect(err.giveUp.attempts).toBe(calls);
    expect(calls).toBeGreaterThan(1);
    expect(calls).toBeLessThan(1000);
  });

  it('abandons an attempt that hangs past tryTimeoutMs and retries it', async () => {
    let calls = 0;
    const options = { ...fast, tryTimeoutMs: 100 };
    const result = await withRetry((signal) => {
      calls++;
      if (calls > 1) return Promise.resolve('second');
      // A request that never answers; only the attempt's signal ends it.
      return new Promise<string>((_, reject) => {
        signal.addEventListener('abort', () => reject(new Error('aborted')), { once: true });
      });
    }, ctx({ options }));
    expect(result).toBe('second');
    expect(calls).toBe(2);
  });

  it('reports a hang as TryTimeoutError when the budget is spent', async () => {
    const options = { ...fast, maxAttempts: 1, tryTimeoutMs: 100 };
    const err = await withRetry<never>(
      (signal) =>
        new Promise<never>((_, reject) => {
          signal.addEventListener('abort', () => reject(new Error('aborted')), { once: true });
        }),
      ctx({ options }),
    ).catch((e: unknown) => e as { giveUp: { lastError: unknown } });
    expect(err.giveUp.lastError).toBeInstanceOf(TryTimeoutError);
  });

  it("ends at once with the caller's abort reason, during an attempt or a backoff", async () => {
    const ac = new AbortController();
    const reason = new Error('caller gave up');
    const options = {
      ...fast,
      initialDelayMs: 60_000,
      maxDelayMs: 60_000,
      totalTimeoutMs: 600_000,
    };
    const p = withRetry(
      async () => {
        throw transientError();
      },
      ctx({ options, signal: ac.signal }),
    );
    setTimeout(() => ac.abort(reason), 20);
    await expect(p).rejects.toBe(reason);

    const ac2 = new AbortController();
    const p2 = withRetry(
      (signal) =>
        new Promise<string>((_, reject) => {
          signal.addEventListener('abort', () => reject(new Error('request aborted')), {
            once: true,
          });
        }),
      ctx({ signal: ac2.signal }),
    );
    ac2.abort(reason);
    await expect(p2).rejects.toBe(reason);
  });

  it('waits at least what the service asked for in Retry-After, and counts it against the budget', async () => {
    let calls = 0;
    const asked: unknown[] = [];
    const err = await withRetry<never>(
      async () => {
        calls++;
        throw Object.assign(transientError(), { retryAfter: 60_000 });
      },
      ctx({
        options: { ...fast, totalTimeoutMs: 1000 },
        retryAfterMs: (e) => {
          asked.push(e);
          return (e as { retryAfter: number }).retryAfter;
        },
      }),
    ).catch((e: unknown) => e as { giveUp: { attempts: number } });
    // A one-minute wait does not fit a one-second budget: it gives up instead of sleeping.
    expect(calls).toBe(1);
    expect(asked.length).toBe(1);
    expect(err.giveUp.attempts).toBe(1);
  });

  it('holds a limiter slot only while an attempt runs', async () => {
    const limiter = new RequestLimiter(1);
    let calls = 0;
    let seenInFlight = -1;
    await withRetry(async () => {
      calls++;
      seenInFlight = limiter.inFlight;
      if (calls < 2) throw transientError();
    }, ctx({ limiter }));
    expect(seenInFlight).toBe(1);
    expect(limiter.inFlight).toBe(0);
  });
});
