import { describe, expect, it } from 'vitest';
import { isLifeboatError } from '@lifeboat/protocol';
import { parseExtents } from './extents-file.js';

function errorOf(fn: () => unknown): unknown {
  try {
    fn();
  } catch (err) {
    return err;
  }
  throw new Error('expected an error');
}

describe('parseExtents', () => {
  it('reads pairs, comments, hex and blank lines, and merges overlaps', () => {
    const text = '# changed\n0 4096\n\n0x1000 4096   # touching\n65536\t512\n';
    expect(parseExtents(text, 1 << 20)).toEqual([
      { offset: 0, length: 8192 },
      { offset: 65536, length: 512 },
    ]);
  });

  it.each([
    ['0 4096\n12 abc\n', 2, 'length "abc"'],
    ['1 2 3\n', 1, 'expected 2 numbers'],
    ['0\n', 1, 'expected 2 numbers'],
    ['-5 10\n', 1, 'offset "-5"'],
    ['0 0\n', 1, 'length is 0'],
    ['\n\n1048000 1000\n', 3, 'past the end'],
    ['1e3 10\n', 1, 'offset "1e3"'],
  ])('rejects %j naming line %i', (text, line, why) => {
    const err = errorOf(() => parseExtents(text, 1 << 20, 'changes.txt'));
    expect(isLifeboatError(err, 'LB_CLI_BAD_EXTENTS')).toBe(true);
    expect((err as Error).message).toContain(`changes.txt line ${line}`);
    expect((err as Error).message).toContain(why);
  });
});
