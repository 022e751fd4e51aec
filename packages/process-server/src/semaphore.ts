/** Limits how many async operations run at once (per store backend). */
export class Semaphore {
  private active = 0;
  private readonly waiters: Array<() => void> = [];

  constructor(private readonly limit: number) {}

  /** Operations running now. */
  get running(): number {
    return this.active;
  }

  /** True when a slot is free now and nobody waits for one. */
  get idle(): boolean {
    return this.active < this.limit && this.waiters.length === 0;
  }

  /** Operations waiting for a slot. */
  get waiting(): number {
    return this.waiters.length;
  }

  /** Runs `fn` when a slot is free. */
  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.active >= this.limit) await new Promise<void>((resolve) => this.waiters.push(resolve));
    else this.active++;
    try {
      return await fn();
    } finally {
      const next = this.waiters.shift();
      if (next) next();
      else this.active--;
    }
  }
}
