#!/usr/bin/env bash
# Builds the Debian package (target/debian/volfs_*.deb) with cargo-deb: release binaries,
# /sbin/mount.volfs, the systemd unit, the default config, and man pages and shell
# completions generated from the CLI's clap definitions.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/volfs-target}
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --version 3.8.0 --locked
cargo build --release --workspace
rel=$CARGO_TARGET_DIR/release
rm -rf "$rel/assets" && mkdir -p "$rel/assets/man" "$rel/assets/completions"
"$rel/volfs" manpages "$rel/assets/man"
"$rel/volfs" completions bash >"$rel/assets/completions/volfs.bash"
"$rel/volfs" completions zsh >"$rel/assets/completions/_volfs"
"$rel/volfs" completions fish >"$rel/assets/completions/volfs.fish"
cargo deb -p volfs --no-build --no-strip "$@"
