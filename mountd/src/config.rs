//! Daemon configuration: `/etc/volfs/volfs.toml` (or `--config`), every key optional with a
//! documented default, overridden by environment variables and then by command-line flags.
//! Unknown keys are refused with the file, key and reason.
use std::path::{Path, PathBuf};

use serde::Deserialize;
use volfs::api::{DEFAULT_DATA_DIR, DEFAULT_RUN_DIR, DEFAULT_SOCKET};

pub const DEFAULT_CONFIG: &str = "/etc/volfs/volfs.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the index and pack files live. Env VOLFS_DATA_DIR, flag --data-dir.
    pub data_dir: PathBuf,
    /// Control socket. Env VOLFS_SOCKET, flag --socket.
    pub socket: PathBuf,
    /// Runtime dir for volume connections (`<run_dir>/mnt/<volume>`). Env VOLFS_RUN_DIR.
    pub run_dir: PathBuf,
    /// Chunk compression: none, lz4 or zstd. Env VOLFS_COMPRESSION.
    pub compression: String,
    /// Decoded-chunk cache size in MiB. Env VOLFS_CHUNK_CACHE_MB.
    pub chunk_cache_mb: u64,
    /// FUSE dispatch threads per volume. Env VOLFS_FUSE_THREADS.
    pub fuse_threads: usize,
    /// Kernel entry/attribute cache time in milliseconds. Env VOLFS_ATTR_TTL_MS.
    pub attr_ttl_ms: u64,
    /// Kernel writeback cache. Env VOLFS_WRITEBACK_CACHE.
    pub writeback_cache: bool,
    /// Percent of the kernel's dirty-page limit one volume connection may hold (1-100; the
    /// kernel's FUSE default is 1% with a strict per-device limit, which stalls writers at
    /// ~50 MiB of dirty data); 0 keeps the kernel default. Env VOLFS_FUSE_DIRTY_MAX_RATIO.
    pub fuse_dirty_max_ratio: u32,
    /// Mount volume connections as type `fuse.volfs` (true) or plain `fuse` (false, which
    /// fstests requires). Env VOLFS_FUSE_SUBTYPE.
    pub fuse_subtype: bool,
    /// text or json. Env VOLFS_LOG_FORMAT, flag --log-format.
    pub log_format: String,
    /// Docker volume plugin socket; empty disables the plugin. Env VOLFS_PLUGIN_SOCKET,
    /// flag --plugin-socket. Docker names the driver after the file (volfs.sock -> volfs).
    pub plugin_socket: String,
    /// Seconds between background garbage collections; 0 turns them off (`volfs gc` still
    /// works). Env VOLFS_GC_INTERVAL_SECS.
    pub gc_interval_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: DEFAULT_DATA_DIR.into(),
            socket: DEFAULT_SOCKET.into(),
            run_dir: DEFAULT_RUN_DIR.into(),
            compression: "none".into(),
            chunk_cache_mb: 256,
            fuse_threads: 4,
            attr_ttl_ms: 10_000,
            writeback_cache: true,
            fuse_dirty_max_ratio: 50,
            fuse_subtype: true,
            log_format: "text".into(),
            plugin_socket: "/run/docker/plugins/volfs.sock".into(),
            gc_interval_secs: 3600,
        }
    }
}

impl Config {
    /// Reads the file (a missing default file is fine; a missing explicit one is not), then
    /// applies environment overrides.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let mut cfg = match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str::<Config>(&text).map_err(|e| {
                anyhow::anyhow!(
                    "invalid config {}: {}",
                    path.display(),
                    e.to_string().trim()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Config::default(),
            Err(e) => anyhow::bail!("cannot read config {}: {e}", path.display()),
        };
        cfg.apply_env()?;
        Ok(cfg)
    }

    fn apply_env(&mut self) -> anyhow::Result<()> {
        fn env(k: &str) -> Option<String> {
            std::env::var(k).ok().filter(|v| !v.is_empty())
        }
        fn parse<T: std::str::FromStr>(k: &str, v: String) -> anyhow::Result<T> {
            v.parse()
                .map_err(|_| anyhow::anyhow!("environment variable {k}={v:?} is not valid"))
        }
        if let Some(v) = env("VOLFS_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = env("VOLFS_SOCKET") {
            self.socket = v.into();
        }
        if let Some(v) = env("VOLFS_RUN_DIR") {
            self.run_dir = v.into();
        }
        if let Some(v) = env("VOLFS_COMPRESSION") {
            self.compression = v;
        }
        if let Some(v) = env("VOLFS_CHUNK_CACHE_MB") {
            self.chunk_cache_mb = parse("VOLFS_CHUNK_CACHE_MB", v)?;
        }
        if let Some(v) = env("VOLFS_FUSE_THREADS") {
            self.fuse_threads = parse("VOLFS_FUSE_THREADS", v)?;
        }
        if let Some(v) = env("VOLFS_ATTR_TTL_MS") {
            self.attr_ttl_ms = parse("VOLFS_ATTR_TTL_MS", v)?;
        }
        if let Some(v) = env("VOLFS_WRITEBACK_CACHE") {
            self.writeback_cache = parse("VOLFS_WRITEBACK_CACHE", v)?;
        }
        if let Some(v) = env("VOLFS_FUSE_DIRTY_MAX_RATIO") {
            self.fuse_dirty_max_ratio = parse("VOLFS_FUSE_DIRTY_MAX_RATIO", v)?;
        }
        if self.fuse_dirty_max_ratio > 100 {
            anyhow::bail!(
                "fuse_dirty_max_ratio is {}: it is a percentage, 0 (kernel default) to 100",
                self.fuse_dirty_max_ratio
            );
        }
        if let Some(v) = env("VOLFS_FUSE_SUBTYPE") {
            self.fuse_subtype = parse("VOLFS_FUSE_SUBTYPE", v)?;
        }
        if let Some(v) = env("VOLFS_LOG_FORMAT") {
            self.log_format = v;
        }
        if let Some(v) = env("VOLFS_GC_INTERVAL_SECS") {
            self.gc_interval_secs = parse("VOLFS_GC_INTERVAL_SECS", v)?;
        }
        if let Ok(v) = std::env::var("VOLFS_PLUGIN_SOCKET") {
            self.plugin_socket = v;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("volfs.toml");
        std::fs::write(&p, "data_dir = \"/x\"\nbogus_key = 1\n").unwrap();
        let e = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("bogus_key") && e.contains("volfs.toml"), "{e}");
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        assert!(Config::load(Some(Path::new("/nonexistent/volfs.toml"))).is_err());
    }
}
