import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { resolveAgentOptions } from './agent-options.js';
import { loadAgentState, saveAgentState } from './agent-state.js';
import type { ReplicationSink } from './replication-sink.js';

const sink = {} as ReplicationSink;
const base = { qmpSocket: '/run/q.sock', machine: 'm', sink, stateDir: '/var/lib/lb' };

describe('agent options', () => {
  it('defaults to a 5 s interval and no app-consistent points without a guest agent', () => {
    const o = resolveAgentOptions(base);
    expect(o.intervalMs).toBe(5000);
    expect(o.appConsistentIntervalMs).toBe(0);
    expect(Object.isFrozen(o)).toBe(true);
    expect(resolveAgentOptions({ ...base, guestAgentSocket: '/g' }).appConsistentIntervalMs).toBe(
      3_600_000,
    );
  });

  it('refuses an interval under one second, and app-consistent points without a guest agent', () => {
    expect(() => resolveAgentOptions({ ...base, intervalMs: 999 })).toThrow(/at least 1000/);
    expect(() => resolveAgentOptions({ ...base, appConsistentIntervalMs: 60_000 })).toThrow(
      expect.objectContaining({ code: 'LB_AGENT_INVALID_OPTIONS' }),
    );
    expect(() => resolveAgentOptions({ ...base, chunkSize: 1000 })).toThrow(/power of two/);
  });
});

describe('agent state file', () => {
  it('round-trips, and names the problem of a damaged or foreign file', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'lb-agent-state-'));
    try {
      const path = join(dir, 'agent-state.json');
      expect(await loadAgentState(path, 'm')).toEqual({ version: 1, machine: 'm', disks: {} });
      const state = {
        version: 1 as const,
        machine: 'm',
        disks: { vda: { node: 'vda', size: 1024, tracking: 'lb-x' } },
      };
      await saveAgentState(path, state);
      expect(await loadAgentState(path, 'm')).toEqual(state);
      await expect(loadAgentState(path, 'other')).rejects.toMatchObject({
        code: 'LB_AGENT_STATE_MACHINE',
      });
      await writeFile(path, '{"version":1,"machine":"m","disks":');
      await expect(loadAgentState(path, 'm')).rejects.toMatchObject({
        code: 'LB_AGENT_STATE_CORRUPT',
      });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
