import type { PointInfo } from './store-types.js';
import { FormatError } from './object-format.js';

/** A point as stored: its public metadata plus where its tree starts. */
export interface PointRecord {
  info: PointInfo;
  /** Root node id, or null for an all-zero disk. */
  root: Buffer | null;
  /** Levels of tree nodes. */
  height: number;
}

/** Encodes a point object's plaintext (JSON, so it stays readable by any future version). */
export function encodePoint(p: PointRecord): Buffer {
  const i = p.info;
  return Buffer.from(
    JSON.stringify({
      v: 1,
      id: i.id,
      machine: i.machine,
      disk: i.disk,
      time: i.time.toISOString(),
      committedAt: i.committedAt.toISOString(),
      kind: i.kind,
      size: i.size,
      cut: i.cut,
      consistencyGroup: i.consistencyGroup,
      labels: i.labels,
      parent: i.parent,
      root: p.root === null ? null : p.root.toString('hex'),
      height: p.height,
    }),
    'utf8',
  );
}

/** Decodes a point object's plaintext; throws FormatError when a field is wrong. */
export function decodePoint(buf: Buffer, expectedId: string): PointRecord {
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(buf.toString('utf8')) as Record<string, unknown>;
  } catch {
    throw new FormatError('point is not valid JSON');
  }
  if (o['v'] !== 1) throw new FormatError(`point version ${String(o['v'])}`, Number(o['v']));
  const str = (k: string): string => {
    const v = o[k];
    if (typeof v !== 'string') throw new FormatError(`point field ${k} missing`);
    return v;
  };
  const optStr = (k: string): string | undefined => {
    const v = o[k];
    if (v === undefined || v === null) return undefined;
    if (typeof v !== 'string') throw new FormatError(`point field ${k} invalid`);
    return v;
  };
  if (str('id') !== expectedId) throw new FormatError('point id does not match its object name');
  const kind = str('kind');
  if (kind !== 'crash' && kind !== 'app') throw new FormatError(`point kind ${kind}`);
  const size = o['size'];
  const height = o['height'];
  if (typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0)
    throw new FormatError('point size invalid');
  if (typeof height !== 'number' || !Number.isInteger(height) || height < 1)
    throw new FormatError('point height invalid');
  const labels = o['labels'];
  if (typeof labels !== 'object' || labels === null) throw new FormatError('point labels invalid');
  const root = o['root'];
  if (root !== null && (typeof root !== 'string' || !/^[0-9a-f]{64}$/.test(root))) {
    throw new FormatError('point root invalid');
  }
  const info: PointInfo = {
    id: expectedId,
    machine: str('machine'),
    disk: str('disk'),
    time: new Date(str('time')),
    committedAt: new Date(str('committedAt')),
    kind,
    size,
    labels: { ...(labels as Record<string, string>) },
  };
  const cut = optStr('cut');
  const cg = optStr('consistencyGroup');
  const parent = optStr('parent');
  if (cut !== undefined) info.cut = cut;
  if (cg !== undefined) info.consistencyGroup = cg;
  if (parent !== undefined) info.parent = parent;
  return { info, root: root === null ? null : Buffer.from(root, 'hex'), height };
}
