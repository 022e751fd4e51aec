import { LifeboatError } from '@lifeboat/protocol/errors';
import type { PointInfo, StoreApi } from '@lifeboat/store';

/**
 * Finds the point a user means: a full id, a unique id prefix (at least 4 characters, as
 * shown by `store points`), or `latest` (the newest point, narrowed by machine and disk).
 */
export async function resolvePoint(
  store: StoreApi,
  ref: string,
  filter: { machine?: string; disk?: string } = {},
): Promise<PointInfo> {
  if (ref === 'latest') {
    const points = await store.listPoints(filter);
    const disks = new Set(points.map((p) => `${p.machine}/${p.disk}`));
    if (points.length === 0) {
      throw new LifeboatError('LB_CLI_POINT_NOT_FOUND', 'The store has no matching point.', {
        details: { ref, ...filter },
      });
    }
    if (disks.size > 1) {
      throw new LifeboatError(
        'LB_CLI_AMBIGUOUS_POINT',
        `"latest" is ambiguous: the store holds ${disks.size} disks (${[...disks].slice(0, 5).join(', ')}). Add --machine and --disk.`,
        { details: { ref, disks: [...disks] } },
      );
    }
    return points.reduce((a, b) => (b.time.getTime() >= a.time.getTime() ? b : a));
  }
  if (!/^[0-9a-f]{4,}$/i.test(ref)) {
    throw new LifeboatError(
      'LB_CLI_POINT_NOT_FOUND',
      `"${ref}" is not a point id. Give an id (or its first characters) from "lifeboat store points", or "latest".`,
      { details: { ref } },
    );
  }
  const lower = ref.toLowerCase();
  const matches = (await store.listPoints(filter)).filter((p) =>
    p.id.toLowerCase().startsWith(lower),
  );
  if (matches.length === 1) return matches[0] as PointInfo;
  if (matches.length === 0) {
    throw new LifeboatError(
      'LB_CLI_POINT_NOT_FOUND',
      `No point has an id starting with ${ref}. List them with "lifeboat store points".`,
      { details: { ref } },
    );
  }
  throw new LifeboatError(
    'LB_CLI_AMBIGUOUS_POINT',
    `${matches.length} points have ids starting with ${ref}. Give more characters.`,
    { details: { ref, matches: matches.map((p) => p.id) } },
  );
}
