import { describe, expect, it } from 'vitest';
import { Agent } from './agent.js';
import type { CutReport } from './agent.js';
import type { ReplicationSink } from './replication-sink.js';

// An agent that is never started: nextCut's contract does not need QEMU.
const idle = (): Agent =>
  new Agent({
    qmpSocket: '/nonexistent/qmp.sock',
    machine: 'm',
    sink: {} as ReplicationSink,
    stateDir: '/nonexistent',
  });

describe('Agent.nextCut', () => {
  it('rejects with LB_AGENT_CUT_TIMEOUT and the agent status when no cut comes in time', async () => {
    const agent = idle();
    await expect(agent.nextCut(50)).rejects.toMatchObject({
      code: 'LB_AGENT_CUT_TIMEOUT',
      details: { timeoutMs: 50, status: { machine: 'm' } },
    });
    expect(agent.listenerCount('cut') + agent.listenerCount('failed')).toBe(0);
  });

  it('resolves with the next cut, rejects when the agent fails first, and leaves no listener', async () => {
    const agent = idle();
    const cut = { cutId: 'c1' } as unknown as CutReport;
    const next = agent.nextCut(10_000);
    agent.emit('cut', cut);
    await expect(next).resolves.toBe(cut);
    const failure = new Error('disk vanished');
    const failing = agent.nextCut(10_000);
    agent.emit('failed', failure);
    await expect(failing).rejects.toBe(failure);
    expect(agent.listenerCount('cut') + agent.listenerCount('failed')).toBe(0);
  });
});
