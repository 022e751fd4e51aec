import type { VaultContext } from '../vault-context.js';

/** What a job's code gets while it runs. */
export interface JobContext {
  readonly id: string;
  readonly kind: string;
  readonly targetId: string | null;
  readonly params: Record<string, unknown>;
  /** 1 on the first run, more when resumed after a vault restart. */
  readonly attempt: number;
  /** Aborted when the job is cancelled or the vault stops. */
  readonly signal: AbortSignal;
  readonly vault: VaultContext;
  /** Appends a line to the job's log. */
  log(message: string, level?: 'info' | 'warn' | 'error'): Promise<void>;
  /** Runs one named step, recording its start, end and failure. */
  step<T>(name: string, fn: () => Promise<T>): Promise<T>;
  /** Records progress from 0 to 1. */
  progress(fraction: number): Promise<void>;
  /**
   * Polls `check` until it returns a value other than undefined, the signal aborts or the
   * timeout passes (then fails with LB_VAULT_JOB_TIMEOUT naming `what`).
   */
  waitFor<T>(what: string, check: () => Promise<T | undefined>, timeoutMs: number): Promise<T>;
}

/** A kind of job. */
export interface JobHandler {
  readonly kind: string;
  /**
   * True when a run interrupted by a vault restart may run again from the start (its steps
   * are idempotent); false makes such a job fail visibly with LB_VAULT_JOB_INTERRUPTED.
   */
  readonly resumable: boolean;
  /** Names of the steps, in order, shown before they run. */
  readonly steps: readonly string[];
  /** Does the work; the returned object becomes the job's result. */
  run(job: JobContext): Promise<Record<string, unknown> | void>;
}
