import { defaultServerConditions } from 'vite';
import { defineConfig } from 'vitest/config';

// Tests import each package's TypeScript sources directly through the "source" export
// condition (see each package.json), so no build is needed between an edit and a test run.
const conditions = ['source', ...defaultServerConditions];

export default defineConfig({
  resolve: { conditions },
  ssr: { resolve: { conditions, externalConditions: ['source'] } },
  test: {
    include: ['packages/*/src/**/*.test.ts'],
    pool: 'forks',
    testTimeout: 60_000,
    hookTimeout: 120_000,
    teardownTimeout: 30_000,
  },
});
