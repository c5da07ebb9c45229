//! The control API: HTTP/1.1 + JSON on a unix socket (mode 0600), paths under `/v1`. Wire
//! types and the endpoint table are in `volfs::api`. Handlers run the blocking work (index,
//! mount syscalls) on tokio's blocking pool.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use volfs::api::{
    self, CreateSnapshot, CreateVolume, ExportLayer, FsckRequest, ImportLayer, ImportedLayer,
    MountInfo, MountRequest, PruneReply, PruneRequest, RollbackRequest, SnapshotInfo, Status,
    UnmountRequest, VolumeInfo,
};
use volfs::ids::{LayerId, VolumeName, VolumeRef};
use volfs::meta::VolumeRecord;
use volfs::volume::CreateOptions;
use volfs::Error;

use crate::metrics::Metrics;
use crate::mounts::Mounts;
use crate::work::Work;

pub struct Daemon {
    pub mounts: Arc<Mounts>,
    pub started: Instant,
    /// Wakes the background worker to seal new snapshot layers.
    pub seal: Arc<tokio::sync::Notify>,
    pub metrics: Arc<Metrics>,
    /// gc, scrub, fsck: what runs now and how each last ended.
    pub work: Work,
    /// The cluster key, the peer records, and fetching chunks from peers.
    pub peers: Arc<crate::peer::Peers>,
}

pub struct ApiError(Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

/// The message of an error answer, for [`log_errors`].
#[derive(Clone)]
struct ErrorMessage(String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let msg = self.0.to_string();
        let mut r = (status, Json(api::ErrorBody { error: msg.clone() })).into_response();
        r.extensions_mut().insert(ErrorMessage(msg));
        r
    }
}

/// Control API requests are small JSON documents.
const MAX_BODY: usize = 1 << 20;

/// Logs every error answer with the operation (method and path) and the volume it concerns,
/// so that what a user sees from the CLI or Docker is also in the daemon's log.
pub async fn log_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // The volume may be in the body (`{"name": ...}`, `{"volume": ...}`): keep a copy of a
    // small JSON body to name it.
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(op = %format!("{method} {path}"), "request body refused: {e}");
            return ApiError(Error::Invalid(format!(
                "request body unreadable or over {MAX_BODY} bytes: {e}"
            )))
            .into_response();
        }
    };
    let named = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| {
            ["volume", "name"]
                .iter()
                .find_map(|k| v.get(k).and_then(|x| x.as_str()).map(str::to_string))
        });
    let req = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
    let r = next.run(req).await;
    if let Some(ErrorMessage(msg)) = r.extensions().get::<ErrorMessage>() {
        let volume = volume_of_path(&path)
            .map(str::to_string)
            .or(named)
            .unwrap_or_else(|| "-".into());
        let volume = volume.as_str();
        let op = format!("{method} {path}");
        if r.status().is_server_error() {
            tracing::error!(volume, op, status = r.status().as_u16(), "{msg}");
        } else {
            tracing::warn!(volume, op, status = r.status().as_u16(), "{msg}");
        }
    }
    r
}

/// The volume a control or plugin path names (`/v1/volumes/{name}/...`).
fn volume_of_path(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/volumes/")?;
    let name = rest.split('/').next()?;
    (!name.is_empty() && name != "prune").then_some(name)
}

type ApiResult<T> = Result<Json<T>, ApiError>;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> volfs::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError),
        Err(e) => Err(ApiError(Error::Db(format!("worker failed: {e}")))),
    }
}

pub fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/prune", post(prune))
        .route(
            "/v1/volumes/{name}",
            get(inspect).delete(remove).patch(update_volume),
        )
        .route("/v1/volumes/{name}/update", post(update_volume))
        .route("/v1/mounts", get(list_mounts).post(mount))
        .route("/v1/unmount", post(unmount))
        .route(
            "/v1/volumes/{name}/snapshots",
            get(list_snapshots).post(create_snapshot),
        )
        .route(
            "/v1/volumes/{name}/snapshots/{snapshot}",
            axum::routing::delete(remove_snapshot),
        )
        .route("/v1/volumes/{name}/rollback", post(rollback))
        .route("/v1/layers", get(list_layers).post(import_layer))
        .route("/v1/layers/{id}", axum::routing::delete(remove_layer))
        .route("/v1/layers/{id}/export", post(export_layer))
        .route("/v1/df", get(df))
        .route("/v1/gc", post(gc))
        .route("/v1/fsck", post(fsck))
        .route("/v1/scrub", post(scrub))
        .route("/v1/cache/drop", post(drop_cache))
        .route("/v1/volumes/{name}/export", get(export_volume))
        .route("/v1/backups", post(backup))
        .route("/v1/backups/list", post(list_backups))
        .route("/v1/restore", post(restore))
        .route("/v1/peers", get(list_peers).post(add_peer))
        .route("/v1/peers/{name}", axum::routing::delete(remove_peer))
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/volumes/{name}/promote", post(promote_volume))
        .route("/v1/volumes/{name}/pull", post(pull_volume))
        .route("/v1/volumes/{name}/move", post(move_handler))
        .layer(axum::middleware::from_fn(log_errors))
        // A streamed tarball: not buffered by `log_errors` (the handler logs its errors).
        .route("/v1/volumes/{name}/import", post(import_volume))
        .with_state(d)
}

/// Builds the API view of a volume.
pub fn volume_info(d: &Daemon, rec: &VolumeRecord) -> volfs::Result<VolumeInfo> {
    let inbound = volfs::replica::inbound(&*d.mounts.registry().store().engine, &rec.name)?;
    let fs = d.mounts.volume_fs(&rec.name);
    let bytes_used = match &fs {
        Some(fs) => fs.used_bytes(),
        None => d.mounts.registry().used_bytes(rec)?,
    };
    let mut options = std::collections::BTreeMap::new();
    if let Some(s) = rec.size {
        options.insert("size".to_string(), s.to_string());
    }
    if rec.read_only {
        options.insert("ro".to_string(), "true".to_string());
    }
    if let Some(s) = volfs::replica::settings(&*d.mounts.registry().store().engine, &rec.name)? {
        if s.replicas > 0 {
            options.insert("replicas".to_string(), s.replicas.to_string());
        }
        if s.rpo_secs > 0 {
            options.insert("rpo".to_string(), format!("{}s", s.rpo_secs));
        }
    }
    Ok(VolumeInfo {
        name: rec.name.clone(),
        created: api::rfc3339(rec.created),
        labels: rec.labels.clone(),
        options,
        read_only: rec.read_only,
        size: rec.size,
        bytes_used,
        mountpoints: d
            .mounts
            .mountpoints(&rec.name)
            .into_iter()
            .map(|m| m.target.display().to_string())
            .collect(),
        open_handles: fs.map(|f| f.open_handles()).unwrap_or(0),
        snapshots: volfs::layer::snapshots(&*d.mounts.registry().store().engine, rec.id)?
            .into_iter()
            .map(|s| s.name)
            .collect(),
        layers: rec.lower.len(),
        image: rec.image.iter().map(|l| l.to_hex()).collect(),
        owner: d.mounts.cluster().and_then(|c| c.owner(&rec.name)),
        token: d.mounts.cluster().and_then(|c| c.token(&rec.name)),
        replicas: d
            .mounts
            .cluster()
            .map(|c| c.replicas(&rec.name))
            .unwrap_or_default(),
        replication: replication_info(d, rec)?,
        replica_of: inbound.as_ref().map(|i| i.origin.clone()),
        replica_snapshot: inbound.map(|i| i.last),
    })
}

/// The replication view of a volume: settings, and per replica peer its progress and live
/// state.
fn replication_info(d: &Daemon, rec: &VolumeRecord) -> volfs::Result<Option<api::ReplicationInfo>> {
    let store = d.mounts.registry().store();
    let Some(s) = volfs::replica::settings(&*store.engine, &rec.name)? else {
        return Ok(None);
    };
    if s.replicas == 0 && s.rpo_secs == 0 {
        return Ok(None);
    }
    let (targets, _) = crate::replication::targets(d, &rec.name, s.replicas as usize)?;
    let live = d.peers.replication.lock().clone();
    let peers = targets
        .iter()
        .map(|p| {
            let pr = s.progress.get(&p.name);
            let l = live
                .get(&(rec.name.clone(), p.name.clone()))
                .cloned()
                .unwrap_or_default();
            api::ReplicaStatus {
                peer: p.name.clone(),
                last_snapshot: pr.and_then(|pr| pr.last.as_ref().map(|l| l.0.clone())),
                last_snapshot_time: pr.and_then(|pr| pr.last.as_ref().map(|l| api::rfc3339(l.1))),
                lag_secs: l.lag_secs,
                state: if l.state.is_empty() {
                    "idle".into()
                } else {
                    l.state.to_string()
                },
                sent_bytes: l.sent_bytes,
                total_bytes: l.total_bytes,
                error: l.last_error,
            }
        })
        .collect();
    Ok(Some(api::ReplicationInfo {
        replicas: s.replicas,
        rpo_secs: s.rpo_secs,
        peers,
    }))
}

async fn update_volume(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    Json(req): Json<api::UpdateVolume>,
) -> ApiResult<VolumeInfo> {
    Ok(Json(
        blocking(move || {
            let vname = VolumeName::new(&name)?;
            let rec = d.mounts.registry().require(&vname)?;
            let store = d.mounts.registry().store().clone();
            let (ship, opts) = take_ship(&req.opts)?;
            let (n, rpo, rest) = crate::replication::split_opts(&opts)?;
            if let Some(k) = rest.keys().next() {
                return Err(Error::Invalid(format!(
                    "option {k:?} cannot be changed with volume update (known: replicas, rpo, ship)"
                )));
            }
            if let Some(i) = volfs::replica::inbound(&*store.engine, &name)? {
                return Err(Error::ReadOnly(format!(
                    "volume {name} is a replica of {}: change it there",
                    i.origin
                )));
            }
            if let Some(lazy) = ship {
                volfs::replica::set_ship(&*store.engine, &name, lazy)?;
            }
            crate::replication::update_settings(&store, &name, |s| {
                if let Some(n) = n {
                    s.replicas = n;
                }
                if let Some(r) = rpo {
                    s.rpo_secs = r;
                }
            })?;
            volume_info(&d, &rec)
        })
        .await?,
    ))
}

fn snapshot_info(
    d: &Daemon,
    vol: &str,
    s: &volfs::layer::SnapshotRecord,
) -> volfs::Result<SnapshotInfo> {
    let layer = volfs::layer::get_tree(&*d.mounts.registry().store().engine, s.tree)?
        .and_then(|t| t.layer)
        .map(|l| l.to_hex());
    Ok(SnapshotInfo {
        volume: vol.to_string(),
        name: s.name.clone(),
        created: api::rfc3339(s.created),
        bytes_used: s.used.max(0) as u64,
        layer,
    })
}

/// A default snapshot name: the UTC time to the second.
fn default_snapshot_name() -> String {
    api::rfc3339(volfs::meta::Ts::now().secs).replace([':', '-'], "")
}

async fn list_snapshots(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> ApiResult<Vec<SnapshotInfo>> {
    Ok(Json(
        blocking(move || {
            let vol = VolumeName::new(&name)?;
            d.mounts
                .registry()
                .snapshots(&vol)?
                .iter()
                .map(|s| snapshot_info(&d, &name, s))
                .collect()
        })
        .await?,
    ))
}

async fn create_snapshot(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    Json(req): Json<CreateSnapshot>,
) -> ApiResult<SnapshotInfo> {
    Ok(Json(
        blocking(move || {
            let vol = VolumeName::new(&name)?;
            let snap = req.name.unwrap_or_else(default_snapshot_name);
            let s = d.mounts.snapshot(&vol, &snap)?;
            d.seal.notify_one();
            snapshot_info(&d, &name, &s)
        })
        .await?,
    ))
}

async fn remove_snapshot(
    State(d): State<Arc<Daemon>>,
    Path((name, snap)): Path<(String, String)>,
) -> ApiResult<serde_json::Value> {
    blocking(move || {
        let vol = VolumeName::new(&name)?;
        let r = VolumeRef::parse(&format!("{name}@{snap}"))?;
        if !d.mounts.mountpoints(r.as_str()).is_empty() {
            return Err(Error::Busy(format!(
                "snapshot {r} is mounted; unmount it first"
            )));
        }
        d.mounts.detach_volume(r.as_str())?;
        d.mounts.registry().snapshot_remove(&vol, &snap)
    })
    .await?;
    Ok(Json(serde_json::json!({})))
}

async fn rollback(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    Json(req): Json<RollbackRequest>,
) -> ApiResult<VolumeInfo> {
    Ok(Json(
        blocking(move || {
            let vol = VolumeName::new(&name)?;
            let rec = d.mounts.rollback(&vol, &req.snapshot)?;
            volume_info(&d, &rec)
        })
        .await?,
    ))
}

async fn list_layers(State(d): State<Arc<Daemon>>) -> ApiResult<Vec<api::LayerInfo>> {
    Ok(Json(
        blocking(move || volfs::image::list(&*d.mounts.registry().store().engine)).await?,
    ))
}

fn absolute(p: &str) -> volfs::Result<PathBuf> {
    let p = PathBuf::from(p);
    if !p.is_absolute() {
        return Err(Error::Invalid(format!(
            "{} is not an absolute path",
            p.display()
        )));
    }
    Ok(p)
}

async fn import_layer(
    State(d): State<Arc<Daemon>>,
    Json(req): Json<ImportLayer>,
) -> ApiResult<ImportedLayer> {
    Ok(Json(
        blocking(move || {
            let path = absolute(&req.path)?;
            let (id, new) = volfs::image::import(d.mounts.registry().store(), &path)?;
            Ok(ImportedLayer {
                id: id.to_hex(),
                new,
            })
        })
        .await?,
    ))
}

async fn remove_layer(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> ApiResult<serde_json::Value> {
    blocking(move || {
        let id: LayerId = id.parse()?;
        volfs::image::remove(d.mounts.registry().store(), &id)
    })
    .await?;
    Ok(Json(serde_json::json!({})))
}

async fn export_layer(
    State(d): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Json(req): Json<ExportLayer>,
) -> ApiResult<serde_json::Value> {
    blocking(move || {
        let id: LayerId = id.parse()?;
        let path = absolute(&req.path)?;
        let f = std::fs::File::create(&path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        let mut w = std::io::BufWriter::new(f);
        volfs::image::export(d.mounts.registry().store(), &id, &mut w)?;
        use std::io::Write;
        w.flush()
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    })
    .await?;
    Ok(Json(serde_json::json!({})))
}

/// The snapshot an export or backup reads: the one named, or a temporary one taken now (a
/// consistent point of a mounted volume, through the same freeze as `snapshot create`) and
/// removed when this is dropped, whatever happened meanwhile.
struct SourceSnap {
    d: Arc<Daemon>,
    vol: VolumeName,
    snap: volfs::layer::SnapshotRecord,
    temp: Option<String>,
}

impl Drop for SourceSnap {
    fn drop(&mut self) {
        if let Some(t) = &self.temp {
            if let Err(e) = self.d.mounts.registry().snapshot_remove(&self.vol, t) {
                tracing::warn!(volume = %self.vol, "removing temporary snapshot {t}: {e}");
            }
        }
    }
}

impl SourceSnap {
    fn take(
        d: &Arc<Daemon>,
        vol: &VolumeName,
        snap: Option<&str>,
        op: &str,
    ) -> volfs::Result<Self> {
        let reg = d.mounts.registry();
        match snap {
            Some(s) => {
                let (_, rec) = reg.snapshot(vol, s)?;
                Ok(SourceSnap {
                    d: d.clone(),
                    vol: vol.clone(),
                    snap: rec,
                    temp: None,
                })
            }
            None => {
                reg.require(vol)?;
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|t| t.as_nanos())
                    .unwrap_or(0);
                let name = format!("volfs-{op}-{nanos}");
                let rec = d.mounts.snapshot(vol, &name)?;
                Ok(SourceSnap {
                    d: d.clone(),
                    vol: vol.clone(),
                    snap: rec,
                    temp: Some(name),
                })
            }
        }
    }

    fn stack(&self) -> volfs::Result<volfs::layer::Stack> {
        volfs::layer::Stack::load(
            &*self.d.mounts.registry().store().engine,
            self.snap.tree,
            &self.snap.lower,
        )
    }
}

type Chunk = Result<axum::body::Bytes, std::io::Error>;

/// A `Write` on the blocking pool that hands 256 KiB pieces to an async response body.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Chunk>,
    buf: Vec<u8>,
}

const PIECE: usize = 256 << 10;

impl ChannelWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(PIECE));
        self.tx.blocking_send(Ok(piece.into())).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
        })
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= PIECE {
            self.send()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// A `Read` on the blocking pool fed by an async request body.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Chunk>,
    cur: axum::body::Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len());
        out[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// A response body fed by a channel.
fn channel_body(rx: tokio::sync::mpsc::Receiver<Chunk>) -> axum::body::Body {
    axum::body::Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|x| (x, rx))
    }))
}

#[derive(Deserialize)]
struct ExportQuery {
    snapshot: Option<String>,
}

/// `GET /v1/volumes/{name}/export`: the volume (through a temporary snapshot) or a snapshot
/// as a tarball, streamed. An error after the answer started breaks off the stream (and is
/// logged), so a client never takes a truncated tarball for a whole one.
async fn export_volume(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    Query(q): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    let d2 = d.clone();
    let src = blocking(move || {
        let vol = VolumeName::new(&name)?;
        if let Some(s) = &q.snapshot {
            volfs::layer::check_snapshot_name(s)?;
        }
        SourceSnap::take(&d2, &vol, q.snapshot.as_deref(), "export")
    })
    .await?;
    let total = src.snap.used.max(0) as u64;
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(8);
    tokio::task::spawn_blocking(move || {
        let store = src.d.mounts.registry().store().clone();
        let mut w = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(PIECE),
        };
        let res = src
            .stack()
            .and_then(|stack| volfs::image::export_stack(&store, &stack, true, &mut w, &mut |_| {}))
            .and_then(|_| {
                use std::io::Write;
                w.flush().map_err(|e| Error::io("sending the tarball", e))
            });
        if let Err(e) = res {
            tracing::error!(volume = %src.vol, op = "export", "{e}");
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
        drop(src);
    });
    Response::builder()
        .header(axum::http::header::CONTENT_TYPE, "application/x-tar")
        .header(api::HEADER_TOTAL, total.to_string())
        .body(channel_body(rx))
        .map_err(|e| ApiError(Error::Db(format!("building the answer: {e}"))))
}

/// `POST /v1/volumes/{name}/import`: a new volume from a streamed tarball. The body is handed
/// to the import on the blocking pool piece by piece (never held whole).
async fn import_volume(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    body: axum::body::Body,
) -> Result<Json<VolumeInfo>, ApiError> {
    use axum::body::HttpBody;
    let res = async {
        let vol = VolumeName::new(&name)?;
        let d2 = d.clone();
        let v2 = vol.clone();
        blocking(move || match d2.mounts.registry().get(&v2)? {
            Some(_) => Err(Error::Exists(format!("volume {v2}"))),
            None => Ok(()),
        })
        .await
        .map_err(|e| e.0)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(16);
        let d2 = d.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut r = ChannelReader {
                rx,
                cur: Default::default(),
            };
            let rec = with_claim(&d2, &vol, 0, || {
                volfs::backup::import_volume(d2.mounts.registry(), &vol, &mut r)
            })?;
            volume_info(&d2, &rec)
        });
        let mut body = body;
        loop {
            let frame =
                std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await;
            let piece = match frame {
                None => break,
                Some(Err(e)) => Err(std::io::Error::other(format!("the upload broke off: {e}"))),
                Some(Ok(f)) => match f.into_data() {
                    Ok(b) => Ok(b),
                    Err(_) => continue, // trailers
                },
            };
            let failed = piece.is_err();
            if tx.send(piece).await.is_err() || failed {
                break; // the import ended (its result says why)
            }
        }
        drop(tx);
        match task.await {
            Ok(r) => r,
            Err(e) => Err(Error::Db(format!("worker failed: {e}"))),
        }
    }
    .await;
    match res {
        Ok(info) => Ok(Json(info)),
        Err(e) => {
            tracing::warn!(volume = name.as_str(), op = "POST import", "{e}");
            Err(ApiError(e))
        }
    }
}

/// Runs `f` on the blocking pool and answers with its progress and result as
/// newline-delimited [`api::StreamLine`]s (at most 4 progress lines a second).
fn stream_lines<T: serde::Serialize + Send + 'static>(
    op: &'static str,
    volume: String,
    f: impl FnOnce(&mut dyn FnMut(u64, u64)) -> volfs::Result<T> + Send + 'static,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Chunk>(16);
    tokio::task::spawn_blocking(move || {
        let line = |l: &api::StreamLine<T>| -> Chunk {
            let mut v = serde_json::to_vec(l).map_err(std::io::Error::other)?;
            v.push(b'\n');
            Ok(v.into())
        };
        let mut last = Instant::now();
        let mut progress = |done: u64, total: u64| {
            if last.elapsed() >= std::time::Duration::from_millis(250) {
                last = Instant::now();
                let _ = tx.try_send(line(&api::StreamLine::Progress { done, total }));
            }
        };
        let end = match f(&mut progress) {
            Ok(v) => api::StreamLine::Done(v),
            Err(e) => {
                tracing::warn!(volume = volume.as_str(), op, "{e}");
                api::StreamLine::Error(e.to_string())
            }
        };
        let _ = tx.blocking_send(line(&end));
    });
    let mut r = channel_body(rx).into_response();
    r.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/x-ndjson"),
    );
    r
}

async fn backup(
    State(d): State<Arc<Daemon>>,
    Json(req): Json<api::BackupRequest>,
) -> Result<Response, ApiError> {
    let d2 = d.clone();
    let (vol, snap, repo) = blocking(move || {
        let (vol, snap) = volfs::layer::split_ref(&req.volume)?;
        if let Some(n) = &req.name {
            volfs::backup::check_backup_name(n)?;
        }
        let reg = d2.mounts.registry();
        match &snap {
            Some(s) => reg.snapshot(&vol, s).map(|_| ())?,
            None => reg.require(&vol).map(|_| ())?,
        }
        let repo = volfs::backup::Repo::open_or_init(&absolute(&req.repo)?)?;
        Ok((vol, snap, (repo, req.name)))
    })
    .await?;
    let (repo, name) = repo;
    Ok(stream_lines("backup", vol.to_string(), move |progress| {
        let src = SourceSnap::take(&d, &vol, snap.as_deref(), "backup")?;
        let stack = src.stack()?;
        let store = d.mounts.registry().store();
        volfs::backup::backup(
            store,
            &repo,
            &volfs::backup::Source {
                volume: vol.as_str(),
                snapshot: snap.as_deref(),
                stack: &stack,
                total: src.snap.used.max(0) as u64,
            },
            name.as_deref(),
            progress,
        )
    }))
}

async fn list_backups(
    State(_d): State<Arc<Daemon>>,
    Json(req): Json<api::BackupList>,
) -> ApiResult<Vec<api::BackupInfo>> {
    Ok(Json(
        blocking(move || volfs::backup::Repo::open(&absolute(&req.repo)?)?.list()).await?,
    ))
}

async fn restore(
    State(d): State<Arc<Daemon>>,
    Json(req): Json<api::RestoreRequest>,
) -> Result<Response, ApiError> {
    let d2 = d.clone();
    let (vol, repo, backup) = blocking(move || {
        let vol = VolumeName::new(&req.volume)?;
        let repo = volfs::backup::Repo::open(&absolute(&req.repo)?)?;
        repo.manifest(&req.backup)?;
        if d2.mounts.registry().get(&vol)?.is_some() {
            return Err(Error::Exists(format!("volume {vol}")));
        }
        Ok((vol, repo, req.backup))
    })
    .await?;
    Ok(stream_lines("restore", vol.to_string(), move |progress| {
        let rec = volfs::backup::restore(d.mounts.registry(), &repo, &backup, &vol, progress)?;
        // Cluster mode: the name's owner keeps it; then the restored copy is a replica here.
        if let Some(c) = d.mounts.cluster() {
            c.claim_or_replica(vol.as_str())?;
        }
        volume_info(&d, &rec)
    }))
}

async fn df(State(d): State<Arc<Daemon>>) -> ApiResult<api::DfReport> {
    Ok(Json(
        blocking(move || {
            let r = d.mounts.registry();
            volfs::gc::df(r.store(), r)
        })
        .await?,
    ))
}

/// Runs gc, keeping the trees that open snapshot views read.
pub fn run_gc(d: &Daemon) -> volfs::Result<api::GcReport> {
    let r = d.mounts.registry();
    let rep = d.work.run(
        "gc",
        |p| {
            volfs::layer::seal_pending(r.store())?;
            volfs::gc::collect(r.store(), r, &d.mounts.active_trees(), p)
        },
        |g| {
            format!(
                "freed {} chunks ({} bytes), {} bytes on disk given back",
                g.chunks_freed,
                g.bytes_freed,
                g.disk_before.saturating_sub(g.disk_after)
            )
        },
    )?;
    d.metrics.gc_freed(&rep);
    Ok(rep)
}

/// Verifies every chunk (`max_bytes_per_sec` 0: as fast as the disk goes).
pub fn run_scrub(d: &Daemon, max_bytes_per_sec: u64) -> volfs::Result<api::ScrubReport> {
    let r = d.mounts.registry();
    let source = crate::peer::PeerSource::new(&d.peers)?;
    let rep = d.work.run(
        "scrub",
        |p| {
            volfs::fsck::scrub(
                r.store(),
                r,
                p,
                max_bytes_per_sec,
                source.as_ref().map(|s| s as &dyn volfs::chunk::ChunkSource),
            )
        },
        |s| {
            format!(
                "verified {} chunks ({} bytes), {} corrupt",
                s.chunks,
                s.bytes_verified,
                s.corrupt.len()
            )
        },
    )?;
    d.metrics.scrubbed(rep.bytes_verified);
    d.metrics
        .peer
        .repaired
        .inc_by(rep.repaired_from_peers.len() as u64);
    Ok(rep)
}

async fn scrub(State(d): State<Arc<Daemon>>) -> ApiResult<api::ScrubReport> {
    Ok(Json(blocking(move || run_scrub(&d, 0)).await?))
}

async fn gc(State(d): State<Arc<Daemon>>) -> ApiResult<api::GcReport> {
    Ok(Json(blocking(move || run_gc(&d)).await?))
}

async fn drop_cache(
    State(d): State<Arc<Daemon>>,
    req: Option<Json<api::CacheDrop>>,
) -> ApiResult<api::CacheDropped> {
    let kernel = req.is_some_and(|r| r.kernel);
    Ok(Json(
        blocking(move || {
            let bytes = d.mounts.registry().store().chunks.clear_cache();
            let kernel_inodes = if kernel {
                d.mounts.invalidate_kernel_caches()
            } else {
                0
            };
            volfs::fs::bufpool::clear();
            crate::release_free_memory();
            Ok(api::CacheDropped {
                bytes,
                kernel_inodes,
            })
        })
        .await?,
    ))
}

async fn fsck(
    State(d): State<Arc<Daemon>>,
    Json(req): Json<FsckRequest>,
) -> ApiResult<api::FsckReport> {
    Ok(Json(
        blocking(move || {
            let r = d.mounts.registry();
            let source = if req.repair {
                crate::peer::PeerSource::new(&d.peers)?
            } else {
                None
            };
            let rep = d.work.run(
                "fsck",
                |p| {
                    volfs::fsck::check(
                        r.store(),
                        r,
                        req.repair,
                        &d.mounts.active_volumes(),
                        p,
                        source.as_ref().map(|s| s as &dyn volfs::chunk::ChunkSource),
                    )
                },
                |f| format!("{} problems", f.problems.len()),
            )?;
            d.metrics.scrubbed(rep.bytes_verified);
            d.metrics
                .peer
                .repaired
                .inc_by(rep.repaired_from_peers.len() as u64);
            Ok(rep)
        })
        .await?,
    ))
}

async fn list_peers(State(d): State<Arc<Daemon>>) -> ApiResult<Vec<api::PeerInfo>> {
    let peers = d.peers.clone();
    let records = blocking(move || peers.records()).await?;
    // Every peer asked at once; a probe ends within the connect and handshake timeouts.
    let probes = records.iter().map(|r| d.peers.probe(r));
    Ok(Json(futures_join_all(probes).await))
}

/// Runs futures concurrently on this task and collects their outputs in order.
async fn futures_join_all<F: std::future::Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in fs {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

async fn add_peer(
    State(d): State<Arc<Daemon>>,
    Json(req): Json<api::AddPeer>,
) -> ApiResult<api::PeerInfo> {
    let peers = d.peers.clone();
    let rec = blocking(move || peers.add(&req)).await?;
    Ok(Json(d.peers.probe(&rec).await))
}

async fn remove_peer(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> ApiResult<serde_json::Value> {
    let peers = d.peers.clone();
    blocking(move || peers.remove(&name)).await?;
    Ok(Json(serde_json::json!({})))
}

pub fn create(d: &Daemon, req: &CreateVolume) -> volfs::Result<VolumeInfo> {
    let name = VolumeName::new(&req.name)?;
    let mut opts = CreateOptions {
        labels: req.labels.clone(),
        read_only: req.read_only,
        ..Default::default()
    };
    let (ship, req_opts) = take_ship(&req.opts)?;
    let (replicas, rpo, rest) = crate::replication::split_opts(&req_opts)?;
    for (k, v) in &rest {
        opts.set_opt(k, v)?;
    }
    let rec = with_claim(d, &name, replicas.unwrap_or(0) as usize, || {
        d.mounts.create_volume(&name, &opts)
    })?;
    if replicas.is_some() || rpo.is_some() {
        crate::replication::update_settings(d.mounts.registry().store(), name.as_str(), |s| {
            *s = volfs::replica::ReplSettings {
                replicas: replicas.unwrap_or(0),
                rpo_secs: rpo.unwrap_or(0),
                progress: Default::default(),
            };
        })?;
    }
    if let Some(lazy) = ship {
        volfs::replica::set_ship(&*d.mounts.registry().store().engine, name.as_str(), lazy)?;
    }
    volume_info(d, &rec)
}

/// Takes the `ship` option (`lazy` or `full`: how snapshots go to replicas) out of `opts`.
fn take_ship(
    opts: &std::collections::BTreeMap<String, String>,
) -> volfs::Result<(Option<bool>, std::collections::BTreeMap<String, String>)> {
    let mut rest = opts.clone();
    let ship = rest
        .remove("ship")
        .map(|v| volfs::replica::parse_ship(&v))
        .transpose()?;
    Ok((ship, rest))
}

async fn pull_volume(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let d2 = d.clone();
    let rec = blocking(move || {
        let vname = VolumeName::new(&name)?;
        d2.mounts.registry().require(&vname)
    })
    .await?;
    Ok(stream_lines("pull", rec.name.clone(), move |progress| {
        pull(&d, &rec, progress)
    }))
}

/// Chunk fetches `volume pull` keeps in flight.
const PULL_WORKERS: usize = 4;

/// `volume pull`: fetches every chunk the volume (all its snapshots) references that is not
/// local, through the store's fallback (the peers), with progress in bytes.
pub fn pull(
    d: &Daemon,
    rec: &VolumeRecord,
    progress: &mut dyn FnMut(u64, u64),
) -> volfs::Result<api::PullReport> {
    let t0 = Instant::now();
    let store = d.mounts.registry().store();
    let lacking = volfs::replica::lacking(store, rec)?;
    let total: u64 = lacking.iter().map(|(_, n)| *n as u64).sum();
    let mut report = api::PullReport {
        volume: rec.name.clone(),
        lacking_chunks: lacking.len() as u64,
        ..Default::default()
    };
    if lacking.is_empty() {
        progress(0, 0);
        report.millis = t0.elapsed().as_millis() as u64;
        return Ok(report);
    }
    let Some(src) = store.chunks.fallback() else {
        return Err(Error::Invalid(format!(
            "volume {} lacks {} chunks and this host has no peers to fetch them from (no cluster key)",
            rec.name,
            lacking.len()
        )));
    };
    let mut done = 0u64;
    // Fetched in groups, stored with one sync and one synced batch per group.
    for group in lacking.chunks(64) {
        let mut got: Vec<(volfs::ids::ChunkId, Vec<u8>)> = Vec::with_capacity(group.len());
        // PULL_WORKERS fetches in flight (each on its own pooled peer connection).
        let results: Vec<(volfs::ids::ChunkId, u32, volfs::Result<Vec<u8>>)> =
            std::thread::scope(|sc| {
                let parts: Vec<_> = group
                    .chunks(group.len().div_ceil(PULL_WORKERS))
                    .map(|part| {
                        let src = &src;
                        sc.spawn(move || {
                            part.iter()
                                .map(|(id, n)| {
                                    (*id, *n, store.chunks.fetch_only(id, &**src).map(|r| r.0))
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                parts
                    .into_iter()
                    .flat_map(|h| h.join().unwrap_or_default())
                    .collect()
            });
        for (id, n, r) in results {
            match r {
                Ok(data) => got.push((id, data)),
                Err(e) => report.failed.push(api::PullFailure {
                    chunk: id.to_hex(),
                    why: e.to_string(),
                }),
            }
            done += n as u64;
        }
        progress(done, total);
        let refs: Vec<(volfs::ids::ChunkId, &[u8])> =
            got.iter().map(|(i, d)| (*i, d.as_slice())).collect();
        store.chunks.store_fetched(&refs)?;
        let bytes: u64 = got.iter().map(|(_, d)| d.len() as u64).sum();
        let c = &store.chunks.stats;
        c.fetched_by_pull
            .fetch_add(got.len() as u64, std::sync::atomic::Ordering::Relaxed);
        c.fetched_by_pull_bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        report.fetched_chunks += got.len() as u64;
        report.fetched_bytes += bytes;
    }
    report.millis = t0.elapsed().as_millis() as u64;
    tracing::info!(volume = %rec.name, chunks = report.fetched_chunks, bytes = report.fetched_bytes, failed = report.failed.len(), "volume pull");
    Ok(report)
}

/// Cluster mode: claims the volume's name for this host (refused if another host owns it),
/// then runs `make`; a failed `make` releases the claim again. Every way of creating a volume
/// (the API, the Docker plugin) goes through here.
pub fn with_claim<T>(
    d: &Daemon,
    name: &VolumeName,
    replicas: usize,
    make: impl FnOnce() -> volfs::Result<T>,
) -> volfs::Result<T> {
    let Some(c) = d.mounts.cluster() else {
        // A single host replicates to its configured peers (`volfs peer add`).
        let peers = d.peers.records()?.len();
        if replicas > peers {
            return Err(Error::Invalid(format!(
                "replicas={replicas}: this single host has {peers} peer(s) to replicate to (volfs peer add NAME ADDR, or set etcd_endpoints)"
            )));
        }
        return make();
    };
    if d.mounts.registry().get(name)?.is_some() {
        return Err(Error::Exists(format!("volume {name}")));
    }
    c.claim_new(name.as_str(), replicas)?;
    match make() {
        Ok(v) => Ok(v),
        Err(e) => {
            if let Err(r) = c.release(name.as_str()) {
                tracing::warn!(volume = %name, "cluster: releasing the claim of a volume that was not created: {r}");
            }
            Err(e)
        }
    }
}

pub fn remove_volume(d: &Daemon, name: &str, force: bool) -> volfs::Result<()> {
    let name = VolumeName::new(name)?;
    d.mounts.registry().require(&name)?;
    let store = d.mounts.registry().store().clone();
    if let Some(i) = volfs::replica::inbound(&*store.engine, name.as_str())? {
        if !force {
            return Err(Error::ReadOnly(format!(
                "volume {name} is a replica of {} (remove it there, or use --force)",
                i.origin
            )));
        }
    }
    let held = d.mounts.holders(name.as_str())?;
    if held > 0 && !force {
        return Err(Error::Busy(format!(
            "volume {name} (in use by {held} container mount(s); use --force)"
        )));
    }
    let mps = d.mounts.mountpoints(name.as_str());
    if !mps.is_empty() && !force {
        return Err(Error::Busy(format!(
            "volume {name} (mounted at {}; unmount it or use --force)",
            mps.iter()
                .map(|m| m.target.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    d.mounts.detach_volume(name.as_str())?;
    d.mounts.registry().remove(&name)?;
    let mut b = volfs::db::Batch::new();
    for k in [
        volfs::replica::settings_key(name.as_str()),
        volfs::replica::inbound_key(name.as_str()),
        volfs::replica::ship_key(name.as_str()),
    ] {
        b.delete(volfs::db::Cf::Meta, k);
    }
    store.engine.write(b, true)?;
    d.metrics.forget_volume(name.as_str());
    if let Some(c) = d.mounts.cluster() {
        c.release(name.as_str())?;
    }
    Ok(())
}

/// `POST /v1/volumes/{name}/promote`. A replica (`repl-in` record) becomes a writable
/// volume holding its last replicated snapshot; cluster mode claims ownership first (refused
/// while the owner's lease lives); a single host without etcd promotes only if the origin
/// does not answer, or with `force`.
pub fn promote(d: &Daemon, name: &str, force: bool) -> volfs::Result<api::Promoted> {
    let name = VolumeName::new(name)?;
    let rec = d.mounts.registry().require(&name)?;
    let engine = d.mounts.registry().store().engine.clone();
    let inbound = volfs::replica::inbound(&*engine, name.as_str())?;
    let host = d.peers.host_name().to_string();
    let Some(inb) = inbound else {
        let Some(c) = d.mounts.cluster() else {
            return Err(Error::Invalid(format!(
                "promote: volume {name} is not a replica, and a single host owns all its volumes (no etcd_endpoints)"
            )));
        };
        let token = c.promote(name.as_str(), None)?;
        c.apply_fences(&d.mounts);
        let snaps = d.mounts.registry().snapshots(&name)?;
        let (at, basis) = match snaps.iter().max_by_key(|s| s.created) {
            Some(s) => (s.created, format!("snapshot {}", s.name)),
            None => (rec.created, "volume created (no snapshot)".to_string()),
        };
        return Ok(api::Promoted {
            volume: name.to_string(),
            host: c.host().to_string(),
            token,
            point_in_time: api::rfc3339(at),
            basis,
            snapshot: None,
            note: None,
        });
    };
    check_unused(d, &name, "promote")?;
    let want = inb.settings.map(|s| s.replicas as usize);
    let (token, note) = match d.mounts.cluster() {
        Some(c) => (c.promote(name.as_str(), want)?, None),
        None => {
            let note = if force {
                format!("forced: origin {} was not asked", inb.origin)
            } else {
                let rec = d
                    .peers
                    .records()?
                    .into_iter()
                    .find(|p| p.name == inb.origin);
                let answer = match (&rec, tokio::runtime::Handle::try_current()) {
                    (Some(r), Ok(h)) => Some(h.block_on(d.peers.probe(r))),
                    _ => None,
                };
                match answer {
                    Some(a) if a.error.is_none() => {
                        return Err(Error::Busy(format!(
                            "volume {name}: its origin {} answers (single host, no etcd): move it from there (`volfs volume move {name} --to {host}` on {}), or promote with --force if that host must not write it any more",
                            inb.origin, inb.origin
                        )))
                    }
                    Some(a) => format!(
                        "single host without etcd: origin {} did not answer ({}); if it comes back it still writes its own copy",
                        inb.origin,
                        a.error.unwrap_or_default()
                    ),
                    None => format!(
                        "single host without etcd: no peer record for origin {}; if it comes back it still writes its own copy",
                        inb.origin
                    ),
                }
            };
            let t = volfs::replica::fence(&*engine, name.as_str())? + 1;
            volfs::replica::check_fence(&*engine, name.as_str(), t)?;
            (t as i64, Some(note))
        }
    };
    let snap = make_writable(d, &name)?;
    if let Some(c) = d.mounts.cluster() {
        volfs::replica::check_fence(&*engine, name.as_str(), token.max(0) as u64)?;
        c.apply_fences(&d.mounts);
    }
    Ok(api::Promoted {
        volume: name.to_string(),
        host,
        token,
        point_in_time: api::rfc3339(snap.created),
        basis: format!(
            "last replicated snapshot {} (from host {})",
            snap.name, inb.origin
        ),
        snapshot: Some(snap.name),
        note,
    })
}

/// Refuses while a volume is mounted or held by Docker (promote and move change what its
/// connection serves).
fn check_unused(d: &Daemon, name: &VolumeName, what: &str) -> volfs::Result<()> {
    let mps = d.mounts.mountpoints(name.as_str());
    let held = d.mounts.holders(name.as_str())?;
    if !mps.is_empty() || held > 0 {
        return Err(Error::Busy(format!(
            "volume {name} is in use ({} mountpoint(s){}, {held} Docker container mount(s)); unmount it before a {what}{}",
            mps.len(),
            if mps.is_empty() {
                String::new()
            } else {
                format!(
                    " at {}",
                    mps.iter()
                        .map(|m| m.target.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            if what == "move" {
                " (or --force: it is unmounted everywhere first, so that no write after the final snapshot is lost)"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

/// A replica becomes writable: an empty top over its last replicated snapshot (a rollback,
/// which closes an idle connection), then read-write and its `repl-in` record dropped.
fn make_writable(d: &Daemon, name: &VolumeName) -> volfs::Result<volfs::layer::SnapshotRecord> {
    let engine = d.mounts.registry().store().engine.clone();
    let inb = volfs::replica::inbound(&*engine, name.as_str())?
        .ok_or_else(|| Error::Invalid(format!("volume {name} is not a replica here")))?;
    d.mounts.rollback(name, &inb.last)?;
    volfs::replica::finish_promote(d.mounts.registry(), name.as_str())
}

/// Serves a peer's `Promote` (the receiving side of `volume move`).
pub struct PeerPromoter(pub Arc<Daemon>);

impl crate::peer::Promoter for PeerPromoter {
    fn promote_from_peer(
        &self,
        volume: &str,
        from: &str,
        token: u64,
    ) -> volfs::Result<(u64, String, i64)> {
        let d = &self.0;
        let name = VolumeName::new(volume)?;
        let engine = d.mounts.registry().store().engine.clone();
        let want = match volfs::replica::inbound(&*engine, volume)? {
            Some(i) if i.origin == from => i.settings.map(|s| s.replicas as usize),
            Some(i) => {
                return Err(Error::ReadOnly(format!(
                    "volume {volume} here is a replica of {}, not of {from}",
                    i.origin
                )))
            }
            None => {
                return Err(Error::Exists(format!(
                    "volume {volume} here is not a replica of {from}"
                )))
            }
        };
        check_unused(d, &name, "promote")?;
        let token = match d.mounts.cluster() {
            Some(c) => c.promote(volume, want)?.max(0) as u64,
            None => token,
        };
        volfs::replica::check_fence(&*engine, volume, token)?;
        let snap = make_writable(d, &name)?;
        if let Some(c) = d.mounts.cluster() {
            c.apply_fences(&d.mounts);
        }
        tracing::info!(volume, from, token, snapshot = %snap.name, "volume moved here: this host owns it now");
        Ok((token, snap.name, snap.created))
    }
}

/// `volfs volume move`: final snapshot, ship everything to the peer, hand ownership over,
/// and keep the local copy as a read-only replica of the peer. `progress`: bytes sent of
/// the current snapshot.
pub fn move_volume(
    d: &Arc<Daemon>,
    name: &str,
    req: &api::MoveRequest,
    progress: &mut dyn FnMut(u64, u64),
) -> volfs::Result<api::Moved> {
    let name = VolumeName::new(name)?;
    d.mounts.registry().require(&name)?;
    let engine = d.mounts.registry().store().engine.clone();
    if let Some(i) = volfs::replica::inbound(&*engine, name.as_str())? {
        return Err(Error::ReadOnly(format!(
            "volume {name} is a replica of {}: move it from there",
            i.origin
        )));
    }
    let peer = d
        .peers
        .records()?
        .into_iter()
        .find(|p| p.name == req.to)
        .ok_or_else(|| {
            Error::NotFound(format!(
                "no peer named {:?} (volfs peer add NAME ADDR; in cluster mode NAME is the host name)",
                req.to
            ))
        })?;
    if peer.name == d.peers.host_name() {
        return Err(Error::Invalid(format!(
            "volume {name} is on {} already",
            peer.name
        )));
    }
    let Some(token) = crate::replication::ownership_token(d, name.as_str())? else {
        return Err(Error::ReadOnly(format!(
            "volume {name}: this host does not own it now ({})",
            d.mounts
                .cluster()
                .and_then(|c| c.fence_reason(name.as_str()))
                .unwrap_or_else(|| "a replica".into())
        )));
    };
    if req.force {
        d.mounts.detach_volume(name.as_str())?;
    } else {
        check_unused(d, &name, "move")?;
    }
    let snap_name = format!("move-{}", volfs::meta::Ts::now().secs);
    let final_snap = d.mounts.snapshot(&name, &snap_name)?;
    d.seal.notify_one();
    let mut snaps = d.mounts.registry().snapshots(&name)?;
    snaps.sort_by_key(|s| s.tree.0);
    let rt = tokio::runtime::Handle::try_current()
        .map_err(|e| Error::Db(format!("move needs the daemon's runtime: {e}")))?;
    let before = volfs::replica::settings(&*engine, name.as_str())?
        .and_then(|s| s.progress.get(&peer.name).map(|p| p.shipped.len()))
        .unwrap_or(0);
    let task = {
        let (d, vol, peer, snaps) = (d.clone(), name.to_string(), peer.clone(), snaps.clone());
        rt.spawn(async move { crate::replication::ship(&d, &vol, &peer, &snaps, token).await })
    };
    while !task.is_finished() {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let live = d
            .peers
            .replication
            .lock()
            .get(&(name.to_string(), peer.name.clone()))
            .cloned()
            .unwrap_or_default();
        progress(live.sent_bytes, live.total_bytes);
    }
    let bytes_sent = rt
        .block_on(task)
        .map_err(|e| Error::Db(format!("worker failed: {e}")))?
        .map_err(|e| Error::Io {
            context: format!("shipping volume {name} to peer {}", peer.name),
            source: std::io::Error::other(e),
        })?;
    let after = volfs::replica::settings(&*engine, name.as_str())?
        .and_then(|s| s.progress.get(&peer.name).map(|p| p.shipped.len()))
        .unwrap_or(0);
    // Hand over: cluster mode gives the owner key up (this host is fenced from now on) and
    // the peer claims it (a new key: a higher create_revision); a single host passes
    // token + 1, which the peer persists.
    let cluster = d.mounts.cluster().cloned();
    let offered = match &cluster {
        Some(c) => c.hand_over(name.as_str())?.max(0) as u64,
        None => token + 1,
    };
    if let Some(c) = &cluster {
        c.apply_fences(&d.mounts);
    }
    let asked = rt.block_on(async {
        let mut client = d.peers.connect(&peer.addr).await?;
        client.promote(name.as_str(), offered).await
    });
    let (new_token, snap_there, _) = match asked {
        Ok(v) => v,
        Err(e) => {
            if let Some(c) = &cluster {
                match c.take_back(name.as_str()) {
                    Ok(role) => {
                        tracing::warn!(volume = %name, ?role, "move: the peer did not take the volume over; claimed it back")
                    }
                    Err(r) => {
                        tracing::error!(volume = %name, "move: the peer did not take the volume over, and claiming it back failed: {r}")
                    }
                }
                c.apply_fences(&d.mounts);
            }
            return Err(Error::Io {
                context: format!(
                    "volume {name}: peer {} did not take it over (this host keeps it if it could claim it back)",
                    peer.name
                ),
                source: std::io::Error::other(e.to_string()),
            });
        }
    };
    if snap_there != final_snap.name {
        tracing::warn!(volume = %name, "move: the peer holds snapshot {snap_there}, not {}", final_snap.name);
    }
    d.mounts.rollback(&name, &final_snap.name)?;
    volfs::replica::make_replica(
        d.mounts.registry(),
        name.as_str(),
        &peer.name,
        &final_snap,
        new_token,
    )?;
    if let Some(c) = &cluster {
        c.apply_fences(&d.mounts);
    }
    tracing::info!(volume = %name, to = %peer.name, token = new_token, snapshot = %final_snap.name, bytes_sent, "volume moved");
    Ok(api::Moved {
        volume: name.to_string(),
        to: peer.name,
        snapshot: final_snap.name,
        snapshot_time: api::rfc3339(final_snap.created),
        bytes_sent,
        snapshots: after.saturating_sub(before).max(1),
        token_before: token as i64,
        token: new_token as i64,
    })
}

async fn move_handler(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    Json(req): Json<api::MoveRequest>,
) -> Response {
    stream_lines("move", name.clone(), move |progress| {
        move_volume(&d, &name, &req, progress)
    })
}

async fn promote_volume(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    body: Option<Json<api::PromoteRequest>>,
) -> ApiResult<api::Promoted> {
    let force = body.map(|b| b.0.force).unwrap_or(false);
    Ok(Json(blocking(move || promote(&d, &name, force)).await?))
}

async fn cluster_status(State(d): State<Arc<Daemon>>) -> ApiResult<api::ClusterStatus> {
    Ok(Json(
        blocking(move || {
            let Some(c) = d.mounts.cluster() else {
                return Ok(api::ClusterStatus {
                    mode: "single host".into(),
                    ..Default::default()
                });
            };
            let local = d
                .mounts
                .registry()
                .list()?
                .into_iter()
                .map(|r| r.name)
                .collect();
            Ok(c.status(local))
        })
        .await?,
    ))
}

/// The daemon's state as status and /metrics show it.
pub struct DaemonState {
    pub status: Status,
    pub store: Arc<volfs::store::Store>,
    pub engine: volfs::db::EngineStats,
    pub chunk_cache_bytes: u64,
}

/// Share of a quota or a disk above which status warns.
const FULL_WARNING: f64 = 0.9;

/// Reads everything status and /metrics report (index reads: call off the async threads).
pub fn state(d: &Daemon) -> volfs::Result<DaemonState> {
    let store = d.mounts.registry().store().clone();
    let (total, free) = volfs::fs::disk_space(&store.data_dir);
    let vols = d.mounts.registry().list()?;
    let volumes = vols
        .iter()
        .map(|r| volume_info(d, r))
        .collect::<volfs::Result<Vec<_>>>()?;
    let logical: u64 = volumes.iter().map(|v| v.bytes_used).sum();
    let stored = store.chunks.disk_bytes();
    let corrupt = store.chunks.stats.known_corrupt();
    let background = d.work.view();
    let mut warnings = Vec::new();
    if total > 0 && (free as f64) < (1.0 - FULL_WARNING) * total as f64 {
        warnings.push(format!(
            "data dir {} is over 90% full ({free} bytes free of {total})",
            store.data_dir.display()
        ));
    }
    if !corrupt.is_empty() {
        let shown: Vec<String> = corrupt.iter().take(5).map(|c| c.to_string()).collect();
        warnings.push(format!(
            "{} chunk(s) fail verification: {}{} (volfs fsck names the files that use them)",
            corrupt.len(),
            shown.join(", "),
            if corrupt.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        ));
    }
    for v in &volumes {
        if let Some(size) = v.size {
            if size > 0 && v.bytes_used as f64 > FULL_WARNING * size as f64 {
                warnings.push(format!(
                    "volume {} uses {} of its {} byte quota (over 90%)",
                    v.name, v.bytes_used, size
                ));
            }
        }
    }
    for v in &volumes {
        for r in v.replication.iter().flat_map(|r| &r.peers) {
            // The last attempt failed (the error stays while retries go on).
            if let Some(e) = &r.error {
                warnings.push(format!(
                    "the replica of volume {} on peer {} is not being updated: {e} (lag {} s)",
                    v.name, r.peer, r.lag_secs
                ));
            }
        }
    }
    let cluster = match d.mounts.cluster() {
        Some(c) => {
            let (line, w) = c.summary();
            warnings.extend(w);
            line
        }
        None => "single host".to_string(),
    };
    for t in &background {
        if t.last_ok == Some(false) {
            warnings.push(format!(
                "last {} run {}",
                t.task,
                t.last_outcome.as_deref().unwrap_or("failed")
            ));
        }
    }
    let engine = store.engine.stats();
    Ok(DaemonState {
        status: Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: if d.mounts.supervised() {
                std::os::unix::process::parent_id()
            } else {
                std::process::id()
            },
            server_pid: std::process::id(),
            server_restarts: crate::handover::restarts(),
            uptime_secs: d.started.elapsed().as_secs(),
            data_dir: store.data_dir.display().to_string(),
            data_dir_free_bytes: free,
            data_dir_total_bytes: total,
            volumes,
            stored_bytes: stored,
            logical_bytes: logical,
            corrupt_chunks: corrupt.len() as u64,
            dedup_ratio: if stored == 0 {
                1.0
            } else {
                logical as f64 / stored as f64
            },
            background,
            warnings,
            cluster,
            index: api::IndexStatus {
                running_flushes: engine.running_flushes,
                running_compactions: engine.running_compactions,
                pending_compaction_bytes: engine.pending_compaction_bytes,
                bytes: engine.sst_bytes + engine.memtable_bytes,
            },
        },
        engine,
        chunk_cache_bytes: store.chunks.cache_bytes(),
        store,
    })
}

async fn status(State(d): State<Arc<Daemon>>) -> ApiResult<Status> {
    Ok(Json(blocking(move || Ok(state(&d)?.status)).await?))
}

async fn list_volumes(State(d): State<Arc<Daemon>>) -> ApiResult<Vec<VolumeInfo>> {
    Ok(Json(
        blocking(move || {
            d.mounts
                .registry()
                .list()?
                .iter()
                .map(|r| volume_info(&d, r))
                .collect()
        })
        .await?,
    ))
}

async fn create_volume(
    State(d): State<Arc<Daemon>>,
    Json(req): Json<CreateVolume>,
) -> ApiResult<VolumeInfo> {
    Ok(Json(blocking(move || create(&d, &req)).await?))
}

async fn inspect(State(d): State<Arc<Daemon>>, Path(name): Path<String>) -> ApiResult<VolumeInfo> {
    Ok(Json(
        blocking(move || {
            let rec = d.mounts.registry().require(&VolumeName::new(&name)?)?;
            volume_info(&d, &rec)
        })
        .await?,
    ))
}

#[derive(Deserialize)]
struct ForceQuery {
    #[serde(default)]
    force: bool,
}

async fn remove(
    State(d): State<Arc<Daemon>>,
    Path(name): Path<String>,
    Query(q): Query<ForceQuery>,
) -> ApiResult<serde_json::Value> {
    blocking(move || remove_volume(&d, &name, q.force)).await?;
    Ok(Json(serde_json::json!({})))
}

async fn prune(
    State(d): State<Arc<Daemon>>,
    Json(req): Json<PruneRequest>,
) -> ApiResult<PruneReply> {
    Ok(Json(
        blocking(move || {
            let mut removed = Vec::new();
            for rec in d.mounts.registry().list()? {
                if api::labels_match(&rec.labels, &req.filters)
                    && d.mounts.mountpoints(&rec.name).is_empty()
                    && d.mounts.holders(&rec.name)? == 0
                {
                    remove_volume(&d, &rec.name, false)?;
                    removed.push(rec.name);
                }
            }
            Ok(PruneReply { removed })
        })
        .await?,
    ))
}

async fn list_mounts(State(d): State<Arc<Daemon>>) -> ApiResult<Vec<MountInfo>> {
    Ok(Json(blocking(move || d.mounts.recorded()).await?))
}

async fn mount(
    State(d): State<Arc<Daemon>>,
    Json(req): Json<MountRequest>,
) -> ApiResult<MountInfo> {
    Ok(Json(
        blocking(move || {
            d.mounts.mount(
                &VolumeRef::parse(&req.volume)?,
                &PathBuf::from(&req.target),
                req.read_only,
            )
        })
        .await?,
    ))
}

async fn unmount(
    State(d): State<Arc<Daemon>>,
    Json(req): Json<UnmountRequest>,
) -> ApiResult<serde_json::Value> {
    blocking(move || d.mounts.unmount(&PathBuf::from(&req.target), false)).await?;
    Ok(Json(serde_json::json!({})))
}
