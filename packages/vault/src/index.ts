/** @lifeboat/vault: the control plane — HTTP API, database, registration, policies, jobs and alerts. */
export { startVault } from './vault.js';
export type { Vault } from './vault.js';
export type { VaultOptions, TargetStoreAccess } from './vault-options.js';
export type { JobHandler, JobContext } from './jobs/job-handler.js';
export { ITEM_TRANSITIONS } from './services/protection.js';
export type { ItemState } from './services/protection.js';
export type { Role } from './services/principal.js';
export { statusOf } from './http/error-mapping.js';
export type { ApiErrorBody } from './http/error-mapping.js';
export type { VaultDatabase } from './db/schema.js';
