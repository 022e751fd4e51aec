/** @lifeboat/store-azure: the Azure Blob Storage backend of the replica store. */
export { AzureBlobBackend } from './azure-blob-backend.js';
export type {
  AzureBlobBackendOptions,
  ResolvedAzureBlobBackendOptions,
} from './azure-backend-options.js';
export type { RetryOptions } from './retry.js';
