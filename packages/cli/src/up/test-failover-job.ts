import { LifeboatError } from '@lifeboat/protocol';
import { runTestFailover } from '@lifeboat/recovery';
import type { RecoveryHost, RecoveryJobRecord } from '@lifeboat/recovery';
import type { StoreApi } from '@lifeboat/store';
import type { JobHandler } from '@lifeboat/vault';

/** Parameters of a `test-failover` job of `lifeboat up`. */
export interface TestFailoverJobParams {
  /** The store's machine id (the vault's machine id). */
  machine: string;
  /** Name of the recovered machine. */
  name: string;
  /** Direct kernel boot (the demo's image has no boot loader). */
  kernel: string;
  append: string;
  memoryMiB: number;
  /** Console pattern (a regular expression's source) that proves the boot. */
  console?: string;
  /** Guest TCP port that must answer, and what it must answer. */
  port?: number;
  portExpect?: string;
}

function stepLine(s: RecoveryJobRecord['steps'][number]): string {
  const detail = s.error
    ? `${s.error.code}: ${s.error.message}`
    : JSON.stringify(s.detail ?? {}).slice(0, 300);
  return `${s.name}: ${s.state}${s.durationMs !== undefined ? ` in ${s.durationMs} ms` : ''} ${detail}`;
}

/**
 * A vault job kind that runs a test failover on the recovery host `lifeboat up` runs in the same
 * process: the vault shows it as a job with steps (select point, boot and verify, clean up),
 * each recovery step in its log, and the boot verification in its result. The vault has no
 * test-failover route yet (it records failovers but hands nothing to a recovery host), so this
 * is how `up` makes the test visible there.
 */
export function testFailoverJob(host: RecoveryHost, store: StoreApi): JobHandler {
  return {
    kind: 'test-failover',
    // Booting twice after a vault restart would be surprising; a new test is one command away.
    resumable: false,
    steps: ['select-point', 'boot-and-verify', 'cleanup'],
    async run(job) {
      const p = job.params as unknown as TestFailoverJobParams;
      const points = await job.step('select-point', async () => {
        const list = await store.listPoints({ machine: p.machine });
        const latest = list.at(-1);
        if (latest === undefined) {
          throw new LifeboatError(
            'LB_UP_NO_POINT',
            `Machine ${p.machine} has no recovery point yet; wait for the first one.`,
            { details: { machine: p.machine } },
          );
        }
        // Every disk of the latest cut.
        const ids = list
          .filter((x) => (latest.cut !== undefined ? x.cut === latest.cut : x.id === latest.id))
          .map((x) => x.id);
        await job.log(
          `Latest point of ${p.machine}: ${ids.join(', ')} taken at ${latest.time.toISOString()}.`,
        );
        return { ids, time: latest.time.toISOString() };
      });
      const tf = await job.step('boot-and-verify', async () => {
        const run = await runTestFailover(host, store, {
          machines: [
            {
              name: p.name,
              points: { pointIds: points.ids },
              boot: { kernel: p.kernel, append: p.append },
              memoryMiB: p.memoryMiB,
            },
          ],
          verify: {
            ...(p.console !== undefined ? { console: new RegExp(p.console) } : {}),
            ...(p.port !== undefined
              ? {
                  port: {
                    guestPort: p.port,
                    ...(p.portExpect !== undefined ? { expect: new RegExp(p.portExpect) } : {}),
                  },
                }
              : {}),
            screenshot: true,
          },
        });
        for (const s of run.job.steps) await job.log(stepLine(s));
        return run;
      });
      const cleanup = await job.step('cleanup', async () => {
        const c = await tf.cleanup();
        for (const s of c.steps) await job.log(stepLine(s));
        return c;
      });
      return {
        points: points.ids,
        pointTime: points.time,
        verification: tf.job.steps
          .filter((s) => /^(console|port|screenshot|isolation) /.test(s.name))
          .map((s) => ({ step: s.name, state: s.state, detail: s.detail ?? {} })),
        artifacts: tf.job.artifacts,
        recoveryJob: tf.job.id,
        bootMs: tf.job.durationMs ?? null,
        cleanup: cleanup.state,
      };
    },
  };
}
