import { defaultServerConditions } from 'vite';
import { defineConfig } from 'vitest/config';

// Tests import each package's TypeScript sources directly through the "source" export
// condition (see each package.json), so no build is needed between an edit and a test run.
// 'module' is left out: vitest passes these conditions to Node (--conditions) in its worker
// processes, and packages such as @opentelemetry/api (required by prom-client) map 'module' to a
// bundler-only ESM build that Node cannot load.
const conditions = ['source', ...defaultServerConditions.filter((c) => c !== 'module')];

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
