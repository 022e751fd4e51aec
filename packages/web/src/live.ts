import { useEffect, useRef, useSyncExternalStore } from 'react';
import { getSession, onSessionChange } from './api';

/** Kinds of change the vault's event stream sends. */
export type LiveKind = 'job' | 'protected-item' | 'alert' | 'component';

/** Whether the event stream is connected (`live`), pages fall back to polling, or no page follows changes (`idle`). */
export type LiveStatus = 'live' | 'polling' | 'idle';

type Handler = (kind: LiveKind, data: unknown) => void;

/**
 * One shared connection to `GET /api/events` for the whole app. EventSource cannot send an
 * Authorization header, so the stream is read with fetch and parsed here. It is open only
 * while some page listens, and reconnects after a few seconds when it drops.
 */
class LiveStream {
  private readonly handlers = new Set<Handler>();
  private readonly statusListeners = new Set<() => void>();
  private abort: AbortController | undefined;
  private retry: ReturnType<typeof setTimeout> | undefined;
  private idleTimer: ReturnType<typeof setTimeout> | undefined;
  status: LiveStatus = 'idle';

  subscribe(handler: Handler): () => void {
    this.handlers.add(handler);
    if (this.idleTimer !== undefined) {
      clearTimeout(this.idleTimer);
      this.idleTimer = undefined;
    }
    if (this.abort === undefined) this.open();
    return () => {
      this.handlers.delete(handler);
      // Going from one page to the next unsubscribes and subscribes again: keep the stream
      // for a few seconds rather than reconnecting on every navigation.
      if (this.handlers.size === 0 && this.idleTimer === undefined) {
        this.idleTimer = setTimeout(() => {
          this.idleTimer = undefined;
          if (this.handlers.size === 0) this.close();
        }, 5000);
      }
    };
  }

  onStatus(listener: () => void): () => void {
    this.statusListeners.add(listener);
    return () => this.statusListeners.delete(listener);
  }

  private setStatus(s: LiveStatus): void {
    if (this.status === s) return;
    this.status = s;
    for (const l of this.statusListeners) l();
  }

  /** Reconnects with the current session's token (after a login or logout). */
  restart(): void {
    this.close();
    if (this.handlers.size > 0) this.open();
  }

  private close(): void {
    this.abort?.abort();
    this.abort = undefined;
    if (this.retry !== undefined) clearTimeout(this.retry);
    this.retry = undefined;
    this.setStatus('idle');
  }

  private open(): void {
    const session = getSession();
    if (session === null) {
      this.abort = undefined;
      return;
    }
    this.setStatus('polling');
    const abort = new AbortController();
    this.abort = abort;
    void this.read(session.token, abort.signal).finally(() => {
      if (this.abort !== abort) return; // closed or replaced meanwhile
      this.setStatus('polling');
      if (!abort.signal.aborted && this.handlers.size > 0) {
        this.retry = setTimeout(() => this.open(), 3000);
      } else {
        this.abort = undefined;
      }
    });
  }

  private async read(token: string, signal: AbortSignal): Promise<void> {
    try {
      const res = await fetch('/api/events', {
        headers: { authorization: `Bearer ${token}`, accept: 'text/event-stream' },
        signal,
      });
      if (!res.ok || res.body === null) return;
      this.setStatus('live');
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += value;
        let end: number;
        while ((end = buffer.indexOf('\n\n')) >= 0) {
          this.dispatch(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch {
      // Dropped or aborted: open() decides whether to reconnect.
    }
  }

  private dispatch(frame: string): void {
    const parsed = parseSseFrame(frame);
    if (parsed === undefined) return;
    for (const h of this.handlers) h(parsed.kind, parsed.data);
  }
}

/**
 * One server-sent-event frame (the lines between blank lines) as a change the portal follows,
 * or undefined for other events (`ready`), comments (keep-alives) and unreadable data.
 */
export function parseSseFrame(frame: string): { kind: LiveKind; data: unknown } | undefined {
  let event = 'message';
  const data: string[] = [];
  for (const line of frame.split(/\r?\n/)) {
    if (line.startsWith('event:')) event = line.slice(6).trim();
    else if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
  }
  if (!KINDS.includes(event as LiveKind) || data.length === 0) return undefined;
  try {
    return { kind: event as LiveKind, data: JSON.parse(data.join('\n')) as unknown };
  } catch {
    return undefined;
  }
}

const KINDS: readonly LiveKind[] = ['job', 'protected-item', 'alert', 'component'];

const stream = new LiveStream();
onSessionChange(() => stream.restart());

/** Whether live updates are connected, for the header's indicator. */
export function useLiveStatus(): LiveStatus {
  return useSyncExternalStore(
    (l) => stream.onStatus(l),
    () => stream.status,
  );
}

/**
 * Calls `refresh` soon after the vault reports a change of one of `kinds` (several changes in
 * a burst cause one refresh), and every `pollMs` as well: points and store figures have no
 * events, and polling covers a dropped stream.
 */
export function useLiveRefresh(kinds: LiveKind[], refresh: () => void, pollMs = 10_000): void {
  const latest = useRef(refresh);
  latest.current = refresh;
  const key = kinds.join(',');
  useEffect(() => {
    const wanted = new Set(key.split(','));
    let pending: ReturnType<typeof setTimeout> | undefined;
    const unsubscribe = stream.subscribe((kind) => {
      if (!wanted.has(kind) || pending !== undefined) return;
      pending = setTimeout(() => {
        pending = undefined;
        latest.current();
      }, 500);
    });
    const poll = setInterval(() => latest.current(), pollMs);
    return () => {
      unsubscribe();
      clearInterval(poll);
      if (pending !== undefined) clearTimeout(pending);
    };
  }, [key, pollMs]);
}
