/**
 * A byte-rate limiter: `take(n)` returns how long the caller should wait before reading more
 * (0 when within the rate). The rate can be changed at any time; 0 or Infinity means unlimited.
 * The burst allowance is one second of the rate.
 */
export class TokenBucket {
  private tokens: number;
  private last = performance.now();

  constructor(private rate: number) {
    this.tokens = rate;
  }

  /** Bytes per second; 0 or Infinity disables the limit. */
  get bytesPerSecond(): number {
    return this.rate;
  }

  /** Changes the rate at run time. */
  setRate(rate: number): void {
    this.refill();
    this.rate = rate;
    this.tokens = Math.min(this.tokens, rate);
  }

  /** Accounts `n` bytes; returns the milliseconds to pause so the average stays at the rate. */
  take(n: number): number {
    if (!(this.rate > 0) || this.rate === Infinity) return 0;
    this.refill();
    this.tokens -= n;
    return this.tokens >= 0 ? 0 : Math.ceil((-this.tokens / this.rate) * 1000);
  }

  private refill(): void {
    const now = performance.now();
    if (this.rate > 0 && this.rate !== Infinity)
      this.tokens = Math.min(this.rate, this.tokens + ((now - this.last) / 1000) * this.rate);
    this.last = now;
  }
}
