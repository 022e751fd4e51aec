/** @lifeboat/process-server: public API. */
export { ProcessServer } from './process-server.js';
export type { DiskHealth, MachineHealth, ProcessServerHealth } from './process-server.js';
export type {
  PeerHttpHandler,
  PeerIdentity,
  ProcessServerOptions,
  ProcessServerStore,
  ProcessServerTls,
} from './process-server-options.js';
export type { CommittedCut } from './machine-replicator.js';
export { Journal, journalDiskUsage } from './journal.js';
export type { JournalOptions } from './journal.js';
export type { ReplicatorStore, StoreWorkerOptions } from './store-worker-pool.js';
export { openWorkerStore } from './worker-store-opener.js';
export type { WorkerStoreSpec } from './worker-store-opener.js';
export { VaultLink } from './vault-link.js';
export type {
  AgentControl,
  AgentItemStatus,
  AssignedItem,
  AssignedOperation,
  AssignedStore,
  Assignments,
  DiscoveredMachine,
  DiscoveryRequest,
  VaultLinkOptions,
} from './vault-link.js';
export { AgentHub } from './agent-hub.js';
export type {
  AgentAssignedItem,
  AgentAssignments,
  AgentFinalSyncReport,
  AgentHubOptions,
  AgentItemReport,
  AgentReport,
} from './agent-hub.js';
export { RoutedStore } from './routed-store.js';
export type { RoutedStoreOptions } from './routed-store.js';
export { startManagedProcessServer } from './managed-process-server.js';
export type {
  ManagedProcessServer,
  ManagedProcessServerOptions,
} from './managed-process-server.js';
export { runFinalSync } from './final-sync.js';
export type { FinalSyncAgent, FinalSyncOptions, FinalSyncResult } from './final-sync.js';
