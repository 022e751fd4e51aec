#!/usr/bin/env bash
# The README's first command: installs what is missing, then runs Lifeboat's main job on
# embedded defaults (a directory store under .lifeboat/demo): import a disk image, import 1% of
# changes from their extent list, list points, show stats, verify, restore and compare.
# Later sessions grow this into `lifeboat up --demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/node_modules/.bin:$PATH"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "Installing what is missing (Debian and npm packages) and building"
bash scripts/install-deps.sh

DATA=.lifeboat/demo
STORE="$DATA/store"
PASSFILE="$DATA/store-passphrase"
IMAGE="$DATA/disk.raw"
mkdir -p "$DATA"
chmod 700 "$DATA"
export LIFEBOAT_STORE="$STORE"
LB=(node packages/cli/bin/lifeboat.js --passphrase-file "$PASSFILE")
lifeboat() { printf '$ lifeboat %s\n' "$*"; "${LB[@]}" "$@"; }

if [ -e "$STORE" ] && [ -n "$(ls -A "$STORE" 2>/dev/null)" ]; then
  if [ ! -s "$PASSFILE" ]; then
    echo "error: the demo store $STORE exists but its passphrase file $PASSFILE is missing." >&2
    echo "Without the passphrase the store cannot be read, and a new store is never created over it." >&2
    echo "Restore $PASSFILE, or move $STORE away to start over." >&2
    exit 1
  fi
  step "Using the existing demo store $STORE (passphrase in $PASSFILE)"
else
  step "Creating a store in $STORE with a random passphrase in $PASSFILE (mode 0600)"
  (umask 077 && node -e "process.stdout.write(require('crypto').randomBytes(24).toString('base64url') + '\n')" >"$PASSFILE")
  lifeboat store init
fi

step "Making a 256 MiB disk image with an ext4 file system ($IMAGE)"
rm -f "$IMAGE" "$DATA/restored.raw"
CONTENT="$(mktemp -d)"
trap 'rm -rf "$CONTENT"' EXIT
cp -r node_modules/typescript/lib "$CONTENT/typescript"
head -c 16M /dev/urandom >"$CONTENT/random.bin"
run mke2fs -q -t ext4 -d "$CONTENT" "$IMAGE" 256M

step "Importing the image: only allocated, non-zero data is read; chunks are deduplicated, compressed and encrypted"
lifeboat store import "$IMAGE" --disk vda --machine demo-vm

step "Changing 1% of the disk's 64 KiB chunks at random, and listing them as changed extents"
CHUNKS=$(($(stat -c %s "$IMAGE") / 65536))
: >"$DATA/changed-extents.txt"
for _ in $(seq $((CHUNKS / 100))); do
  n=$((RANDOM % CHUNKS))
  dd if=/dev/urandom of="$IMAGE" bs=65536 seek="$n" count=1 conv=notrunc status=none
  echo "$((n * 65536)) 65536" >>"$DATA/changed-extents.txt"
done
echo "$(wc -l <"$DATA/changed-extents.txt") chunks changed; extents in $DATA/changed-extents.txt"

step "Importing only the changed extents: a new point on top of the previous one"
lifeboat store import "$IMAGE" --disk vda --machine demo-vm --changed-extents "$DATA/changed-extents.txt"

step "Recovery points"
lifeboat store points --machine demo-vm

step "Store figures"
lifeboat store stats

step "Verifying every object of the store"
lifeboat store verify

step "Restoring the latest point and comparing it with the image"
lifeboat store restore latest "$DATA/restored.raw" --machine demo-vm --disk vda
run cmp "$IMAGE" "$DATA/restored.raw"
echo "identical: the latest point restores byte for byte"

step "Done"
echo "The store is in $STORE, its passphrase in $PASSFILE. Try:"
echo "  LIFEBOAT_STORE=$STORE npx lifeboat --passphrase-file $PASSFILE store points"
