import { randomBytes } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { LifeboatError, isLifeboatError } from '@lifeboat/protocol';

/** What a recovery job does. */
export type RecoveryJobKind =
  | 'test-failover'
  | 'test-failover-cleanup'
  | 'failover'
  | 'failover-change-point'
  | 'failover-commit'
  | 'hydration'
  | 'failover-cleanup';

/** State of a job or of one of its steps. */
export type RecoveryJobState = 'running' | 'succeeded' | 'failed';

/** One step of a job, with its timing. */
export interface RecoveryJobStep {
  name: string;
  state: RecoveryJobState;
  startedAt: string;
  endedAt?: string;
  durationMs?: number;
  /** What the step found or did (ids, paths, figures). */
  detail?: Record<string, unknown>;
  /** Why it failed: a stable code and the message. */
  error?: { code: string; message: string; details?: Record<string, unknown> };
}

/** A job as the vault's jobs API shows it: kind, target, state, steps with timings. */
export interface RecoveryJobRecord {
  id: string;
  kind: RecoveryJobKind;
  /** What the job acts on (machine names, point ids). */
  target: Record<string, unknown>;
  state: RecoveryJobState;
  startedAt: string;
  endedAt?: string;
  durationMs?: number;
  steps: RecoveryJobStep[];
  /** Files saved with the job (console logs, screenshots), by name. */
  artifacts: Record<string, string>;
  error?: { code: string; message: string; details?: Record<string, unknown> };
}

/** Receives every change of a job, e.g. to report it to the vault's jobs API. */
export type RecoveryJobListener = (job: Readonly<RecoveryJobRecord>) => void;

function errorOf(err: unknown): NonNullable<RecoveryJobStep['error']> {
  if (isLifeboatError(err)) return { code: err.code, message: err.message, details: err.details };
  return {
    code: 'LB_RECOVERY_INTERNAL',
    message: err instanceof Error ? err.message : String(err),
  };
}

/**
 * A job with steps and timings, kept in process and written to `<dir>/job.json` after every
 * change (the record survives the process for the operator); a listener can forward it to
 * the vault. The vault's jobs API is not wired here: the recovery site works without a vault.
 */
export class RecoveryJob {
  /** The job's current record. */
  readonly record: RecoveryJobRecord;
  private writing: Promise<void> = Promise.resolve();

  /** Directory of the job's files (job.json, screenshots, console logs). */
  readonly dir: string;

  constructor(
    kind: RecoveryJobKind,
    target: Record<string, unknown>,
    /** Directory holding one directory per job. */
    jobsDir: string,
    private readonly listener?: RecoveryJobListener,
    /** The job's id (the vault's, for a job it queued). @default a new one from kind and time */
    id?: string,
  ) {
    if (id !== undefined && !/^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$/.test(id)) {
      throw new LifeboatError(
        'LB_RECOVERY_BAD_OPTION',
        `Job id "${id}" may hold only letters, digits, dot, dash and underscore.`,
        { details: { id } },
      );
    }
    this.record = {
      id:
        id ??
        `${kind}-${new Date().toISOString().replace(/[-:.]/g, '').slice(0, 15)}-${randomBytes(3).toString('hex')}`,
      kind,
      target,
      state: 'running',
      startedAt: new Date().toISOString(),
      steps: [],
      artifacts: {},
    };
    this.dir = join(jobsDir, this.record.id);
  }

  /** Runs `fn` as a step named `name`; its result's `detail` (if any) is recorded. */
  async step<T>(name: string, fn: (detail: Record<string, unknown>) => Promise<T>): Promise<T> {
    const started = Date.now();
    const step: RecoveryJobStep = {
      name,
      state: 'running',
      startedAt: new Date(started).toISOString(),
    };
    const detail: Record<string, unknown> = {};
    this.record.steps.push(step);
    this.changed();
    try {
      const result = await fn(detail);
      step.state = 'succeeded';
      return result;
    } catch (err) {
      step.state = 'failed';
      step.error = errorOf(err);
      throw err;
    } finally {
      step.endedAt = new Date().toISOString();
      step.durationMs = Date.now() - started;
      if (Object.keys(detail).length > 0) step.detail = detail;
      this.changed();
    }
  }

  /** Records a file saved with the job. */
  artifact(name: string, path: string): void {
    this.record.artifacts[name] = path;
    this.changed();
  }

  /** Ends the job: succeeded, or failed with `err`. */
  async finish(err?: unknown): Promise<RecoveryJobRecord> {
    this.record.state = err === undefined ? 'succeeded' : 'failed';
    if (err !== undefined) this.record.error = errorOf(err);
    this.record.endedAt = new Date().toISOString();
    this.record.durationMs = Date.parse(this.record.endedAt) - Date.parse(this.record.startedAt);
    this.changed();
    await this.writing;
    return this.record;
  }

  private changed(): void {
    this.listener?.(this.record);
    const json = JSON.stringify(this.record, null, 2);
    // Serialised so an older state never overwrites a newer one.
    this.writing = this.writing
      .then(async () => {
        await mkdir(this.dir, { recursive: true });
        await writeFile(join(this.dir, 'job.json'), json);
      })
      .catch(() => undefined);
  }
}
