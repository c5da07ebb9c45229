//! The authenticated, encrypted channel between two daemons: the version preamble, the Noise
//! handshake with the cluster's pre-shared key (`Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s`, the
//! negotiated version and both preambles bound in as the prologue), then encrypted frames
//! carrying one [`MsgV1`] each. A side without the key cannot complete the handshake, so it
//! can neither read nor send a message.
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::wire::{self, MsgV1, WireError, NOISE_MAX, TAG};
use crate::metrics::PeerCounters;

/// The Noise protocol name.
pub const PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Preamble and handshake together must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which side of the handshake this is: the side that connected initiates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Initiator,
    Responder,
}

pub struct Channel {
    stream: TcpStream,
    noise: snow::TransportState,
    /// The negotiated protocol version.
    pub version: u16,
    pub remote: SocketAddr,
    counters: PeerCounters,
    /// Bytes of encrypted frames sent and received on this channel (after the handshake).
    pub sent_bytes: u64,
    pub received_bytes: u64,
}

fn noise_err(e: snow::Error) -> WireError {
    WireError::Malformed(format!("noise: {e}"))
}

/// Counts the bytes of a stream's reads.
struct Counted<'a> {
    stream: &'a mut TcpStream,
    counters: &'a PeerCounters,
}

impl Counted<'_> {
    async fn write(&mut self, b: &[u8]) -> Result<(), WireError> {
        self.stream.write_all(b).await?;
        self.counters.sent.inc_by(b.len() as u64);
        Ok(())
    }
}

impl Channel {
    /// Negotiates the version and runs the handshake on a fresh connection.
    pub async fn open(
        stream: TcpStream,
        key: &[u8; 32],
        role: Role,
        counters: PeerCounters,
    ) -> Result<Channel, WireError> {
        match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            Self::handshake(stream, key, role, counters),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(WireError::Timeout("in the version exchange or handshake")),
        }
    }

    async fn handshake(
        mut stream: TcpStream,
        key: &[u8; 32],
        role: Role,
        counters: PeerCounters,
    ) -> Result<Channel, WireError> {
        let remote = stream.peer_addr()?;
        let _ = stream.set_nodelay(true);
        let ours = wire::preamble(wire::VERSIONS);
        Counted {
            stream: &mut stream,
            counters: &counters,
        }
        .write(&ours)
        .await?;
        let offered = wire::read_preamble(&mut stream).await?;
        let theirs = wire::preamble(&offered);
        counters.received.inc_by(theirs.len() as u64);
        let version = wire::choose(wire::VERSIONS, &offered)?;
        let (ini, resp) = match role {
            Role::Initiator => (&ours, &theirs),
            Role::Responder => (&theirs, &ours),
        };
        let prologue = wire::prologue(version, ini, resp);
        let params: snow::params::NoiseParams = PATTERN
            .parse()
            .map_err(|e| WireError::Malformed(format!("noise pattern: {e}")))?;
        let builder = snow::Builder::new(params).prologue(&prologue).psk(0, key);
        let mut buf = vec![0u8; NOISE_MAX];
        let refused = "the peer refused the handshake (a different peer key?)";
        let noise = match role {
            Role::Initiator => {
                let mut hs = builder.build_initiator().map_err(noise_err)?;
                let n = hs.write_message(&[], &mut buf).map_err(noise_err)?;
                wire::write_handshake(&mut stream, &buf[..n]).await?;
                counters.sent.inc_by(n as u64 + 2);
                let msg = match wire::read_handshake(&mut stream).await {
                    Ok(m) => m,
                    Err(WireError::Io(e))
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                        ) =>
                    {
                        return Err(WireError::Auth(refused.into()))
                    }
                    Err(e) => return Err(e),
                };
                counters.received.inc_by(msg.len() as u64 + 2);
                hs.read_message(&msg, &mut buf).map_err(|_| {
                    WireError::Auth(
                        "the peer's handshake does not verify (a different peer key?)".into(),
                    )
                })?;
                hs.into_transport_mode().map_err(noise_err)?
            }
            Role::Responder => {
                let mut hs = builder.build_responder().map_err(noise_err)?;
                let msg = wire::read_handshake(&mut stream).await?;
                counters.received.inc_by(msg.len() as u64 + 2);
                hs.read_message(&msg, &mut buf).map_err(|_| {
                    WireError::Auth("the handshake does not verify (a different peer key?)".into())
                })?;
                let n = hs.write_message(&[], &mut buf).map_err(noise_err)?;
                wire::write_handshake(&mut stream, &buf[..n]).await?;
                counters.sent.inc_by(n as u64 + 2);
                hs.into_transport_mode().map_err(noise_err)?
            }
        };
        Ok(Channel {
            stream,
            noise,
            version,
            remote,
            counters,
            sent_bytes: 0,
            received_bytes: 0,
        })
    }

    /// Encrypts and sends one message.
    pub async fn send(&mut self, msg: &MsgV1) -> Result<(), WireError> {
        let plain = msg.encode();
        let mut ct = Vec::with_capacity(plain.len() + plain.len() / (NOISE_MAX - TAG) * TAG + TAG);
        let mut piece = vec![0u8; NOISE_MAX];
        // An empty message still gets one (tag-only) piece.
        let mut parts: Vec<&[u8]> = plain.chunks(NOISE_MAX - TAG).collect();
        if parts.is_empty() {
            parts.push(&[]);
        }
        for p in parts {
            let n = self.noise.write_message(p, &mut piece).map_err(noise_err)?;
            ct.extend_from_slice(&piece[..n]);
        }
        wire::write_frame(&mut self.stream, &ct).await?;
        self.counters.sent.inc_by(ct.len() as u64 + 4);
        self.sent_bytes += ct.len() as u64 + 4;
        Ok(())
    }

    /// Receives and decrypts one message; a frame that does not decrypt or decode is an error
    /// (the caller closes the connection).
    pub async fn recv(&mut self) -> Result<MsgV1, WireError> {
        let ct = wire::read_frame(&mut self.stream).await?;
        self.counters.received.inc_by(ct.len() as u64 + 4);
        self.received_bytes += ct.len() as u64 + 4;
        let mut plain = Vec::with_capacity(ct.len());
        let mut piece = vec![0u8; NOISE_MAX];
        for p in ct.chunks(NOISE_MAX) {
            if p.len() < TAG {
                return Err(WireError::Malformed("short encrypted piece".into()));
            }
            let n = self
                .noise
                .read_message(p, &mut piece)
                .map_err(|_| WireError::Malformed("frame does not decrypt".into()))?;
            plain.extend_from_slice(&piece[..n]);
        }
        MsgV1::decode(&plain)
    }

    /// [`Channel::recv`] with a deadline.
    pub async fn recv_within(
        &mut self,
        t: Duration,
        what: &'static str,
    ) -> Result<MsgV1, WireError> {
        tokio::time::timeout(t, self.recv())
            .await
            .unwrap_or(Err(WireError::Timeout(what)))
    }
}
