import type { RecoveryJobListener, RecoveryJobRecord } from './recovery-job.js';
import type { VaultClient } from '@lifeboat/protocol';

/** Options for {@link vaultJobReporter}. */
export interface VaultJobReporterOptions {
  /** The vault's base URL, e.g. `https://vault.example:443` (unless `client` is given). */
  url?: string;
  /** The recovery host's component token (from registration), unless `client` is given. */
  token?: string;
  /** Sends through this client (with its token and client certificate) instead of fetch. @default none */
  client?: Pick<VaultClient, 'call'>;
  /** More of the job's result for the vault (e.g. verification per machine). @default none */
  result?: (job: RecoveryJobRecord) => Record<string, unknown>;
  /** Called when a report fails; the job itself goes on. @default ignore */
  onError?: (err: unknown, job: RecoveryJobRecord) => void;
  /** @default globalThis.fetch */
  fetch?: typeof fetch;
}

/** A job listener that reports to the vault, and a way to wait until every report is sent. */
export interface VaultJobReporter {
  listener: RecoveryJobListener;
  /** Resolves once the latest state of every job has been sent (or failed to send). */
  flush(): Promise<void>;
}

/**
 * Reports recovery jobs to the vault's jobs API (`PUT /api/components/self/jobs/:id`), so the
 * operator sees each test failover and failover with its steps and timings there. Reports of
 * one job are sent one at a time, newest state last, and a failed report never fails the job:
 * the recovery site must work when the vault is down.
 */
export function vaultJobReporter(options: VaultJobReporterOptions): VaultJobReporter {
  const doFetch = options.fetch ?? fetch;
  const latest = new Map<string, RecoveryJobRecord>();
  const sending = new Map<string, Promise<void>>();
  const send = async (id: string): Promise<void> => {
    for (;;) {
      const job = latest.get(id);
      if (!job) {
        // In the same tick as the check, so a listener call never finds a sender that has left.
        sending.delete(id);
        return;
      }
      latest.delete(id);
      try {
        const path = `/api/components/self/jobs/${encodeURIComponent(id)}`;
        const body = {
          kind: job.kind,
          target: job.target,
          state: job.state,
          steps: job.steps,
          ...(job.error ? { error: job.error } : {}),
          result: {
            artifacts: job.artifacts,
            startedAt: job.startedAt,
            endedAt: job.endedAt,
            ...(options.result?.(job) ?? {}),
          },
        };
        if (options.client !== undefined) {
          await options.client.call('PUT', path, body);
        } else {
          const res = await doFetch(`${(options.url ?? '').replace(/\/$/, '')}${path}`, {
            method: 'PUT',
            headers: {
              authorization: `Bearer ${options.token ?? ''}`,
              'content-type': 'application/json',
            },
            body: JSON.stringify(body),
          });
          if (!res.ok) throw new Error(`the vault answered ${res.status}: ${await res.text()}`);
        }
      } catch (err) {
        options.onError?.(err, job);
      }
    }
  };
  return {
    listener(job) {
      // A snapshot: the record keeps changing while a report is in flight.
      latest.set(job.id, JSON.parse(JSON.stringify(job)) as RecoveryJobRecord);
      if (!sending.has(job.id)) sending.set(job.id, send(job.id));
    },
    async flush() {
      while (sending.size > 0) await Promise.all([...sending.values()]);
    },
  };
}
