import { LifeboatError } from '@lifeboat/protocol';

/** HTTP statuses the service uses for faults that pass: timeout, throttling, overload. */
const TRANSIENT_STATUS = new Set([408, 429, 500, 502, 503, 504]);

/** Node and SDK error codes of connections that failed or dropped (the service may be back soon). */
const TRANSIENT_CODES = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'ECONNABORTED',
  'ETIMEDOUT',
  'ESOCKETTIMEDOUT',
  'EPIPE',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ENETDOWN',
  'EAI_AGAIN',
  'ENOTFOUND',
  'REQUEST_SEND_ERROR',
  'ERR_STREAM_PREMATURE_CLOSE',
  'UND_ERR_SOCKET',
]);

/** The HTTP status of an SDK error, if it has one. */
export function statusOf(err: unknown): number | undefined {
  const status = (err as { statusCode?: unknown } | null)?.statusCode;
  return typeof status === 'number' ? status : undefined;
}

/**
 * The service's error code (`BlobNotFound`, `ContainerNotFound`, …) or a Node error code.
 * Responses to HEAD requests have no body, so the code is only in `details.errorCode` (from the
 * `x-ms-error-code` header).
 */
export function errorCodeOf(err: unknown): string | undefined {
  const e = err as { code?: unknown; details?: { errorCode?: unknown } } | null;
  const fromHeader = e?.details?.errorCode;
  if (typeof fromHeader === 'string') return fromHeader;
  return typeof e?.code === 'string' ? e.code : undefined;
}

/** True for faults that another attempt may not meet: throttling, 5xx, dropped connections. */
export function isTransient(err: unknown): boolean {
  const status = statusOf(err);
  if (status !== undefined) return TRANSIENT_STATUS.has(status);
  const code = errorCodeOf(err);
  if (code !== undefined && TRANSIENT_CODES.has(code)) return true;
  // The SDK sometimes wraps a socket error without copying its code.
  const cause = (err as { cause?: unknown } | null)?.cause;
  return cause !== undefined && cause !== err && isTransient(cause);
}

/**
 * The wait a throttled (429) or busy (503) answer asks for in its `Retry-After` header, in ms.
 * Capped at a minute so that a bogus header cannot stall the caller.
 */
export function retryAfterMs(err: unknown): number | undefined {
  const headers = (
    err as { response?: { headers?: { get?: (name: string) => string | undefined } } } | null
  )?.response?.headers;
  const value = typeof headers?.get === 'function' ? headers.get('retry-after') : undefined;
  if (value === undefined || !/^\d+$/.test(value.trim())) return undefined;
  return Math.min(Number(value) * 1000, 60_000);
}

/** Facts about one failed request, for messages and `details`. */
export interface RequestFacts {
  location: string;
  operation: string;
  key?: string;
}

function describe(err: unknown): string {
  const status = statusOf(err);
  const code = errorCodeOf(err);
  if (status !== undefined) return [`HTTP ${status}`, code].filter(Boolean).join(' ');
  // A network fault: the message says where and what (`connect ECONNREFUSED 10.0.0.5:443`).
  const message = String((err as Error | null)?.message ?? err).slice(0, 200);
  return code === undefined || message.includes(code) ? message : `${code}: ${message}`;
}

/**
 * Maps an SDK error that is not transient (or a transient one after the retries) to a stable
 * LifeboatError naming the store and the object.
 */
export function toLifeboatError(err: unknown, facts: RequestFacts): LifeboatError {
  if (err instanceof LifeboatError) return err;
  const status = statusOf(err);
  const code = errorCodeOf(err);
  const details = {
    location: facts.location,
    operation: facts.operation,
    ...(facts.key === undefined ? {} : { key: facts.key }),
    ...(status === undefined ? {} : { status }),
    ...(code === undefined ? {} : { serviceCode: code }),
  };
  const what = facts.key === undefined ? facts.location : `${facts.key} in ${facts.location}`;
  if (code === 'ContainerNotFound') {
    return new LifeboatError(
      'LB_BACKEND_CONTAINER_NOT_FOUND',
      `The container of ${facts.location} does not exist. Check the container name, or create it ` +
        `(the backend option createContainer does so on first use).`,
      { cause: err, details },
    );
  }
  if (status === 404) {
    return new LifeboatError('LB_BACKEND_NOT_FOUND', `Object ${what} does not exist.`, {
      cause: err,
      details,
    });
  }
  if (status === 401 || status === 403) {
    return new LifeboatError(
      'LB_BACKEND_AUTH',
      `Azure Blob Storage refused ${facts.operation} on ${facts.location} (${describe(err)}). ` +
        `Check the account key or SAS token in the connection string, its expiry, and that it ` +
        `grants read, write, list and delete on the container.`,
      { cause: err, details },
    );
  }
  if (status === 416) {
    return new LifeboatError('LB_BACKEND_RANGE', `The range read from ${what} is past its end.`, {
      cause: err,
      details,
    });
  }
  return new LifeboatError(
    'LB_BACKEND_FAILED',
    `Azure Blob Storage failed ${facts.operation} on ${what} (${describe(err)}). ` +
      `This is not a transient fault; check the service's message in the cause.`,
    { cause: err, details },
  );
}

/** The error for a store that stayed unreachable through every retry. */
export function unavailableError(
  facts: RequestFacts,
  lastError: unknown,
  attempts: number,
  elapsedMs: number,
): LifeboatError {
  return new LifeboatError(
    'LB_BACKEND_UNAVAILABLE',
    `Azure Blob Storage at ${facts.location} did not answer ${facts.operation}` +
      `${facts.key === undefined ? '' : ` of ${facts.key}`} after ${attempts} attempts in ` +
      `${Math.round(elapsedMs / 1000)} s (last: ${describe(lastError)}). Check the network and ` +
      `the storage account (firewall, DNS, status page), then retry the operation.`,
    {
      cause: lastError,
      details: {
        location: facts.location,
        operation: facts.operation,
        ...(facts.key === undefined ? {} : { key: facts.key }),
        attempts,
        elapsedMs,
      },
    },
  );
}
