import type { FastifyInstance } from 'fastify';
import type { VaultContext } from '../vault-context.js';
import { nowIso } from '../ids.js';
import { invalid } from '../services/errors.js';
import { refuseIfReferenced, registerCrud, requireRef } from './crud-routes.js';

type Row = Record<string, unknown>;

const name = {
  type: 'string',
  minLength: 1,
  maxLength: 100,
  pattern: '^[A-Za-z0-9][A-Za-z0-9 ._-]*$',
};
const text = { type: 'string', maxLength: 1000 };
const idRef = { type: ['string', 'null'], minLength: 1, maxLength: 100 };
const duration = { type: 'string', pattern: '^[1-9][0-9]*[smhdw]$' };

function pick(input: Row, keys: string[]): Row {
  return Object.fromEntries(keys.filter((k) => input[k] !== undefined).map((k) => [k, input[k]]));
}

/** Registers the resources that are plain records: sites, policies, stores, credentials, mappings, source hosts. */
export function registerSimpleResources(app: FastifyInstance, vault: VaultContext): void {
  const { db } = vault;

  registerCrud(app, vault, {
    noun: 'site',
    path: '/api/sites',
    table: 'sites',
    idPrefix: 'site',
    tag: 'sites',
    properties: { name, kind: { type: 'string', enum: ['source', 'recovery'] }, description: text },
    required: ['name', 'kind'],
    filters: ['kind'],
    writeAccess: 'operator',
    toApi: (r) => r,
    toColumns: (input, _v, existing) =>
      Promise.resolve({
        ...pick(input, ['name', 'kind', 'description']),
        ...(existing === undefined ? { description: input['description'] ?? '' } : {}),
      }),
    beforeDelete: (id) =>
      refuseIfReferenced(db, id, 'site', [
        { table: 'components', column: 'siteId', noun: 'component' },
        { table: 'sourceHosts', column: 'siteId', noun: 'source host' },
        { table: 'targetStores', column: 'siteId', noun: 'target store' },
      ]),
  });

  registerCrud(app, vault, {
    noun: 'policy',
    path: '/api/policies',
    table: 'policies',
    idPrefix: 'pol',
    tag: 'policies',
    properties: {
      name,
      rpoThresholdSeconds: { type: 'integer', minimum: 1, maximum: 86_400 * 7 },
      crashConsistentIntervalSeconds: { type: 'integer', minimum: 1, maximum: 86_400 },
      appConsistentIntervalSeconds: { type: 'integer', minimum: 0, maximum: 86_400 * 7 },
      retentionIntervalSeconds: { type: 'integer', minimum: 60, maximum: 86_400 * 7 },
      retention: {
        type: 'object',
        properties: {
          rules: {
            type: 'array',
            minItems: 1,
            maxItems: 20,
            items: {
              type: 'object',
              properties: { for: duration, every: duration },
              required: ['for'],
              additionalProperties: false,
            },
          },
          keepAppConsistentFor: duration,
        },
        required: ['rules'],
        additionalProperties: false,
      },
    },
    required: ['name', 'rpoThresholdSeconds', 'retention'],
    writeAccess: 'operator',
    toApi: (r) => ({ ...r, retention: JSON.parse(r['retention'] as string) as unknown }),
    toColumns: (input, _v, existing) => {
      const cols: Row = {
        ...pick(input, [
          'name',
          'rpoThresholdSeconds',
          'crashConsistentIntervalSeconds',
          'appConsistentIntervalSeconds',
          'retentionIntervalSeconds',
        ]),
        ...(input['retention'] !== undefined
          ? { retention: JSON.stringify(input['retention']) }
          : {}),
      };
      if (existing === undefined) {
        cols['crashConsistentIntervalSeconds'] ??= 30;
        cols['appConsistentIntervalSeconds'] ??= 3600;
        cols['retentionIntervalSeconds'] ??= 3600;
      }
      const merged = { ...existing, ...cols };
      if (
        Number(merged['crashConsistentIntervalSeconds']) > Number(merged['rpoThresholdSeconds'])
      ) {
        throw invalid(
          'body.crashConsistentIntervalSeconds',
          'must not exceed rpoThresholdSeconds: points taken less often than the RPO threshold would always alert.',
        );
      }
      return Promise.resolve(cols);
    },
    beforeDelete: (id) =>
      refuseIfReferenced(db, id, 'policy', [
        { table: 'protectedItems', column: 'policyId', noun: 'protected item' },
      ]),
    // New intervals are a new desired state of every item under the policy: its generation
    // moves, and the process servers (and agents) apply it.
    afterUpdate: async (id, input) => {
      if (
        input['crashConsistentIntervalSeconds'] === undefined &&
        input['appConsistentIntervalSeconds'] === undefined
      )
        return;
      await db
        .updateTable('protectedItems')
        .set((eb) => ({ generation: eb('generation', '+', 1), updatedAt: nowIso() }))
        .where('policyId', '=', id)
        .where('state', '!=', 'disabled')
        .execute();
    },
  });

  registerCrud(app, vault, {
    noun: 'target-store',
    path: '/api/target-stores',
    table: 'targetStores',
    idPrefix: 'ts',
    tag: 'target stores',
    properties: {
      name,
      kind: { type: 'string', enum: ['directory', 'azure'] },
      siteId: idRef,
      path: { type: 'string', minLength: 1, maxLength: 4096, pattern: '^/' },
      container: { type: 'string', pattern: '^[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])$' },
      connectionString: { type: 'string', minLength: 1, maxLength: 4096 },
      passphrase: { type: 'string', minLength: 8, maxLength: 1024 },
    },
    required: ['name', 'kind', 'passphrase'],
    filters: ['kind', 'siteId'],
    writeAccess: 'admin',
    toApi: (r) => ({
      id: r['id'],
      name: r['name'],
      kind: r['kind'],
      siteId: r['siteId'],
      path: r['path'],
      container: r['container'],
      hasConnectionString: r['connectionSealed'] !== null,
      createdAt: r['createdAt'],
      updatedAt: r['updatedAt'],
    }),
    toColumns: async (input, v, existing) => {
      await requireRef(db, 'sites', input['siteId'], 'body.siteId', 'site');
      const kind = (input['kind'] ?? existing?.['kind']) as string;
      const path = input['path'] ?? existing?.['path'] ?? null;
      const container = input['container'] ?? existing?.['container'] ?? null;
      const hasConnection =
        input['connectionString'] !== undefined || existing?.['connectionSealed'] != null;
      if (kind === 'directory' && path === null)
        throw invalid('body.path', 'a directory store needs an absolute path.');
      if (kind === 'azure' && container === null)
        throw invalid('body.container', 'an Azure store needs a container name.');
      if (kind === 'azure' && !hasConnection) {
        throw invalid('body.connectionString', 'an Azure store needs a connection string.');
      }
      return {
        ...pick(input, ['name', 'kind', 'siteId', 'path', 'container']),
        ...(existing === undefined ? { siteId: input['siteId'] ?? null, path, container } : {}),
        ...(input['connectionString'] !== undefined
          ? { connectionSealed: v.secrets.seal(input['connectionString'] as string) }
          : existing === undefined
            ? { connectionSealed: null }
            : {}),
        ...(input['passphrase'] !== undefined
          ? { passphraseSealed: v.secrets.seal(input['passphrase'] as string) }
          : {}),
      };
    },
    beforeDelete: (id) =>
      refuseIfReferenced(db, id, 'target store', [
        { table: 'protectedItems', column: 'targetStoreId', noun: 'protected item' },
      ]),
  });

  registerCrud(app, vault, {
    noun: 'credential',
    path: '/api/credentials',
    table: 'credentials',
    idPrefix: 'cred',
    tag: 'credentials',
    properties: {
      name,
      kind: { type: 'string', enum: ['ssh-password', 'ssh-key', 'vcenter', 'kvm'] },
      username: { type: 'string', minLength: 1, maxLength: 200 },
      secret: { type: 'string', minLength: 1, maxLength: 65_536 },
      description: text,
    },
    required: ['name', 'kind', 'username', 'secret'],
    filters: ['kind'],
    writeAccess: 'admin',
    toApi: (r) => ({
      id: r['id'],
      name: r['name'],
      kind: r['kind'],
      username: r['username'],
      description: r['description'],
      createdAt: r['createdAt'],
      updatedAt: r['updatedAt'],
    }),
    toColumns: (input, v, existing) =>
      Promise.resolve({
        ...pick(input, ['name', 'kind', 'username', 'description']),
        ...(existing === undefined ? { description: input['description'] ?? '' } : {}),
        ...(input['secret'] !== undefined
          ? { secretSealed: v.secrets.seal(input['secret'] as string) }
          : {}),
      }),
    beforeDelete: (id) =>
      refuseIfReferenced(db, id, 'credential', [
        { table: 'sourceHosts', column: 'credentialId', noun: 'source host' },
      ]),
  });

  registerCrud(app, vault, {
    noun: 'network-mapping',
    path: '/api/network-mappings',
    table: 'networkMappings',
    idPrefix: 'net',
    tag: 'network mappings',
    properties: {
      name,
      sourceSiteId: idRef,
      targetSiteId: idRef,
      sourceNetwork: { type: 'string', minLength: 1, maxLength: 200 },
      targetNetwork: { type: 'string', minLength: 1, maxLength: 200 },
      testNetwork: { type: ['string', 'null'], minLength: 1, maxLength: 200 },
    },
    required: ['name', 'sourceNetwork', 'targetNetwork'],
    filters: ['sourceSiteId', 'targetSiteId'],
    writeAccess: 'operator',
    toApi: (r) => r,
    toColumns: async (input, _v, existing) => {
      await requireRef(db, 'sites', input['sourceSiteId'], 'body.sourceSiteId', 'site');
      await requireRef(db, 'sites', input['targetSiteId'], 'body.targetSiteId', 'site');
      return {
        ...pick(input, [
          'name',
          'sourceSiteId',
          'targetSiteId',
          'sourceNetwork',
          'targetNetwork',
          'testNetwork',
        ]),
        ...(existing === undefined
          ? {
              sourceSiteId: input['sourceSiteId'] ?? null,
              targetSiteId: input['targetSiteId'] ?? null,
              testNetwork: input['testNetwork'] ?? null,
            }
          : {}),
      };
    },
    beforeDelete: (id) =>
      refuseIfReferenced(db, id, 'network mapping', [
        { table: 'protectedItems', column: 'networkMappingId', noun: 'protected item' },
      ]),
  });

  registerCrud(app, vault, {
    noun: 'source-host',
    path: '/api/source-hosts',
    table: 'sourceHosts',
    idPrefix: 'sh',
    tag: 'source hosts',
    properties: {
      name,
      kind: { type: 'string', enum: ['kvm'] },
      siteId: idRef,
      processServerId: idRef,
      agentId: idRef,
      credentialId: idRef,
      endpoints: {
        type: 'array',
        maxItems: 10_000,
        items: {
          type: 'object',
          properties: {
            name: { type: 'string', minLength: 1, maxLength: 200 },
            qmp: { type: 'string', minLength: 1, maxLength: 4096 },
          },
          required: ['name', 'qmp'],
          additionalProperties: false,
        },
      },
    },
    required: ['name', 'kind', 'endpoints'],
    filters: ['siteId', 'processServerId', 'agentId', 'kind'],
    writeAccess: 'operator',
    toApi: (r) => ({ ...r, endpoints: JSON.parse(r['endpoints'] as string) as unknown }),
    toColumns: async (input, _v, existing) => {
      await requireRef(db, 'sites', input['siteId'], 'body.siteId', 'site');
      await requireRef(db, 'credentials', input['credentialId'], 'body.credentialId', 'credential');
      for (const [field, kind] of [
        ['processServerId', 'process-server'],
        ['agentId', 'agent'],
      ] as const) {
        if (input[field] === undefined || input[field] === null) continue;
        const c = await db
          .selectFrom('components')
          .select('id')
          .where('id', '=', input[field] as string)
          .where('kind', '=', kind)
          .executeTakeFirst();
        if (c === undefined) {
          throw invalid(`body.${field}`, `no ${kind} with id "${String(input[field])}".`);
        }
      }
      return {
        ...pick(input, ['name', 'kind', 'siteId', 'processServerId', 'agentId', 'credentialId']),
        ...(input['endpoints'] !== undefined
          ? { endpoints: JSON.stringify(input['endpoints']) }
          : {}),
        ...(existing === undefined
          ? {
              siteId: input['siteId'] ?? null,
              processServerId: input['processServerId'] ?? null,
              agentId: input['agentId'] ?? null,
              credentialId: input['credentialId'] ?? null,
              discoveryRequestedAt: null,
              discoveredAt: null,
            }
          : {}),
      };
    },
    beforeDelete: (id) =>
      refuseIfReferenced(db, id, 'source host', [
        { table: 'machines', column: 'sourceHostId', noun: 'machine' },
      ]),
  });
}
