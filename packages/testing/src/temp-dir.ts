import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** A private temporary directory that removes itself. */
export interface TempDir {
  /** Absolute path of the directory. */
  readonly path: string;
  /** Removes the directory and everything in it; safe to call twice. */
  remove(): Promise<void>;
}

/**
 * Creates a fresh private directory under the OS temp dir. Names are random (mkdtemp) because
 * several engineers and CI jobs run tests on one machine at once: a fixed path would collide.
 */
export async function makeTempDir(prefix = 'lifeboat-'): Promise<TempDir> {
  const path = await mkdtemp(join(tmpdir(), prefix));
  return {
    path,
    remove: () => rm(path, { recursive: true, force: true, maxRetries: 3 }),
  };
}

/** Runs `fn` with a fresh temporary directory and removes it afterwards, also on failure. */
export async function withTempDir<T>(
  fn: (path: string) => Promise<T>,
  prefix = 'lifeboat-',
): Promise<T> {
  const dir = await makeTempDir(prefix);
  try {
    return await fn(dir.path);
  } finally {
    await dir.remove();
  }
}
