/** A byte rate over the last ten one-second samples. */
export class RateMeter {
  private total = 0;
  private readonly samples: Array<{ at: number; total: number }> = [];

  /** Adds bytes. */
  add(n: number): void {
    this.total += n;
  }

  /** Sets the cumulative total (for counters kept elsewhere). */
  set(total: number): void {
    this.total = total;
    this.sample();
  }

  /** Records a sample; call once a second. */
  sample(): void {
    this.samples.push({ at: performance.now(), total: this.total });
    if (this.samples.length > 11) this.samples.shift();
  }

  /** Bytes per second over the sampled window. */
  rate(): number {
    const first = this.samples[0];
    const last = this.samples.at(-1);
    if (!first || !last || last.at === first.at) return 0;
    return ((last.total - first.total) / (last.at - first.at)) * 1000;
  }
}
