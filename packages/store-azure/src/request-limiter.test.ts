import { describe, expect, it } from 'vitest';
import { RequestLimiter } from './request-limiter.js';

describe('RequestLimiter', () => {
  it('never lets more than `limit` tasks run at once, and runs them all', async () => {
    const limiter = new RequestLimiter(3);
    let running = 0;
    let peak = 0;
    const results = await Promise.all(
      Array.from({ length: 20 }, (_, i) =>
        limiter.run(async () => {
          running++;
          peak = Math.max(peak, running);
          await new Promise((r) => setTimeout(r, 1 + (i % 3)));
          running--;
          return i;
        }),
      ),
    );
    expect(results).toEqual(Array.from({ length: 20 }, (_, i) => i));
    expect(peak).toBe(3);
    expect(limiter.inFlight).toBe(0);
  });

  it('releases the slot when a task fails, and a release twice counts once', async () => {
    const limiter = new RequestLimiter(1);
    await expect(limiter.run(() => Promise.reject(new Error('boom')))).rejects.toThrow('boom');
    const release = await limiter.acquire();
    release();
    release();
    expect(limiter.inFlight).toBe(0);
    const again = await limiter.acquire();
    expect(limiter.inFlight).toBe(1);
    again();
  });

  it('drops an aborted waiter from the queue', async () => {
    const limiter = new RequestLimiter(1);
    const hold = await limiter.acquire();
    const ac = new AbortController();
    const waiting = limiter.acquire(ac.signal);
    const reason = new Error('stop waiting');
    ac.abort(reason);
    await expect(waiting).rejects.toBe(reason);
    hold();
    // The aborted waiter must not have been handed the slot.
    expect(limiter.inFlight).toBe(0);
  });
});
