#!/usr/bin/env bash
# Sets volfs up on this machine and runs it on its embedded default: installs build
# dependencies, builds, installs the binaries (/usr/local/bin/volfs, volfs-mountd and
# /sbin/mount.volfs), starts the daemon (systemd if it runs the machine, else in the
# background) on /var/lib/volfs, and mounts a demo volume at /mnt/volfs-demo.
#   sudo scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "setup.sh: run as root (it installs packages and mounts)" >&2; exit 1; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/volfs-target}
scripts/deps.sh
cargo build --release --workspace
rel=$CARGO_TARGET_DIR/release
install -m 0755 "$rel/volfs" /usr/local/bin/volfs
install -m 0755 "$rel/volfs-mountd" /usr/local/bin/volfs-mountd
install -m 0755 "$rel/mount-volfs" /sbin/mount.volfs
mkdir -p /etc/volfs
[ -f /etc/volfs/volfs.toml ] || install -m 0644 packaging/volfs.toml /etc/volfs/volfs.toml

if volfs status >/dev/null 2>&1; then
  echo "volfs-mountd is already running"
elif [ -d /run/systemd/system ]; then
  sed 's#/usr/bin/volfs-mountd#/usr/local/bin/volfs-mountd#' packaging/systemd/volfs-mountd.service \
    >/etc/systemd/system/volfs-mountd.service
  systemctl daemon-reload
  systemctl enable --now volfs-mountd.service
else
  nohup /usr/local/bin/volfs-mountd >>/var/log/volfs-mountd.log 2>&1 &
  for _ in $(seq 100); do volfs status >/dev/null 2>&1 && break; sleep 0.1; done
fi
volfs volume inspect demo >/dev/null 2>&1 || volfs volume create demo --label purpose=demo
mkdir -p /mnt/volfs-demo
grep -q " /mnt/volfs-demo " /proc/mounts || mount -t volfs demo /mnt/volfs-demo
echo "volfs is running; volume 'demo' is mounted at /mnt/volfs-demo"
volfs volume ls
