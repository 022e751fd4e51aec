/** Seconds as a short duration: `42 s`, `7 min`, `3 h 5 min`, `2 d 4 h`. */
export function duration(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return '—';
  const s = Math.round(seconds);
  if (s < 90) return `${s} s`;
  const m = Math.round(s / 60);
  if (m < 90) return `${m} min`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h} h ${m % 60} min`;
  return `${Math.floor(h / 24)} d ${h % 24} h`;
}

/** Bytes in binary units: `512 B`, `1.5 GiB`. */
export function bytes(n: number | null | undefined): string {
  if (n === null || n === undefined || !Number.isFinite(n)) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(v < 10 ? 1 : 0)} ${units[i] ?? 'B'}`;
}

/** An ISO time in the browser's locale, or a dash. */
export function time(iso: string | null | undefined): string {
  if (iso === null || iso === undefined) return '—';
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

/** How long ago an ISO time was, e.g. `5 min ago`. */
export function ago(iso: string | null | undefined, now = Date.now()): string {
  if (iso === null || iso === undefined) return 'never';
  return `${duration((now - Date.parse(iso)) / 1000)} ago`;
}

/** Human words for item states. */
export const STATE_LABELS: Record<string, string> = {
  enabling: 'Enabling',
  'initial-replication': 'Initial replication',
  protected: 'Protected',
  'resync-needed': 'Resync needed',
  'failed-over': 'Failed over',
  disabled: 'Disabled',
};

/** A ratio such as a dedup ratio: `12.3×`, or a dash. */
export function ratio(r: number | null | undefined): string {
  if (r === null || r === undefined || !Number.isFinite(r) || r <= 0) return '—';
  return `${r < 10 ? r.toFixed(2) : r < 100 ? r.toFixed(1) : Math.round(r)}×`;
}
