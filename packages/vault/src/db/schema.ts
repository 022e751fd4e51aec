/**
 * Row types of the vault's tables. Columns are camelCase (Kysely quotes identifiers, so both
 * dialects keep them); times are ISO 8601 text in UTC (sortable as text on both dialects);
 * JSON is text; booleans are integers 0/1.
 */

/** A site: a place where machines run (source) or are recovered (recovery). */
export interface SiteRow {
  id: string;
  name: string;
  kind: string;
  description: string;
  createdAt: string;
  updatedAt: string;
}

/** A registered process server, recovery host or agent. */
export interface ComponentRow {
  id: string;
  kind: string;
  name: string;
  siteId: string | null;
  address: string | null;
  version: string | null;
  certificateSerial: string | null;
  certificateExpiresAt: string | null;
  lastHeartbeatAt: string | null;
  health: string;
  createdAt: string;
  updatedAt: string;
}

/** A one-time registration key (stored hashed). */
export interface RegistrationKeyRow {
  id: string;
  kind: string;
  keyHash: string;
  description: string;
  expiresAt: string;
  usedAt: string | null;
  usedByComponentId: string | null;
  createdBy: string;
  createdAt: string;
}

/** A KVM host (or later a vCenter) whose machines can be protected. */
export interface SourceHostRow {
  id: string;
  kind: string;
  name: string;
  siteId: string | null;
  processServerId: string | null;
  /** The agent on this host that discovers and replicates its machines (null: the process server's own). */
  agentId: string | null;
  credentialId: string | null;
  endpoints: string;
  discoveryRequestedAt: string | null;
  discoveredAt: string | null;
  createdAt: string;
  updatedAt: string;
}

/** A machine found on a source host. */
export interface MachineRow {
  id: string;
  sourceHostId: string;
  name: string;
  externalId: string;
  endpoint: string | null;
  cpus: number | null;
  memoryBytes: number | null;
  os: string | null;
  present: number;
  discoveredAt: string;
  createdAt: string;
  updatedAt: string;
}

/** A disk of a discovered machine. */
export interface MachineDiskRow {
  id: string;
  machineId: string;
  name: string;
  node: string | null;
  sizeBytes: number;
}

/** Where recovery points are kept: a directory or an Azure Blob container. */
export interface TargetStoreRow {
  id: string;
  kind: string;
  name: string;
  siteId: string | null;
  path: string | null;
  container: string | null;
  connectionSealed: string | null;
  passphraseSealed: string;
  createdAt: string;
  updatedAt: string;
}

/** A replication policy. */
export interface PolicyRow {
  id: string;
  name: string;
  rpoThresholdSeconds: number;
  crashConsistentIntervalSeconds: number;
  appConsistentIntervalSeconds: number;
  retention: string;
  retentionIntervalSeconds: number;
  createdAt: string;
  updatedAt: string;
}

/** A machine under protection. */
export interface ProtectedItemRow {
  id: string;
  machineId: string;
  policyId: string;
  processServerId: string;
  targetStoreId: string;
  networkMappingId: string | null;
  consistencyGroup: string | null;
  state: string;
  stateReason: string;
  stateChangedAt: string;
  generation: number;
  appliedGeneration: number;
  lastPointAt: string | null;
  rpoSeconds: number | null;
  backlogBytes: number;
  throughputBps: number;
  activeKey: string | null;
  createdAt: string;
  updatedAt: string;
}

/** A disk of a protected item. */
export interface ProtectedDiskRow {
  id: string;
  protectedItemId: string;
  name: string;
  sizeBytes: number;
  lastPointAt: string | null;
  backlogBytes: number;
  throughputBps: number;
  initialDoneBytes: number;
}

/** A recovery point in the catalogue (mirrors one committed point of the store). */
export interface RecoveryPointRow {
  id: string;
  targetStoreId: string;
  protectedItemId: string | null;
  machine: string;
  disk: string;
  time: string;
  committedAt: string;
  kind: string;
  size: number;
  cut: string | null;
  consistencyGroup: string | null;
  labels: string;
  parent: string | null;
}

/** A job: long work with steps, progress and a log. */
export interface JobRow {
  id: string;
  kind: string;
  state: string;
  targetType: string | null;
  targetId: string | null;
  params: string;
  result: string | null;
  error: string | null;
  progress: number;
  steps: string;
  attempts: number;
  scheduleKey: string | null;
  leaseOwner: string | null;
  leaseUntil: string | null;
  cancelRequested: number;
  createdBy: string;
  createdAt: string;
  startedAt: string | null;
  finishedAt: string | null;
  updatedAt: string;
}

/** One line of a job's log. */
export interface JobLogRow {
  id: string;
  jobId: string;
  time: string;
  level: string;
  message: string;
}

/** An alert; `activeKey` is set while it is active so each condition is raised once. */
export interface AlertRow {
  id: string;
  kind: string;
  severity: string;
  subjectType: string;
  subjectId: string;
  message: string;
  details: string;
  state: string;
  activeKey: string | null;
  raisedAt: string;
  clearedAt: string | null;
  acknowledgedAt: string | null;
  acknowledgedBy: string | null;
}

/**
 * One webhook delivery of an alert event (the outbox): written in the same transaction as the
 * alert's change, so a raised or cleared alert is delivered even when the vault stops before
 * the receiver takes it. At least once: the receiver may see a delivery id twice.
 */
export interface AlertDeliveryRow {
  id: string;
  alertId: string;
  /** alert.raised | alert.cleared */
  event: string;
  /** The JSON POSTed, as it was when the event happened. */
  body: string;
  /** pending | delivered | failed */
  state: string;
  /** POSTs made so far. */
  attempts: number;
  /** When the next POST is due (ISO time). */
  nextAttemptAt: string;
  /** A vault instance is POSTing it until this time; NULL when none is. */
  claimedUntil: string | null;
  lastError: string | null;
  createdAt: string;
  /** When it was delivered or given up. */
  finishedAt: string | null;
}

/** Maps a source network to the network machines use after failover (and in tests). */
export interface NetworkMappingRow {
  id: string;
  name: string;
  sourceSiteId: string | null;
  targetSiteId: string | null;
  sourceNetwork: string;
  targetNetwork: string;
  testNetwork: string | null;
  createdAt: string;
  updatedAt: string;
}

/** A stored credential (SSH, vCenter, KVM host); the secret is sealed. */
export interface CredentialRow {
  id: string;
  name: string;
  kind: string;
  username: string;
  secretSealed: string;
  description: string;
  createdAt: string;
  updatedAt: string;
}

/** A user of the portal, CLI and API. */
export interface UserRow {
  id: string;
  username: string;
  passwordHash: string;
  role: string;
  disabled: number;
  createdAt: string;
  updatedAt: string;
  lastLoginAt: string | null;
}

/** A bearer token: a login session, an API token or a component's token (stored hashed). */
export interface TokenRow {
  id: string;
  kind: string;
  name: string;
  tokenHash: string;
  userId: string | null;
  componentId: string | null;
  expiresAt: string | null;
  lastUsedAt: string | null;
  createdAt: string;
}

/** One recorded change. */
export interface AuditRow {
  id: string;
  time: string;
  actorType: string;
  actorId: string;
  actorName: string;
  action: string;
  targetType: string;
  targetId: string;
  summary: string;
}

/**
 * The latest figures of one target store (the `store-stats` job measures them in the store,
 * so the dashboard never scans the store itself).
 */
export interface TargetStoreStatsRow {
  targetStoreId: string;
  measuredAt: string;
  jobId: string | null;
  points: number;
  machines: number;
  disks: number;
  logicalBytes: number;
  uniqueBytes: number;
  storedBytes: number;
  packs: number;
  chunks: number;
}

/**
 * One protected item's replication figures over one time bucket, aggregated from its process
 * server's heartbeat reports (kept for `historyRetentionHours`).
 */
export interface ItemSampleRow {
  protectedItemId: string;
  /** Start of the bucket (ISO, a multiple of `historyBucketSeconds`). */
  bucket: string;
  /** Reports aggregated into this row. */
  reports: number;
  throughputSumBps: number;
  throughputMaxBps: number;
  backlogMaxBytes: number;
}

/** Small vault-wide values (the CA). */
export interface SettingRow {
  key: string;
  value: string;
}

/**
 * A test failover or a failover: what the operator asked for, the machines and points the
 * vault chose, and what the recovery host reported (each operation on it is a job).
 */
export interface RecoveryRunRow {
  id: string;
  kind: string;
  state: string;
  recoveryHostId: string;
  /** JSON array of protected item ids. */
  protectedItemIds: string;
  consistencyGroup: string | null;
  /** JSON: the request as validated (point, network, verify, boot, addresses, planned). */
  spec: string;
  /** JSON: per machine, the item, the recovered machine's name, its points and results. */
  machines: string;
  /** JSON { code, message, details } of the last failure, or null. */
  error: string | null;
  /** The recovery host's process instance that holds the run's machines (a restart loses them). */
  hostInstance: string | null;
  lastJobId: string | null;
  createdBy: string;
  createdAt: string;
  updatedAt: string;
}

/** A file a component saved with a job (a boot screenshot, a console log tail), base64 text. */
export interface JobArtifactRow {
  id: string;
  jobId: string;
  name: string;
  contentType: string;
  size: number;
  data: string;
  createdAt: string;
}

/** The vault's database. */
export interface VaultDatabase {
  sites: SiteRow;
  components: ComponentRow;
  registrationKeys: RegistrationKeyRow;
  sourceHosts: SourceHostRow;
  machines: MachineRow;
  machineDisks: MachineDiskRow;
  targetStores: TargetStoreRow;
  policies: PolicyRow;
  protectedItems: ProtectedItemRow;
  protectedDisks: ProtectedDiskRow;
  recoveryPoints: RecoveryPointRow;
  jobs: JobRow;
  jobLogs: JobLogRow;
  alerts: AlertRow;
  alertDeliveries: AlertDeliveryRow;
  networkMappings: NetworkMappingRow;
  credentials: CredentialRow;
  users: UserRow;
  tokens: TokenRow;
  audit: AuditRow;
  settings: SettingRow;
  recoveryRuns: RecoveryRunRow;
  jobArtifacts: JobArtifactRow;
  targetStoreStats: TargetStoreStatsRow;
  itemSamples: ItemSampleRow;
}
