import { LifeboatError } from '@lifeboat/protocol';
import { DEFAULT_RETRY, type ResolvedRetryOptions, type RetryOptions } from './retry.js';

const MiB = 1024 * 1024;
/** Largest block this backend stages; the service accepts up to 100 MiB on every API version. */
export const MAX_BLOCK_SIZE = 100 * MiB;
/** Largest single-request upload; the service accepts 256 MiB on every API version. */
export const MAX_SINGLE_PUT_SIZE = 256 * MiB;

/** Options of {@link AzureBlobBackend}. Give `connectionString` + `container`, or `containerUrl`. */
export interface AzureBlobBackendOptions {
  /**
   * The storage account's connection string (`AccountName=…;AccountKey=…` or
   * `BlobEndpoint=…;SharedAccessSignature=…`). Optional only when `containerUrl` carries a SAS.
   */
  connectionString?: string;
  /** The container's name (3–63 lowercase letters, digits and single hyphens). */
  container?: string;
  /**
   * The container's URL instead of `container`, e.g.
   * `https://myaccount.blob.core.windows.net/lifeboat` (or Azurite's path style
   * `http://127.0.0.1:10000/devstoreaccount1/lifeboat`), optionally with a SAS query.
   */
  containerUrl?: string;
  /** Create the container on first use when it is missing (needs account-level permission). @default false */
  createContainer?: boolean;
  /** Requests one backend instance has in flight at once. @default 8 */
  maxConcurrency?: number;
  /** Block size in bytes for objects uploaded in blocks (64 KiB to 100 MiB). @default 8388608 */
  blockSize?: number;
  /** Objects up to this many bytes are uploaded in one request, larger ones in blocks (at most 256 MiB). @default 8388608 */
  maxSinglePutSize?: number;
  /** Objects per list request (1 to 5000, the service's maximum). @default 5000 */
  listPageSize?: number;
  /** Retries of transient faults. */
  retry?: RetryOptions;
}

/** {@link AzureBlobBackendOptions} validated, with defaults applied. */
export interface ResolvedAzureBlobBackendOptions {
  readonly connectionString: string | undefined;
  readonly container: string | undefined;
  readonly containerUrl: string | undefined;
  readonly createContainer: boolean;
  readonly maxConcurrency: number;
  readonly blockSize: number;
  readonly maxSinglePutSize: number;
  readonly listPageSize: number;
  readonly retry: ResolvedRetryOptions;
}

function configError(message: string, details: Record<string, unknown> = {}): LifeboatError {
  return new LifeboatError('LB_BACKEND_INVALID_OPTIONS', message, { details });
}

function integerIn(
  name: string,
  value: number | undefined,
  fallback: number,
  min: number,
  max: number,
): number {
  const v = value ?? fallback;
  if (!Number.isSafeInteger(v) || v < min || v > max) {
    throw configError(
      `Azure backend option ${name} must be an integer from ${min} to ${max}, not ${v}.`,
      {
        option: name,
        value: v,
      },
    );
  }
  return v;
}

/** Container names as the service accepts them. */
const CONTAINER_NAME = /^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$/;

/** Validates options once into a frozen value; throws `LB_BACKEND_INVALID_OPTIONS` naming the bad option. */
export function resolveAzureBlobBackendOptions(
  options: AzureBlobBackendOptions,
): ResolvedAzureBlobBackendOptions {
  const { connectionString, container, containerUrl } = options;
  if ((container === undefined) === (containerUrl === undefined)) {
    throw configError(
      'Give the Azure backend either a container name or a container URL (exactly one).',
    );
  }
  if (container !== undefined && !CONTAINER_NAME.test(container)) {
    throw configError(
      `"${container}" is not a valid container name: use 3 to 63 lowercase letters, digits and single hyphens, starting and ending with a letter or digit.`,
      { container },
    );
  }
  if (containerUrl !== undefined) {
    let url: URL;
    try {
      url = new URL(containerUrl);
    } catch (cause) {
      throw new LifeboatError('LB_BACKEND_INVALID_OPTIONS', `"${containerUrl}" is not a URL.`, {
        cause,
      });
    }
    if (url.protocol !== 'https:' && url.protocol !== 'http:') {
      throw configError(`The container URL must be http(s), not ${url.protocol}.`);
    }
    if (connectionString === undefined && !url.searchParams.has('sig')) {
      throw configError(
        'The container URL has no SAS token: also give the storage account connection string.',
      );
    }
  } else if (connectionString === undefined || connectionString.trim() === '') {
    throw configError('Give the Azure backend the storage account connection string.');
  }
  const retry = options.retry ?? {};
  const resolvedRetry: ResolvedRetryOptions = Object.freeze({
    maxAttempts: integerIn(
      'retry.maxAttempts',
      retry.maxAttempts,
      DEFAULT_RETRY.maxAttempts,
      1,
      1000,
    ),
    initialDelayMs: integerIn(
      'retry.initialDelayMs',
      retry.initialDelayMs,
      DEFAULT_RETRY.initialDelayMs,
      0,
      600_000,
    ),
    maxDelayMs: integerIn(
      'retry.maxDelayMs',
      retry.maxDelayMs,
      DEFAULT_RETRY.maxDelayMs,
      0,
      600_000,
    ),
    totalTimeoutMs: integerIn(
      'retry.totalTimeoutMs',
      retry.totalTimeoutMs,
      DEFAULT_RETRY.totalTimeoutMs,
      0,
      86_400_000,
    ),
    tryTimeoutMs: integerIn(
      'retry.tryTimeoutMs',
      retry.tryTimeoutMs,
      DEFAULT_RETRY.tryTimeoutMs,
      100,
      86_400_000,
    ),
  });
  return Object.freeze({
    connectionString,
    container,
    containerUrl,
    createContainer: options.createContainer ?? false,
    maxConcurrency: integerIn('maxConcurrency', options.maxConcurrency, 8, 1, 1024),
    blockSize: integerIn('blockSize', options.blockSize, 8 * MiB, 64 * 1024, MAX_BLOCK_SIZE),
    maxSinglePutSize: integerIn(
      'maxSinglePutSize',
      options.maxSinglePutSize,
      8 * MiB,
      0,
      MAX_SINGLE_PUT_SIZE,
    ),
    listPageSize: integerIn('listPageSize', options.listPageSize, 5000, 1, 5000),
    retry: resolvedRetry,
  });
}
