import { duration } from '../format';
import type { RecoveryPoint } from '../types';

const W = 1000;
const H = 160;
const PAD = { left: 70, right: 10, top: 10, bottom: 24 };

/**
 * The machine's RPO over the span of the points shown, derived from the catalogue: at any
 * moment the RPO is the time since the newest point before it, so it climbs until a point is
 * committed and drops to zero there. The policy's threshold is drawn as a dashed line. (The
 * vault keeps no history of throughput, so only the RPO is charted.)
 */
export function RpoChart(props: {
  points: RecoveryPoint[];
  thresholdSeconds?: number;
  now?: number;
}) {
  const now = props.now ?? Date.now();
  const times = [...new Set(props.points.map((p) => Date.parse(p.time)))]
    .filter((t) => Number.isFinite(t))
    .sort((a, b) => a - b);
  const first = times[0];
  if (first === undefined || times.length < 2) return null;
  const steps: Array<[number, number]> = [[first, 0]];
  let peak = 0;
  for (let i = 1; i < times.length; i++) {
    const t = times[i] ?? first;
    const rpo = (t - (times[i - 1] ?? first)) / 1000;
    peak = Math.max(peak, rpo);
    steps.push([t, rpo], [t, 0]);
  }
  const last = times[times.length - 1] ?? first;
  const tail = (now - last) / 1000;
  peak = Math.max(peak, tail);
  steps.push([now, tail]);
  const top = Math.max(peak, props.thresholdSeconds ?? 0) * 1.1 || 1;
  const x = (t: number) =>
    PAD.left + ((t - first) / Math.max(1, now - first)) * (W - PAD.left - PAD.right);
  const y = (s: number) => PAD.top + (1 - s / top) * (H - PAD.top - PAD.bottom);
  const d = steps
    .map(([t, s], i) => `${i === 0 ? 'M' : 'L'}${x(t).toFixed(1)},${y(s).toFixed(1)}`)
    .join(' ');
  const threshold = props.thresholdSeconds;
  return (
    <figure className="chart">
      <svg
        viewBox={`0 0 ${W} ${H}`}
        role="img"
        aria-label={`RPO over time: worst ${duration(peak)}, now ${duration(tail)}${threshold !== undefined ? `, threshold ${duration(threshold)}` : ''}`}
      >
        <line x1={PAD.left} x2={W - PAD.right} y1={y(0)} y2={y(0)} className="axis" />
        <line x1={PAD.left} x2={PAD.left} y1={PAD.top} y2={y(0)} className="axis" />
        <text x={PAD.left - 6} y={y(top / 1.1) + 4} textAnchor="end" className="tick">
          {duration(top / 1.1)}
        </text>
        <text x={PAD.left - 6} y={y(0) + 4} textAnchor="end" className="tick">
          0
        </text>
        {threshold !== undefined ? (
          <>
            <line
              x1={PAD.left}
              x2={W - PAD.right}
              y1={y(threshold)}
              y2={y(threshold)}
              className="threshold"
            />
            <text x={W - PAD.right} y={y(threshold) - 4} textAnchor="end" className="tick">
              threshold {duration(threshold)}
            </text>
          </>
        ) : null}
        <path d={d} className="rpo-line" />
        <text x={PAD.left} y={H - 6} className="tick">
          {new Date(first).toLocaleString()}
        </text>
        <text x={W - PAD.right} y={H - 6} textAnchor="end" className="tick">
          now
        </text>
      </svg>
      <figcaption className="muted small">
        RPO over the points shown (time since the newest point at each moment).
      </figcaption>
    </figure>
  );
}
