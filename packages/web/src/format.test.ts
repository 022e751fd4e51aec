import { describe, expect, it } from 'vitest';
import { query, roleAtLeast } from './api';
import { ago, bytes, duration } from './format';
import { parseSseFrame } from './live';

describe('portal helpers', () => {
  it('formats durations and sizes the way the tables show them', () => {
    expect(duration(null)).toBe('—');
    expect(duration(42.4)).toBe('42 s');
    expect(duration(300)).toBe('5 min');
    expect(duration(7200)).toBe('2 h 0 min');
    expect(duration(3 * 86_400 + 4 * 3600)).toBe('3 d 4 h');
    expect(bytes(512)).toBe('512 B');
    expect(bytes(1536)).toBe('1.5 KiB');
    expect(bytes(20 * 2 ** 30)).toBe('20 GiB');
    expect(ago(null)).toBe('never');
    expect(ago(new Date(1_000_000 - 90_000).toISOString(), 1_000_000)).toBe('2 min ago');
  });

  it('builds query strings without empty filters', () => {
    expect(query({ limit: 50, q: '', state: undefined, present: true })).toBe(
      '?limit=50&present=true',
    );
    expect(query({ q: 'a b&c' })).toBe('?q=a+b%26c');
    expect(query({})).toBe('');
  });

  it('orders roles admin > operator > viewer', () => {
    expect(roleAtLeast('admin', 'operator')).toBe(true);
    expect(roleAtLeast('operator', 'operator')).toBe(true);
    expect(roleAtLeast('viewer', 'operator')).toBe(false);
    expect(roleAtLeast(undefined, 'viewer')).toBe(false);
  });

  it('parses the vault event stream, ignoring keep-alives and other events', () => {
    expect(parseSseFrame('event: job\ndata: {"id":"job_1","state":"running"}')).toEqual({
      kind: 'job',
      data: { id: 'job_1', state: 'running' },
    });
    expect(parseSseFrame('event: alert\r\ndata: {"a":\r\ndata: 1}')).toEqual({
      kind: 'alert',
      data: { a: 1 },
    });
    expect(parseSseFrame(': keep-alive')).toBeUndefined();
    expect(parseSseFrame('retry: 3000\nevent: ready\ndata: {}')).toBeUndefined();
    expect(parseSseFrame('event: job\ndata: {not json')).toBeUndefined();
  });
});
