#!/usr/bin/env bash
# The README's first command: installs what is missing (Debian and npm packages, saying which),
# builds, then runs `lifeboat up --demo` on embedded defaults in .lifeboat/: the vault, a
# process server, an agent and a recovery host in one process; a small VM that writes is
# protected with a 5-second policy, its RPO shown live, and a test failover boots and verifies
# its latest point. Lifeboat then keeps running until Ctrl-C so you can look around.
# Extra arguments go to `lifeboat up` (e.g. --data-dir DIR, --listen 127.0.0.1:9440).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/node_modules/.bin:$PATH"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Installing what is missing (Debian and npm packages) and building"
bash scripts/install-deps.sh

# The data directory `lifeboat up` uses unless --data-dir says otherwise.
DATA=.lifeboat
for ((i = 1; i <= $#; i++)); do
  if [ "${!i}" = "--data-dir" ]; then j=$((i + 1)); DATA="${!j:-$DATA}"; fi
done
STORE="$DATA/store"
PASSFILE="$DATA/store-passphrase"
# `lifeboat up` refuses this too (LB_UP_PASSPHRASE_MISSING); saying it here first spares the
# wait for the build of the test image.
if [ -n "$(ls -A "$STORE" 2>/dev/null)" ] && [ ! -s "$PASSFILE" ]; then
  echo "error: the store $STORE exists but its passphrase file $PASSFILE is missing." >&2
  echo "Without the passphrase the store cannot be read, and a new store is never created over it." >&2
  echo "Restore $PASSFILE, or move $STORE away to start over." >&2
  exit 1
fi
if [ -e "$STORE" ]; then
  step "Using the store $STORE (passphrase in $PASSFILE)"
else
  step "lifeboat up creates a store in $STORE with a random passphrase in $PASSFILE (mode 0600)"
fi

step "Running: lifeboat up --demo $*"
exec node packages/cli/bin/lifeboat.js up --demo "$@"
