import type { EventEmitter } from 'node:events';
import { LifeboatError } from '@lifeboat/protocol';
import type { CommittedCut } from './machine-replicator.js';

/** What a final sync needs from the agent of the machine (in process, or through its routes). */
export interface FinalSyncAgent {
  /** Pauses the guest, takes a cut at once, resolves with its id once acknowledged. */
  finalCut(): Promise<{ cutId: string }>;
  /** Stops replicating and quits the paused source machine. */
  quitSource(): Promise<void>;
}

/** Options of {@link runFinalSync}. */
export interface FinalSyncOptions {
  /** The process server (its `committed` events say when the last cut is a point). */
  server: Pick<EventEmitter, 'on' | 'off'>;
  /** The store's machine id of the item (the vault's machine id). */
  machine: string;
  agent: FinalSyncAgent;
  /** Stop the source after the commit. @default true */
  stopSource?: boolean;
  /** How long the commit of the last cut may take. @default 600000 */
  commitTimeoutMs?: number;
  /** Runs each stage as a named step (for the job's steps and timings). @default just runs it */
  step?: <T>(name: string, fn: () => Promise<T>) => Promise<T>;
}

/** What a final sync reports to the vault on its job. */
export interface FinalSyncResult {
  cutId: string;
  /** The points of the last cut, one per disk. */
  pointIds: string[];
  time: string;
  sourceStopped: boolean;
}

/**
 * The process server's part of a planned failover (the vault's `final-sync` job): the agent
 * pauses the source and takes a last cut; the process server waits until that cut is committed
 * as points in the store (not just journaled), then the agent quits the source; the result
 * names the points the recovery host boots. Nothing the source wrote is lost, and the source
 * cannot write after the points were taken.
 */
export async function runFinalSync(options: FinalSyncOptions): Promise<FinalSyncResult> {
  const timeoutMs = options.commitTimeoutMs ?? 600_000;
  // Listen before the cut is taken: its commit may come right after its acknowledgement.
  const committed: CommittedCut[] = [];
  let notify: (() => void) | undefined;
  const onCommitted = (cut: CommittedCut): void => {
    if (cut.machine !== options.machine) return;
    committed.push(cut);
    notify?.();
  };
  const step = options.step ?? (<T>(_name: string, fn: () => Promise<T>) => fn());
  options.server.on('committed', onCommitted);
  try {
    const { cutId } = await step('pause the source and take a last cut', () =>
      options.agent.finalCut(),
    );
    const cut = await step('commit the last cut', () => waitCommitted(cutId));
    const stop = options.stopSource ?? true;
    if (stop) await step('stop the source', () => options.agent.quitSource());
    return {
      cutId,
      pointIds: cut.points.map((p) => p.id),
      time: cut.time.toISOString(),
      sourceStopped: stop,
    };
  } finally {
    options.server.off('committed', onCommitted);
  }

  async function waitCommitted(cutId: string): Promise<CommittedCut> {
    const deadline = Date.now() + timeoutMs;
    let cut: CommittedCut | undefined;
    while ((cut = committed.find((c) => c.cutId === cutId)) === undefined) {
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new LifeboatError(
          'LB_PS_FINAL_SYNC_TIMEOUT',
          `The last cut ${cutId} of machine ${options.machine} was not committed to the store within ${Math.round(timeoutMs / 1000)} s. The source is paused, not stopped; check the store, then retry or resume the source.`,
          { details: { machine: options.machine, cutId } },
        );
      }
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, Math.min(left, 1000));
        notify = () => {
          clearTimeout(t);
          resolve();
        };
      });
      notify = undefined;
    }
    return cut;
  }
}
