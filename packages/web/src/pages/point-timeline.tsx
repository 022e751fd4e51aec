import { navigate } from '../router';
import type { RecoveryPoint } from '../types';

const W = 1000;
const H = 70;

/**
 * The points of one page on a time axis: crash-consistent points as blue circles on the lower
 * row, app-consistent ones as green diamonds on the upper row (shape, row and colour differ,
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
  const app = points.filter((p) => p.kind === 'app').length;
  return (
    <figure className="timeline">
      <svg
        viewBox={`0 0 ${W} ${H}`}
        role="img"
        aria-label={`${points.length} recovery ${points.length === 1 ? 'point' : 'points'} from ${new Date(min).toLocaleString()} to ${new Date(max).toLocaleString()}: ${app} app-consistent, ${points.length - app} crash-consistent`}
      >
        <line x1={10} x2={W - 10} y1={H - 12} y2={H - 12} className="axis" />
        {points.map((p) => {
          const cx = x(Date.parse(p.time));
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
                <title>{`App-consistent ${new Date(p.time).toLocaleString()} (${p.disk})`}</title>
              </rect>
            ) : (
              <circle key={`${p.targetStoreId}/${p.id}`} className="pt-crash" cx={cx} cy={40} r={5}>
                <title>{`Crash-consistent ${new Date(p.time).toLocaleString()} (${p.disk})`}</title>
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
