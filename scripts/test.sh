#!/usr/bin/env bash
# The test command: installs what is needed, then runs type check, lint, format check and every
# test (unit and integration, with the real QEMU, Azurite and PostgreSQL they start themselves).
# Ends with the line "N passed, N failed, N skipped".
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/node_modules/.bin:$PATH"
bash scripts/install-deps.sh || { echo "0 passed, 1 failed"; exit 1; }

failed_checks=0
run_check() {
  local name=$1; shift
  echo "== $name"
  if "$@"; then echo "ok: $name"; else echo "FAILED: $name"; failed_checks=$((failed_checks + 1)); fi
}
run_check "type check" tsc -b
run_check "type check (bench)" tsc -p bench/tsconfig.json
run_check "lint" eslint . --max-warnings=0
run_check "format" prettier --check . --log-level=warn

mkdir -p .test-results
echo "== tests"
vitest run --reporter=default --reporter=json --outputFile.json=.test-results/vitest.json "$@"
vitest_rc=$?
node scripts/summarize-tests.mjs .test-results/vitest.json "$failed_checks" "$vitest_rc"
