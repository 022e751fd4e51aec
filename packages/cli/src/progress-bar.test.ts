import { describe, expect, it } from 'vitest';
import { formatBytes, formatDuration } from './format.js';
import { ProgressBar } from './progress-bar.js';

function fakeOut(isTTY: boolean): {
  write: (s: string) => boolean;
  isTTY: boolean;
  text: () => string;
} {
  let text = '';
  return { write: (s) => ((text += s), true), isTTY, text: () => text };
}

describe('ProgressBar', () => {
  it('shows bytes, rate and ETA, redrawing in place on a terminal', () => {
    let t = 0;
    const out = fakeOut(true);
    const bar = new ProgressBar({
      out,
      enabled: true,
      label: 'import',
      total: 100e6,
      now: () => t,
    });
    t = 1000;
    bar.update(25e6);
    expect(out.text()).toContain('\rimport [######..................]  25%');
    expect(out.text()).toContain('25.0 MB/s');
    expect(out.text()).toContain('ETA 0:03');
    t = 1050;
    bar.update(30e6); // within the redraw interval: nothing drawn
    expect(out.text().split('\r')).toHaveLength(2);
    t = 4000;
    bar.update(100e6);
    bar.finish();
    expect(out.text()).toMatch(/100%.*in 0:04/);
    expect(out.text().endsWith('\n')).toBe(true);
  });

  it('prints nothing when disabled (--json, or not a terminal without --progress)', () => {
    const out = fakeOut(false);
    const bar = new ProgressBar({ out, enabled: false, label: 'restore', total: 10 });
    bar.update(5);
    bar.finish();
    expect(out.text()).toBe('');
  });
});

describe('format', () => {
  it('formats sizes and durations', () => {
    expect(formatBytes(65536)).toBe('64 KiB');
    expect(formatBytes(1.5 * 1024 ** 3)).toBe('1.50 GiB');
    expect(formatBytes(512)).toBe('512 B');
    expect(formatDuration(3725)).toBe('1:02:05');
    expect(formatDuration(65)).toBe('1:05');
  });
});
