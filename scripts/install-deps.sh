#!/usr/bin/env bash
# Installs what Lifeboat needs on a fresh Debian machine: Debian packages (only those missing,
# saying which) and the npm packages, then builds the TypeScript. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/node_modules/.bin:$PATH"

# Debian packages: QEMU for the recovery host and agent tests, restic for the benchmarks'
# reference, PostgreSQL for the vault's second database, Chromium for the portal tests.
DEBS=(qemu-utils qemu-system-x86 qemu-block-extra nbdkit libnbd-bin restic busybox-static
  e2fsprogs postgresql chromium zstd iproute2 procps genisoimage cloud-init)
missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "lifeboat: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -d node_modules ]; then
  echo "lifeboat: installing npm packages (native addons build from source; first time takes a few minutes)"
  npm ci --no-audit --no-fund --loglevel=error
elif [ package-lock.json -nt node_modules/.package-lock.json ]; then
  # Never `npm ci` over an existing node_modules: it deletes it first, which breaks every other
  # process using this tree (tests, a running `lifeboat up`) until it is done. `npm install`
  # brings it in line with the lock in place; the lock file serialises concurrent installs.
  echo "lifeboat: updating npm packages to package-lock.json"
  flock /tmp/lifeboat-npm.lock npm install --no-audit --no-fund --loglevel=error
fi
echo "lifeboat: building"
tsc -b
# The portal (React, packages/web) is bundled by Vite into packages/web/dist; the vault serves it.
vite build packages/web --logLevel warn
