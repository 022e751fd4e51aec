import { request } from 'node:https';
import type { RequestOptions } from 'node:https';
import { isIP } from 'node:net';
import { checkServerIdentity } from 'node:tls';
import { LifeboatError } from '@lifeboat/protocol';

/** Options of {@link ProcessServerApi}. */
export interface ProcessServerApiOptions {
  host: string;
  /** @default 9443 */
  port?: number;
  /** Name the process server's certificate must carry. @default host */
  servername?: string;
  /** The vault CA's certificate (PEM): the process server's certificate must chain to it. */
  ca: string | Buffer;
  /** This agent's client certificate and key; absent before registration. */
  cert?: string | Buffer;
  key?: string | Buffer;
  /** This agent's vault token, relayed by the process server for its own vault calls. */
  token?: string;
  /** @default 15000 */
  timeoutMs?: number;
}

/**
 * The agent's client of its process server's HTTPS routes, on the same mTLS port as the
 * replication stream (ALPN `http/1.1` tells them apart). The agent talks to nothing else.
 */
export class ProcessServerApi {
  constructor(private readonly options: ProcessServerApiOptions) {}

  /** Where it goes, for messages. */
  get address(): string {
    return `${this.options.host}:${this.options.port ?? 9443}`;
  }

  /** A client with other credentials (after registration or a renewal). */
  with(changes: Partial<ProcessServerApiOptions>): ProcessServerApi {
    return new ProcessServerApi({ ...this.options, ...changes });
  }

  /** Calls a route; an error answer becomes a LifeboatError with the process server's (or vault's) code. */
  call<T>(method: string, path: string, body?: unknown): Promise<T> {
    const o = this.options;
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const servername = o.servername ?? o.host;
    return new Promise<T>((resolve, reject) => {
      // node passes TLS options through to tls.connect; ALPN is not in the https typings.
      const options: RequestOptions & { ALPNProtocols: string[] } = {
        host: o.host,
        port: o.port ?? 9443,
        method,
        path,
        ca: o.ca,
        ...(o.cert !== undefined ? { cert: o.cert } : {}),
        ...(o.key !== undefined ? { key: o.key } : {}),
        // The certificate is checked against this name; SNI must not carry an address.
        ...(isIP(servername) === 0 ? { servername } : {}),
        // node checks `host` by default; the process server may be reached by another name.
        checkServerIdentity: (_host, cert) => checkServerIdentity(servername, cert),
        ALPNProtocols: ['http/1.1'],
        minVersion: 'TLSv1.3',
        agent: false,
        timeout: o.timeoutMs ?? 15_000,
        headers: {
          accept: 'application/json',
          ...(o.token !== undefined ? { authorization: `Bearer ${o.token}` } : {}),
          ...(payload !== undefined
            ? { 'content-type': 'application/json', 'content-length': String(payload.length) }
            : {}),
        },
      };
      const req = request(options, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('error', (err) => reject(unreachable(this.address, path, err)));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let parsed: unknown = {};
          try {
            parsed = text === '' ? {} : JSON.parse(text);
          } catch {
            parsed = { message: text };
          }
          const status = res.statusCode ?? 0;
          if (status >= 200 && status < 300) return resolve(parsed as T);
          const e = parsed as {
            code?: string;
            message?: string;
            details?: Record<string, unknown>;
          };
          reject(
            new LifeboatError(
              e.code ?? 'LB_AGENT_PS_ERROR',
              e.message ?? `The process server answered ${method} ${path} with HTTP ${status}.`,
              { details: { status, path, ...(e.details ?? {}) } },
            ),
          );
        });
      });
      req.on('timeout', () => req.destroy(new Error('no answer in time')));
      req.on('error', (err) => reject(unreachable(this.address, path, err)));
      req.end(payload);
    });
  }
}

function unreachable(address: string, path: string, err: unknown): LifeboatError {
  return new LifeboatError(
    'LB_AGENT_PS_UNREACHABLE',
    `Cannot reach the process server at ${address} (${path}): ${(err as Error).message}. Check --process-server, that it runs, and that its certificate is from the CA given with --ca.`,
    { cause: err, details: { processServer: address, path } },
  );
}
