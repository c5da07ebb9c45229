//! The side that connects: opens a channel to a peer's listener, exchanges hellos, and asks
//! (ping, which chunks it has, one chunk). Every chunk received is verified against its id
//! here, on arrival; one that fails is an error and is never handed on.
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use volfs::ids::ChunkId;

use super::channel::{Channel, Role};
use super::wire::{MsgV1, WireError, MAX_IDS};
use crate::metrics::PeerCounters;

/// Connecting (name resolution and TCP) must finish within this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Each request must be answered within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub struct PeerClient {
    ch: Channel,
    /// The host name the peer gave in its hello.
    pub host: String,
    counters: PeerCounters,
}

impl PeerClient {
    /// Connects to `addr` (`host:port`), runs the handshake and exchanges hellos.
    pub async fn connect(
        addr: &str,
        key: &[u8; 32],
        me: &str,
        counters: PeerCounters,
    ) -> Result<PeerClient, WireError> {
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(WireError::Connect(e.to_string())),
            Err(_) => {
                return Err(WireError::Connect(format!(
                    "no answer within {CONNECT_TIMEOUT:?}"
                )))
            }
        };
        let mut ch = match Channel::open(stream, key, Role::Initiator, counters.clone()).await {
            Ok(ch) => ch,
            Err(e) => {
                if matches!(e, WireError::Auth(_)) {
                    counters.handshake_failures.inc();
                }
                return Err(e);
            }
        };
        let version = ch.version;
        ch.send(&MsgV1::Hello {
            host: me.to_string(),
            version,
        })
        .await?;
        let host = match ch
            .recv_within(REQUEST_TIMEOUT, "waiting for the peer's hello")
            .await?
        {
            MsgV1::Hello { host, version: v } if v == version => host,
            MsgV1::Hello { version: v, .. } => {
                return Err(WireError::Protocol(format!(
                    "the peer's hello says version {v}, the channel runs {version}"
                )))
            }
            m => return Err(unexpected(&m)),
        };
        Ok(PeerClient { ch, host, counters })
    }

    pub fn version(&self) -> u16 {
        self.ch.version
    }

    /// One request, one answer.
    async fn ask(&mut self, m: &MsgV1) -> Result<MsgV1, WireError> {
        self.ch.send(m).await?;
        match self
            .ch
            .recv_within(REQUEST_TIMEOUT, "waiting for an answer")
            .await?
        {
            MsgV1::Error { message } => {
                Err(WireError::Protocol(format!("the peer refused: {message}")))
            }
            a => Ok(a),
        }
    }

    /// Round trip of a ping.
    pub async fn ping(&mut self) -> Result<Duration, WireError> {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let t0 = Instant::now();
        match self.ask(&MsgV1::Ping { nonce }).await? {
            MsgV1::Pong { nonce: n } if n == nonce => Ok(t0.elapsed()),
            m => Err(unexpected(&m)),
        }
    }

    /// Which of `ids` the peer holds (asked in requests of at most [`MAX_IDS`]).
    pub async fn has_chunks(&mut self, ids: &[ChunkId]) -> Result<Vec<bool>, WireError> {
        let mut out = Vec::with_capacity(ids.len());
        for part in ids.chunks(MAX_IDS) {
            let ask = MsgV1::HasChunks {
                ids: part.iter().map(|i| i.0).collect(),
            };
            match self.ask(&ask).await? {
                MsgV1::Have { which } if which.len() == part.len() => out.extend(which),
                m => return Err(unexpected(&m)),
            }
        }
        Ok(out)
    }

    /// Chunk `id` from the peer, verified: `None` when it holds no intact copy; an error
    /// ([`WireError::Rejected`]) when it sends bytes that do not hash to `id`.
    pub async fn get_chunk(&mut self, id: &ChunkId) -> Result<Option<Vec<u8>>, WireError> {
        match self.ask(&MsgV1::GetChunk { id: id.0 }).await? {
            MsgV1::Chunk { id: got, data } => {
                if got != id.0 {
                    self.counters.rejected.inc();
                    return Err(WireError::Rejected(format!(
                        "sent chunk {} when asked for {id} (rejected)",
                        ChunkId(got)
                    )));
                }
                if ChunkId::of(&data) != *id {
                    self.counters.rejected.inc();
                    tracing::warn!(chunk = %id, remote = %self.ch.remote, "a peer sent bytes that do not match the chunk's hash; rejected");
                    return Err(WireError::Rejected(
                        "sent bytes that do not match the chunk's hash (rejected, not stored)"
                            .into(),
                    ));
                }
                Ok(Some(data))
            }
            MsgV1::Missing { id: got } if got == id.0 => Ok(None),
            m => Err(unexpected(&m)),
        }
    }
}

/// At most this many `PutChunk`s in flight before their answers are read.
pub const PUT_WINDOW: usize = 8;

impl PeerClient {
    /// Bytes of encrypted frames sent and received on this connection so far.
    pub fn bytes(&self) -> (u64, u64) {
        (self.ch.sent_bytes, self.ch.received_bytes)
    }

    fn need_v2(&self) -> Result<(), WireError> {
        if self.ch.version < super::wire::REPLICATION_VERSION {
            return Err(WireError::Protocol(format!(
                "the peer speaks protocol version {} and cannot receive replicas (needs {})",
                self.ch.version,
                super::wire::REPLICATION_VERSION
            )));
        }
        Ok(())
    }

    /// Which of these layers the peer holds.
    pub async fn has_layers(
        &mut self,
        ids: &[volfs::ids::LayerId],
    ) -> Result<Vec<bool>, WireError> {
        self.need_v2()?;
        let mut out = Vec::with_capacity(ids.len());
        for part in ids.chunks(MAX_IDS) {
            let ask = MsgV1::HasLayers {
                ids: part.iter().map(|i| i.0).collect(),
            };
            match self.ask(&ask).await? {
                MsgV1::Have { which } if which.len() == part.len() => out.extend(which),
                m => return Err(unexpected(&m)),
            }
        }
        Ok(out)
    }

    /// Sends chunks for a replica, up to [`PUT_WINDOW`] in flight; each answer must say the
    /// chunk is stored. `on_stored(bytes)` is called per chunk stored.
    pub async fn put_chunks(
        &mut self,
        volume: &str,
        token: u64,
        chunks: &[(ChunkId, std::sync::Arc<Vec<u8>>)],
        on_stored: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(), WireError> {
        self.need_v2()?;
        for window in chunks.chunks(PUT_WINDOW) {
            for (id, data) in window {
                self.ch
                    .send(&MsgV1::PutChunk {
                        volume: volume.to_string(),
                        token,
                        id: id.0,
                        data: data.to_vec(),
                    })
                    .await?;
            }
            for (id, data) in window {
                match self
                    .ch
                    .recv_within(REQUEST_TIMEOUT, "waiting for a chunk to be stored")
                    .await?
                {
                    MsgV1::Stored { id: got, .. } if got == id.0 => on_stored(data.len() as u64),
                    MsgV1::Error { message } => {
                        return Err(WireError::Protocol(format!("the peer refused: {message}")))
                    }
                    m => return Err(unexpected(&m)),
                }
            }
        }
        Ok(())
    }

    /// Stages the rows of one tree on the peer, in messages of at most
    /// [`super::wire::MAX_ROWS_BYTES`].
    pub async fn tree_rows(
        &mut self,
        volume: &str,
        token: u64,
        layer: &volfs::ids::LayerId,
        rows: &[volfs::replica::Row],
    ) -> Result<(), WireError> {
        self.need_v2()?;
        let mut start = 0;
        loop {
            let mut end = start;
            let mut n = 0;
            while end < rows.len()
                && (end == start || n + rows[end].len() <= super::wire::MAX_ROWS_BYTES)
            {
                n += rows[end].len();
                end += 1;
            }
            let m = MsgV1::TreeRows {
                volume: volume.to_string(),
                token,
                layer: layer.0,
                rows: rows[start..end].to_vec(),
            };
            match self.ask(&m).await? {
                MsgV1::Staged { .. } => {}
                m => return Err(unexpected(&m)),
            }
            start = end;
            if start >= rows.len() {
                return Ok(());
            }
        }
    }

    /// Commits a snapshot on the peer: `(new trees, already there)`.
    pub async fn commit(
        &mut self,
        token: u64,
        snapshot: volfs::replica::Incoming,
    ) -> Result<(u32, bool), WireError> {
        self.need_v2()?;
        match self.ask(&MsgV1::Commit { token, snapshot }).await? {
            MsgV1::Committed { new_trees, already } => Ok((new_trees, already)),
            m => Err(unexpected(&m)),
        }
    }
}

impl PeerClient {
    /// Commits a lazily shipped snapshot (its chunks not all sent) on the peer: `(new
    /// trees, already there)`. Needs protocol v2 with `CommitLazy`.
    pub async fn commit_lazy(
        &mut self,
        token: u64,
        snapshot: volfs::replica::Incoming,
    ) -> Result<(u32, bool), WireError> {
        if self.ch.version < super::wire::LAZY_VERSION {
            return Err(WireError::Protocol(format!(
                "the peer speaks protocol version {} and cannot receive lazily shipped snapshots (needs {})",
                self.ch.version,
                super::wire::LAZY_VERSION
            )));
        }
        match self.ask(&MsgV1::CommitLazy { token, snapshot }).await? {
            MsgV1::Committed { new_trees, already } => Ok((new_trees, already)),
            m => Err(unexpected(&m)),
        }
    }

    /// Commits a snapshot (lazily shipped with `lazy`) with the origin's replication
    /// settings: `CommitV3` on a v3 channel, else `Commit` or `CommitLazy` (the settings
    /// are not sent). `(new trees, already there)`.
    pub async fn commit_with(
        &mut self,
        token: u64,
        lazy: bool,
        settings: volfs::replica::OriginSettings,
        snapshot: volfs::replica::Incoming,
    ) -> Result<(u32, bool), WireError> {
        if self.ch.version < super::wire::SETTINGS_VERSION {
            return if lazy {
                self.commit_lazy(token, snapshot).await
            } else {
                self.commit(token, snapshot).await
            };
        }
        let m = MsgV1::CommitV3 {
            token,
            lazy,
            settings,
            snapshot,
        };
        match self.ask(&m).await? {
            MsgV1::Committed { new_trees, already } => Ok((new_trees, already)),
            m => Err(unexpected(&m)),
        }
    }

    /// Asks the peer to take over a volume whose replica it holds (`volume move`): its new
    /// token and the snapshot its writable volume starts from.
    pub async fn promote(
        &mut self,
        volume: &str,
        token: u64,
    ) -> Result<(u64, String, i64), WireError> {
        self.need_v2()?;
        let m = MsgV1::Promote {
            volume: volume.to_string(),
            token,
        };
        self.ch.send(&m).await?;
        // Claiming in etcd may take a few seconds: a longer limit than other requests.
        match self
            .ch
            .recv_within(Duration::from_secs(60), "waiting for the promote")
            .await?
        {
            MsgV1::Promoted {
                token,
                snapshot,
                created,
            } => Ok((token, snapshot, created)),
            MsgV1::Error { message } => {
                Err(WireError::Protocol(format!("the peer refused: {message}")))
            }
            m => Err(unexpected(&m)),
        }
    }
}

fn unexpected(m: &MsgV1) -> WireError {
    let name = format!("{m:?}");
    let name = name
        .split([' ', '{', '('])
        .next()
        .unwrap_or("?")
        .to_string();
    WireError::Protocol(format!("unexpected message {name}"))
}
