import { isLifeboatError } from '@lifeboat/protocol';
import { describe, expect, it } from 'vitest';
import { resolveAzureBlobBackendOptions } from './azure-backend-options.js';
import { AzureBlobBackend } from './azure-blob-backend.js';

const cs =
  'DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=' +
  'Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;' +
  'BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;';

function codeOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (err) {
    return isLifeboatError(err) ? err.code : `not a LifeboatError: ${String(err)}`;
  }
  return undefined;
}

describe('AzureBlobBackend options', () => {
  it('applies the documented defaults and freezes the result', () => {
    const o = resolveAzureBlobBackendOptions({ connectionString: cs, container: 'lifeboat' });
    expect(o).toMatchObject({
      createContainer: false,
      maxConcurrency: 8,
      blockSize: 8 * 1024 * 1024,
      maxSinglePutSize: 8 * 1024 * 1024,
      listPageSize: 5000,
      retry: { maxAttempts: 10, totalTimeoutMs: 60_000 },
    });
    expect(Object.isFrozen(o)).toBe(true);
    expect(Object.isFrozen(o.retry)).toBe(true);
  });

  it('rejects bad options with LB_BACKEND_INVALID_OPTIONS', () => {
    const bad = [
      { connectionString: cs },
      { connectionString: cs, container: 'Bad_Name' },
      { connectionString: cs, container: 'a--b' },
      { container: 'lifeboat' },
      { connectionString: cs, container: 'lifeboat', containerUrl: 'http://x/y/z' },
      { connectionString: cs, container: 'lifeboat', maxConcurrency: 0 },
      { connectionString: cs, container: 'lifeboat', blockSize: 200 * 1024 * 1024 },
      { connectionString: cs, container: 'lifeboat', maxSinglePutSize: 300 * 1024 * 1024 },
      { connectionString: cs, container: 'lifeboat', listPageSize: 5001 },
      { connectionString: cs, container: 'lifeboat', retry: { maxAttempts: 0 } },
      { containerUrl: 'https://acct.blob.core.windows.net/c1' },
      { containerUrl: 'ftp://acct/c1', connectionString: cs },
    ];
    for (const options of bad) {
      expect(
        codeOf(() => new AzureBlobBackend(options)),
        JSON.stringify(options),
      ).toBe('LB_BACKEND_INVALID_OPTIONS');
    }
    expect(
      codeOf(() => new AzureBlobBackend({ connectionString: 'nonsense', container: 'c1' })),
    ).toBe('LB_BACKEND_INVALID_OPTIONS');
  });

  it('names its location azure:<account>/<container>, from a name or a URL', () => {
    expect(new AzureBlobBackend({ connectionString: cs, container: 'lifeboat' }).location).toBe(
      'azure:devstoreaccount1/lifeboat',
    );
    const fromUrl = AzureBlobBackend.fromContainerUrl(
      'http://127.0.0.1:10000/devstoreaccount1/dr-site',
      cs,
    );
    expect(fromUrl.location).toBe('azure:devstoreaccount1/dr-site');
    const sas = AzureBlobBackend.fromContainerUrl(
      'https://acct.blob.core.windows.net/c1?sv=2024&sig=abc',
    );
    expect(sas.location).toBe('azure:acct/c1');
  });

  it('refuses a container URL outside the connection string account', () => {
    expect(
      codeOf(() =>
        AzureBlobBackend.fromContainerUrl('https://other.blob.core.windows.net/lifeboat', cs),
      ),
    ).toBe('LB_BACKEND_INVALID_OPTIONS');
  });
});
