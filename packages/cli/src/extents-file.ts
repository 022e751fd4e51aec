import { readFile } from 'node:fs/promises';
import { LifeboatError } from '@lifeboat/protocol/errors';
import type { ByteRange } from './byte-ranges.js';
import { mergeRanges } from './byte-ranges.js';

const NUMBER = /^(?:0x[0-9a-f]+|\d+)$/i;

function parseNumber(text: string): number | undefined {
  if (!NUMBER.test(text)) return undefined;
  const n = Number(text);
  return Number.isSafeInteger(n) ? n : undefined;
}

/**
 * Parses a changed-extents list: one `OFFSET LENGTH` pair per line, in bytes (decimal or 0x
 * hex), blank lines and `#` comments allowed. Every range must lie within `diskSize`. Returns
 * the ranges sorted and merged. A bad line is LB_CLI_BAD_EXTENTS naming the line.
 */
export function parseExtents(text: string, diskSize: number, source = 'extents'): ByteRange[] {
  const ranges: ByteRange[] = [];
  const lines = text.split(/\r?\n/);
  lines.forEach((raw, i) => {
    const line = raw.replace(/#.*/, '').trim();
    if (line === '') return;
    const bad = (why: string): LifeboatError =>
      new LifeboatError(
        'LB_CLI_BAD_EXTENTS',
        `${source} line ${i + 1} ("${raw.trim()}"): ${why}. Each line must be "OFFSET LENGTH" in bytes within the disk's ${diskSize} bytes.`,
        { details: { file: source, line: i + 1, text: raw } },
      );
    const fields = line.split(/[\s,]+/);
    if (fields.length !== 2) throw bad(`expected 2 numbers, found ${fields.length} fields`);
    const offset = parseNumber(fields[0] as string);
    const length = parseNumber(fields[1] as string);
    if (offset === undefined) throw bad(`offset "${fields[0]}" is not a whole number`);
    if (length === undefined) throw bad(`length "${fields[1]}" is not a whole number`);
    if (length === 0) throw bad('length is 0');
    if (offset + length > diskSize) {
      throw bad(`range ends at ${offset + length}, past the end of the disk`);
    }
    ranges.push({ offset, length });
  });
  return mergeRanges(ranges);
}

/** Reads and parses a changed-extents file (see {@link parseExtents}). */
export async function readExtentsFile(path: string, diskSize: number): Promise<ByteRange[]> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (cause) {
    throw new LifeboatError(
      'LB_CLI_BAD_EXTENTS',
      `Cannot read the changed-extents file ${path}: ${(cause as Error).message}.`,
      { cause, details: { file: path } },
    );
  }
  return parseExtents(text, diskSize, path);
}
