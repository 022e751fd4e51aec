import { request as httpRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { LifeboatError } from '@lifeboat/protocol';

/** Options of {@link VaultClient}. */
export interface VaultClientOptions {
  /** The vault's base URL, e.g. `https://vault.example:9440`. */
  url: string;
  /** The component's bearer token (`lbc_...`). @default none (registration only) */
  token?: string;
  /** Over HTTPS: the vault CA to trust, and the component's client certificate and key (PEM). */
  tls?: { ca?: string; cert?: string; key?: string };
  /** How long one request may take. @default 30000 */
  timeoutMs?: number;
}

/**
 * A small client of the vault's component routes over node:http(s), so a component can
 * present the client certificate it got at registration (the vault checks it over HTTPS).
 * An answer other than 2xx becomes a LifeboatError with the vault's own code and message.
 */
export class VaultClient {
  constructor(private readonly options: VaultClientOptions) {}

  /** The vault's base URL. */
  get url(): string {
    return this.options.url.replace(/\/+$/, '');
  }

  /** The same vault with another token (and, optionally, client certificate). */
  with(token: string, tls?: VaultClientOptions['tls']): VaultClient {
    return new VaultClient({ ...this.options, token, ...(tls !== undefined ? { tls } : {}) });
  }

  /** Sends one JSON request; resolves with the parsed answer. */
  async call<T = Record<string, unknown>>(
    method: string,
    path: string,
    body?: unknown,
  ): Promise<T> {
    const target = new URL(`${this.url}${path}`);
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const headers: Record<string, string> = {
      accept: 'application/json',
      ...(this.options.token !== undefined
        ? { authorization: `Bearer ${this.options.token}` }
        : {}),
      ...(payload !== undefined
        ? { 'content-type': 'application/json', 'content-length': String(payload.length) }
        : {}),
    };
    const https = target.protocol === 'https:';
    const tls = this.options.tls ?? {};
    const { status, text } = await new Promise<{ status: number; text: string }>(
      (resolve, reject) => {
        const req = (https ? httpsRequest : httpRequest)(
          target,
          {
            method,
            headers,
            timeout: this.options.timeoutMs ?? 30_000,
            ...(https
              ? {
                  ...(tls.ca !== undefined ? { ca: tls.ca } : {}),
                  ...(tls.cert !== undefined ? { cert: tls.cert } : {}),
                  ...(tls.key !== undefined ? { key: tls.key } : {}),
                }
              : {}),
          },
          (res) => {
            const chunks: Buffer[] = [];
            res.on('data', (c: Buffer) => chunks.push(c));
            res.on('end', () =>
              resolve({
                status: res.statusCode ?? 0,
                text: Buffer.concat(chunks).toString('utf8'),
              }),
            );
            res.on('error', reject);
          },
        );
        req.on('timeout', () => req.destroy(new Error('the request timed out')));
        req.on('error', (cause) =>
          reject(
            new LifeboatError(
              'LB_RECOVERY_VAULT_UNREACHABLE',
              `Cannot reach the vault at ${this.url} (${method} ${path}): ${cause.message}. Check the URL and that the vault runs; the recovery host keeps trying.`,
              { cause, details: { url: this.url, method, path } },
            ),
          ),
        );
        req.end(payload);
      },
    );
    let parsed: unknown = {};
    try {
      parsed = text === '' ? {} : JSON.parse(text);
    } catch {
      parsed = { message: text.slice(0, 500) };
    }
    if (status < 200 || status >= 300) {
      const e = parsed as { code?: string; message?: string; details?: Record<string, unknown> };
      throw new LifeboatError(
        e.code ?? 'LB_RECOVERY_VAULT',
        `The vault answered ${method} ${path} with ${status}: ${e.message ?? 'no message'}`,
        { details: { status, method, path, ...(e.details ?? {}) } },
      );
    }
    return parsed as T;
  }
}
