/** @lifeboat/process-server: public API. */
export { ProcessServer } from './process-server.js';
export type { DiskHealth, MachineHealth, ProcessServerHealth } from './process-server.js';
export type { ProcessServerOptions, ProcessServerTls } from './process-server-options.js';
export type { CommittedCut } from './machine-replicator.js';
export { Journal, journalDiskUsage } from './journal.js';
export type { JournalOptions } from './journal.js';
export type { StoreWorkerOptions } from './store-worker-pool.js';
export { openWorkerStore } from './worker-store-opener.js';
export type { WorkerStoreSpec } from './worker-store-opener.js';
