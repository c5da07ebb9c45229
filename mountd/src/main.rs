//! `volfs-mountd`: the volfs daemon. It owns the data dir (index + packs), serves each mounted
//! volume over FUSE (see `fuse` and `mounts`) and answers the control API (see `control`).
mod cluster;
mod config;
mod control;
mod fuse;
mod handover;
mod metrics;
mod mounts;
mod peer;
mod plugin;
mod replication;
mod systemd;
mod work;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use volfs::chunk::Compression;
use volfs::store::{Store, StoreOptions};
use volfs::volume::Registry;

#[derive(Parser, Debug)]
#[command(
    name = "volfs-mountd",
    version,
    about = "volfs daemon: persistent volumes for containers over FUSE"
)]
struct Args {
    /// Config file (default /etc/volfs/volfs.toml if it exists). Env VOLFS_CONFIG.
    #[arg(long, env = "VOLFS_CONFIG")]
    config: Option<PathBuf>,
    /// Data dir (overrides config and VOLFS_DATA_DIR).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Control socket (overrides config and VOLFS_SOCKET).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Runtime dir for volume connections (overrides config and VOLFS_RUN_DIR).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Log format: text, json or journald (overrides config and VOLFS_LOG_FORMAT).
    #[arg(long)]
    log_format: Option<String>,
    /// Log filter in RUST_LOG syntax, e.g. `debug` or `volfs=debug,info` (RUST_LOG wins).
    #[arg(long)]
    log_level: Option<String>,
    /// Docker volume plugin socket ("" disables the plugin).
    #[arg(long)]
    plugin_socket: Option<String>,
    /// Prometheus endpoint address, IP:PORT ("" disables it).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Sets any config key, e.g. `--set chunk_cache_mb=512` (repeatable; wins over the file
    /// and the environment).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

impl Args {
    /// The command-line overrides as (flag, key, value).
    fn overrides(&self) -> anyhow::Result<Vec<(String, String, String)>> {
        let mut out = Vec::new();
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        for (flag, key, v) in [
            ("--data-dir", "data_dir", path(&self.data_dir)),
            ("--socket", "socket", path(&self.socket)),
            ("--run-dir", "run_dir", path(&self.run_dir)),
            ("--log-format", "log_format", self.log_format.clone()),
            ("--log-level", "log_level", self.log_level.clone()),
            (
                "--plugin-socket",
                "plugin_socket",
                self.plugin_socket.clone(),
            ),
            (
                "--metrics-listen",
                "metrics_listen",
                self.metrics_listen.clone(),
            ),
        ] {
            if let Some(v) = v {
                out.push((flag.to_string(), key.to_string(), v));
            }
        }
        for kv in &self.set {
            let Some((k, v)) = kv.split_once('=') else {
                anyhow::bail!("--set {kv:?}: expected KEY=VALUE");
            };
            out.push((format!("--set {k}"), k.trim().to_string(), v.to_string()));
        }
        Ok(out)
    }
}

fn main() {
    tune_malloc();
    let args = Args::parse();
    let loaded = args
        .overrides()
        .and_then(|o| config::Config::load(args.config.as_deref(), &o));
    let loaded = match loaded {
        Ok(l) => l,
        Err(e) => {
            eprintln!("volfs-mountd: {e:#}");
            std::process::exit(1);
        }
    };
    let auto_format = loaded.sources.get("log_format") == Some(&config::Source::Default);
    if let Err(e) = init_logging(&loaded.config, auto_format) {
        eprintln!("volfs-mountd: {e:#}");
        std::process::exit(1);
    }
    let supervised = std::env::var_os(handover::SUPERVISED_ENV).is_some();
    if !supervised {
        for var in config::Config::unknown_env() {
            tracing::warn!("environment variable {var} names no config key; ignored");
        }
    }
    if loaded.config.supervise && !supervised {
        std::process::exit(handover::supervise());
    }
    if let Err(e) = run(loaded) {
        tracing::error!("{e:#}");
        eprintln!("volfs-mountd: {e:#}");
        std::process::exit(1);
    }
}

/// Is stderr connected to the systemd journal? (JOURNAL_STREAM holds its device:inode.)
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// Logs through `tracing` to stderr: text, JSON, or journald-style text (a `<N>` syslog
/// priority prefix per line and no timestamps, which the journal adds). RUST_LOG, when set,
/// replaces the configured filter.
fn init_logging(cfg: &config::Config, auto_format: bool) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.is_empty() => tracing_subscriber::EnvFilter::try_new(&f)
            .map_err(|e| anyhow::anyhow!("RUST_LOG={f:?} is not a log filter: {e}"))?,
        _ => tracing_subscriber::EnvFilter::try_new(&cfg.log_level)?,
    };
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let format = if auto_format && stderr_is_journal() {
        "journald"
    } else {
        cfg.log_format.as_str()
    };
    match format {
        "json" => b.json().init(),
        "journald" => b.event_format(JournaldFormat::default()).init(),
        "text" => {
            use std::io::IsTerminal;
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            b.with_ansi(colour).init()
        }
        other => anyhow::bail!("unknown log format {other:?} (expected text, json or journald)"),
    }
    Ok(())
}

/// Text lines with the syslog priority prefix journald reads (`<3>` error ... `<7>` debug)
/// and without timestamps or colours.
struct JournaldFormat {
    inner: tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Full, ()>,
}

impl Default for JournaldFormat {
    fn default() -> Self {
        JournaldFormat {
            inner: tracing_subscriber::fmt::format()
                .without_time()
                .with_ansi(false),
        }
    }
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JournaldFormat
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        self.inner.format_event(ctx, writer, event)
    }
}

/// Makes a configured path absolute (relative to the working directory), so that paths the
/// daemon hands out (mountpoints for Docker) and compares (mountinfo) are absolute.
fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

fn run(loaded: config::Loaded) -> anyhow::Result<()> {
    let mut cfg = loaded.config;
    cfg.data_dir = absolute(&cfg.data_dir)?;
    cfg.run_dir = absolute(&cfg.run_dir)?;
    cfg.socket = absolute(&cfg.socket)?;
    if !cfg.plugin_socket.is_empty() {
        cfg.plugin_socket = absolute(Path::new(&cfg.plugin_socket))?
            .display()
            .to_string();
    }
    let compression = Compression::parse(&cfg.compression).context("config key compression")?;
    let store = Arc::new(Store::open(
        &cfg.data_dir,
        &StoreOptions {
            compression,
            chunk_cache_bytes: cfg.chunk_cache_mb << 20,
            owner_pid: std::env::var_os(handover::SUPERVISED_ENV)
                .map(|_| std::os::unix::process::parent_id()),
        },
    )?);
    let registry = Arc::new(Registry::new(store.clone()));
    let metrics = Arc::new(metrics::Metrics::new());
    let metrics_listener = match cfg.metrics_listen.as_str() {
        "" => None,
        addr => {
            let l = std::net::TcpListener::bind(addr).with_context(|| {
                format!(
                    "cannot listen for metrics on {addr} (config key metrics_listen, from {})",
                    loaded
                        .sources
                        .get("metrics_listen")
                        .unwrap_or(&config::Source::Default)
                )
            })?;
            l.set_nonblocking(true)?;
            Some(l)
        }
    };
    let fuse_opts = fuse::FuseOptions {
        ttl: Duration::from_millis(cfg.attr_ttl_ms),
        writeback_cache: cfg.writeback_cache,
        workers: cfg.fuse_threads.max(1),
        subtype: cfg.fuse_subtype,
        dirty_max_ratio: (cfg.fuse_dirty_max_ratio > 0).then_some(cfg.fuse_dirty_max_ratio),
        dirty_max_bytes: (cfg.fuse_dirty_max_mb > 0).then_some(cfg.fuse_dirty_max_mb << 20),
    };
    let link = handover::Link::from_env();
    let mounts = mounts::Mounts::new(registry, &cfg.run_dir, fuse_opts, metrics.clone(), link)?;
    // Cluster mode (etcd_endpoints set): the lease keeper and the fencer, before any volume
    // is taken over or mounted, so each is fenced unless this host owns it.
    if let Some(c) = cluster::Cluster::start(&cfg, store.clone(), mounts.clone())? {
        mounts.set_cluster(c);
    }
    let listener = bind_socket(&cfg.socket)?;
    let plugin_listener = match cfg.plugin_socket.as_str() {
        "" => None,
        p => Some(bind_socket(Path::new(p))?),
    };
    // Peers: only with a cluster key; the listener is bound here so that a port in use is a
    // start error naming the key.
    let peer_key = peer::load_key(
        &cfg.peer_key_file,
        loaded
            .sources
            .get("peer_key_file")
            .unwrap_or(&config::Source::Default),
    )?;
    let mut peers = peer::Peers::new(peer_key, store.clone(), metrics.peer.clone());
    if !cfg.host_name.is_empty() {
        // This host's name in hellos on a single host too (cluster mode uses its own).
        peers.host = cfg.host_name.clone();
    }
    let peers = Arc::new(peers);
    let peer_listener = match (peer_key, cfg.peer_listen.as_str()) {
        (None, _) | (_, "") => None,
        (Some(_), addr) => {
            let l = std::net::TcpListener::bind(addr).with_context(|| {
                format!(
                    "cannot listen for peers on {addr} (config key peer_listen, from {})",
                    loaded
                        .sources
                        .get("peer_listen")
                        .unwrap_or(&config::Source::Default)
                )
            })?;
            l.set_nonblocking(true)?;
            Some(l)
        }
    };
    let daemon = Arc::new(control::Daemon {
        mounts: mounts.clone(),
        started: Instant::now(),
        seal: Arc::new(tokio::sync::Notify::new()),
        work: work::Work::new(
            metrics.clone(),
            &[
                ("gc", cfg.gc_interval_secs),
                ("scrub", cfg.scrub_interval_secs),
                ("fsck", 0),
            ],
        ),
        metrics: metrics.clone(),
        peers: peers.clone(),
    });
    metrics.attach(&daemon);
    let gc_interval = cfg.gc_interval_secs;
    let scrub_interval = cfg.scrub_interval_secs;
    let scrub_rate = cfg.scrub_max_mb_per_sec << 20;
    let fetch_timeout_ms = cfg.peer_fetch_timeout_ms;
    tracing::info!(data_dir = %cfg.data_dir.display(), socket = %cfg.socket.display(), "volfs-mountd {} starting", env!("CARGO_PKG_VERSION"));
    mounts.adopt(handover::inherited());
    mounts.restore()?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served = mounts.clone();
    let supervised = mounts.supervised();
    let handing_over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hup = handing_over.clone();
    let result = rt.block_on(async move {
        let mounts = served;
        let listener = tokio::net::UnixListener::from_std(listener)?;
        let reaper = mounts.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let m = reaper.clone();
                let _ = tokio::task::spawn_blocking(move || m.reap_idle()).await;
            }
        });
        // Background work, off the request path: sealing new snapshot layers (woken by each
        // snapshot, and every minute) and periodic garbage collection.
        let worker = daemon.clone();
        tokio::spawn(async move {
            let mut last_gc = Instant::now();
            loop {
                tokio::select! {
                    _ = worker.seal.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                }
                let d = worker.clone();
                let gc_due =
                    gc_interval > 0 && last_gc.elapsed() >= Duration::from_secs(gc_interval);
                if gc_due {
                    last_gc = Instant::now();
                }
                let _ = tokio::task::spawn_blocking(move || {
                    let store = d.mounts.registry().store().clone();
                    if let Err(e) = volfs::layer::seal_pending(&store) {
                        tracing::warn!("sealing layers: {e}");
                    }
                    if gc_due {
                        if let Err(e) = control::run_gc(&d) {
                            tracing::warn!(op = "gc", "background gc: {e}");
                        }
                    }
                    volfs::fs::bufpool::trim();
                    release_free_memory();
                })
                .await;
            }
        });
        // The background scrub: its own loop, so that hours of reading never hold up
        // sealing or gc.
        if scrub_interval > 0 {
            let d = daemon.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(scrub_interval)).await;
                    let d = d.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        if let Err(e) = control::run_scrub(&d, scrub_rate) {
                            tracing::warn!(op = "scrub", "background scrub: {e}");
                        }
                    })
                    .await;
                }
            });
        }
        if let Some(l) = metrics_listener {
            let l = tokio::net::TcpListener::from_std(l)?;
            tracing::info!(addr = %l.local_addr()?, "metrics endpoint: GET /metrics");
            tokio::spawn(metrics::serve(l, metrics.clone()));
        }
        // Reads of chunks that are not local (lazily shipped replicas) fetch them from peers.
        if peer_key.is_some() {
            let fetch = peer::PeerFetch::new(
                peers.clone(),
                tokio::runtime::Handle::current(),
                Duration::from_millis(fetch_timeout_ms),
            );
            daemon
                .mounts
                .registry()
                .store()
                .chunks
                .set_fallback(Some(Arc::new(fetch)));
        }
        // Snapshot replication: one worker per replicated volume (and receiving replicas).
        replication::start(daemon.clone());
        if let Some(l) = peer_listener {
            let l = tokio::net::TcpListener::from_std(l)?;
            tracing::info!(addr = %l.local_addr()?, "peer listener: Noise_NNpsk0, protocol v1, v2, v3");
            tokio::spawn(peer::server::serve(l, peers));
        }
        if let Some(l) = plugin_listener {
            let l = tokio::net::UnixListener::from_std(l)?;
            let app = plugin::router(daemon.clone());
            tokio::spawn(async move {
                if let Err(e) = axum::serve(l, app).await {
                    tracing::error!("docker plugin socket: {e}");
                }
            });
        }
        systemd::notify("READY=1");
        mounts.ready();
        let app = control::router(daemon);
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal(hup, supervised))
            .await?;
        anyhow::Ok(())
    });
    // Stop the reaper and the API servers before tearing the mounts down, so that nothing
    // prunes records or starts a connection while shutdown detaches them.
    rt.shutdown_timeout(Duration::from_secs(5));
    // The fallback holds the peers, which hold the store: break the cycle.
    store.chunks.set_fallback(None);
    // Under systemd, a SIGTERM that is part of `systemctl restart` keeps the mounts: the
    // connections wait in the service's fd store for the next start.
    if supervised
        && !handing_over.load(std::sync::atomic::Ordering::SeqCst)
        && systemd::restart_pending()
    {
        tracing::info!("systemd restarts the service: leaving the mounts to its fd store");
        handing_over.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    if handing_over.load(std::sync::atomic::Ordering::SeqCst) {
        // Upgrade or reload: commit what the volumes buffer, leave every mount in place and
        // exit; the supervisor starts the (possibly new) binary on the same connections.
        tracing::info!("handing the mounts over to a new server process");
        mounts.flush_for_handover();
        store.sync()?;
        let _ = std::fs::remove_file(&cfg.socket);
        std::process::exit(handover::HANDOVER_EXIT);
    }
    tracing::info!("shutting down: flushing volumes");
    systemd::notify("STOPPING=1");
    mounts.shutdown();
    store.sync()?;
    let _ = std::fs::remove_file(&cfg.socket);
    if !cfg.plugin_socket.is_empty() {
        let _ = std::fs::remove_file(&cfg.plugin_socket);
    }
    result
}

fn bind_socket(path: &Path) -> anyhow::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("another volfs-mountd already answers on {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let l = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Waits for SIGTERM or SIGINT (stop), or SIGHUP under a supervisor (hand the connections
/// to a fresh server process: an upgrade or a reload). Sets `handover` for SIGHUP.
async fn shutdown_signal(handover: Arc<std::sync::atomic::AtomicBool>, supervised: bool) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                if supervised {
                    handover.store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                tracing::warn!("SIGHUP ignored: without a supervisor there is no one to hand the mounts to");
            }
        }
    }
}

/// glibc settings for a daemon with many threads and many 64 KiB chunk buffers:
/// - a fixed mmap threshold of 1 MiB: every FUSE dispatch thread allocates a zeroed 16 MiB
///   request buffer (fuser), and with glibc's dynamic threshold those came from the heap,
///   zeroed by hand, so each became resident (100 idle volumes held 2.2 GiB; now ~31 MiB);
/// - at most 4 arenas: chunk buffers are allocated on one thread and freed on another, and
///   with one arena per thread the freed memory piled up where no one reused it.
fn tune_malloc() {
    // SAFETY: mallopt only adjusts allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

/// Hands memory the allocator holds free back to the OS (after the chunk cache or write
/// buffers shrank); run by the background worker every minute and after `cache drop`.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only releases free pages; it is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
