#!/usr/bin/env bash
# Installs the Debian packages volfs needs to build, run and test. Idempotent.
set -euo pipefail
pkgs=(librocksdb-dev libclang-dev clang pkg-config fuse3 libacl1-dev sqlite3 busybox-static python3-prometheus-client systemd util-linux etcd-server etcd-client protobuf-compiler iproute2 tar)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "volfs needs a Rust toolchain (cargo, Rust >= 1.85): install it with rustup, then run this again" >&2
  exit 1
fi
