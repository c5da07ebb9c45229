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
use super::wire::{MsgV1, WireError, MAX_IDS};
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
    ch.send(&MsgV1::Hello {
        host: peers.host.clone(),
        version,
    })
    .await?;
    loop {
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
