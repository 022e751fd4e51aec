import { RestError } from '@azure/storage-blob';
import { describe, expect, it } from 'vitest';
import { isTransient, retryAfterMs, toLifeboatError, unavailableError } from './azure-errors.js';

const facts = { location: 'azure:acct/c1', operation: 'get', key: 'packs/ab/abcd' };

function rest(statusCode: number | undefined, code?: string): RestError {
  return new RestError('service said no', {
    ...(statusCode === undefined ? {} : { statusCode }),
    ...(code === undefined ? {} : { code }),
  });
}

describe('Azure error classification', () => {
  it('retries throttling, service errors and dropped connections, not client errors', () => {
    for (const s of [408, 429, 500, 502, 503, 504])
      expect(isTransient(rest(s)), String(s)).toBe(true);
    for (const s of [400, 401, 403, 404, 409, 412, 416])
      expect(isTransient(rest(s)), String(s)).toBe(false);
    for (const c of ['ECONNRESET', 'ECONNREFUSED', 'ETIMEDOUT', 'REQUEST_SEND_ERROR']) {
      expect(isTransient(rest(undefined, c)), c).toBe(true);
    }
    expect(
      isTransient(
        new Error('wrapped', { cause: Object.assign(new Error('x'), { code: 'ECONNRESET' }) }),
      ),
    ).toBe(true);
    expect(isTransient(new Error('plain'))).toBe(false);
  });

  it('maps service answers to stable codes naming the object and the store', () => {
    expect(toLifeboatError(rest(404, 'BlobNotFound'), facts).code).toBe('LB_BACKEND_NOT_FOUND');
    expect(toLifeboatError(rest(404, 'ContainerNotFound'), facts).code).toBe(
      'LB_BACKEND_CONTAINER_NOT_FOUND',
    );
    expect(toLifeboatError(rest(403, 'AuthenticationFailed'), facts).code).toBe('LB_BACKEND_AUTH');
    expect(toLifeboatError(rest(416, 'InvalidRange'), facts).code).toBe('LB_BACKEND_RANGE');
    const other = toLifeboatError(rest(400, 'InvalidHeaderValue'), facts);
    expect(other.code).toBe('LB_BACKEND_FAILED');
    expect(other.message).toContain('packs/ab/abcd in azure:acct/c1');
    expect(other.details).toMatchObject({ status: 400, serviceCode: 'InvalidHeaderValue' });
    const down = unavailableError(facts, rest(undefined, 'ECONNREFUSED'), 4, 1500);
    expect(down.code).toBe('LB_BACKEND_UNAVAILABLE');
    expect(down.message).toContain('azure:acct/c1');
    expect(down.details).toMatchObject({ attempts: 4, location: 'azure:acct/c1' });
  });

  it('reads Retry-After in seconds, capped at a minute', () => {
    const withHeader = (v: string): unknown => ({
      response: { headers: { get: (n: string) => (n === 'retry-after' ? v : undefined) } },
    });
    expect(retryAfterMs(withHeader('3'))).toBe(3000);
    expect(retryAfterMs(withHeader('86400'))).toBe(60_000);
    expect(retryAfterMs(withHeader('Wed, 21 Oct 2015 07:28:00 GMT'))).toBeUndefined();
    expect(retryAfterMs(rest(503))).toBeUndefined();
  });
});
