import { request as httpRequest } from 'node:http';
import type { IncomingMessage } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { LifeboatError } from './lifeboat-error.js';

/** A JSON object from the vault's API. */
export type VaultObject = Record<string, unknown>;

/** TLS material for an HTTPS vault: the CA to trust and the component's client certificate. */
export interface VaultClientTls {
  /** CA certificate(s) the vault's server certificate must chain to (PEM). @default the system's */
  ca?: string | Buffer;
  /** Client certificate presented to the vault (mutual TLS). @default none */
  cert?: string | Buffer;
  /** Its private key. @default none */
  key?: string | Buffer;
}

/** Options of {@link VaultClient}. */
export interface VaultClientOptions {
  /** Base URL, e.g. `https://vault.example:9440` (a trailing slash is ignored). */
  url: string;
  /** Bearer token (`lbc_...` of a component, `lbs_`/`lbt_` of a user). @default none */
  token?: string;
  /** TLS material for an HTTPS URL. @default the system's CAs, no client certificate */
  tls?: VaultClientTls;
  /** A request without an answer for this long fails as unreachable. @default 30000 */
  timeoutMs?: number;
}

/**
 * A small client of the vault's HTTP API for components (process servers, recovery hosts) and
 * `lifeboat up`: the same routes an operator's script calls. It uses node:http(s) rather than
 * fetch so a component can present its client certificate to an HTTPS vault. An error answer
 * becomes a LifeboatError with the vault's own code; no answer at all is
 * `LB_VAULT_CLIENT_UNREACHABLE`.
 */
export class VaultClient {
  /** Base URL without a trailing slash. */
  readonly url: string;
  private readonly options: Readonly<VaultClientOptions>;

  constructor(options: VaultClientOptions) {
    let parsed: URL;
    try {
      parsed = new URL(options.url);
    } catch (cause) {
      throw new LifeboatError(
        'LB_VAULT_CLIENT_BAD_URL',
        `The vault URL ${options.url} cannot be parsed. Give http(s)://host:port.`,
        { cause, details: { url: options.url } },
      );
    }
    if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
      throw new LifeboatError(
        'LB_VAULT_CLIENT_BAD_URL',
        `The vault URL ${options.url} is not http:// or https://.`,
        { details: { url: options.url } },
      );
    }
    this.url = options.url.replace(/\/+$/, '');
    this.options = Object.freeze({ ...options, url: this.url });
  }

  /** A client of the same vault with another bearer token. */
  as(token: string | undefined): VaultClient {
    const { token: _old, ...rest } = this.options;
    return new VaultClient(token === undefined ? rest : { ...rest, token });
  }

  /** A client of the same vault with other TLS material (after a certificate renewal). */
  withTls(tls: VaultClientTls): VaultClient {
    return new VaultClient({ ...this.options, tls });
  }

  /** Calls a route with a JSON body; resolves with the JSON answer (`{}` for an empty one). */
  async call<T = VaultObject>(
    method: string,
    path: string,
    body?: unknown,
    signal?: AbortSignal,
  ): Promise<T> {
    const { status, text } = await this.send(method, path, body, signal);
    let parsed: unknown = {};
    if (text !== '') {
      try {
        parsed = JSON.parse(text);
      } catch (cause) {
        throw new LifeboatError(
          'LB_VAULT_CLIENT_BAD_ANSWER',
          `The vault at ${this.url} answered ${method} ${path} with HTTP ${status} and no JSON; is ${this.url} really a Lifeboat vault?`,
          { cause, details: { url: this.url, method, path, status } },
        );
      }
    }
    if (status < 200 || status >= 300) {
      const e = parsed as { code?: string; message?: string; details?: Record<string, unknown> };
      throw new LifeboatError(
        e.code ?? 'LB_VAULT_CLIENT_BAD_ANSWER',
        e.message ?? `The vault answered ${method} ${path} with HTTP ${status}.`,
        { details: { status, method, path, ...(e.details ?? {}) } },
      );
    }
    return parsed as T;
  }

  /** Reads a route's body as text (the CA certificate, `GET /api/ca.pem`). */
  async text(path: string, signal?: AbortSignal): Promise<string> {
    const { status, text } = await this.send('GET', path, undefined, signal);
    if (status !== 200) {
      throw new LifeboatError(
        'LB_VAULT_CLIENT_BAD_ANSWER',
        `The vault answered GET ${path} with HTTP ${status}.`,
        { details: { status, path } },
      );
    }
    return text;
  }

  private send(
    method: string,
    path: string,
    body: unknown,
    signal: AbortSignal | undefined,
  ): Promise<{ status: number; text: string }> {
    const url = new URL(`${this.url}${path}`);
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const { token, tls, timeoutMs = 30_000 } = this.options;
    const headers: Record<string, string> = {
      accept: 'application/json',
      ...(token !== undefined ? { authorization: `Bearer ${token}` } : {}),
      ...(payload !== undefined
        ? { 'content-type': 'application/json', 'content-length': String(payload.length) }
        : {}),
    };
    const unreachable = (cause: unknown): LifeboatError =>
      new LifeboatError(
        'LB_VAULT_CLIENT_UNREACHABLE',
        `Cannot reach the vault at ${this.url} (${method} ${path}): ${(cause as Error).message}. Check the vault URL, that the vault runs, and the network between here and there.`,
        { cause, details: { url: this.url, method, path } },
      );
    return new Promise((resolve, reject) => {
      const onAnswer = (res: IncomingMessage): void => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () =>
          resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString('utf8') }),
        );
        res.on('error', (err) => reject(unreachable(err)));
      };
      const common = {
        method,
        headers,
        timeout: timeoutMs,
        ...(signal !== undefined ? { signal } : {}),
      };
      const req =
        url.protocol === 'https:'
          ? httpsRequest(
              url,
              {
                ...common,
                ...(tls?.ca !== undefined ? { ca: tls.ca } : {}),
                ...(tls?.cert !== undefined ? { cert: tls.cert } : {}),
                ...(tls?.key !== undefined ? { key: tls.key } : {}),
              },
              onAnswer,
            )
          : httpRequest(url, common, onAnswer);
      req.on('timeout', () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)));
      req.on('error', (err) => reject(signal?.aborted === true ? err : unreachable(err)));
      req.end(payload);
    });
  }
}
