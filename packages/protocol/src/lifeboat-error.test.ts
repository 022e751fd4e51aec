import { describe, expect, it } from 'vitest';
import { LifeboatError, isLifeboatError } from './lifeboat-error.js';

describe('LifeboatError', () => {
  it('carries a stable code, details and cause', () => {
    const cause = new Error('disk gone');
    const err = new LifeboatError('LB_TEST_EXAMPLE', 'Example failed; retry.', {
      cause,
      details: { disk: 'vda' },
    });
    expect(err.code).toBe('LB_TEST_EXAMPLE');
    expect(err.cause).toBe(cause);
    expect(err.toJSON()).toEqual({
      code: 'LB_TEST_EXAMPLE',
      message: 'Example failed; retry.',
      details: { disk: 'vda' },
    });
    expect(isLifeboatError(err, 'LB_TEST_EXAMPLE')).toBe(true);
    expect(isLifeboatError(err, 'LB_OTHER')).toBe(false);
    expect(isLifeboatError(new Error('x'))).toBe(false);
  });
});
