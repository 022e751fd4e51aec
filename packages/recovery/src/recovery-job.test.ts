import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LifeboatError } from '@lifeboat/protocol';
import { RecoveryJob, type RecoveryJobRecord } from './recovery-job.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'lb-job-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('RecoveryJob', () => {
  it('records steps with timings and details, the failing step with its code, and writes job.json', async () => {
    const seen: string[] = [];
    const job = new RecoveryJob('test-failover', { machines: ['web'] }, dir, (r) =>
      seen.push(`${r.state}:${r.steps.map((s) => `${s.name}=${s.state}`).join(',')}`),
    );
    await job.step('select points', async (d) => {
      d['web'] = ['p1'];
    });
    const err = new LifeboatError('LB_RECOVERY_BOOT_TIMEOUT', 'no marker', {
      details: { machine: 'web' },
    });
    await expect(job.step('console of web', () => Promise.reject(err))).rejects.toBe(err);
    job.artifact('web-console', '/x/console.log');
    const record = await job.finish(err);
    expect(record.state).toBe('failed');
    expect(record.error).toEqual({
      code: 'LB_RECOVERY_BOOT_TIMEOUT',
      message: 'no marker',
      details: { machine: 'web' },
    });
    expect(record.steps.map((s) => [s.name, s.state])).toEqual([
      ['select points', 'succeeded'],
      ['console of web', 'failed'],
    ]);
    expect(record.steps[0]?.detail).toEqual({ web: ['p1'] });
    expect(record.steps[1]?.error?.code).toBe('LB_RECOVERY_BOOT_TIMEOUT');
    for (const s of record.steps) expect(s.durationMs).toBeGreaterThanOrEqual(0);
    expect(seen[0]).toBe('running:select points=running');
    expect(seen.at(-1)).toMatch(/^failed:/);
    const onDisk = JSON.parse(
      await readFile(join(dir, record.id, 'job.json'), 'utf8'),
    ) as RecoveryJobRecord;
    expect(onDisk).toEqual(JSON.parse(JSON.stringify(record)));
  });
});
