#!/usr/bin/env bash
# Runs fstests against volfs. Expects an xfstests checkout that you built yourself
# (git clone of kdave/xfstests, `make`), given as XFSTESTS_DIR, and volfs built
# (scripts/setup.sh, or CARGO_TARGET_DIR with debug binaries).
#   sudo XFSTESTS_DIR=/path/to/xfstests xfstests/run.sh [TESTS...]   (default: the lock tests)
# It starts a private volfs-mountd with plain "fuse" mounts (fstests requires that type),
# installs /sbin/mount.fuse.volfs for the run, and removes it and all mounts afterwards.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
: "${XFSTESTS_DIR:?set XFSTESTS_DIR to a built xfstests checkout}"
target=${CARGO_TARGET_DIR:-/var/cache/volfs-target}
bin=$target/debug
[ -x "$bin/volfs-mountd" ] || bin=$target/release
tmp=$(mktemp -d /tmp/volfs-fstests.XXXXXX)
daemon=""
cleanup() {
  set +e
  for m in $(awk '$2 ~ "^/mnt/volfs-xfstests|^'"$tmp"'" {print $2}' /proc/self/mounts | sort -r); do umount -l "$m"; done
  [ -n "$daemon" ] && kill "$daemon" && wait "$daemon"
  rm -f /sbin/mount.fuse.volfs
  rm -rf "$tmp"
}
trap cleanup EXIT
# Users and groups fstests expects: each user with a group of the same name as its primary
# group (tests chown to fsgqa:fsgqa and expect the user to be in it) and a home directory
# (su warns "cannot change directory" into the test output otherwise).
for u in fsgqa 123456-fsgqa fsgqa2; do
  getent group "$u" >/dev/null || groupadd "$u"
  if ! id "$u" >/dev/null 2>&1; then useradd -m -g "$u" "$u"; elif [ "$(id -gn "$u")" != "$u" ]; then usermod -g "$u" "$u"; fi
  home=$(getent passwd "$u" | cut -d: -f6)
  [ -d "$home" ] || { mkdir -p "$home" && chown "$u:$u" "$home"; }
done
mkdir -p /mnt/volfs-xfstests "$tmp/data" "$tmp/run"
# The daemon mounts each volume's FUSE connection at <run dir>/mnt/<volume> with the volume
# name as its source, and every mountpoint is a bind mount of it with the same source. fstests
# (_check_if_dev_already_mounted: findmnt -S $TEST_DEV) aborts when the device shows up on any
# mount besides TEST_DIR/SCRATCH_MNT, so hide the connections: the daemon runs in its own mount
# namespace, its run dir is a private tmpfs (connections mounted there stay in that namespace),
# and /mnt/volfs-xfstests is a shared mount, so the bind mounts the daemon makes under it show
# up here and a plain umount here reaches the daemon's namespace.
mount -t tmpfs -o mode=0755 volfs-fstests-run "$tmp/run"
mount --make-private "$tmp/run"
mount --bind /mnt/volfs-xfstests /mnt/volfs-xfstests
mount --make-shared /mnt/volfs-xfstests
mkdir -p /mnt/volfs-xfstests/test /mnt/volfs-xfstests/scratch
export VOLFS_SOCKET=$tmp/run/volfs.sock VOLFS_FUSE_SUBTYPE=false
unshare --mount --propagation unchanged -- \
  "$bin/volfs-mountd" --data-dir "$tmp/data" --run-dir "$tmp/run" --plugin-socket "" --metrics-listen "" 2>"$tmp/daemon.log" &
daemon=$!
for _ in $(seq 100); do [ -S "$VOLFS_SOCKET" ] && break; sleep 0.1; done
[ -S "$VOLFS_SOCKET" ] || { echo "volfs-mountd did not start:" >&2; cat "$tmp/daemon.log" >&2; exit 1; }
# Create the TEST_DEV and SCRATCH_DEV volumes up front. mount(8) strips x-* options (they are
# userspace-only in libmount) before it runs /sbin/mount.fuse.volfs, so "-o x-volfs.create"
# never reaches the helper.
for v in xfstests-test xfstests-scratch; do "$bin/volfs" volume create "$v" >/dev/null; done
install -m 0755 "$bin/mount-volfs" /sbin/mount.fuse.volfs
cp "$here/local.config" "$XFSTESTS_DIR/local.config"
cd "$XFSTESTS_DIR"
if [ $# -eq 0 ]; then
  # Locking: POSIX record locks, OFD locks, flock, lock/unlock races.
  set -- generic/131 generic/478 generic/504 generic/571
fi
./check -E "$here/exclude" "$@"
