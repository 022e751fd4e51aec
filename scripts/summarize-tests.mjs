// Prints the closing line "N passed, N failed, N skipped" from vitest's JSON report, counting
// each failed check (type check, lint, format) and a crashed test run as one failure.
import { readFileSync } from 'node:fs';

const [file, failedChecksArg = '0', vitestRcArg = '0'] = process.argv.slice(2);
let passed = 0;
let failed = Number(failedChecksArg);
let skipped = 0;
try {
  const report = JSON.parse(readFileSync(file, 'utf8'));
  passed = report.numPassedTests;
  failed += report.numFailedTests;
  skipped = report.numPendingTests + report.numTodoTests;
  // A suite that failed to load has no failed tests of its own; count it so it cannot hide.
  failed += report.testResults.filter(
    (r) => r.status === 'failed' && r.assertionResults.length === 0,
  ).length;
} catch {
  failed += 1;
}
if (Number(vitestRcArg) !== 0 && failed === 0) failed = 1;
console.log(`${passed} passed, ${failed} failed, ${skipped} skipped`);
process.exit(failed === 0 ? 0 : 1);
