#!/usr/bin/env bash
# Runs pjdfstest (crates.io runner) against a volfs mount made by a fresh daemon on a
# temporary data dir. Exits non-zero on any failure. Always unmounts and stops the daemon.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$here/target}
bin=$target/debug
tmp=$(mktemp -d /tmp/volfs-pjd.XXXXXX)
# pjdfstest runs steps as other users, who must be able to reach the mountpoint.
chmod 0755 "$tmp"
daemon=""
cleanup() {
  set +e
  grep -E " fuse(\.volfs)? " /proc/self/mounts | awk '{print $2}' | grep "^$tmp" | sort -r | while read -r m; do umount -l "$m"; done
  if [ -n "$daemon" ]; then kill "$daemon" 2>/dev/null; wait "$daemon" 2>/dev/null; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
getent group tests >/dev/null || groupadd tests
id tests >/dev/null 2>&1 || useradd -g tests -M -N -s /usr/sbin/nologin tests
mkdir -p "$tmp/data" "$tmp/run" "$tmp/mnt"
RUST_LOG=warn "$bin/volfs-mountd" --data-dir "$tmp/data" --run-dir "$tmp/run" --socket "$tmp/run/volfs.sock" --plugin-socket "" --metrics-listen "" 2>"$tmp/daemon.log" &
daemon=$!
for _ in $(seq 100); do [ -S "$tmp/run/volfs.sock" ] && break; sleep 0.1; done
export VOLFS_SOCKET=$tmp/run/volfs.sock
"$bin/volfs" volume create pjd >/dev/null
"$bin/volfs" mount pjd "$tmp/mnt"
chmod 0777 "$tmp/mnt"
cd "$tmp/mnt"
set +e
pjdfstest -c "$here/tests/pjdfstest.toml" -p "$tmp/mnt" 2>&1 | tee "$tmp/pjd.out"
rc=${PIPESTATUS[0]}
set -e
cd /
summary=$(grep -E "^Summary:" "$tmp/pjd.out" | tail -1)
if [ "$rc" -ne 0 ] || ! echo "$summary" | grep -q "Summary: 0 failed"; then
  echo "pjdfstest: FAILED (daemon log follows)"
  tail -50 "$tmp/daemon.log"
  exit 1
fi
passed=$(echo "$summary" | sed -E 's/.* ([0-9]+) passed.*/\1/')
skipped=$(echo "$summary" | sed -E 's/.* ([0-9]+) skipped.*/\1/')
echo "pjdfstest: $passed passed, 0 failed, $skipped skipped"
