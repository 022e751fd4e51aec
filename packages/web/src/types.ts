/** Shapes of the vault's API answers that the portal reads (see /api/openapi.json). */

/** `GET /api/summary`. */
export interface Summary {
  protectedItems: { total: number; byState: Record<string, number> };
  worstRpo: Array<{
    id: string;
    machineName: string;
    state: string;
    lastPointAt: string | null;
    policyId: string;
    rpoSeconds: number | null;
  }>;
  alerts: { active: Record<string, number>; unacknowledged: number };
  jobs: Record<string, number>;
  /** Target stores with their latest store-stats figures (null before the first). */
  stores?: {
    logicalBytes: number;
    storedBytes: number;
    dedupRatio: number | null;
    items: Array<{
      id: string;
      name: string;
      kind: string;
      measuredAt: string | null;
      points: number | null;
      logicalBytes: number | null;
      storedBytes: number | null;
      dedupRatio: number | null;
    }>;
  };
  components: Array<{
    id: string;
    kind: string;
    name: string;
    status: string;
    lastHeartbeatAt: string | null;
    health: Record<string, unknown>;
  }>;
}

/** A protected item (`GET /api/protected-items`). */
export interface ProtectedItem {
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
  lastPointAt: string | null;
  rpoSeconds: number | null;
  backlogBytes: number;
  throughputBps: number;
  disks?: ProtectedDisk[];
}

/** A disk of a protected item. */
export interface ProtectedDisk {
  id: string;
  name: string;
  sizeBytes: number;
  lastPointAt: string | null;
  backlogBytes: number;
  throughputBps: number;
  initialDoneBytes: number;
}

/** A discovered machine (`GET /api/machines/:id`). */
export interface Machine {
  id: string;
  name: string;
  sourceHostId: string;
  os: string | null;
  cpus: number | null;
  memoryBytes: number | null;
  present: boolean;
  disks?: Array<{ id: string; name: string; sizeBytes: number }>;
}

/** A replication policy. */
export interface Policy {
  id: string;
  name: string;
  rpoThresholdSeconds: number;
  crashConsistentIntervalSeconds: number;
  appConsistentIntervalSeconds: number;
}

/** A recovery point in the catalogue. */
export interface RecoveryPoint {
  id: string;
  targetStoreId: string;
  machine: string;
  disk: string;
  time: string;
  committedAt: string;
  kind: 'crash' | 'app';
  size: number;
  cut: string | null;
  consistencyGroup: string | null;
}

/** A step of a job. */
export interface JobStep {
  name: string;
  state: 'pending' | 'running' | 'done' | 'failed';
  startedAt: string | null;
  finishedAt: string | null;
}

/** A job with steps and progress. */
export interface Job {
  id: string;
  kind: string;
  state: string;
  targetType: string | null;
  targetId: string | null;
  progress: number;
  steps: JobStep[];
  error: { code?: string; message?: string } | null;
  createdBy: string;
  createdAt: string;
  startedAt: string | null;
  finishedAt: string | null;
  cancelRequested: boolean;
}

/** A line of a job's log. */
export interface JobLog {
  id: string;
  time: string;
  level: string;
  message: string;
}

/** An alert. */
export interface Alert {
  id: string;
  kind: string;
  severity: string;
  subjectType: string;
  subjectId: string;
  message: string;
  state: string;
  raisedAt: string;
  clearedAt: string | null;
  acknowledgedAt: string | null;
  acknowledgedBy: string | null;
}

/** How a test failover or failover picks its points (docs/architecture.md). */
export type PointSelector =
  { pick: 'latest'; at?: string } | { pick: 'latest-app' } | { pointId: string };

/** A machine of a recovery run. */
export interface RunMachine {
  protectedItemId: string;
  machineId: string;
  machineName: string;
  name: string;
  targetStoreId: string;
  points: Array<{ id: string; disk: string; time: string; kind: string; cut: string | null }>;
  address: unknown;
  verification: {
    console?: string | null;
    port?: { guestPort: number; answer: string } | null;
    screenshot?: { width: number; height: number } | null;
  } | null;
  artifacts: { screenshot?: string | null; console?: string | null } | null;
  /** The recovery host's network it is attached to (its network mapping's); null: the run's isolated network. */
  network?: string | null;
  /** Failover, once hydrated: the disks' files on the recovery host. */
  localDisks?: string[];
}

/** A test failover (`tf_…`) or failover (`fo_…`) run (`GET /api/test-failovers/:id`). */
export interface RecoveryRun {
  id: string;
  kind: 'test-failover' | 'failover';
  state: string;
  recoveryHostId: string | null;
  protectedItemIds: string[];
  consistencyGroup: string | null;
  point: PointSelector | null;
  network: string | null;
  planned?: boolean;
  verify: { console?: string; guestPort?: number; expect?: string; screenshot?: boolean } | null;
  machines: RunMachine[];
  jobs: Array<{ id: string; kind: string; state: string }>;
  jobId: string | null;
  error: { code: string; message: string; details?: Record<string, unknown> } | null;
  createdBy: string;
  createdAt: string;
  updatedAt: string;
}

/** A registered component (`GET /api/recovery-hosts`). */
export interface Component {
  id: string;
  kind: string;
  name: string;
  status: string;
  lastHeartbeatAt: string | null;
  /** What it reported in its last heartbeat (a recovery host: its `networks`). */
  health?: unknown;
}

/** A network mapping (`GET /api/network-mappings`): a source network and where it fails over to. */
export interface NetworkMapping {
  id: string;
  name: string;
  sourceNetwork: string;
  targetNetwork: string;
  testNetwork: string | null;
}
