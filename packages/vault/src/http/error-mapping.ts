import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import { isLifeboatError } from '@lifeboat/protocol';

/** The one error body of the API. */
export interface ApiErrorBody {
  code: string;
  message: string;
  details: Record<string, unknown>;
}

// The only place codes meet HTTP statuses: services throw LifeboatErrors and never know HTTP.
const STATUS: Record<string, number> = {
  LB_VAULT_INVALID_INPUT: 400,
  LB_VAULT_NETWORK_UNAVAILABLE: 400,
  LB_VAULT_UNAUTHENTICATED: 401,
  LB_VAULT_LOGIN_FAILED: 401,
  LB_VAULT_REGISTRATION_KEY_UNKNOWN: 401,
  LB_VAULT_REGISTRATION_KEY_EXPIRED: 401,
  LB_VAULT_REGISTRATION_KEY_USED: 401,
  LB_VAULT_CLIENT_CERTIFICATE: 401,
  LB_VAULT_FORBIDDEN: 403,
  LB_VAULT_NOT_FOUND: 404,
  LB_VAULT_POINT_NOT_FOUND: 404,
  LB_VAULT_ROUTE_NOT_FOUND: 404,
  LB_VAULT_CONFLICT: 409,
  LB_VAULT_INVALID_STATE: 409,
  LB_VAULT_IN_USE: 409,
  LB_VAULT_LAST_ADMIN: 409,
  LB_VAULT_NO_RECOVERY_HOST: 409,
  LB_VAULT_RECOVERY_HOST_DOWN: 409,
  LB_VAULT_PROCESS_SERVER_DOWN: 409,
  LB_VAULT_UNSUPPORTED_MEDIA_TYPE: 415,
  LB_VAULT_PAYLOAD_TOO_LARGE: 413,
  LB_VAULT_DATABASE_UNAVAILABLE: 503,
};

/** HTTP status of an error code (500 for codes the API does not expect). */
export function statusOf(code: string): number {
  return STATUS[code] ?? 500;
}

function fieldOf(err: FastifyError): string {
  const first = err.validation?.[0];
  const context = err.validationContext ?? 'body';
  if (first === undefined) return context;
  const params = first.params as Record<string, unknown>;
  const path = first.instancePath
    .split('/')
    .filter((p) => p !== '')
    .join('.');
  const extra =
    typeof params['missingProperty'] === 'string'
      ? params['missingProperty']
      : typeof params['additionalProperty'] === 'string'
        ? params['additionalProperty']
        : undefined;
  return [context, path, extra].filter((p) => p !== undefined && p !== '').join('.');
}

/** Turns any error reaching the edge into `{ code, message, details }` with its status. */
export function toApiError(err: unknown): { status: number; body: ApiErrorBody } {
  if (isLifeboatError(err)) {
    return { status: statusOf(err.code), body: err.toJSON() };
  }
  const fe = err as FastifyError;
  if (fe.validation !== undefined) {
    const field = fieldOf(fe);
    const first = fe.validation[0];
    return {
      status: 400,
      body: {
        code: 'LB_VAULT_INVALID_INPUT',
        message: `Invalid ${field}: ${first?.message ?? 'does not match the schema'}. Fix the field and retry.`,
        details: { field, rule: first?.keyword ?? 'schema', params: first?.params ?? {} },
      },
    };
  }
  if (fe.statusCode === 415) {
    return {
      status: 415,
      body: {
        code: 'LB_VAULT_UNSUPPORTED_MEDIA_TYPE',
        message: 'The request body must be JSON (Content-Type: application/json).',
        details: {},
      },
    };
  }
  if (fe.statusCode === 413) {
    return {
      status: 413,
      body: {
        code: 'LB_VAULT_PAYLOAD_TOO_LARGE',
        message: 'The request body is too large.',
        details: {},
      },
    };
  }
  if (fe.statusCode !== undefined && fe.statusCode >= 400 && fe.statusCode < 500) {
    return {
      status: 400,
      body: {
        code: 'LB_VAULT_INVALID_INPUT',
        message: `Invalid request: ${fe.message}. Send valid JSON matching the API schema.`,
        details: { field: 'body', fastifyCode: fe.code },
      },
    };
  }
  return {
    status: 500,
    body: {
      code: 'LB_VAULT_INTERNAL',
      message:
        'The vault failed unexpectedly; the vault log has the details. Retry, and report it if it persists.',
      details: {},
    },
  };
}

/** Fastify error handler: logs server faults, answers with the error model. */
export function errorHandler(err: unknown, request: FastifyRequest, reply: FastifyReply): void {
  const { status, body } = toApiError(err);
  if (status >= 500) request.log.error({ err }, 'request failed');
  void reply.status(status).send(body);
}
