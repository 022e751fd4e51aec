/** A user role; each includes the rights of the ones before it. */
export type Role = 'viewer' | 'operator' | 'admin';

/** Who is calling: a user (with a role) or a registered component. */
export type Principal =
  | { type: 'user'; id: string; name: string; role: Role; tokenId: string }
  | { type: 'component'; id: string; name: string; kind: ComponentKind; tokenId: string }
  | { type: 'system'; id: 'system'; name: string };

/** Kinds of registered components. */
export type ComponentKind = 'process-server' | 'recovery-host' | 'agent';

/** The vault itself (scheduler, job runner), as an actor in the audit log. */
export const SYSTEM: Principal = { type: 'system', id: 'system', name: 'vault' };

const RANK: Record<Role, number> = { viewer: 0, operator: 1, admin: 2 };

/** True when `role` has at least the rights of `needed`. */
export function roleAtLeast(role: Role, needed: Role): boolean {
  return RANK[role] >= RANK[needed];
}
