import { navigate } from '../router';
import type { RecoveryPoint } from '../types';

const W = 1000;
const H = 70;

/**
 * The points of one page on a time axis, one mark per cut (its disks' points): crash-consistent
 * as blue circles on the lower row, app-consistent as green diamonds on the upper row (shape, row and colour differ,
 * so colour is never the only cue). An SVG with a text summary for screen readers.
 */
export function PointTimeline({
  points,
  linkTo,
}: {
  points: RecoveryPoint[];
  /** For operators: where a click on a point goes (the test-failover wizard for it). */
  linkTo?: (p: RecoveryPoint) => string;
}) {
  if (points.length === 0) return null;
  const times = points.map((p) => Date.parse(p.time));
  const min = Math.min(...times);
  const max = Math.max(...times);
  const span = Math.max(1, max - min);
  const x = (t: number) => 20 + ((t - min) / span) * (W - 40);
  // One mark per cut: the points of a cut's disks share its time and kind.
  const byCut = new Map<string, { p: RecoveryPoint; disks: string[] }>();
  for (const p of points) {
    const key = `${p.targetStoreId}/${p.cut ?? p.id}`;
    const m = byCut.get(key);
    if (m === undefined) byCut.set(key, { p, disks: [p.disk] });
    else m.disks.push(p.disk);
  }
  const marks = [...byCut.values()];
  const app = marks.filter((m) => m.p.kind === 'app').length;
  return (
    <figure className="timeline">
      <svg
        viewBox={`0 0 ${W} ${H}`}
        role="img"
        aria-label={`${marks.length} recovery ${marks.length === 1 ? 'point' : 'points'} (of every disk) from ${new Date(min).toLocaleString()} to ${new Date(max).toLocaleString()}: ${app} app-consistent, ${marks.length - app} crash-consistent`}
      >
        <line x1={10} x2={W - 10} y1={H - 12} y2={H - 12} className="axis" />
        {marks.map(({ p, disks }) => {
          const cx = x(Date.parse(p.time));
          const title = `${p.kind === 'app' ? 'App' : 'Crash'}-consistent ${new Date(p.time).toLocaleString()} (${disks.join(', ')})`;
          const mark =
            p.kind === 'app' ? (
              <rect
                key={`${p.targetStoreId}/${p.id}`}
                className="pt-app"
                x={cx - 6}
                y={14 - 6}
                width={12}
                height={12}
                transform={`rotate(45 ${cx} 14)`}
              >
                <title>{title}</title>
              </rect>
            ) : (
              <circle key={`${p.targetStoreId}/${p.id}`} className="pt-crash" cx={cx} cy={40} r={5}>
                <title>{title}</title>
              </circle>
            );
          // The table below has a keyboard path to the same wizard: the marks stay out of the
          // tab order (a hundred stops), and are a convenience for the mouse.
          return linkTo === undefined ? (
            mark
          ) : (
            <a
              key={`${p.targetStoreId}/${p.id}`}
              href={linkTo(p)}
              tabIndex={-1}
              className="pt-link"
              onClick={(e) => {
                e.preventDefault();
                navigate(linkTo(p));
              }}
            >
              {mark}
            </a>
          );
        })}
      </svg>
      <figcaption className="legend">
        <span className="kind kind-app">
          <span aria-hidden="true" className="kind-mark" /> App-consistent
        </span>
        <span className="kind kind-crash">
          <span aria-hidden="true" className="kind-mark" /> Crash-consistent
        </span>
        <span className="muted">
          {new Date(min).toLocaleString()} – {new Date(max).toLocaleString()}
        </span>
      </figcaption>
    </figure>
  );
}
