//! Prometheus metrics: owns the metric registry and serves it as OpenMetrics text on
//! `GET /metrics` at the configured TCP address (`metrics_listen`, loopback by default).
//!
//! Two kinds of metrics:
//! - counted as things happen: FUSE requests by volume and operation (latency histograms,
//!   errors by errno), bytes read and written through FUSE, kernel cache invalidations sent,
//!   background runs (gc, scrub, fsck) and what gc freed. The FUSE adapter holds one
//!   [`VolumeMetrics`] per volume with its histograms resolved up front, so a request costs
//!   one clock read and one uncontended lock, never a label lookup.
//! - read at scrape time by [`StateCollector`]: volume usage and quota, open files, store
//!   bytes and dedup ratio, chunk and index cache hit counters, RocksDB compaction backlog,
//!   corrupt chunks, data dir space, background work in progress.
//!
//! Metric names and meanings are listed in docs/OPERATIONS.md; the Grafana dashboard in
//! packaging/grafana/ reads them.
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::control::Daemon;

macro_rules! fuse_ops {
    ($($v:ident => $s:literal),* $(,)?) => {
        /// The FUSE operations volfs answers, as they appear in the `op` label.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(usize)]
        pub enum Op { $($v),* }
        impl Op {
            pub const ALL: &'static [Op] = &[$(Op::$v),*];
            pub fn name(self) -> &'static str {
                match self { $(Op::$v => $s),* }
            }
        }
    };
}

fuse_ops! {
    Lookup => "lookup", Forget => "forget", Getattr => "getattr", Setattr => "setattr",
    Readlink => "readlink", Mknod => "mknod", Mkdir => "mkdir", Unlink => "unlink",
    Rmdir => "rmdir", Symlink => "symlink", Rename => "rename", Link => "link",
    Open => "open", Read => "read", Write => "write", Flush => "flush",
    Release => "release", Fsync => "fsync", Opendir => "opendir", Readdir => "readdir",
    Readdirplus => "readdirplus", Releasedir => "releasedir", Fsyncdir => "fsyncdir",
    Statfs => "statfs", Setxattr => "setxattr", Getxattr => "getxattr",
    Listxattr => "listxattr", Removexattr => "removexattr", Access => "access",
    Create => "create", Fallocate => "fallocate", Lseek => "lseek",
    CopyFileRange => "copy_file_range",
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabel {
    volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    volume: String,
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    volume: String,
    op: &'static str,
    errno: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    task: &'static str,
    outcome: &'static str,
}

/// FUSE request latency buckets, in seconds: 5 us to 10 s.
const LATENCY_BUCKETS: [f64; 14] = [
    5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.025, 0.1, 0.5, 2.0, 10.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Registers a metric and returns the handle to count into.
fn registered<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

pub struct Metrics {
    registry: Registry,
    daemon: Arc<OnceLock<Weak<Daemon>>>,
    fuse_latency: Family<OpLabels, Histogram, fn() -> Histogram>,
    fuse_errors: Family<ErrorLabels, Counter>,
    /// The (op, errno) error series each volume has, to drop them with the volume.
    error_labels: parking_lot::Mutex<
        std::collections::HashMap<String, std::collections::HashSet<(&'static str, i32)>>,
    >,
    read_bytes: Family<VolumeLabel, Counter>,
    written_bytes: Family<VolumeLabel, Counter>,
    invalidations: Family<VolumeLabel, Counter>,
    runs: Family<RunLabels, Counter>,
    gc_chunk_bytes_freed: Counter,
    gc_disk_bytes_reclaimed: Counter,
    scrub_bytes: Counter,
    /// Peer traffic and repairs (the peer module counts into clones of these).
    pub peer: PeerCounters,
    pub replication: ReplicationMetrics,
}

/// The peer counters: bytes on peer connections (both directions, listener and client),
/// handshake failures, chunks repaired from peers and chunks a peer sent that failed
/// verification.
#[derive(Clone, Debug, Default)]
pub struct PeerCounters {
    pub sent: Counter,
    pub received: Counter,
    pub handshake_failures: Counter,
    pub repaired: Counter,
    pub rejected: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    pub volume: String,
    pub replica: String,
}

/// Replication: bytes of replication messages on the wire (sent by this host's workers,
/// received by its listener), snapshots shipped, and the lag of each replica.
#[derive(Clone, Debug, Default)]
pub struct ReplicationMetrics {
    pub sent: Counter,
    pub received: Counter,
    pub shipped: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("volfs");
        let fuse_latency: Family<OpLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "fuse_request_duration_seconds",
            "FUSE requests answered, by volume and operation, and how long the daemon took",
            fuse_latency.clone(),
        );
        let fuse_errors = registered(
            &mut registry,
            "fuse_errors",
            "FUSE requests answered with an error, by volume, operation and errno",
            Family::default(),
        );
        let read_bytes = registered(
            &mut registry,
            "volume_read_bytes",
            "Bytes read from a volume through FUSE",
            Family::default(),
        );
        let written_bytes = registered(
            &mut registry,
            "volume_written_bytes",
            "Bytes written to a volume through FUSE",
            Family::default(),
        );
        let invalidations = registered(
            &mut registry,
            "kernel_cache_invalidations",
            "Inodes whose kernel page and attribute cache the daemon invalidated",
            Family::default(),
        );
        let runs = registered(
            &mut registry,
            "background_runs",
            "Background and maintenance runs (gc, scrub, fsck) by outcome",
            Family::default(),
        );
        let gc_chunk_bytes_freed = registered(
            &mut registry,
            "gc_chunk_bytes_freed",
            "Uncompressed bytes of the chunks gc freed",
            Counter::default(),
        );
        let gc_disk_bytes_reclaimed = registered(
            &mut registry,
            "gc_disk_bytes_reclaimed",
            "Pack and index bytes on disk that gc gave back",
            Counter::default(),
        );
        let scrub_bytes = registered(
            &mut registry,
            "scrub_verified_bytes",
            "Chunk bytes read back and verified against their hash by scrub and fsck",
            Counter::default(),
        );
        let peer = PeerCounters {
            sent: registered(
                &mut registry,
                "peer_sent_bytes",
                "Bytes sent on peer connections (preamble, handshake and encrypted frames)",
                Counter::default(),
            ),
            received: registered(
                &mut registry,
                "peer_received_bytes",
                "Bytes received on peer connections",
                Counter::default(),
            ),
            handshake_failures: registered(
                &mut registry,
                "peer_handshake_failures",
                "Peer connections that failed the version exchange or the Noise handshake (wrong cluster key, not a volfs peer, timeout)",
                Counter::default(),
            ),
            repaired: registered(
                &mut registry,
                "peer_chunks_repaired",
                "Corrupt chunks replaced by a verified copy from a peer (fsck --repair, scrub)",
                Counter::default(),
            ),
            rejected: registered(
                &mut registry,
                "peer_chunks_rejected",
                "Chunks a peer sent that did not match their id (never stored)",
                Counter::default(),
            ),
        };
        let replication = ReplicationMetrics {
            sent: registered(
                &mut registry,
                "replication_sent_bytes",
                "Bytes of replication messages (layer queries, chunks, tree rows, commits) sent to replica peers",
                Counter::default(),
            ),
            received: registered(
                &mut registry,
                "replication_received_bytes",
                "Bytes of replication messages received from origin peers",
                Counter::default(),
            ),
            shipped: registered(
                &mut registry,
                "replication_snapshots_shipped",
                "Snapshots committed on a replica peer",
                Counter::default(),
            ),
        };
        registry.register(
            "build",
            "The daemon's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let daemon = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(StateCollector {
            daemon: daemon.clone(),
        }));
        Metrics {
            registry,
            daemon,
            fuse_latency,
            fuse_errors,
            error_labels: Default::default(),
            read_bytes,
            written_bytes,
            invalidations,
            runs,
            gc_chunk_bytes_freed,
            gc_disk_bytes_reclaimed,
            scrub_bytes,
            peer,
            replication,
        }
    }

    /// Points the scrape-time view at the daemon (which owns the metrics, hence the late,
    /// weak link). Until then only the counters are served.
    pub fn attach(&self, daemon: &Arc<Daemon>) {
        let _ = self.daemon.set(Arc::downgrade(daemon));
    }

    /// The handles one volume's FUSE adapter counts into.
    pub fn volume(self: &Arc<Self>, volume: &str) -> Arc<VolumeMetrics> {
        let ops = Op::ALL.iter().map(|_| OnceLock::new()).collect();
        let label = VolumeLabel {
            volume: volume.to_string(),
        };
        Arc::new(VolumeMetrics {
            volume: volume.to_string(),
            ops,
            read_bytes: self.read_bytes.get_or_create(&label).clone(),
            written_bytes: self.written_bytes.get_or_create(&label).clone(),
            invalidations: self.invalidations.get_or_create(&label).clone(),
            errors: Default::default(),
            metrics: self.clone(),
        })
    }

    /// Drops every series of a removed volume.
    pub fn forget_volume(&self, volume: &str) {
        for op in Op::ALL {
            self.fuse_latency.remove(&OpLabels {
                volume: volume.to_string(),
                op: op.name(),
            });
        }
        let label = VolumeLabel {
            volume: volume.to_string(),
        };
        self.read_bytes.remove(&label);
        self.written_bytes.remove(&label);
        self.invalidations.remove(&label);
        for (op, errno) in self.error_labels.lock().remove(volume).unwrap_or_default() {
            self.fuse_errors.remove(&ErrorLabels {
                volume: volume.to_string(),
                op,
                errno: errno_name(errno),
            });
        }
    }

    /// Counts a finished background or maintenance run.
    pub fn run_finished(&self, task: &'static str, ok: bool) {
        self.runs
            .get_or_create(&RunLabels {
                task,
                outcome: if ok { "ok" } else { "failed" },
            })
            .inc();
    }

    pub fn gc_freed(&self, report: &volfs::api::GcReport) {
        self.gc_chunk_bytes_freed.inc_by(report.bytes_freed);
        self.gc_disk_bytes_reclaimed
            .inc_by(report.disk_before.saturating_sub(report.disk_after));
    }

    pub fn scrubbed(&self, bytes: u64) {
        self.scrub_bytes.inc_by(bytes);
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// One volume's counters, held by its FUSE adapter.
pub struct VolumeMetrics {
    volume: String,
    /// Indexed like [`Op::ALL`]; each made on the operation's first request, so that
    /// operations a volume never sees export no series.
    ops: Vec<OnceLock<Histogram>>,
    pub read_bytes: Counter,
    pub written_bytes: Counter,
    pub invalidations: Counter,
    /// (op, errno) -> its counter in the family, so that a counted error (ENOENT lookups can
    /// be frequent) costs a read lock and a hash, no allocation.
    errors: parking_lot::RwLock<std::collections::HashMap<(&'static str, i32), Counter>>,
    metrics: Arc<Metrics>,
}

impl VolumeMetrics {
    /// Starts timing one request; the time is recorded when the returned timer drops.
    pub fn time(&self, op: Op) -> Timer {
        let i = op as usize;
        let h = self.ops[i].get_or_init(|| {
            self.metrics
                .fuse_latency
                .get_or_create(&OpLabels {
                    volume: self.volume.clone(),
                    op: op.name(),
                })
                .clone()
        });
        Timer {
            h: h.clone(),
            start: Instant::now(),
        }
    }

    /// Counts a request answered with `errno`.
    pub fn error(&self, op: &'static str, errno: i32) {
        if let Some(c) = self.errors.read().get(&(op, errno)) {
            c.inc();
            return;
        }
        let c = self
            .metrics
            .fuse_errors
            .get_or_create(&ErrorLabels {
                volume: self.volume.clone(),
                op,
                errno: errno_name(errno),
            })
            .clone();
        c.inc();
        self.errors.write().insert((op, errno), c);
        self.metrics
            .error_labels
            .lock()
            .entry(self.volume.clone())
            .or_default()
            .insert((op, errno));
    }
}

/// Records a request's duration into its histogram when dropped (so a request handed to a
/// worker thread is timed until that thread replies).
pub struct Timer {
    h: Histogram,
    start: Instant,
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.h.observe(self.start.elapsed().as_secs_f64());
    }
}

/// `ENOENT`, `EIO`, ... (the number for the rare ones without a name here).
pub fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EDQUOT => "EDQUOT",
        libc::ENXIO => "ENXIO",
        libc::ESTALE => "ESTALE",
        libc::E2BIG => "E2BIG",
        _ => return e.to_string(),
    };
    name.to_string()
}

/// Reads the daemon's state at each scrape.
#[derive(Debug)]
struct StateCollector {
    daemon: Arc<OnceLock<Weak<Daemon>>>,
}

fn gauge<N: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: N,
) -> std::fmt::Result {
    ConstGauge::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

/// One gauge family with one `volume` label per row.
fn volume_gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(String, i64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (volume, v) in rows {
        let label = VolumeLabel {
            volume: volume.clone(),
        };
        ConstGauge::new(*v).encode(m.encode_family(&label)?)?;
    }
    Ok(())
}

impl Collector for StateCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let Some(d) = self.daemon.get().and_then(Weak::upgrade) else {
            return Ok(());
        };
        let s = match crate::control::state(&d) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(op = "metrics", "reading the daemon state: {e}");
                return Ok(());
            }
        };
        let rows = |f: &dyn Fn(&volfs::api::VolumeInfo) -> Option<i64>| -> Vec<(String, i64)> {
            s.status
                .volumes
                .iter()
                .filter_map(|v| f(v).map(|x| (v.name.clone(), x)))
                .collect()
        };
        // Replication lag, from the workers' live table (always described, even when empty).
        {
            let live = d.peers.replication.lock().clone();
            let mut m = enc.encode_descriptor(
                "replication_lag_seconds",
                "0 when a replica is up to date, else seconds since the last snapshot it holds, by volume and replica peer",
                None,
                MetricType::Gauge,
            )?;
            for ((volume, replica), l) in live {
                ConstGauge::new(l.lag_secs as i64)
                    .encode(m.encode_family(&ReplicaLabels { volume, replica })?)?;
            }
        }
        volume_gauges(
            &mut enc,
            "volume_used_bytes",
            "Bytes a volume's files use (what its quota counts)",
            &rows(&|v| Some(v.bytes_used as i64)),
        )?;
        volume_gauges(
            &mut enc,
            "volume_quota_bytes",
            "A volume's size limit (volumes without one are absent)",
            &rows(&|v| v.size.map(|s| s as i64)),
        )?;
        volume_gauges(
            &mut enc,
            "volume_open_files",
            "Files and directories the kernel holds open on a volume",
            &rows(&|v| Some(v.open_handles as i64)),
        )?;
        volume_gauges(
            &mut enc,
            "volume_mountpoints",
            "Mountpoints of a volume",
            &rows(&|v| Some(v.mountpoints.len() as i64)),
        )?;
        let st = &s.status;
        gauge(
            &mut enc,
            "store_logical_bytes",
            "Bytes all volumes use, before deduplication",
            st.logical_bytes as i64,
        )?;
        gauge(
            &mut enc,
            "store_stored_bytes",
            "Bytes of chunk data on disk (pack files)",
            st.stored_bytes as i64,
        )?;
        gauge(
            &mut enc,
            "store_dedup_ratio",
            "Logical bytes over stored bytes",
            st.dedup_ratio,
        )?;
        gauge(
            &mut enc,
            "data_dir_free_bytes",
            "Free bytes on the data dir's file system",
            st.data_dir_free_bytes as i64,
        )?;
        gauge(
            &mut enc,
            "data_dir_size_bytes",
            "Size of the data dir's file system",
            st.data_dir_total_bytes as i64,
        )?;
        let c = &s.store.chunks.stats;
        counter(
            &mut enc,
            "chunk_cache_hits",
            "Chunk reads answered from the decoded-chunk cache",
            c.cache_hits.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "chunk_cache_misses",
            "Chunk reads that went to the pack files",
            c.cache_misses.load(Ordering::Relaxed),
        )?;
        gauge(
            &mut enc,
            "chunk_cache_bytes",
            "Bytes the decoded-chunk cache holds",
            s.chunk_cache_bytes as i64,
        )?;
        counter(
            &mut enc,
            "chunks_written",
            "New chunks written to pack files",
            c.written.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "chunks_deduplicated",
            "Chunks not written because the store already held them",
            c.deduplicated.load(Ordering::Relaxed),
        )?;
        for (name, help, v) in [
            (
                "chunks_fetched_on_read",
                "Chunks a read found missing locally and fetched from a peer (lazily shipped replicas)",
                &c.fetched_on_read,
            ),
            (
                "chunk_bytes_fetched_on_read",
                "Bytes of the chunks fetched from peers on read",
                &c.fetched_on_read_bytes,
            ),
            (
                "chunks_fetched_by_pull",
                "Chunks volume pull fetched from peers",
                &c.fetched_by_pull,
            ),
            (
                "chunk_bytes_fetched_by_pull",
                "Bytes of the chunks volume pull fetched from peers",
                &c.fetched_by_pull_bytes,
            ),
            (
                "chunk_fetch_failures",
                "Chunks missing locally that no peer could give (EIO on read, reported by pull)",
                &c.fetch_failures,
            ),
        ] {
            counter(&mut enc, name, help, v.load(Ordering::Relaxed))?;
        }
        counter(
            &mut enc,
            "corrupt_chunk_reads",
            "Chunk reads that failed verification",
            c.corrupt.load(Ordering::Relaxed),
        )?;
        gauge(
            &mut enc,
            "corrupt_chunks",
            "Distinct chunks known to fail verification (a clean scrub resets it)",
            st.corrupt_chunks as i64,
        )?;
        let e = &s.engine;
        counter(
            &mut enc,
            "index_cache_hits",
            "Metadata index (RocksDB) block cache hits",
            e.cache_hits,
        )?;
        counter(
            &mut enc,
            "index_cache_misses",
            "Metadata index (RocksDB) block cache misses",
            e.cache_misses,
        )?;
        gauge(
            &mut enc,
            "index_cache_bytes",
            "Bytes the metadata index block cache holds",
            e.cache_bytes as i64,
        )?;
        gauge(
            &mut enc,
            "index_pending_compaction_bytes",
            "RocksDB compaction backlog: bytes compaction still has to rewrite",
            e.pending_compaction_bytes as i64,
        )?;
        gauge(
            &mut enc,
            "index_running_compactions",
            "RocksDB compactions running now",
            e.running_compactions as i64,
        )?;
        gauge(
            &mut enc,
            "index_running_flushes",
            "RocksDB memtable flushes running now",
            e.running_flushes as i64,
        )?;
        gauge(
            &mut enc,
            "index_table_bytes",
            "Bytes of the metadata index's table files",
            e.sst_bytes as i64,
        )?;
        gauge(
            &mut enc,
            "index_memtable_bytes",
            "Bytes of the metadata index's memtables",
            e.memtable_bytes as i64,
        )?;
        {
            let mut m = enc.encode_descriptor(
                "background_task_running",
                "1 while a background or maintenance task runs",
                None,
                MetricType::Gauge,
            )?;
            for t in &st.background {
                #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
                struct Task {
                    task: String,
                }
                ConstGauge::new(i64::from(t.running)).encode(m.encode_family(&Task {
                    task: t.task.clone(),
                })?)?;
            }
        }
        gauge(
            &mut enc,
            "uptime_seconds",
            "Seconds since the daemon started",
            st.uptime_secs as i64,
        )?;
        Ok(())
    }
}

/// Serves `GET /metrics` on a TCP listener until the runtime stops.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    use axum::http::header;
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move {
                match tokio::task::spawn_blocking(move || m.encode()).await {
                    Ok(Ok(text)) => (
                        axum::http::StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    ),
                    _ => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                        "encoding metrics failed\n".to_string(),
                    ),
                }
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(op = "metrics", "metrics endpoint: {e}");
    }
}
