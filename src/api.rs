//! Wire types of the control API (HTTP/1.1 + JSON on a unix socket, mode 0600).
//!
//! Paths are versioned; this is version 1:
//! | method | path | body | answer |
//! | --- | --- | --- | --- |
//! | GET | /v1/status | | [`Status`] |
//! | GET | /v1/volumes | | `[VolumeInfo]` |
//! | POST | /v1/volumes | [`CreateVolume`] | [`VolumeInfo`] |
//! | GET | /v1/volumes/{name} | | [`VolumeInfo`] |
//! | DELETE | /v1/volumes/{name}?force=true | | `{}` |
//! | PATCH | /v1/volumes/{name} (or POST /v1/volumes/{name}/update) | [`UpdateVolume`] | [`VolumeInfo`] |
//! | POST | /v1/volumes/prune | [`PruneRequest`] | [`PruneReply`] |
//! | GET | /v1/mounts | | `[MountInfo]` |
//! | POST | /v1/mounts | [`MountRequest`] | [`MountInfo`] |
//! | POST | /v1/unmount | [`UnmountRequest`] | `{}` |
//! | GET | /v1/volumes/{name}/snapshots | | `[SnapshotInfo]` |
//! | POST | /v1/volumes/{name}/snapshots | [`CreateSnapshot`] | [`SnapshotInfo`] |
//! | DELETE | /v1/volumes/{name}/snapshots/{snapshot} | | `{}` |
//! | POST | /v1/volumes/{name}/rollback | [`RollbackRequest`] | [`VolumeInfo`] |
//! | GET | /v1/layers | | `[LayerInfo]` |
//! | POST | /v1/layers | [`ImportLayer`] | [`ImportedLayer`] |
//! | DELETE | /v1/layers/{id} | | `{}` |
//! | POST | /v1/layers/{id}/export | [`ExportLayer`] | `{}` |
//! | GET | /v1/df | | [`DfReport`] |
//! | POST | /v1/gc | | [`GcReport`] |
//! | POST | /v1/fsck | [`FsckRequest`] | [`FsckReport`] |
//! | POST | /v1/scrub | | [`ScrubReport`] |
//! | POST | /v1/cache/drop | [`CacheDrop`] (optional) | [`CacheDropped`] |
//! | GET | /v1/volumes/{name}/export?snapshot=S | | a tarball, chunked; header [`HEADER_TOTAL`] |
//! | POST | /v1/volumes/{name}/import | a tarball (chunked or Content-Length) | [`VolumeInfo`] |
//! | POST | /v1/backups | [`BackupRequest`] | NDJSON [`StreamLine`]`<BackupInfo>` |
//! | POST | /v1/backups/list | [`BackupList`] | `[BackupInfo]` |
//! | POST | /v1/restore | [`RestoreRequest`] | NDJSON [`StreamLine`]`<VolumeInfo>` |
//! | GET | /v1/peers | | `[PeerInfo]` (each peer asked now) |
//! | POST | /v1/peers | [`AddPeer`] | [`PeerInfo`] |
//! | DELETE | /v1/peers/{name} | | `{}` |
//! | GET | /v1/cluster | | [`ClusterStatus`] |
//! | POST | /v1/volumes/{name}/promote | | [`Promoted`] |
//! | POST | /v1/volumes/{name}/pull | | NDJSON [`StreamLine`]`<PullReport>` |
//!
//! Volume clones are `POST /v1/volumes` with the option `from=VOLUME[@SNAPSHOT]`; a mount
//! request's volume may be `VOLUME@SNAPSHOT` (read-only).
//!
//! Errors answer with a 4xx/5xx status and an [`ErrorBody`].
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::backup::BackupInfo;
pub use crate::fsck::ScrubReport;
pub use crate::fsck::{FsckReport, PeerRepair, Problem};
pub use crate::gc::{DfReport, GcReport, VolumeUsage};
pub use crate::image::LayerInfo;
pub use crate::progress::ProgressView;

pub const DEFAULT_SOCKET: &str = "/run/volfs/volfs.sock";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/volfs";
pub const DEFAULT_RUN_DIR: &str = "/run/volfs";

/// Header of an export answer: the bytes of file data the tarball will carry (for progress).
pub const HEADER_TOTAL: &str = "x-volfs-total-bytes";

/// Body of `POST /v1/backups`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupRequest {
    /// `VOLUME` or `VOLUME@SNAPSHOT`.
    pub volume: String,
    /// Absolute path of the repository (created if missing or empty).
    pub repo: String,
    /// The backup's name (default `VOLUME-YYYYMMDDTHHMMSSZ`).
    #[serde(default)]
    pub name: Option<String>,
}

/// Body of `POST /v1/backups/list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupList {
    pub repo: String,
}

/// Body of `POST /v1/restore`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestoreRequest {
    pub repo: String,
    pub backup: String,
    /// The new volume.
    pub volume: String,
}

/// One line of a long operation's answer (newline-delimited JSON): progress lines, then
/// exactly one `done` or `error` line. A stream that ends without one failed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamLine<T> {
    Progress { done: u64, total: u64 },
    Done(T),
    Error(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct CreateVolume {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `size`, `ro`; unknown keys are refused.
    #[serde(default)]
    pub opts: BTreeMap<String, String>,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeInfo {
    pub name: String,
    /// RFC 3339, UTC.
    pub created: String,
    pub labels: BTreeMap<String, String>,
    pub options: BTreeMap<String, String>,
    pub read_only: bool,
    /// Quota in bytes, if any.
    pub size: Option<u64>,
    pub bytes_used: u64,
    pub mountpoints: Vec<String>,
    pub open_handles: u64,
    /// Snapshot names.
    #[serde(default)]
    pub snapshots: Vec<String>,
    /// Frozen trees below the writable top.
    #[serde(default)]
    pub layers: usize,
    /// The image layers it was created on (`--layers`), bottom first.
    #[serde(default)]
    pub image: Vec<String>,
    /// Cluster mode only: the host that owns the volume for writing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Cluster mode only: the fencing token of that ownership.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<i64>,
    /// Cluster mode only: the hosts placed to hold replicas.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
    /// Replication of this volume to peers (`replicas`, `rpo`), if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationInfo>,
    /// Set when this volume is a read-only replica: the origin host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_of: Option<String>,
    /// On a replica: the last snapshot received from the origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_snapshot: Option<String>,
}

/// `POST /v1/volumes/{name}/pull`'s result: the chunks of a (lazily shipped) replica that
/// were not local, fetched from peers. Progress lines count bytes (`done`/`total`).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct PullReport {
    pub volume: String,
    /// Chunks the volume (every snapshot) references that were not local.
    pub lacking_chunks: u64,
    /// Chunks and bytes fetched (and stored) now.
    pub fetched_chunks: u64,
    pub fetched_bytes: u64,
    /// Chunks no peer could give: `{chunk, why}`. Non-empty: the CLI exits 1.
    #[serde(default)]
    pub failed: Vec<PullFailure>,
    pub millis: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PullFailure {
    pub chunk: String,
    pub why: String,
}

/// `PATCH /v1/volumes/{name}` (also `POST /v1/volumes/{name}/update`): change options.
/// Known keys: `replicas`, `rpo`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct UpdateVolume {
    #[serde(default)]
    pub opts: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplicationInfo {
    pub replicas: u32,
    /// 0: no automatic snapshots.
    pub rpo_secs: u64,
    /// One per replica peer (placement order).
    pub peers: Vec<ReplicaStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplicaStatus {
    pub peer: String,
    /// The newest snapshot the replica holds, and its time (RFC 3339).
    pub last_snapshot: Option<String>,
    pub last_snapshot_time: Option<String>,
    /// Seconds of changes the replica lacks: now minus its last snapshot's time while
    /// something newer is unshipped; 0 when it is up to date.
    pub lag_secs: u64,
    /// `idle`, `sending`, `error`.
    pub state: String,
    pub sent_bytes: u64,
    pub total_bytes: u64,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct CreateSnapshot {
    /// Default: the UTC time, `YYYYMMDDTHHMMSSZ`.
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotInfo {
    pub volume: String,
    pub name: String,
    /// RFC 3339, UTC.
    pub created: String,
    /// The volume's used bytes when it was taken.
    pub bytes_used: u64,
    /// The LayerId of its frozen top, once sealed (sealing runs in the background).
    pub layer: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RollbackRequest {
    pub snapshot: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportLayer {
    /// Absolute path of a tarball on the daemon's host.
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportedLayer {
    pub id: String,
    /// False when the store already had an identical layer.
    pub new: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportLayer {
    /// Absolute path of the tarball to write (created or truncated).
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct FsckRequest {
    #[serde(default)]
    pub repair: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct PruneRequest {
    /// Only volumes carrying all these labels (`k=v`, or `k` for any value).
    #[serde(default)]
    pub filters: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct PruneReply {
    pub removed: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountRequest {
    pub volume: String,
    /// Where to mount; absolute path to an existing directory.
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MountInfo {
    pub volume: String,
    pub target: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnmountRequest {
    pub target: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// The daemon as started (the supervisor, when it runs as two processes; systemd's
    /// main PID).
    pub pid: u32,
    /// The process that serves FUSE and this API (equal to `pid` without a supervisor).
    #[serde(default)]
    pub server_pid: u32,
    /// Times a crashed server process was replaced since the daemon started.
    #[serde(default)]
    pub server_restarts: u64,
    pub uptime_secs: u64,
    pub data_dir: String,
    pub data_dir_free_bytes: u64,
    pub data_dir_total_bytes: u64,
    pub volumes: Vec<VolumeInfo>,
    pub stored_bytes: u64,
    pub logical_bytes: u64,
    /// Distinct chunks known to fail verification (a clean scrub or fsck resets it).
    pub corrupt_chunks: u64,
    /// `logical_bytes / stored_bytes` (1 when nothing is stored).
    #[serde(default)]
    pub dedup_ratio: f64,
    /// gc, scrub, fsck: running now (with progress) and how each last ended.
    #[serde(default)]
    pub background: Vec<BackgroundTask>,
    /// Things that need attention; `volfs status` exits non-zero when there are any.
    pub warnings: Vec<String>,
    /// One line on the cluster: `single host`, or the host, etcd and lease state.
    #[serde(default)]
    pub cluster: String,
    /// The metadata index's background work and size (absent from older daemons).
    #[serde(default)]
    pub index: IndexStatus,
}

/// The metadata index (RocksDB) in [`Status`]: whether it is flushing or compacting now, and
/// its size. Lookups are slower while a large compaction runs (it competes for the CPU and
/// rewrites the table files lookups read), e.g. right after a million files were created.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct IndexStatus {
    pub running_flushes: u64,
    pub running_compactions: u64,
    /// Bytes compaction still has to rewrite (its backlog).
    pub pending_compaction_bytes: u64,
    /// Live table files plus memtables.
    pub bytes: u64,
}

impl IndexStatus {
    /// Nothing is being flushed or compacted, and nothing waits to be.
    pub fn quiet(&self) -> bool {
        self.running_flushes == 0
            && self.running_compactions == 0
            && self.pending_compaction_bytes == 0
    }
}

/// One kind of background or maintenance work in [`Status`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackgroundTask {
    /// `gc`, `scrub` or `fsck`.
    pub task: String,
    pub running: bool,
    /// RFC 3339, UTC: when the current run started.
    pub started: Option<String>,
    pub progress: Option<ProgressView>,
    /// How often it runs by itself, in seconds; 0: only on request.
    pub interval_secs: u64,
    pub last_finished: Option<String>,
    pub last_millis: Option<u64>,
    /// What the last run did (`freed 12 MiB`) or why it failed (`failed: ...`).
    pub last_outcome: Option<String>,
    pub last_ok: Option<bool>,
}

/// Body of `POST /v1/cache/drop` (optional).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct CacheDrop {
    /// Also invalidate the kernel's page and attribute cache of every mounted volume.
    #[serde(default)]
    pub kernel: bool,
}

/// Does a label map match `k=v` / `k` filters?
pub fn labels_match(labels: &BTreeMap<String, String>, filters: &[String]) -> bool {
    filters.iter().all(|f| match f.split_once('=') {
        Some((k, v)) => labels.get(k).is_some_and(|x| x == v),
        None => labels.contains_key(f.as_str()),
    })
}

/// Formats unix seconds as RFC 3339 UTC.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_values() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn label_filters() {
        let mut l = BTreeMap::new();
        l.insert("env".to_string(), "ci".to_string());
        assert!(labels_match(&l, &["env=ci".into()]));
        assert!(labels_match(&l, &["env".into()]));
        assert!(!labels_match(&l, &["env=prod".into()]));
        assert!(labels_match(&l, &[]));
    }
}

/// Answer to `POST /v1/cache/drop`: bytes the decoded-chunk cache held before it was emptied,
/// and how many inodes' kernel caches were invalidated (with `kernel`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheDropped {
    pub bytes: u64,
    #[serde(default)]
    pub kernel_inodes: u64,
}

/// `POST /v1/peers`: a peer host to add (`volfs peer add NAME ADDR`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddPeer {
    /// Validated like volume names.
    pub name: String,
    /// `host:port` of the peer's `peer_listen`.
    pub addr: String,
}

/// A peer and how it answered when asked (`GET /v1/peers`, `volfs peer ls`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerInfo {
    pub name: String,
    pub addr: String,
    /// A TCP connection was made.
    pub connected: bool,
    /// The Noise handshake with the cluster key succeeded and the peer said hello.
    pub authenticated: bool,
    /// The peer protocol version the two sides chose.
    #[serde(default)]
    pub version: Option<u16>,
    /// The host name the peer gave in its hello.
    #[serde(default)]
    pub host: Option<String>,
    /// Round trip of a ping over the channel, in milliseconds.
    #[serde(default)]
    pub latency_ms: Option<f64>,
    /// Why it does not answer (`authentication failed: ...`, `connection refused`, ...).
    #[serde(default)]
    pub error: Option<String>,
}

/// `GET /v1/cluster`: this host's view of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ClusterStatus {
    /// `single host` (no etcd configured) or `etcd`.
    pub mode: String,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Did the last keep-alive succeed within half the lease TTL?
    #[serde(default)]
    pub connected: bool,
    #[serde(default)]
    pub lease_id: i64,
    #[serde(default)]
    pub lease_ttl_secs: u64,
    /// Why etcd could not be used, if it could not.
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub hosts: Vec<ClusterHost>,
    #[serde(default)]
    pub volumes: Vec<ClusterVolume>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ClusterHost {
    pub host: String,
    #[serde(default)]
    pub peer: Option<String>,
    #[serde(default)]
    pub version: String,
    /// Seconds left on the host's lease (-1: unknown).
    pub ttl_left: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ClusterVolume {
    pub name: String,
    /// The owner host, if the volume has one now.
    #[serde(default)]
    pub owner: Option<String>,
    /// The fencing token of the ownership (the owner key's etcd create_revision).
    #[serde(default)]
    pub token: Option<i64>,
    #[serde(default)]
    pub replicas: Vec<String>,
    /// This host's role: `owner`, `replica`, or `-` (not here).
    #[serde(default)]
    pub local: String,
}

/// `POST /v1/volumes/{name}/promote`: the answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Promoted {
    pub volume: String,
    pub host: String,
    pub token: i64,
    /// RFC 3339: the point in time the local copy holds.
    pub point_in_time: String,
    /// What that time is: `snapshot NAME`, or `volume created` when it has no snapshot; for
    /// a promoted replica `last replicated snapshot NAME (from host ORIGIN)`.
    pub basis: String,
    /// The snapshot a promoted replica starts from (absent for other volumes).
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Anything the operator must know (a single host's promote without etcd: why it was
    /// allowed).
    #[serde(default)]
    pub note: Option<String>,
}

/// `POST /v1/volumes/{name}/promote` body (may be absent).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PromoteRequest {
    /// A single host without etcd: promote even if the replica's origin answers.
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/volumes/{name}/move` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MoveRequest {
    /// The peer (by its record's name; in cluster mode its host name) to move to.
    pub to: String,
    /// Move a mounted or Docker-held volume: it is unmounted everywhere first.
    #[serde(default)]
    pub force: bool,
}

/// What `volume move` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Moved {
    pub volume: String,
    pub to: String,
    /// The final snapshot, and its time (RFC 3339): the contents the new owner has.
    pub snapshot: String,
    pub snapshot_time: String,
    /// Bytes sent to the peer (chunks, rows, messages).
    pub bytes_sent: u64,
    /// Snapshots shipped (those the peer lacked).
    pub snapshots: usize,
    pub token_before: i64,
    /// The new owner's token.
    pub token: i64,
}
