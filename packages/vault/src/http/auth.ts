import type { TLSSocket } from 'node:tls';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { LifeboatError } from '@lifeboat/protocol';
import { hashToken, nowIso } from '../ids.js';
import {
  roleAtLeast,
  type ComponentKind,
  type Principal,
  type Role,
} from '../services/principal.js';
import type { VaultContext } from '../vault-context.js';

/**
 * Who may call a route: `public` (no token), a minimum user role, `component` (a registered
 * process server, recovery host or agent), or a list of those (any one suffices).
 */
export type Access = 'public' | Role | 'component' | Array<Role | 'component'>;

declare module 'fastify' {
  interface FastifyContextConfig {
    access?: Access;
  }
  interface FastifyRequest {
    principal?: Principal;
  }
}

/**
 * Recently resolved bearer tokens (hash → principal), so a busy dashboard does not cost two
 * queries per request. Entries live `ttlMs`; this instance clears them on every logout,
 * revocation, user or component change, so only another instance's changes wait for the TTL.
 */
export class AuthCache {
  private readonly entries = new Map<
    string,
    { principal: Principal; until: number; tokenExpiresAt: string | null }
  >();

  constructor(private readonly ttlMs: number) {}

  get(
    hash: string,
    now: number,
  ): { principal: Principal; tokenExpiresAt: string | null } | undefined {
    const e = this.entries.get(hash);
    if (e === undefined || e.until < now) return undefined;
    return e;
  }

  set(hash: string, principal: Principal, tokenExpiresAt: string | null, now: number): void {
    if (this.ttlMs <= 0) return;
    if (this.entries.size > 10_000) this.entries.clear();
    this.entries.set(hash, { principal, tokenExpiresAt, until: now + this.ttlMs });
  }

  /** Forgets every cached token (after any change to tokens, users or components). */
  clear(): void {
    this.entries.clear();
  }
}

/**
 * Over HTTPS, a component's client certificate (when presented, or always with
 * requireComponentCertificates) must be signed by the vault's CA and name the component whose
 * token is used: a stolen token is useless without the matching key. One exception: agents
 * reach the vault only through their process server, which relays their calls (heartbeats,
 * certificate renewals) with its own certificate; that is accepted for an agent of a source
 * host the process server serves (or an agent not yet given a host).
 */
async function checkClientCertificate(
  request: FastifyRequest,
  principal: Extract<Principal, { type: 'component' }>,
  vault: VaultContext,
): Promise<void> {
  const componentId = principal.id;
  const socket = request.raw.socket as TLSSocket;
  if (typeof socket.getPeerCertificate !== 'function') return; // plain HTTP
  const peer = socket.getPeerCertificate();
  const presented = peer !== null && Object.keys(peer).length > 0;
  if (!presented) {
    if (vault.options.requireComponentCertificates) {
      throw new LifeboatError(
        'LB_VAULT_CLIENT_CERTIFICATE',
        'This vault requires components to present their client certificate (from registration). Configure the certificate and key.',
      );
    }
    return;
  }
  const cn = peer.subject?.CN;
  if (socket.authorized && cn === componentId) return;
  if (socket.authorized && principal.kind === 'agent' && typeof cn === 'string') {
    if (await relaysFor(vault, cn, componentId)) return;
  }
  throw new LifeboatError(
    'LB_VAULT_CLIENT_CERTIFICATE',
    `The client certificate ${socket.authorized ? `names ${String(cn)}, not the token's component ${componentId}` : `is not signed by this vault's CA (${String(socket.authorizationError)})`}. Use the certificate issued at registration.`,
    { details: { componentId, subject: cn ?? null } },
  );
}

/** True when `relayId` is a process server that may relay the calls of agent `agentId`. */
async function relaysFor(vault: VaultContext, relayId: string, agentId: string): Promise<boolean> {
  const relay = await vault.db
    .selectFrom('components')
    .select(['kind'])
    .where('id', '=', relayId)
    .executeTakeFirst();
  if (relay?.kind !== 'process-server') return false;
  const hosts = await vault.db
    .selectFrom('sourceHosts')
    .select(['processServerId'])
    .where('agentId', '=', agentId)
    .execute();
  return hosts.length === 0 || hosts.some((h) => h.processServerId === relayId);
}

/** The caller of an authenticated route (routes with access other than public). */
export function principalOf(request: FastifyRequest): Principal {
  const p = request.principal;
  if (p === undefined) {
    throw new LifeboatError(
      'LB_VAULT_UNAUTHENTICATED',
      'Log in first (Authorization: Bearer <token>).',
    );
  }
  return p;
}

function allowed(principal: Principal, access: Exclude<Access, 'public'>): boolean {
  const options = Array.isArray(access) ? access : [access];
  return options.some((a) =>
    a === 'component'
      ? principal.type === 'component'
      : principal.type === 'user' && roleAtLeast(principal.role, a),
  );
}

/**
 * Bearer authentication and role checks for every route. The default is `viewer` for GET and
 * `admin` for everything else, so a route that forgets to say is closed rather than open.
 */
export function installAuth(app: FastifyInstance, vault: VaultContext): void {
  // lastUsedAt is written at most once a minute per token: a write per request would make
  // every read a write.
  const lastTouched = new Map<string, number>();
  app.addHook('onRequest', async (request) => {
    const configured = request.routeOptions.config?.access;
    const url = request.routeOptions.url;
    // Unknown routes get the 404 handler; the browsable API page (its assets) is public.
    if (url === undefined || url === '/api/docs' || url.startsWith('/api/docs/')) return;
    const access: Access = configured ?? (request.method === 'GET' ? 'viewer' : 'admin');
    if (access === 'public') return;
    const header = request.headers.authorization;
    const match = header === undefined ? null : /^Bearer\s+(\S+)$/i.exec(header);
    if (match === null || match[1] === undefined) {
      throw new LifeboatError(
        'LB_VAULT_UNAUTHENTICATED',
        'This request needs a token: log in (POST /api/auth/login) or create an API token, and send "Authorization: Bearer <token>".',
      );
    }
    const hash = hashToken(match[1]);
    const now = new Date();
    const cached = vault.authCache.get(hash, now.getTime());
    let principal: Principal | undefined = cached?.principal;
    if (
      cached !== undefined &&
      cached.tokenExpiresAt !== null &&
      cached.tokenExpiresAt < nowIso(now)
    ) {
      principal = undefined;
    }
    if (cached === undefined) {
      const token = await vault.db
        .selectFrom('tokens')
        .selectAll()
        .where('tokenHash', '=', hash)
        .executeTakeFirst();
      if (token === undefined || (token.expiresAt !== null && token.expiresAt < nowIso(now))) {
        throw new LifeboatError(
          'LB_VAULT_UNAUTHENTICATED',
          'The token is unknown, revoked or expired. Log in again or create a new API token.',
        );
      }
      if (token.userId !== null) {
        const user = await vault.db
          .selectFrom('users')
          .select(['id', 'username', 'role', 'disabled'])
          .where('id', '=', token.userId)
          .executeTakeFirst();
        if (user !== undefined && user.disabled === 0) {
          principal = {
            type: 'user',
            id: user.id,
            name: user.username,
            role: user.role as Role,
            tokenId: token.id,
          };
        }
      } else if (token.componentId !== null) {
        const component = await vault.db
          .selectFrom('components')
          .select(['id', 'name', 'kind'])
          .where('id', '=', token.componentId)
          .executeTakeFirst();
        if (component !== undefined) {
          principal = {
            type: 'component',
            id: component.id,
            name: component.name,
            kind: component.kind as ComponentKind,
            tokenId: token.id,
          };
        }
      }
      if (principal !== undefined)
        vault.authCache.set(hash, principal, token.expiresAt, now.getTime());
    }
    if (principal === undefined || principal.type === 'system') {
      throw new LifeboatError(
        'LB_VAULT_UNAUTHENTICATED',
        'The token is expired, or belongs to a disabled user or a removed component. Log in again or ask an admin.',
      );
    }
    const tokenId = principal.tokenId;
    if ((lastTouched.get(tokenId) ?? 0) < now.getTime() - 60_000) {
      lastTouched.set(tokenId, now.getTime());
      await vault.db
        .updateTable('tokens')
        .set({ lastUsedAt: nowIso(now) })
        .where('id', '=', tokenId)
        .execute();
    }
    if (principal.type === 'component') await checkClientCertificate(request, principal, vault);
    request.principal = principal;
    if (!allowed(principal, access)) {
      const needed = Array.isArray(access) ? access.join(' or ') : access;
      throw new LifeboatError(
        'LB_VAULT_FORBIDDEN',
        `${principal.type === 'user' ? `Role ${principal.role}` : principal.type === 'component' ? `A ${principal.kind}` : 'The vault'} may not do this; it needs ${needed}. Ask an admin.`,
        { details: { needed: access, method: request.method, route: request.routeOptions.url } },
      );
    }
  });
}
