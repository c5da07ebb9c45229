#!/usr/bin/env bash
# The whole volfs test suite: formatting, lints, unit tests, integration tests against real
# FUSE mounts and daemons, and pjdfstest on a volfs mount. Run as root on Debian:
#   sudo scripts/test.sh
# It installs what it needs (Debian packages, pjdfstest) and leaves no mounts behind.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/volfs-target}
export CARGO_TERM_COLOR=never
scripts/deps.sh
command -v pjdfstest >/dev/null 2>&1 || cargo install pjdfstest --version 0.2.2 --locked
export PATH=$HOME/.cargo/bin:$PATH

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== build"
cargo build --workspace
echo "== unit and integration tests"
cargo test --workspace -- --test-threads=2
echo "== pjdfstest"
scripts/pjdfstest.sh
echo "== Debian package"
packaging/build-deb.sh >/dev/null
deb=$(ls -t "$CARGO_TARGET_DIR"/debian/volfs_*.deb | head -1)
dpkg -i "$deb" >/dev/null
/usr/bin/volfs --version
test -x /sbin/mount.volfs
test -f /usr/share/doc/volfs/grafana/volfs.json
dpkg -r volfs >/dev/null
echo "deb: $(basename "$deb") installs and runs"
