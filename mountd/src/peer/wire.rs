//! The peer protocol on the wire (docs/FORMAT.md, "Peer protocol v1" and "Peer protocol v2"):
//! the plaintext preamble with which both sides offer their protocol versions, the
//! length-prefixed frames of the Noise handshake and of the encrypted messages, the message
//! enum (version 1's messages, then version 2's, appended so that v1's encodings do not
//! change), and the limits every reader enforces before it allocates. Version 2 adds snapshot
//! replication; a v2 message is only ever sent on a channel that negotiated version 2.
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The first bytes each side sends.
pub const MAGIC: &[u8; 8] = b"VOLFSPR\0";
/// The protocol versions this build speaks, lowest first.
pub const VERSIONS: &[u16] = &[1, 2, 3];
/// The first version that can receive replicas.
pub const REPLICATION_VERSION: u16 = 2;
/// The first version that can receive lazily shipped snapshots (`CommitLazy`, appended to
/// v2's messages in the same release as v2 itself; a v2 build without it closes the
/// connection on it, which the origin's inspect shows).
pub const LAZY_VERSION: u16 = 2;
/// The first version whose commits carry the origin's replication settings (`CommitV3`), so
/// that a promoted replica keeps replicating; a v2 peer gets `Commit`/`CommitLazy`.
pub const SETTINGS_VERSION: u16 = 3;
/// At most this many versions in a preamble.
pub const MAX_VERSIONS: usize = 32;
/// Largest encrypted frame (the ciphertext after the 4-byte length): a 256 KiB chunk, its
/// encoding and the tags, with room to spare.
pub const MAX_FRAME: usize = 1 << 20;
/// Largest Noise message (handshake or transport).
pub const NOISE_MAX: usize = 65535;
/// Noise's authentication tag per transport message.
pub const TAG: usize = 16;
/// At most this many chunk ids in one `HasChunks`.
pub const MAX_IDS: usize = 4096;
/// At most this many bytes of rows in one `TreeRows` (well under [`MAX_FRAME`]).
pub const MAX_ROWS_BYTES: usize = 512 << 10;

/// A failure of the wire: the connection is closed after it.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a volfs peer (bad magic {0:02x?})")]
    Magic(Vec<u8>),
    #[error("no common peer protocol version: this host speaks {ours:?}, the peer {theirs:?}")]
    NoCommonVersion { ours: Vec<u16>, theirs: Vec<u16> },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME}")]
    Oversized(usize),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer sent data that failed verification; it was not stored.
    #[error("{0}")]
    Rejected(String),
}

/// Encodes a preamble: magic, count u8, versions u16 BE.
pub fn preamble(versions: &[u16]) -> Vec<u8> {
    let mut v = MAGIC.to_vec();
    v.push(versions.len() as u8);
    for x in versions {
        v.extend(x.to_be_bytes());
    }
    v
}

/// Reads the other side's preamble; the versions it offers.
pub async fn read_preamble<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u16>, WireError> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await?;
    if &head[..8] != MAGIC {
        return Err(WireError::Magic(head[..8].to_vec()));
    }
    let n = head[8] as usize;
    if n == 0 || n > MAX_VERSIONS {
        return Err(WireError::Malformed(format!(
            "{n} versions in the preamble"
        )));
    }
    let mut raw = vec![0u8; 2 * n];
    r.read_exact(&mut raw).await?;
    Ok(raw
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect())
}

/// The highest version both offer.
pub fn choose(ours: &[u16], theirs: &[u16]) -> Result<u16, WireError> {
    ours.iter()
        .filter(|v| theirs.contains(v))
        .max()
        .copied()
        .ok_or_else(|| WireError::NoCommonVersion {
            ours: ours.to_vec(),
            theirs: theirs.to_vec(),
        })
}

/// The Noise prologue: binds the negotiated version and both preambles (initiator's first)
/// into the handshake, so that a changed offer makes the handshake fail.
pub fn prologue(version: u16, initiator: &[u8], responder: &[u8]) -> Vec<u8> {
    let mut p = b"volfs peer protocol".to_vec();
    p.extend(version.to_be_bytes());
    p.extend(initiator);
    p.extend(responder);
    p
}

/// Writes a handshake message: length u16 BE, bytes.
pub async fn write_handshake<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &[u8],
) -> Result<(), WireError> {
    let len = u16::try_from(msg.len())
        .map_err(|_| WireError::Malformed("handshake message over 64 KiB".into()))?;
    let mut buf = len.to_be_bytes().to_vec();
    buf.extend_from_slice(msg);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Reads a handshake message.
pub async fn read_handshake<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, WireError> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len).await?;
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    r.read_exact(&mut msg).await?;
    Ok(msg)
}

/// Writes an encrypted frame: ciphertext length u32 BE, ciphertext.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, ct: &[u8]) -> Result<(), WireError> {
    if ct.len() > MAX_FRAME {
        return Err(WireError::Oversized(ct.len()));
    }
    let mut buf = Vec::with_capacity(4 + ct.len());
    buf.extend((ct.len() as u32).to_be_bytes());
    buf.extend_from_slice(ct);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Reads an encrypted frame, refusing one over [`MAX_FRAME`] before reading it.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, WireError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(WireError::Oversized(len));
    }
    if len == 0 {
        return Err(WireError::Malformed("empty frame".into()));
    }
    let mut ct = vec![0u8; len];
    r.read_exact(&mut ct).await?;
    Ok(ct)
}

/// A chunk id on the wire.
pub type Id = [u8; 32];

/// The messages of protocol version 1 (postcard-encoded, one per frame). Requests are
/// answered in order on the connection that asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MsgV1 {
    /// First message of each side after the handshake.
    Hello {
        host: String,
        version: u16,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// Which of these chunks the peer holds (at most [`MAX_IDS`]).
    HasChunks {
        ids: Vec<Id>,
    },
    /// One flag per id asked, in order.
    Have {
        which: Vec<bool>,
    },
    GetChunk {
        id: Id,
    },
    /// The chunk's uncompressed bytes.
    Chunk {
        id: Id,
        data: Vec<u8>,
    },
    /// The peer holds no intact copy.
    Missing {
        id: Id,
    },
    /// The request was refused; the connection stays usable.
    Error {
        message: String,
    },
    // ---- version 2: replication (each message that changes a replica carries the volume
    // and the origin's fencing token) ----
    /// Which of these layers (sealed trees, by LayerId) the peer holds.
    HasLayers {
        ids: Vec<Id>,
    },
    /// A chunk for a replica; the receiver verifies it against `id` before storing it.
    PutChunk {
        volume: String,
        token: u64,
        id: Id,
        data: Vec<u8>,
    },
    /// The chunk is stored (`new`: it was not there before).
    Stored {
        id: Id,
        new: bool,
    },
    /// Rows of a tree to stage on this connection until `Commit` (several messages per tree).
    TreeRows {
        volume: String,
        token: u64,
        layer: Id,
        rows: Vec<volfs::replica::Row>,
    },
    /// The rows are staged.
    Staged {
        rows: u64,
    },
    /// Make the snapshot (its trees staged or held) a snapshot of the replica, atomically.
    Commit {
        token: u64,
        snapshot: volfs::replica::Incoming,
    },
    Committed {
        new_trees: u32,
        already: bool,
    },
    // ---- version 2, appended: lazy shipping ----
    /// `Commit` of a snapshot whose chunks are not all sent: the receiver records the ones it
    /// lacks as missing and fetches them later (reads, `volume pull`). Answer `Committed`.
    CommitLazy {
        token: u64,
        snapshot: volfs::replica::Incoming,
    },
    // ---- version 2, extension for `volume move` (appended after CommitLazy: indices 17, 18) ----
    /// The origin of a replica hands the volume over: the receiver (whose replica holds the
    /// moved snapshot) takes ownership and makes it writable. `token`: the sender's token
    /// (cluster mode: informational, the receiver claims in etcd; single host: the new token,
    /// the sender's previous + 1).
    Promote {
        volume: String,
        token: u64,
    },
    /// The receiver owns the volume now: its new token, and the snapshot (name, creation
    /// time) its writable volume starts from.
    Promoted {
        token: u64,
        snapshot: String,
        created: i64,
    },
    // ---- version 3 (index 19): commits carry the origin's replication settings ----
    /// `Commit` (or, with `lazy`, `CommitLazy`) plus how the origin replicates the volume,
    /// which the replica keeps for a promote. Answer `Committed`. Only on v3 channels.
    CommitV3 {
        token: u64,
        lazy: bool,
        settings: volfs::replica::OriginSettings,
        snapshot: volfs::replica::Incoming,
    },
}

impl MsgV1 {
    pub fn encode(&self) -> Vec<u8> {
        // postcard only fails on writer errors, which a Vec never has.
        postcard::to_stdvec(self).unwrap_or_default()
    }
    pub fn decode(b: &[u8]) -> Result<MsgV1, WireError> {
        postcard::from_bytes(b).map_err(|e| WireError::Malformed(format!("message: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_choice() {
        assert_eq!(choose(&[1, 2, 3], &[2, 3, 4]).unwrap(), 3);
        assert_eq!(choose(&[1], &[1]).unwrap(), 1);
        let e = choose(&[1], &[2, 3]).unwrap_err().to_string();
        assert!(
            e.contains("no common") && e.contains("[1]") && e.contains("[2, 3]"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn preamble_round_trip_and_garbage() {
        let p = preamble(&[1, 7]);
        assert_eq!(read_preamble(&mut &p[..]).await.unwrap(), vec![1, 7]);
        let e = read_preamble(&mut &b"GET / HTTP/1.1\r\n"[..])
            .await
            .unwrap_err();
        assert!(matches!(e, WireError::Magic(_)), "{e}");
        let mut bad = MAGIC.to_vec();
        bad.push(0);
        assert!(matches!(
            read_preamble(&mut &bad[..]).await.unwrap_err(),
            WireError::Malformed(_)
        ));
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_before_reading() {
        let mut b = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        b.extend([0u8; 8]);
        assert!(matches!(
            read_frame(&mut &b[..]).await.unwrap_err(),
            WireError::Oversized(_)
        ));
    }

    #[test]
    fn messages_round_trip() {
        for m in [
            MsgV1::Hello {
                host: "a".into(),
                version: 1,
            },
            MsgV1::HasChunks {
                ids: vec![[1; 32], [2; 32]],
            },
            MsgV1::Have {
                which: vec![true, false],
            },
            MsgV1::Chunk {
                id: [3; 32],
                data: vec![9; 1000],
            },
        ] {
            assert_eq!(MsgV1::decode(&m.encode()).unwrap(), m);
        }
        assert!(MsgV1::decode(&[200, 1, 2]).is_err());
    }
}
