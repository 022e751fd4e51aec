/**
 * Recovery-site networks as the recovery host, the vault and the portal all name them: one
 * module without dependencies, so the portal's bundle can import it too
 * (`@lifeboat/protocol/networks`).
 */

/**
 * Names of the recovery host's built-in isolated networks: never a bridge, and a declared
 * network cannot take them; a network mapping naming one means "isolated".
 */
export const BUILT_IN_NETWORKS: readonly string[] = ['isolated', 'isolated-user', 'segment'];

/** Whether `name` is one of the {@link BUILT_IN_NETWORKS}. */
export function isBuiltInNetwork(name: string): boolean {
  return BUILT_IN_NETWORKS.includes(name);
}

/**
 * The networks a recovery host reported in its heartbeat's health (`networks: [{ name,
 * present }]`): name -> whether its bridge exists. Anything malformed counts as none.
 */
export function reportedNetworks(health: unknown): Map<string, boolean> {
  const list = (health as { networks?: unknown } | null | undefined)?.networks;
  if (!Array.isArray(list)) return new Map();
  return new Map(
    list
      .filter((n): n is { name: string; present?: unknown } => typeof n?.name === 'string')
      .map((n) => [n.name, n.present !== false]),
  );
}
