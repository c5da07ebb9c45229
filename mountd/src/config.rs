//! Daemon configuration: `/etc/volfs/volfs.toml` (or `--config`), every key optional with a
//! documented default. Later layers override earlier ones, key by key:
//!
//! 1. the defaults below;
//! 2. the config file;
//! 3. the environment: `VOLFS_<KEY>` for every key (`VOLFS_CHUNK_CACHE_MB=512`);
//! 4. the command line: dedicated flags (`--data-dir`, `--log-format`, ...) and
//!    `--set KEY=VALUE` for any key.
//!
//! Every value is checked where it comes from: an unknown key, a wrong type or an invalid
//! value is refused at start with the key, the reason and its source (the file with its line,
//! the environment variable, or the flag). The key list and defaults are documented in
//! docs/OPERATIONS.md and packaging/volfs.toml.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use volfs::api::{DEFAULT_DATA_DIR, DEFAULT_RUN_DIR, DEFAULT_SOCKET};

pub const DEFAULT_CONFIG: &str = "/etc/volfs/volfs.toml";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9567";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the index and pack files live. Flag --data-dir.
    pub data_dir: PathBuf,
    /// Control socket. Flag --socket.
    pub socket: PathBuf,
    /// Runtime dir for volume connections (`<run_dir>/mnt/<volume>`). Flag --run-dir.
    pub run_dir: PathBuf,
    /// Chunk compression: none, lz4 or zstd.
    pub compression: String,
    /// Decoded-chunk cache size in MiB.
    pub chunk_cache_mb: u64,
    /// FUSE dispatch threads per volume (1-64).
    pub fuse_threads: usize,
    /// Kernel entry/attribute cache time in milliseconds.
    pub attr_ttl_ms: u64,
    /// Kernel writeback cache.
    pub writeback_cache: bool,
    /// Percent of the kernel's dirty-page limit one volume connection may hold (1-100; the
    /// kernel's FUSE default is 1% with a strict per-device limit, which stalls writers at
    /// ~50 MiB of dirty data); 0 keeps the kernel default.
    pub fuse_dirty_max_ratio: u32,
    /// With the writeback cache: a strict per-connection dirty limit of this many MiB, instead
    /// of `fuse_dirty_max_ratio`'s share. The kernel starts writing back at half of it, so the
    /// daemon chunks while a stream is written instead of all at its fsync; 0 = no byte limit.
    pub fuse_dirty_max_mb: u64,
    /// Mount volume connections as type `fuse.volfs` (true) or plain `fuse` (false, which
    /// fstests requires).
    pub fuse_subtype: bool,
    /// Log format: text, json or journald (text with syslog priority prefixes and no
    /// timestamps; chosen by itself when stderr is the journal). Flag --log-format.
    pub log_format: String,
    /// Log filter, RUST_LOG syntax (`info`, `volfs=debug,info`). RUST_LOG, when set, wins.
    /// Flag --log-level.
    pub log_level: String,
    /// Docker volume plugin socket; empty disables the plugin. Flag --plugin-socket.
    /// Docker names the driver after the file (volfs.sock -> volfs).
    pub plugin_socket: String,
    /// Prometheus endpoint (`GET /metrics`), host:port; empty disables it. Loopback by
    /// default: the metrics name volumes. Flag --metrics-listen.
    pub metrics_listen: String,
    /// Seconds between background garbage collections; 0 turns them off (`volfs gc` still
    /// works).
    pub gc_interval_secs: u64,
    /// Seconds between background scrubs (every chunk read back and verified); 0 turns them
    /// off (`volfs scrub` and `volfs fsck` still work).
    pub scrub_interval_secs: u64,
    /// Read rate of the background scrub in MiB/s, so that it leaves the disk to the
    /// volumes; 0: no limit.
    pub scrub_max_mb_per_sec: u64,
    /// Run as a supervisor and a server process, so that a crash of the server keeps every
    /// mount and open file (see docs/ARCHITECTURE.md, "Surviving a crash of the daemon").
    pub supervise: bool,
    /// Where other volfs daemons connect (TCP host:port; "" turns the listener off). Only
    /// used when a cluster key is configured.
    pub peer_listen: String,
    /// The cluster key shared by all peers: 32 random bytes as 64 hex digits
    /// (`volfs peer keygen`). A missing file at the default path turns peers off; a missing
    /// or malformed file that is configured is a start error. "" turns peers off.
    pub peer_key_file: PathBuf,
    /// etcd endpoints, comma-separated (`http://10.0.0.5:2379,http://10.0.0.6:2379`); empty
    /// (the default) is a single host: no etcd, no peers (see docs/ARCHITECTURE.md, "Cluster
    /// state and ownership").
    pub etcd_endpoints: String,
    /// This host's name in the cluster; empty means the machine's hostname. Validated like a
    /// volume name.
    pub host_name: String,
    /// Seconds an ownership lease lives without a keep-alive (at least 3). The owner stops
    /// writing after half of it without a successful keep-alive.
    pub lease_ttl_secs: u64,
    /// Deadline in milliseconds for fetching a chunk that is not local (a lazily shipped
    /// replica's) from the peers on a read; each peer gets an equal share of it (at least
    /// 1 s). A read that misses it fails with EIO (100 to 600000).
    pub peer_fetch_timeout_ms: u64,
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
            fuse_dirty_max_mb: 0,
            fuse_subtype: true,
            log_format: "text".into(),
            log_level: "info".into(),
            plugin_socket: "/run/docker/plugins/volfs.sock".into(),
            metrics_listen: DEFAULT_METRICS_LISTEN.into(),
            gc_interval_secs: 3600,
            scrub_interval_secs: 7 * 24 * 3600,
            scrub_max_mb_per_sec: 64,
            supervise: true,
            peer_listen: crate::peer::DEFAULT_LISTEN.into(),
            peer_key_file: crate::peer::DEFAULT_KEY_FILE.into(),
            etcd_endpoints: String::new(),
            host_name: String::new(),
            lease_ttl_secs: 10,
            peer_fetch_timeout_ms: crate::peer::DEFAULT_FETCH_TIMEOUT_MS,
        }
    }
}

/// Where a key's value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    /// The file, and the line of the key when known.
    File(PathBuf, Option<usize>),
    Env(String),
    Flag(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => write!(f, "the built-in default"),
            Source::File(p, None) => write!(f, "config file {}", p.display()),
            Source::File(p, Some(l)) => write!(f, "config file {}, line {l}", p.display()),
            Source::Env(v) => write!(f, "environment variable {v}"),
            Source::Flag(s) => write!(f, "command-line flag {s}"),
        }
    }
}

/// A configuration with the source of each key's value.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub sources: BTreeMap<String, Source>,
}

/// The keys and their default values, as TOML.
fn defaults() -> toml::Table {
    toml::Value::try_from(Config::default())
        .ok()
        .and_then(|v| v.as_table().cloned())
        .unwrap_or_default()
}

/// A raw string (environment or flag) as a TOML value of the key's type.
fn typed(key: &str, raw: &str, default: &toml::Value) -> toml::Value {
    if default.is_str() {
        return toml::Value::String(raw.to_string());
    }
    toml::from_str::<toml::Table>(&format!("{key} = {raw}"))
        .ok()
        .and_then(|mut t| t.remove(key))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// The line (from 1) where `key = ...` is set in a config text.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

/// Checks one key's value alone, so that an error names the source it came from.
fn check_one(key: &str, value: &toml::Value, source: &Source) -> anyhow::Result<()> {
    let mut t = toml::Table::new();
    t.insert(key.to_string(), value.clone());
    let cfg: Config = t.try_into().map_err(|e: toml::de::Error| {
        anyhow::anyhow!("invalid config key {key} (from {source}): {}", e.message())
    })?;
    cfg.validate_key(key)
        .map_err(|why| anyhow::anyhow!("invalid config key {key} (from {source}): {why}"))
}

impl Config {
    /// Checks the value of one key beyond its type; the reason when it is invalid.
    fn validate_key(&self, key: &str) -> Result<(), String> {
        match key {
            "compression" => volfs::chunk::Compression::parse(&self.compression)
                .map(|_| ())
                .map_err(|e| match e {
                    volfs::Error::Invalid(m) => m,
                    e => e.to_string(),
                }),
            "fuse_threads" if !(1..=64).contains(&self.fuse_threads) => Err(format!(
                "{} FUSE threads: expected 1 to 64",
                self.fuse_threads
            )),
            "fuse_dirty_max_ratio" if self.fuse_dirty_max_ratio > 100 => Err(format!(
                "{} is not a percentage: expected 0 (kernel default) to 100",
                self.fuse_dirty_max_ratio
            )),
            "fuse_dirty_max_mb" if self.fuse_dirty_max_mb != 0 && !(16..=1 << 20).contains(&self.fuse_dirty_max_mb) => Err(format!(
                "{} MiB: expected 0 (no byte limit) or 16 to 1048576",
                self.fuse_dirty_max_mb
            )),
            "chunk_cache_mb" if self.chunk_cache_mb > (1 << 20) => Err(format!(
                "{} MiB is more than 1 TiB of cache",
                self.chunk_cache_mb
            )),
            "log_format" if !["text", "json", "journald"].contains(&self.log_format.as_str()) => {
                Err(format!(
                    "{:?}: expected text, json or journald",
                    self.log_format
                ))
            }
            "log_level" => tracing_subscriber::EnvFilter::try_new(&self.log_level)
                .map(|_| ())
                .map_err(|e| format!("{:?} is not a log filter: {e}", self.log_level)),
            "metrics_listen" if !self.metrics_listen.is_empty() => self
                .metrics_listen
                .parse::<std::net::SocketAddr>()
                .map(|_| ())
                .map_err(|_| {
                    format!(
                        "{:?}: expected IP:PORT (e.g. {DEFAULT_METRICS_LISTEN}), or \"\" to turn the endpoint off",
                        self.metrics_listen
                    )
                }),
            "peer_listen" if !self.peer_listen.is_empty() => self
                .peer_listen
                .parse::<std::net::SocketAddr>()
                .map(|_| ())
                .map_err(|_| {
                    format!(
                        "{:?}: expected IP:PORT (e.g. {}), or \"\" to turn the peer listener off",
                        self.peer_listen,
                        crate::peer::DEFAULT_LISTEN
                    )
                }),
            "peer_fetch_timeout_ms"
                if !(100..=600_000).contains(&self.peer_fetch_timeout_ms) =>
            {
                Err(format!(
                    "{} ms: expected 100 to 600000",
                    self.peer_fetch_timeout_ms
                ))
            }
            "lease_ttl_secs" if self.lease_ttl_secs < 3 || self.lease_ttl_secs > 3600 => Err(
                format!("{} seconds: expected 3 to 3600", self.lease_ttl_secs),
            ),
            "host_name" if !self.host_name.is_empty() => {
                volfs::ids::VolumeName::new(&self.host_name)
                    .map(|_| ())
                    .map_err(|_| {
                        format!(
                            "{:?}: expected [a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 128 bytes",
                            self.host_name
                        )
                    })
            }
            "etcd_endpoints" => crate::cluster::parse_endpoints(&self.etcd_endpoints).map(|_| ()),
            "data_dir" | "socket" | "run_dir" if self.path(key).as_os_str().is_empty() => {
                Err("the path is empty".into())
            }
            _ => Ok(()),
        }
    }

    fn path(&self, key: &str) -> &Path {
        match key {
            "data_dir" => &self.data_dir,
            "socket" => &self.socket,
            _ => &self.run_dir,
        }
    }

    /// Reads the file (a missing default file is fine; a missing explicit one is not), then
    /// applies the environment and `overrides` (flag name, key, value), checking each value
    /// against its source.
    pub fn load(
        path: Option<&Path>,
        overrides: &[(String, String, String)],
    ) -> anyhow::Result<Loaded> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG), false),
        };
        let defaults = defaults();
        let mut table = defaults.clone();
        let mut sources: BTreeMap<String, Source> = defaults
            .keys()
            .map(|k| (k.clone(), Source::Default))
            .collect();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                // Syntax errors: toml's message, with line and column, on one line.
                let file: toml::Table = toml::from_str(&text).map_err(|e| {
                    anyhow::anyhow!(
                        "invalid config {}: {}",
                        path.display(),
                        e.to_string()
                            .split_whitespace()
                            .collect::<Vec<_>>()
                            .join(" ")
                    )
                })?;
                for (k, v) in file {
                    let src = Source::File(path.clone(), line_of(&text, &k));
                    check_one(&k, &v, &src)?;
                    sources.insert(k.clone(), src);
                    table.insert(k, v);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {}
            Err(e) => anyhow::bail!("cannot read config {}: {e}", path.display()),
        }
        for (k, default) in &defaults {
            let var = format!("VOLFS_{}", k.to_uppercase());
            let Ok(raw) = std::env::var(&var) else {
                continue;
            };
            // An empty variable means "not set", except for keys where "" turns a feature
            // off (the plugin socket, the metrics endpoint).
            if raw.is_empty()
                && !matches!(
                    k.as_str(),
                    "plugin_socket"
                        | "metrics_listen"
                        | "peer_listen"
                        | "peer_key_file"
                        | "etcd_endpoints"
                )
            {
                continue;
            }
            let v = typed(k, &raw, default);
            let src = Source::Env(var);
            check_one(k, &v, &src)?;
            sources.insert(k.clone(), src);
            table.insert(k.clone(), v);
        }
        for (flag, k, raw) in overrides {
            let Some(default) = defaults.get(k) else {
                anyhow::bail!(
                    "unknown config key {k:?} in {flag}; keys: {}",
                    defaults.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            };
            let v = typed(k, raw, default);
            let src = Source::Flag(flag.clone());
            check_one(k, &v, &src)?;
            sources.insert(k.clone(), src);
            table.insert(k.clone(), v);
        }
        let config: Config = table
            .try_into()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("invalid config: {}", e.message()))?;
        Ok(Loaded { config, sources })
    }

    /// Environment variables that look like volfs settings but name no key (typos).
    pub fn unknown_env() -> Vec<String> {
        let keys = defaults();
        std::env::vars()
            .map(|(k, _)| k)
            .filter(|k| {
                k.strip_prefix("VOLFS_").is_some_and(|rest| {
                    !keys.contains_key(&rest.to_lowercase())
                        // Read by volfs-mountd's flags, the unit file and the test harness,
                        // not config keys.
                        && rest != "CONFIG"
                        && rest != "SYSTEMD_UNIT"
                        && !rest.starts_with("TEST")
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("volfs.toml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn unknown_key_is_named_with_the_file() {
        let (_d, p) = file("data_dir = \"/x\"\nbogus_key = 1\n");
        let e = Config::load(Some(&p), &[]).unwrap_err().to_string();
        assert!(e.contains("bogus_key") && e.contains("volfs.toml"), "{e}");
    }

    #[test]
    fn wrong_type_and_bad_value_name_key_and_source() {
        let (_d, p) = file("# cache\nchunk_cache_mb = \"lots\"\n");
        let e = Config::load(Some(&p), &[]).unwrap_err().to_string();
        assert!(
            e.contains("chunk_cache_mb") && e.contains("line 2") && e.contains("expected u64"),
            "{e}"
        );
        let (_d, p) = file("chunk_cache_mb = [\n");
        let e = Config::load(Some(&p), &[]).unwrap_err().to_string();
        assert!(e.contains("line 1") && !e.contains('\n'), "{e}");
        let (_d, p) = file("compression = \"lz5\"\n");
        let e = Config::load(Some(&p), &[]).unwrap_err().to_string();
        assert!(
            e.contains("compression") && e.contains("config file") && e.contains("lz5"),
            "{e}"
        );
        let (_d, p) = file("metrics_listen = \"localhost\"\n");
        let e = Config::load(Some(&p), &[]).unwrap_err().to_string();
        assert!(e.contains("metrics_listen") && e.contains("IP:PORT"), "{e}");
    }

    #[test]
    fn flags_override_the_file_and_are_checked() {
        let (_d, p) = file("chunk_cache_mb = 16\nfuse_threads = 2\n");
        let l = Config::load(
            Some(&p),
            &[("--set".into(), "chunk_cache_mb".into(), "32".into())],
        )
        .unwrap();
        assert_eq!(l.config.chunk_cache_mb, 32);
        assert_eq!(l.config.fuse_threads, 2);
        assert_eq!(l.sources["chunk_cache_mb"], Source::Flag("--set".into()));
        assert!(matches!(
            l.sources["fuse_threads"],
            Source::File(_, Some(2))
        ));
        assert_eq!(l.sources["attr_ttl_ms"], Source::Default);
        let e = Config::load(
            Some(&p),
            &[("--set".into(), "fuse_threads".into(), "0".into())],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("fuse_threads") && e.contains("--set"), "{e}");
        let e = Config::load(Some(&p), &[("--set".into(), "nope".into(), "1".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown config key \"nope\""), "{e}");
    }

    #[test]
    fn fuse_dirty_max_mb_is_checked() {
        for (v, ok) in [
            ("0", true),
            ("15", false),
            ("16", true),
            ("256", true),
            ("2000000", false),
        ] {
            let (_d, p) = file(&format!("fuse_dirty_max_mb = {v}\n"));
            match Config::load(Some(&p), &[]) {
                Ok(l) => {
                    assert!(ok, "{v} accepted");
                    assert_eq!(l.config.fuse_dirty_max_mb.to_string(), v);
                }
                Err(e) => {
                    assert!(!ok, "{v} refused: {e}");
                    assert!(e.to_string().contains("fuse_dirty_max_mb"), "{e}");
                }
            }
        }
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        assert!(Config::load(Some(Path::new("/nonexistent/volfs.toml")), &[]).is_err());
    }

    #[test]
    fn peer_listen_is_checked() {
        let (_d, p) = file("peer_listen = \"somewhere\"\n");
        let e = Config::load(Some(&p), &[]).unwrap_err().to_string();
        assert!(e.contains("peer_listen") && e.contains("line 1"), "{e}");
        let (_d, p) = file("peer_listen = \"\"\n");
        assert_eq!(Config::load(Some(&p), &[]).unwrap().config.peer_listen, "");
    }

    #[test]
    fn peer_key_file_rules() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("peer.key");
        // The default path, missing: peers off.
        assert_eq!(
            crate::peer::load_key(&missing, &Source::Default).unwrap(),
            None
        );
        // Configured and missing: an error naming the key and the source.
        let src = Source::Env("VOLFS_PEER_KEY_FILE".into());
        let e = crate::peer::load_key(&missing, &src)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("peer_key_file")
                && e.contains("VOLFS_PEER_KEY_FILE")
                && e.contains("peer.key"),
            "{e}"
        );
        std::fs::write(&missing, "abcd\n").unwrap();
        let e = crate::peer::load_key(&missing, &Source::Default)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("invalid peer key") && e.contains("32 bytes"),
            "{e}"
        );
        std::fs::write(&missing, "zz".repeat(32)).unwrap();
        assert!(crate::peer::load_key(&missing, &src).is_err());
        std::fs::write(&missing, format!("{}\n", "0a".repeat(32))).unwrap();
        assert_eq!(
            crate::peer::load_key(&missing, &src).unwrap(),
            Some([10u8; 32])
        );
    }

    #[test]
    fn every_key_has_a_default_that_validates() {
        let c = Config::default();
        for k in defaults().keys() {
            c.validate_key(k).unwrap_or_else(|e| panic!("{k}: {e}"));
        }
    }
}
