import type { CliOutput } from './cli-context.js';
import { formatBytes, formatDuration, formatRate } from './format.js';

/** Options of a {@link ProgressBar}. */
export interface ProgressBarOptions {
  /** Where to draw (stderr). */
  out: CliOutput;
  /** Draw at all (a terminal or --progress, never with --json). */
  enabled: boolean;
  /** Word in front of the bar, e.g. `import`. */
  label: string;
  /** Total units expected. */
  total: number;
  /** What is counted. @default 'bytes' */
  unit?: 'bytes' | 'objects' | 'points';
  /** Milliseconds between redraws. @default 100 on a terminal, 2000 otherwise */
  intervalMs?: number;
  /** Clock, for tests. @default performance.now */
  now?: () => number;
}

/**
 * A progress line on stderr: bar, percentage, amount, rate and ETA. On a terminal it redraws
 * in place; with --progress on a pipe or file it prints a line every couple of seconds.
 */
export class ProgressBar {
  private readonly start: number;
  private lastDraw = -Infinity;
  private done = 0;
  private total: number;
  private readonly tty: boolean;
  private readonly interval: number;
  private readonly now: () => number;
  private drawn = false;

  constructor(private readonly options: ProgressBarOptions) {
    this.now = options.now ?? (() => performance.now());
    this.start = this.now();
    this.total = options.total;
    this.tty = options.out.isTTY === true;
    this.interval = options.intervalMs ?? (this.tty ? 100 : 2000);
  }

  /** Records progress; redraws when the interval has passed. */
  update(done: number, total?: number): void {
    this.done = done;
    if (total !== undefined) this.total = total;
    if (!this.options.enabled) return;
    const t = this.now();
    if (t - this.lastDraw < this.interval) return;
    this.lastDraw = t;
    this.draw(t, false);
  }

  /** Adds to the amount done. */
  advance(delta: number): void {
    this.update(this.done + delta);
  }

  /** Draws the final state and ends the line. */
  finish(): void {
    if (!this.options.enabled) return;
    if (this.drawn || this.done > 0) this.draw(this.now(), true);
  }

  /** Seconds since the bar started. */
  elapsedSeconds(): number {
    return (this.now() - this.start) / 1000;
  }

  private draw(t: number, final: boolean): void {
    this.drawn = true;
    const seconds = Math.max((t - this.start) / 1000, 1e-3);
    const fraction = this.total > 0 ? Math.min(this.done / this.total, 1) : final ? 1 : 0;
    const width = 24;
    const filled = Math.round(fraction * width);
    const bar = `[${'#'.repeat(filled)}${'.'.repeat(width - filled)}]`;
    const pct = `${Math.floor(fraction * 100)}%`.padStart(4);
    const bytes = (this.options.unit ?? 'bytes') === 'bytes';
    const amount = bytes
      ? `${formatBytes(this.done)} / ${formatBytes(this.total)}`
      : `${this.done} / ${this.total} ${this.options.unit}`;
    const rate = this.done / seconds;
    const speed = bytes ? formatRate(rate) : `${rate.toFixed(1)}/s`;
    const eta = final
      ? `in ${formatDuration(seconds)}`
      : `ETA ${rate > 0 ? formatDuration((this.total - this.done) / rate) : '-:--'}`;
    const text = `${this.options.label} ${bar} ${pct}  ${amount}  ${speed}  ${eta}`;
    if (this.tty) {
      this.options.out.write(`\r${text}\u001b[K${final ? '\n' : ''}`);
    } else {
      this.options.out.write(`${text}\n`);
    }
  }
}
