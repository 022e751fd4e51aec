import { LifeboatError } from '@lifeboat/protocol';

/** A JSON object from the vault's API. */
export type ApiObject = Record<string, unknown>;

/**
 * A minimal client of the vault's HTTP API for the roles `lifeboat up` runs: the same routes a
 * separately installed process server or an operator's script calls.
 */
export class VaultApi {
  constructor(
    /** Base URL, e.g. `http://127.0.0.1:9440`. */
    readonly url: string,
    private token: string | undefined,
  ) {}

  /** A client of the same vault with another bearer token. */
  as(token: string): VaultApi {
    return new VaultApi(this.url, token);
  }

  /** Calls a route; an error answer becomes a LifeboatError with the vault's code. */
  async call<T = ApiObject>(
    method: string,
    path: string,
    body?: unknown,
    signal?: AbortSignal,
  ): Promise<T> {
    let res: Response;
    try {
      res = await fetch(`${this.url}${path}`, {
        method,
        headers: {
          ...(this.token !== undefined ? { authorization: `Bearer ${this.token}` } : {}),
          ...(body !== undefined ? { 'content-type': 'application/json' } : {}),
        },
        ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
        ...(signal !== undefined ? { signal } : {}),
      });
    } catch (err) {
      throw new LifeboatError(
        'LB_CLI_VAULT_UNREACHABLE',
        `Cannot reach the vault at ${this.url}: ${(err as Error).message}.`,
        { cause: err, details: { url: this.url, path } },
      );
    }
    const text = await res.text();
    const parsed: unknown = text === '' ? {} : JSON.parse(text);
    if (!res.ok) {
      const e = parsed as { code?: string; message?: string; details?: Record<string, unknown> };
      throw new LifeboatError(e.code ?? 'LB_CLI_VAULT_ERROR', e.message ?? `HTTP ${res.status}`, {
        details: { status: res.status, method, path, ...(e.details ?? {}) },
      });
    }
    return parsed as T;
  }
}
