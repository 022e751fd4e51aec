import { useState } from 'react';
import { bytes, duration } from '../format';
import { useLiveRefresh } from '../live';
import { useApi } from '../use-api';
import { ErrorBox } from '../ui';

/** `GET /api/protected-items/:id/history`. */
interface History {
  since: string;
  until: string;
  bucketSeconds: number;
  buckets: Array<{
    time: string;
    rpoSeconds: number | null;
    throughputBps: number | null;
    throughputMaxBps: number | null;
    backlogBytes: number | null;
  }>;
}

const W = 1000;
const H = 150;
const PAD = { left: 80, right: 10, top: 12, bottom: 22 };
const SPANS = [1, 6, 24];

const x = (i: number, n: number) => PAD.left + (i / Math.max(1, n)) * (W - PAD.left - PAD.right);

/** The y of `v` on a 0..top scale. */
const yOf = (v: number, top: number) => PAD.top + (1 - v / top) * (H - PAD.top - PAD.bottom);

function Axes(props: { top: string; since: string; label: string }) {
  return (
    <>
      <line
        x1={PAD.left}
        x2={W - PAD.right}
        y1={H - PAD.bottom}
        y2={H - PAD.bottom}
        className="axis"
      />
      <line x1={PAD.left} x2={PAD.left} y1={PAD.top} y2={H - PAD.bottom} className="axis" />
      <text x={PAD.left - 6} y={PAD.top + 10} textAnchor="end" className="tick">
        {props.top}
      </text>
      <text x={PAD.left - 6} y={H - PAD.bottom + 4} textAnchor="end" className="tick">
        0
      </text>
      <text x={PAD.left} y={H - 6} className="tick">
        {new Date(props.since).toLocaleTimeString()}
      </text>
      <text x={W - PAD.right} y={H - 6} textAnchor="end" className="tick">
        now
      </text>
      <text x={PAD.left + 6} y={PAD.top + 10} className="tick">
        {props.label}
      </text>
    </>
  );
}

/**
 * The machine's RPO and throughput over the last hours, from the vault's history: the worst
 * RPO of each time bucket (derived by the vault from the recovery points, so it also climbs
 * while the process server is silent) against the policy's threshold, and the mean throughput
 * the process server reported in each bucket (with its peak). SVGs with text summaries.
 */
export function HistoryChart(props: { itemId: string; thresholdSeconds?: number }) {
  const [hours, setHours] = useState(6);
  const history = useApi<History>(
    `/api/protected-items/${encodeURIComponent(props.itemId)}/history?hours=${hours}`,
  );
  useLiveRefresh([], history.reload, 30_000);
  const h = history.data;
  return (
    <section className="card wide" aria-labelledby="history-h">
      <div className="toolbar">
        <h2 id="history-h">RPO and throughput</h2>
        <div className="field inline">
          <label htmlFor="history-span">Over the last</label>
          <select
            id="history-span"
            value={hours}
            onChange={(e) => setHours(Number(e.target.value))}
          >
            {SPANS.map((s) => (
              <option key={s} value={s}>
                {s === 1 ? '1 hour' : `${s} hours`}
              </option>
            ))}
          </select>
        </div>
      </div>
      <ErrorBox error={history.error} />
      {h === undefined ? null : <Charts history={h} hours={hours} {...props} />}
    </section>
  );
}

function Charts(props: { history: History; hours: number; thresholdSeconds?: number }) {
  const { buckets, since } = props.history;
  const n = buckets.length;
  const span = props.hours === 1 ? '1 h' : `${props.hours} h`;
  const rpos = buckets.map((b) => b.rpoSeconds).filter((v): v is number => v !== null);
  const worst = rpos.length === 0 ? null : Math.max(...rpos);
  const nowRpo = buckets[n - 1]?.rpoSeconds ?? null;
  const threshold = props.thresholdSeconds;
  const rpoTop = Math.max(worst ?? 0, threshold ?? 0) * 1.1 || 60;
  // One path, broken where the RPO is unknown (before the first point of every disk).
  let d = '';
  let pen = false;
  buckets.forEach((b, i) => {
    if (b.rpoSeconds === null) {
      pen = false;
      return;
    }
    const px = x(i + 1, n).toFixed(1);
    d += `${pen ? 'L' : 'M'}${x(i, n).toFixed(1)},${yOf(b.rpoSeconds, rpoTop).toFixed(1)} L${px},${yOf(b.rpoSeconds, rpoTop).toFixed(1)} `;
    pen = true;
  });

  const means = buckets.map((b) => b.throughputBps ?? 0);
  const peaks = buckets.map((b) => b.throughputMaxBps ?? 0);
  const reported = buckets.filter((b) => b.throughputBps !== null);
  const peak = Math.max(0, ...peaks);
  const mean =
    reported.length === 0
      ? 0
      : reported.reduce((a, b) => a + (b.throughputBps ?? 0), 0) / reported.length;
  const tTop = peak * 1.1 || 1;
  const barW = Math.max(1, (W - PAD.left - PAD.right) / Math.max(1, n) - 1);

  return (
    <>
      <figure className="chart">
        <svg
          viewBox={`0 0 ${W} ${H}`}
          role="img"
          data-testid="rpo-chart"
          aria-label={`RPO over the last ${span}: ${worst === null ? 'no recovery point yet' : `worst ${duration(worst)}, ${duration(nowRpo)} in the latest ${duration(props.history.bucketSeconds)}`}${threshold !== undefined ? `, threshold ${duration(threshold)}` : ''}`}
        >
          <Axes top={duration(rpoTop / 1.1)} since={since} label="RPO" />
          {threshold !== undefined ? (
            <>
              <line
                x1={PAD.left}
                x2={W - PAD.right}
                y1={yOf(threshold, rpoTop)}
                y2={yOf(threshold, rpoTop)}
                className="threshold"
              />
              <text
                x={W - PAD.right}
                y={yOf(threshold, rpoTop) - 4}
                textAnchor="end"
                className="tick"
              >
                threshold {duration(threshold)}
              </text>
            </>
          ) : null}
          <path d={d} className="rpo-line" />
        </svg>
      </figure>
      <figure className="chart">
        <svg
          viewBox={`0 0 ${W} ${H}`}
          role="img"
          data-testid="throughput-chart"
          aria-label={`Throughput over the last ${span}: ${reported.length === 0 ? 'no data moved' : `peak ${bytes(peak)}/s, mean ${bytes(mean)}/s while replicating`}`}
        >
          <Axes top={`${bytes(tTop / 1.1)}/s`} since={since} label="Throughput" />
          {means.map((m, i) =>
            m > 0 ? (
              <rect
                key={i}
                className="tp-bar"
                x={x(i, n)}
                y={yOf(m, tTop)}
                width={barW}
                height={H - PAD.bottom - yOf(m, tTop)}
              />
            ) : null,
          )}
          {peaks.map((p, i) =>
            p > 0 ? (
              <line
                key={i}
                className="tp-peak"
                x1={x(i, n)}
                x2={x(i, n) + barW}
                y1={yOf(p, tTop)}
                y2={yOf(p, tTop)}
              />
            ) : null,
          )}
        </svg>
        <figcaption className="legend">
          <span>
            <span aria-hidden="true" className="swatch swatch-rpo" /> Worst RPO per{' '}
            {duration(props.history.bucketSeconds)}
          </span>
          <span>
            <span aria-hidden="true" className="swatch swatch-tp" /> Mean throughput (bar) and peak
            (line)
          </span>
        </figcaption>
      </figure>
    </>
  );
}
