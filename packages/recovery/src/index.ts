/** @lifeboat/recovery: the recovery host's public API. */
export {
  RecoveryHost,
  type MachineSpec,
  type MachineDiskSpec,
  type BootedMachine,
} from './recovery-host.js';
export {
  parseNetworkOption,
  parseNetworkOptions,
  BUILT_IN_NETWORKS,
  type RecoveryHostOptions,
  type ResolvedRecoveryHostOptions,
  type RecoveryNetwork,
} from './recovery-host-options.js';
export {
  RecoveryMachine,
  exportUri,
  machineMac,
  bridgeExists,
  type DiskExport,
  type MachineBoot,
  type MachineNic,
  type MachineDisk,
  type RecoveryMachineOptions,
} from './recovery-machine.js';
export { PointExport, type PointExportOptions } from './point-export.js';
export {
  CachedPointSource,
  type CachedPointSourceOptions,
  type PointReadFault,
} from './cached-point-source.js';
export { IsolatedSegment } from './isolated-segment.js';
export {
  buildSeedDisk,
  networkConfig,
  type SeedDiskOptions,
  type StaticAddress,
} from './seed-disk.js';
export { ppmToPng, pngSize, type ImageSize } from './png.js';
export { listeningSockets, type ListeningSocket } from './listening-sockets.js';
export { selectPoints, type PointSelector } from './point-selector.js';
export {
  RecoveryJob,
  type RecoveryJobKind,
  type RecoveryJobRecord,
  type RecoveryJobStep,
  type RecoveryJobState,
  type RecoveryJobListener,
} from './recovery-job.js';
export type { QmpSession } from './qmp-session.js';
export {
  runTestFailover,
  damagedPointError,
  type TestFailover,
  type TestFailoverPlan,
  type TestFailoverMachine,
  type BootVerification,
} from './test-failover.js';
export {
  Failover,
  type FailoverPlan,
  type FailoverState,
  type HydrationOptions,
  type PlannedFailoverSource,
} from './failover.js';
export {
  serveFailoverControl,
  failoverControlRequest,
  type FailoverControlRequest,
  type FailoverControlReply,
} from './failover-control.js';
export {
  mapNetworks,
  type NetworkMapping,
  type SourceNic,
  type MappedNetworks,
} from './network-mapping.js';
export {
  recordedMachineConfig,
  MACHINE_LABELS,
  type RecordedMachineConfig,
} from './recorded-config.js';
export {
  vaultJobReporter,
  type VaultJobReporter,
  type VaultJobReporterOptions,
} from './vault-job-reporter.js';
export {
  RecoveryHostLink,
  type RecoveryHostLinkOptions,
  type RecoveryOperation,
  type AssignedTargetStore,
} from './recovery-host-link.js';
export {
  recoveryHostCredentials,
  componentClient,
  keepRecoveryHostCertificate,
  type KeepCertificateOptions,
  type RecoveryHostCredentialsOptions,
} from './recovery-host-credentials.js';
export { cleanupRunDir } from './run-dir-cleanup.js';
