import { PostgresAdapter, sql, type Kysely, type Migration, type MigrationProvider } from 'kysely';

// Migrations work on the untyped database: a migration describes the schema as it was at its
// time, not as the current row types say.
// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Db = Kysely<any>;

async function initial(db: Db): Promise<void> {
  const table = (name: string) =>
    db.schema.createTable(name).addColumn('id', 'text', (c) => c.primaryKey());
  await table('sites')
    .addColumn('name', 'text', (c) => c.notNull().unique())
    .addColumn('kind', 'text', (c) => c.notNull())
    .addColumn('description', 'text', (c) => c.notNull())
    .addColumn('createdAt', 'text', (c) => c.notNull())
    .addColumn('updatedAt', 'text', (c) => c.notNull())
    .execute();
  await table('components')
    .addColumn('kind', 'text', (c) => c.notNull())
    .addColumn('name', 'text', (c) => c.notNull())
    .addColumn('siteId', 'text')
    .addColumn('address', 'text')
    .addColumn('version', 'text')
    .addColumn('certificateSerial', 'text')
    .addColumn('certificateExpiresAt', 'text')
    .addColumn('lastHeartbeatAt', 'text')
    .addColumn('health', 'text', (c) => c.notNull())
    .addColumn('createdAt', 'text', (c) => c.notNull())
    .addColumn('updatedAt', 'text', (c) => c.notNull())
    .execute();
  await db.schema.createIndex('componentsKind').on('components').columns(['kind', 'id']).execute();
  await table('registrationKeys')
    .addColumn('kind', 'text', (c) => c.notNull())
    .addColumn('keyHash', 'text', (c) => c.notNull().unique())
    .addColumn('description', 'text', (c) => c.notNull())
    .addColumn('expiresAt', 'text', (c) => c.notNull())
    .addColumn('usedAt', 'text')
    .addColumn('usedByComponentId', 'text')
    .addColumn('createdBy', 'text', (c) => c.notNull())
    .addColumn('createdAt', 'text', (c) => c.notNull())
    .execute();
  await table('sourceHosts')
    .addColumn('kind', 'text', (c) => c.notNull())
    .addColumn('name', 'text', (c) => c.notNull().unique())
    .addColumn('siteId', 'text')
    .addColumn('processServerId', 'text')
    .addColumn('credentialId', 'text')
    .addColumn('endpoints', 'text', (c) => c.notNull())
    .addColumn('discoveryRequestedAt', 'text')
    .addColumn('discoveredAt', 'text')
    .addColumn('createdAt', 'text', (c) => c.notNull())
    .addColumn('updatedAt', 'text', (c) => c.notNull())
    .execute();
  await table('machines')
    .addColumn('sourceHostId', 'text', (c) => c.notNull())
    .addColumn('name', 'text', (c) => c.notNull())
    .addColumn('externalId', 'text', (c) => c.notNull())
    .addColumn('endpoint', 'text')
    .addColumn('cpus', 'integer')
    .addColumn('memoryBytes', 'bigint')
    .addColumn('os', 'text')
    .addColumn('present', 'integer', (c) => c.notNull())
    .addColumn('discoveredAt', 'text', (c) => c.notNull())
    .addColumn('createdAt', 'text', (c) => c.notNull())
    .addColumn('updatedAt', 'text', (c) => c.notNull())
    .addUniqueConstraint('machinesHostExternal', ['sourceHostId', 'externalId'])
    .execute();
  await table('machineDisks')
    .addColumn('machineId', 'text', (c) => c.notNull())
    .addColumn('name', 'text', (c) => c.notNull())
    .addColumn('node', 'text')
    .addColumn('sizeBytes', 'bigint', (c) => c.notNull())
    .addUniqueConstraint('machineDisksName', ['machineId', 'name'])
    .execute();
  await table('targetStores')
    .addColumn('kind', 'text', (c) => c.notNull())
    .addColumn('name', 'text', (c) => c.notNull().unique())
    .addColumn('siteId', 'text')
    .addColumn('path', 'text')
    .addColumn('container', 'text')
    .addColumn('connectionSealed', 'text')
    .addColumn('passphraseSealed', 'text', (c) => c.notNull())
    .addColumn('createdAt', 'text', (c) => c.notNull())
    .addColumn('updatedAt', 'text', (c) => c.notNull())
    .execute();
  await table('policies')
    .addColumn('name', 'text', (c) => c.notNull().unique())
    .addColumn('rpoThresholdSeconds', 'integer', (c) => c.notNull())
    .addColumn('crashConsistentIntervalSeconds', 'integer', (c) => c.notNull())
    .addColumn('appConsistentIntervalSeconds', 'integer', (c) => c.notNull())
    .addColumn('retention', 'text', (c) => c.notNull())
    .addColumn('retentionIntervalSeconds', 'integer', (c) => c.notNull())
    .addColumn('createdAt', 'text', (c) => c.notNull())
    .addColumn('updatedAt', 'text', (c) => c.notNull())
    .execute();
  await table('protectedItems')
    .addColumn('machineId', 'text', (c) => c.notNull())
    .addColumn('policyId', 'text', (c) => c.notNull())
    .addColumn('processServerId', 'text', (c) => c.notNull())
    .addColumn('targetStoreId', 'text', (c) => c.notNull())
    .addColumn('networkMappingId', 'text')
    .addColumn('consistencyGroup', 'text')
    .addColumn('state', 'text', (c) => c.notNull())
    .addColumn('stateReason', 'text', (c) => c.notNull())
    .addColumn('stateChangedAt', 'text', (c) => c.notNull())
    .addColumn('generation', 'integer', (c) => c.notNull())
    .addColumn('appliedGeneration', 'integer', (c) => c.notNull())
    .addColumn('lastPointAt', 'text')
    .addColumn('rpoSeconds', 'double precision')
    .addColumn('backlogBytes', 'bigint', (c) => c.notNull())
    .addColumn('throughputBps', 'double precision', (c) => c.notNull())
    // Set while the item is not disabled: one active protection per machine.
    .addColumn('activeKey', 'text', (c) => c.unique())
    .addColumn('createdAt', 'text', (c) => c.notNull())
    .addColumn('updatedAt', 'text', (c) => c.notNull())
    .execute();
  for (const col of ['state', 'policyId', 'processServerId', 'targetStoreId', 'machineId']) {
    await db.schema
      .createIndex(`protectedItems_${col}`)
      .on('protectedItems')
      .columns([col, 'id'])
      .execute();
  }
  await table('protectedDisks')
    .addColumn('protectedItemId', 'text', (c) => c.notNull())
    .addColumn('name', 'text', (c) => c.notNull())
    .addColumn('sizeBytes', 'bigint', (c) => c.notNull())
    .addColumn('lastPointAt', 'text')
    .addColumn('backlogBytes', 'bigint', (c) => c.notNull())
    .addColumn('throughputBps', 'double precision', (c) => c.notNull())
    .addColumn('initialDoneBytes', 'bigint', (c) => c.notNull())
    .addUniqueConstraint('protectedDisksName', ['protectedItemId', 'name'])
    .execute();
  await db.schema
    .createTable('recoveryPoints')
    .addColumn('id', 'text', (c) => c.notNull())
    .addColumn('targetStoreId', 'text', (c) => c.notNull())
    .addColumn('protectedItemId', 'text')
    .addColumn('machine', 'text', (c) => c.notNull())
    .addColumn('disk', 'text', (c) => c.notNull())
    .addColumn('time', 'text', (c) => c.notNull())
    .addColumn('committedAt', 'text', (c) => c.notNull())
    .addColumn('kind', 'text', (c) => c.notNull())
    .addColumn('size', 'bigint', (c) => c.notNull())
    .addColumn('cut', 'text')
    .addColumn('consistencyGroup', 'text')
    .addColumn('labels', 'text', (c) => c.notNull())
    .addColumn('parent', 'text')
    .addPrimaryKeyConstraint('recoveryPointsPk', ['targetStoreId', 'id'])
    .execute();
  await db.schema
    .createIndex('recoveryPointsItemTime')
    .on('recoveryPoints')
    .columns(['protectedItemId', 'time', 'id'])
    .execute();
  await db.schema
    .createIndex('recoveryPointsTime')
    .on('recoveryPoints')
    .columns(['time', 'id'])
    .execute();
  await table('jobs')
    .addColumn('kind', 'text', (c) => c.notNull())
    .addColumn('state', 'text', (c) => c.notNull())
    .addColumn('targetType', 'text')
    .addColumn('targetId', 'text')
    .addColumn('params', 'text', (c) => c.notNull())
    .addColumn('result', 'text')
    .addColumn('error', 'text')
    .addColumn('progress', 'double precision', (c) => c.notNull())
    .addColumn('steps', 'text', (c) => c.notNull())
    .addColumn('attempts', 'integer', (c) => c.notNull())
    // A scheduled job's slot (`retention:<policy>:<slot>`): unique, so no slot runs twice.
    .addColumn('scheduleKey', 'text', (c) => c.unique())
    .addColumn('leaseOwner', 'text')
    .addColumn('leaseUntil', 'text')
    .addColumn('cancelRequested', 'integer', (c) => c.notNull())
    .addColumn('createdBy', 'text', (c) => c.notNull())
    .addColumn('createdAt', 'text', (c) => c.notNull())
    .addColumn('startedAt', 'text')
    .addColumn('finishedAt', 'text')
    .addColumn('updatedAt', 'text', (c) => c.notNull())
    .execute();
  await db.schema.createIndex('jobsState').on('jobs').columns(['state', 'id']).execute();
  await db.schema.createIndex('jobsTarget').on('jobs').columns(['targetId', 'id']).execute();
  await table('jobLogs')
    .addColumn('jobId', 'text', (c) => c.notNull())
    .addColumn('time', 'text', (c) => c.notNull())
    .addColumn('level', 'text', (c) => c.notNull())
    .addColumn('message', 'text', (c) => c.notNull())
    .execute();
  await db.schema.createIndex('jobLogsJob').on('jobLogs').columns(['jobId', 'id']).execute();
  await table('alerts')
    .addColumn('kind', 'text', (c) => c.notNull())
    .addColumn('severity', 'text', (c) => c.notNull())
    .addColumn('subjectType', 'text', (c) => c.notNull())
    .addColumn('subjectId', 'text', (c) => c.notNull())
    .addColumn('message', 'text', (c) => c.notNull())
    .addColumn('details', 'text', (c) => c.notNull())
    .addColumn('state', 'text', (c) => c.notNull())
    // `kind:subject` while active, NULL once cleared: an active condition is raised once.
    .addColumn('activeKey', 'text', (c) => c.unique())
    .addColumn('raisedAt', 'text', (c) => c.notNull())
    .addColumn('clearedAt', 'text')
    .addColumn('acknowledgedAt', 'text')
    .addColumn('acknowledgedBy', 'text')
    .execute();
  await db.schema.createIndex('alertsState').on('alerts').columns(['state', 'id']).execute();
  await table('networkMappings')
    .addColumn('name', 'text', (c) => c.notNull().unique())
    .addColumn('sourceSiteId', 'text')
    .addColumn('targetSiteId', 'text')
    .addColumn('sourceNetwork', 'text', (c) => c.notNull())
    .addColumn('targetNetwork', 'text', (c) => c.notNull())
    .addColumn('testNetwork', 'text')
    .addColumn('createdAt', 'text', (c) => c.notNull())
    .addColumn('updatedAt', 'text', (c) => c.notNull())
    .execute();
  await table('credentials')
    .addColumn('name', 'text', (c) => c.notNull().unique())
    .addColumn('kind', 'text', (c) => c.notNull())
    .addColumn('username', 'text', (c) => c.notNull())
    .addColumn('secretSealed', 'text', (c) => c.notNull())
    .addColumn('description', 'text', (c) => c.notNull())
    .addColumn('createdAt', 'text', (c) => c.notNull())
    .addColumn('updatedAt', 'text', (c) => c.notNull())
    .execute();
  await table('users')
    .addColumn('username', 'text', (c) => c.notNull().unique())
    .addColumn('passwordHash', 'text', (c) => c.notNull())
    .addColumn('role', 'text', (c) => c.notNull())
    .addColumn('disabled', 'integer', (c) => c.notNull())
    .addColumn('createdAt', 'text', (c) => c.notNull())
    .addColumn('updatedAt', 'text', (c) => c.notNull())
    .addColumn('lastLoginAt', 'text')
    .execute();
  await table('tokens')
    .addColumn('kind', 'text', (c) => c.notNull())
    .addColumn('name', 'text', (c) => c.notNull())
    .addColumn('tokenHash', 'text', (c) => c.notNull().unique())
    .addColumn('userId', 'text')
    .addColumn('componentId', 'text')
    .addColumn('expiresAt', 'text')
    .addColumn('lastUsedAt', 'text')
    .addColumn('createdAt', 'text', (c) => c.notNull())
    .execute();
  await table('audit')
    .addColumn('time', 'text', (c) => c.notNull())
    .addColumn('actorType', 'text', (c) => c.notNull())
    .addColumn('actorId', 'text', (c) => c.notNull())
    .addColumn('actorName', 'text', (c) => c.notNull())
    .addColumn('action', 'text', (c) => c.notNull())
    .addColumn('targetType', 'text', (c) => c.notNull())
    .addColumn('targetId', 'text', (c) => c.notNull())
    .addColumn('summary', 'text', (c) => c.notNull())
    .execute();
  await db.schema
    .createTable('settings')
    .addColumn('key', 'text', (c) => c.primaryKey())
    .addColumn('value', 'text', (c) => c.notNull())
    .execute();
}

// Indexes for the portal's busiest reads with 10,000 items: the machines table sorted by RPO
// (newest point), filtered by state, and the dashboard's worst RPOs.
async function rpoIndexes(db: Db): Promise<void> {
  await db.schema
    .createIndex('protectedItemsLastPoint')
    .on('protectedItems')
    .columns(['lastPointAt', 'id'])
    .execute();
  await db.schema
    .createIndex('protectedItemsStateLastPoint')
    .on('protectedItems')
    .columns(['state', 'lastPointAt', 'id'])
    .execute();
}

// A KVM host's QMP sockets are local to it: the agent running there serves its machines
// (discovery and replication), so a source host names that agent.
async function sourceHostAgent(db: Db): Promise<void> {
  await db.schema.alterTable('sourceHosts').addColumn('agentId', 'text').execute();
}

// Test failovers and failovers the vault drives on recovery hosts, and the files their jobs
// upload (screenshots, console logs): base64 text, so one column type serves both dialects.
async function recoveryRuns(db: Db): Promise<void> {
  await db.schema
    .createTable('recoveryRuns')
    .addColumn('id', 'text', (c) => c.primaryKey())
    .addColumn('kind', 'text', (c) => c.notNull())
    .addColumn('state', 'text', (c) => c.notNull())
    .addColumn('recoveryHostId', 'text', (c) => c.notNull())
    .addColumn('protectedItemIds', 'text', (c) => c.notNull())
    .addColumn('consistencyGroup', 'text')
    .addColumn('spec', 'text', (c) => c.notNull())
    .addColumn('machines', 'text', (c) => c.notNull())
    .addColumn('error', 'text')
    .addColumn('hostInstance', 'text')
    .addColumn('lastJobId', 'text')
    .addColumn('createdBy', 'text', (c) => c.notNull())
    .addColumn('createdAt', 'text', (c) => c.notNull())
    .addColumn('updatedAt', 'text', (c) => c.notNull())
    .execute();
  await db.schema
    .createIndex('recoveryRunsKind')
    .on('recoveryRuns')
    .columns(['kind', 'id'])
    .execute();
  await db.schema
    .createIndex('recoveryRunsHost')
    .on('recoveryRuns')
    .columns(['recoveryHostId', 'state'])
    .execute();
  await db.schema
    .createTable('jobArtifacts')
    .addColumn('id', 'text', (c) => c.primaryKey())
    .addColumn('jobId', 'text', (c) => c.notNull())
    .addColumn('name', 'text', (c) => c.notNull())
    .addColumn('contentType', 'text', (c) => c.notNull())
    .addColumn('size', 'integer', (c) => c.notNull())
    .addColumn('data', 'text', (c) => c.notNull())
    .addColumn('createdAt', 'text', (c) => c.notNull())
    .execute();
  await db.schema
    .createIndex('jobArtifactsJobName')
    .on('jobArtifacts')
    .columns(['jobId', 'name'])
    .unique()
    .execute();
}

// The portal's store figures and replication history (issue 8): the latest stats of each
// target store, and per-item throughput/backlog samples per time bucket.
async function storeStatsAndItemSamples(db: Db): Promise<void> {
  await db.schema
    .createTable('targetStoreStats')
    .addColumn('targetStoreId', 'text', (c) => c.primaryKey())
    .addColumn('measuredAt', 'text', (c) => c.notNull())
    .addColumn('jobId', 'text')
    .addColumn('points', 'integer', (c) => c.notNull())
    .addColumn('machines', 'integer', (c) => c.notNull())
    .addColumn('disks', 'integer', (c) => c.notNull())
    .addColumn('logicalBytes', 'bigint', (c) => c.notNull())
    .addColumn('uniqueBytes', 'bigint', (c) => c.notNull())
    .addColumn('storedBytes', 'bigint', (c) => c.notNull())
    .addColumn('packs', 'integer', (c) => c.notNull())
    .addColumn('chunks', 'bigint', (c) => c.notNull())
    .execute();
  await db.schema
    .createTable('itemSamples')
    .addColumn('protectedItemId', 'text', (c) => c.notNull())
    .addColumn('bucket', 'text', (c) => c.notNull())
    .addColumn('reports', 'integer', (c) => c.notNull())
    .addColumn('throughputSumBps', 'double precision', (c) => c.notNull())
    .addColumn('throughputMaxBps', 'double precision', (c) => c.notNull())
    .addColumn('backlogMaxBytes', 'bigint', (c) => c.notNull())
    .addPrimaryKeyConstraint('itemSamplesPk', ['protectedItemId', 'bucket'])
    .execute();
  // Retention deletes by age across items.
  await db.schema.createIndex('itemSamplesBucket').on('itemSamples').columns(['bucket']).execute();
}

// PostgreSQL sorts NULLs last ascending, but lists sort items without a point first (as SQLite
// does): an index on plain (lastPointAt, id) cannot serve that order there, and every sorted
// page of 10,000 items was a sort. Rebuilt with NULLS FIRST (read backwards for descending,
// NULLS LAST). SQLite's indexes already have that order (and it rejects NULLS FIRST on them).
async function postgresNullsFirstIndexes(db: Db): Promise<void> {
  if (!(db.getExecutor().adapter instanceof PostgresAdapter)) return;
  for (const [name, columns] of [
    ['protectedItemsLastPoint', sql`"lastPointAt" asc nulls first, "id"`],
    ['protectedItemsStateLastPoint', sql`"state", "lastPointAt" asc nulls first, "id"`],
  ] as const) {
    await db.schema.dropIndex(name).execute();
    await sql`create index ${sql.id(name)} on "protectedItems" (${columns})`.execute(db);
  }
}

// Webhook deliveries were promises in memory: a vault that stopped (or crashed) while a
// receiver was down lost them. Now an outbox row per delivery, written with the alert's change.
async function alertDeliveries(db: Db): Promise<void> {
  await db.schema
    .createTable('alertDeliveries')
    .addColumn('id', 'text', (c) => c.primaryKey())
    .addColumn('alertId', 'text', (c) => c.notNull())
    .addColumn('event', 'text', (c) => c.notNull())
    .addColumn('body', 'text', (c) => c.notNull())
    .addColumn('state', 'text', (c) => c.notNull())
    .addColumn('attempts', 'integer', (c) => c.notNull())
    .addColumn('nextAttemptAt', 'text', (c) => c.notNull())
    .addColumn('claimedUntil', 'text')
    .addColumn('lastError', 'text')
    .addColumn('createdAt', 'text', (c) => c.notNull())
    .addColumn('finishedAt', 'text')
    .execute();
  // The deliverer reads the pending ones in order of creation.
  await db.schema
    .createIndex('alertDeliveriesState')
    .on('alertDeliveries')
    .columns(['state', 'createdAt', 'id'])
    .execute();
}

/** The vault's migrations, in code so a built vault needs no migration files on disk. */
export const migrations: Record<string, Migration> = {
  '0001-initial': { up: initial },
  '0002-rpo-indexes': { up: rpoIndexes },
  '0003-source-host-agent': { up: sourceHostAgent },
  '0004-recovery-runs': { up: recoveryRuns },
  '0005-store-stats-item-samples': { up: storeStatsAndItemSamples },
  '0006-postgres-nulls-first-indexes': { up: postgresNullsFirstIndexes },
  '0007-alert-deliveries': { up: alertDeliveries },
};

/** Hands Kysely's Migrator the migrations above. */
export const migrationProvider: MigrationProvider = {
  getMigrations: () => Promise.resolve(migrations),
};
