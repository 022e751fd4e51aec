import type { Kysely } from 'kysely';
import type { Logger } from 'pino';
import type { DialectName } from './db/open-database.js';
import type { AuthCache } from './http/auth.js';
import type { VaultDatabase } from './db/schema.js';
import type { JobRunner } from './jobs/job-runner.js';
import type { SecretBox } from './secret-box.js';
import type { AlertService } from './services/alert-service.js';
import type { CertificateAuthority } from './services/certificate-authority.js';
import type { ItemHistory } from './services/item-history.js';
import type { VaultMetrics } from './vault-metrics.js';
import type { ResolvedVaultOptions } from './vault-options.js';

/** What services, routes and jobs of one vault instance share (its composition root builds it). */
export interface VaultContext {
  readonly db: Kysely<VaultDatabase>;
  readonly dialect: DialectName;
  readonly options: ResolvedVaultOptions;
  readonly secrets: SecretBox;
  readonly log: Logger;
  readonly metrics: VaultMetrics;
  readonly alerts: AlertService;
  readonly jobs: JobRunner;
  readonly ca: CertificateAuthority;
  /** Per-item throughput and backlog history from heartbeats. */
  readonly history: ItemHistory;
  /** Resolved bearer tokens; clear it after changing tokens, users or components. */
  readonly authCache: AuthCache;
  /** Random id of this running instance (job leases name it). */
  readonly instanceId: string;
}
