import { readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

const root = join(import.meta.dirname, '..', '..', '..');

function sourceFiles(dir: string): string[] {
  const out: string[] = [];
  for (const name of readdirSync(dir)) {
    if (name === 'node_modules' || name === 'dist') continue;
    const path = join(dir, name);
    if (statSync(path).isDirectory()) out.push(...sourceFiles(path));
    else if (/\.(ts|tsx)$/.test(name) && !/\.test\.tsx?$/.test(name)) out.push(path);
  }
  return out;
}

describe('error catalogue', () => {
  it('documents every error code used in the sources in docs/errors.md', () => {
    const doc = readFileSync(join(root, 'docs', 'errors.md'), 'utf8');
    const documented = new Set(doc.match(/LB_[A-Z0-9_]+/g) ?? []);
    const used = new Set<string>();
    for (const file of sourceFiles(join(root, 'packages'))) {
      for (const code of readFileSync(file, 'utf8').match(/'LB_[A-Z0-9_]+'/g) ?? []) {
        used.add(code.slice(1, -1));
      }
    }
    const missing = [...used].filter((c) => !documented.has(c)).sort();
    expect(missing, `codes missing from docs/errors.md: ${missing.join(', ')}`).toEqual([]);
  });
});
