//! The peer listener (`peer_listen`): accepts connections, runs the responder side of the
//! handshake, and answers requests in order on each connection (pings, which chunks this host
//! holds, one verified chunk). At most [`MAX_CONNECTIONS`] at once; a connection idle for
//! [`IDLE_TIMEOUT`], or one that sends a malformed or oversized frame or breaks a limit, is
//! closed with a logged error. Nothing a peer sends can stop the listener.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use volfs::ids::ChunkId;

use super::channel::{Channel, Role};
use super::wire::{MsgV1, WireError, LAZY_VERSION, MAX_IDS, REPLICATION_VERSION, SETTINGS_VERSION};
use super::Peers;

pub const MAX_CONNECTIONS: usize = 64;
/// A connection with no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Accepts peers until the runtime stops.
pub async fn serve(listener: TcpListener, peers: Arc<Peers>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("peer listener: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(remote = %remote, "peer connection refused: {MAX_CONNECTIONS} are open");
            continue;
        };
        let peers = peers.clone();
        tokio::spawn(async move {
            let _slot = slot;
            connection(stream, remote, &peers).await;
        });
    }
}

async fn connection(stream: TcpStream, remote: SocketAddr, peers: &Peers) {
    let Some(key) = peers.key else {
        return;
    };
    let mut ch = match Channel::open(stream, &key, Role::Responder, peers.counters.clone()).await {
        Ok(ch) => ch,
        Err(e) => {
            peers.counters.handshake_failures.inc();
            tracing::warn!(remote = %remote, "peer handshake failed: {e}");
            return;
        }
    };
    match serve_channel(&mut ch, peers).await {
        Ok(()) => tracing::debug!(remote = %remote, "peer connection closed"),
        Err(e) => tracing::warn!(remote = %remote, "peer connection closed: {e}"),
    }
}

/// Hellos, then requests until the peer closes.
async fn serve_channel(ch: &mut Channel, peers: &Peers) -> Result<(), WireError> {
    let version = ch.version;
    let host = match ch.recv_within(IDLE_TIMEOUT, "waiting for a hello").await? {
        MsgV1::Hello { host, version: v } if v == version => host,
        MsgV1::Hello { version: v, .. } => {
            return Err(WireError::Protocol(format!(
                "hello says version {v}, the channel runs {version}"
            )))
        }
        _ => {
            return Err(WireError::Protocol(
                "the first message is not a hello".into(),
            ))
        }
    };
    tracing::debug!(remote = %ch.remote, host, version, "peer connected");
    // Tree rows staged by `TreeRows` until `Commit` (this connection only: a cut connection
    // drops them, and nothing references them).
    let mut staged = Staging::default();
    ch.send(&MsgV1::Hello {
        host: peers.host_name().to_string(),
        version,
    })
    .await?;
    loop {
        let received_before = ch.received_bytes;
        let msg = match ch.recv_within(IDLE_TIMEOUT, "idle").await {
            Ok(m) => m,
            Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(WireError::Timeout(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let answer = match msg {
            MsgV1::Ping { nonce } => MsgV1::Pong { nonce },
            MsgV1::HasChunks { ids } => {
                if ids.len() > MAX_IDS {
                    return Err(WireError::Protocol(format!(
                        "{} ids in one request, over the limit of {MAX_IDS}",
                        ids.len()
                    )));
                }
                let store = peers.store.clone();
                let which = tokio::task::spawn_blocking(move || {
                    ids.iter()
                        .map(|i| store.chunks.contains(&ChunkId(*i)))
                        .collect::<volfs::Result<Vec<bool>>>()
                })
                .await;
                match which {
                    Ok(Ok(which)) => MsgV1::Have { which },
                    Ok(Err(e)) => MsgV1::Error {
                        message: e.to_string(),
                    },
                    Err(e) => MsgV1::Error {
                        message: format!("worker failed: {e}"),
                    },
                }
            }
            MsgV1::GetChunk { id } => {
                let store = peers.store.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let cid = ChunkId(id);
                    // A chunk this host does not hold is not damage here: look first.
                    match store.chunks.location(&cid)? {
                        None => Ok(None),
                        Some(_) => store.chunks.read_verified(&cid).map(Some),
                    }
                })
                .await;
                match read {
                    Ok(Ok(Some(data))) => MsgV1::Chunk { id, data },
                    // Not here, or damaged here: never send bytes that do not verify.
                    Ok(Ok(None)) | Ok(Err(volfs::Error::Corrupt { .. })) => MsgV1::Missing { id },
                    Ok(Err(e)) => MsgV1::Error {
                        message: e.to_string(),
                    },
                    Err(e) => MsgV1::Error {
                        message: format!("worker failed: {e}"),
                    },
                }
            }
            m @ (MsgV1::HasLayers { .. }
            | MsgV1::PutChunk { .. }
            | MsgV1::TreeRows { .. }
            | MsgV1::Commit { .. }
            | MsgV1::CommitLazy { .. }
            | MsgV1::CommitV3 { .. }
            | MsgV1::Promote { .. }) => {
                if version < REPLICATION_VERSION
                    || (matches!(m, MsgV1::CommitLazy { .. }) && version < LAZY_VERSION)
                    || (matches!(m, MsgV1::CommitV3 { .. }) && version < SETTINGS_VERSION)
                {
                    return Err(WireError::Protocol(format!(
                        "a replication message on a version {version} channel"
                    )));
                }
                if let Some(rm) = peers.repl_metrics.get() {
                    rm.received
                        .inc_by(ch.received_bytes.saturating_sub(received_before));
                }
                replication_request(m, &host, peers, &mut staged).await?
            }
            m => {
                return Err(WireError::Protocol(format!(
                    "unexpected message from a client: {}",
                    format!("{m:?}").split([' ', '{']).next().unwrap_or("?")
                )))
            }
        };
        ch.send(&answer).await?;
    }
}

/// Tree rows staged on one connection.
#[derive(Default)]
struct Staging {
    rows: std::collections::HashMap<volfs::ids::LayerId, Vec<volfs::replica::Row>>,
    bytes: usize,
}

/// At most this many bytes of tree rows staged on one connection.
pub const MAX_STAGED: usize = 1 << 30;

/// Answers one replication request (protocol v2). Refusals (a lower fencing token, a chunk
/// that does not match its id, a name taken by a local volume) are `Error` answers; the
/// connection stays usable.
async fn replication_request(
    m: MsgV1,
    host: &str,
    peers: &Peers,
    staged: &mut Staging,
) -> Result<MsgV1, WireError> {
    let Some(registry) = peers.registry.get().cloned() else {
        return Ok(MsgV1::Error {
            message: "this host does not receive replicas yet (starting)".into(),
        });
    };
    let store = peers.store.clone();
    let refused = |e: volfs::Error| MsgV1::Error {
        message: e.to_string(),
    };
    let worker_failed = |e: tokio::task::JoinError| MsgV1::Error {
        message: format!("worker failed: {e}"),
    };
    Ok(match m {
        MsgV1::HasLayers { ids } => {
            if ids.len() > MAX_IDS {
                return Err(WireError::Protocol(format!(
                    "{} ids in one request, over the limit of {MAX_IDS}",
                    ids.len()
                )));
            }
            let r = tokio::task::spawn_blocking(move || {
                let ids: Vec<volfs::ids::LayerId> =
                    ids.into_iter().map(volfs::ids::LayerId).collect();
                volfs::replica::has_layers(&*store.engine, &ids)
            })
            .await;
            match r {
                Ok(Ok(which)) => MsgV1::Have { which },
                Ok(Err(e)) => refused(e),
                Err(e) => worker_failed(e),
            }
        }
        MsgV1::PutChunk {
            volume,
            token,
            id,
            data,
        } => {
            let counters = peers.counters.clone();
            let cluster = peers.cluster.get().cloned();
            let r = tokio::task::spawn_blocking(move || {
                check_token(cluster.as_deref(), &*store.engine, &volume, token)?;
                let cid = ChunkId(id);
                if ChunkId::of(&data) != cid {
                    counters.rejected.inc();
                    tracing::warn!(chunk = %cid, volume, "a peer sent replica bytes that do not match the chunk's hash; rejected");
                }
                volfs::replica::store_chunk(&store, &cid, &data)
            })
            .await;
            match r {
                Ok(Ok(new)) => MsgV1::Stored { id, new },
                Ok(Err(e)) => refused(e),
                Err(e) => worker_failed(e),
            }
        }
        MsgV1::TreeRows {
            volume,
            token,
            layer,
            rows,
        } => {
            let cluster = peers.cluster.get().cloned();
            let check = tokio::task::spawn_blocking(move || {
                check_token(cluster.as_deref(), &*store.engine, &volume, token)
            })
            .await;
            match check {
                Ok(Ok(())) => {
                    let n: usize = rows.iter().map(|r| r.len()).sum();
                    if staged.bytes + n > MAX_STAGED {
                        return Err(WireError::Protocol(format!(
                            "over {MAX_STAGED} bytes of tree rows staged on one connection"
                        )));
                    }
                    staged.bytes += n;
                    let e = staged.rows.entry(volfs::ids::LayerId(layer)).or_default();
                    e.extend(rows);
                    MsgV1::Staged {
                        rows: e.len() as u64,
                    }
                }
                Ok(Err(e)) => refused(e),
                Err(e) => worker_failed(e),
            }
        }
        MsgV1::Commit { token, snapshot } => {
            let c = volfs::replica::CommitInfo {
                token,
                lazy: false,
                settings: None,
            };
            commit(peers, registry, host, staged, c, snapshot).await
        }
        MsgV1::CommitLazy { token, snapshot } => {
            let c = volfs::replica::CommitInfo {
                token,
                lazy: true,
                settings: None,
            };
            commit(peers, registry, host, staged, c, snapshot).await
        }
        MsgV1::CommitV3 {
            token,
            lazy,
            settings,
            snapshot,
        } => {
            let c = volfs::replica::CommitInfo {
                token,
                lazy,
                settings: Some(settings),
            };
            commit(peers, registry, host, staged, c, snapshot).await
        }
        MsgV1::Promote { volume, token } => {
            let Some(p) = peers.promoter.get().cloned() else {
                return Ok(MsgV1::Error {
                    message: "this host cannot take volumes over yet (starting)".into(),
                });
            };
            let from = host.to_string();
            let r = tokio::task::spawn_blocking(move || p.promote_from_peer(&volume, &from, token))
                .await;
            match r {
                Ok(Ok((token, snapshot, created))) => MsgV1::Promoted {
                    token,
                    snapshot,
                    created,
                },
                Ok(Err(e)) => refused(e),
                Err(e) => worker_failed(e),
            }
        }
        _ => MsgV1::Error {
            message: "not a replication request".into(),
        },
    })
}

/// `Commit` / `CommitLazy` / `CommitV3`: applies the staged trees as a snapshot of the
/// replica.
async fn commit(
    peers: &Peers,
    registry: std::sync::Arc<volfs::volume::Registry>,
    host: &str,
    staged: &mut Staging,
    info: volfs::replica::CommitInfo,
    mut snapshot: volfs::replica::Incoming,
) -> MsgV1 {
    let refused = |e: volfs::Error| MsgV1::Error {
        message: e.to_string(),
    };
    let worker_failed = |e: tokio::task::JoinError| MsgV1::Error {
        message: format!("worker failed: {e}"),
    };
    // The origin is the authenticated peer's hello name, not what the message says.
    snapshot.origin = host.to_string();
    let rows = std::mem::take(&mut staged.rows);
    staged.bytes = 0;
    let store = peers.store.clone();
    let cluster = peers.cluster.get().cloned();
    let r = tokio::task::spawn_blocking(move || {
        check_token(
            cluster.as_deref(),
            &*store.engine,
            &snapshot.volume,
            info.token,
        )?;
        volfs::replica::apply(&registry, &snapshot, &rows, &info)
    })
    .await;
    match r {
        Ok(Ok(volfs::replica::Applied::New(n))) => MsgV1::Committed {
            new_trees: n as u32,
            already: false,
        },
        Ok(Ok(volfs::replica::Applied::Already)) => MsgV1::Committed {
            new_trees: 0,
            already: true,
        },
        Ok(Err(e)) => refused(e),
        Err(e) => worker_failed(e),
    }
}

/// The token check of every change to a replica: below the highest token persisted for the
/// volume (`repl-fence/<volume>`) is refused; in cluster mode also below the owner's token
/// as this host last saw it in etcd (a deposed owner that has not noticed yet).
fn check_token(
    cluster: Option<&crate::cluster::Cluster>,
    engine: &dyn volfs::db::Engine,
    volume: &str,
    token: u64,
) -> volfs::Result<()> {
    if let Some(c) = cluster {
        c.check_token(volume, i64::try_from(token).unwrap_or(i64::MAX))?;
    }
    volfs::replica::check_fence(engine, volume, token)
}
