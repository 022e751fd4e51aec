import { execFile } from 'node:child_process';
import { access, mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { chromium, type BrowserContext } from 'playwright-core';

/** The repository's root (for the built portal and `.test-results`). */
export const REPO_ROOT = join(import.meta.dirname, '..', '..', '..');

/** Debian's Chromium, which the tests drive (scripts/install-deps.sh installs it). */
export const CHROMIUM = '/usr/bin/chromium';

/**
 * Builds the portal into packages/web/dist when it is missing (the test command builds it in
 * scripts/install-deps.sh; this covers running one test file on a fresh checkout).
 */
export async function ensurePortalBuilt(): Promise<void> {
  const index = join(REPO_ROOT, 'packages', 'web', 'dist', 'index.html');
  try {
    await access(index);
    return;
  } catch {
    // Build below.
  }
  const vite = join(REPO_ROOT, 'node_modules', 'vite', 'bin', 'vite.js');
  await promisify(execFile)(
    process.execPath,
    [vite, 'build', 'packages/web', '--logLevel', 'warn'],
    {
      cwd: REPO_ROOT,
      timeout: 180_000,
    },
  );
}

/**
 * Launches headless Chromium with a fresh profile in a temporary directory and the flags that
 * keep it from reaching the network on its own; the context has a 1280x800 viewport.
 */
export async function launchChromium(): Promise<{ context: BrowserContext; profile: string }> {
  const profile = await mkdtemp(join(tmpdir(), 'lifeboat-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    viewport: { width: 1280, height: 800 },
    timeout: 60_000,
  });
  return { context, profile };
}
