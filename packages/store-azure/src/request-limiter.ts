/** Releases a slot taken from a {@link RequestLimiter}; calling it twice has no effect. */
export type ReleaseSlot = () => void;

interface Waiter {
  grant: (release: ReleaseSlot) => void;
}

/**
 * Caps the requests one backend instance has in flight. The store issues many puts and gets at
 * once (packs, indexes, readers with read-ahead); without a cap a burst opens hundreds of
 * sockets and the service answers with 503 ServerBusy, which only slows everyone down.
 */
export class RequestLimiter {
  private active = 0;
  private readonly waiters: Waiter[] = [];

  /** @param limit most slots held at once (an integer ≥ 1). */
  constructor(readonly limit: number) {}

  /** Requests holding a slot now. */
  get inFlight(): number {
    return this.active;
  }

  /** Waits for a free slot (first come, first served); rejects with the signal's reason on abort. */
  acquire(signal?: AbortSignal): Promise<ReleaseSlot> {
    signal?.throwIfAborted();
    if (this.active < this.limit) {
      this.active++;
      return Promise.resolve(this.releaser());
    }
    return new Promise<ReleaseSlot>((resolve, reject) => {
      const onAbort = (): void => {
        const i = this.waiters.indexOf(waiter);
        if (i >= 0) this.waiters.splice(i, 1);
        reject(signal?.reason);
      };
      const waiter: Waiter = {
        grant: (release) => {
          signal?.removeEventListener('abort', onAbort);
          resolve(release);
        },
      };
      this.waiters.push(waiter);
      signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  /** Runs `fn` while holding a slot. */
  async run<T>(fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    const release = await this.acquire(signal);
    try {
      return await fn();
    } finally {
      release();
    }
  }

  private releaser(): ReleaseSlot {
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const next = this.waiters.shift();
      // Hand the slot straight to the next waiter so a newcomer cannot overtake it.
      if (next !== undefined) next.grant(this.releaser());
      else this.active--;
    };
  }
}
