//! A hand-written peer, for what a real daemon never sends: garbage, oversized or
//! undecryptable frames, chunks with wrong bytes, a deposed owner's shipments. It speaks the
//! wire as docs/FORMAT.md describes it ("Peer protocol v1" and "v2": the plaintext preamble,
//! the Noise `NNpsk0` handshake with the versions bound into its prologue, encrypted
//! postcard frames), written apart from the daemon's code so that it checks the format, not
//! the implementation against itself. Shared by tests/peers.rs, tests/lazy.rs and
//! tests/failover.rs; include with `#[path = "common/fakepeer.rs"] mod fakepeer;`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The messages of peer protocol v1, then the first of v2 (appended, so v1's encodings are
/// the same), as docs/FORMAT.md numbers them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Msg {
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
    HasChunks {
        ids: Vec<[u8; 32]>,
    },
    Have {
        which: Vec<bool>,
    },
    GetChunk {
        id: [u8; 32],
    },
    Chunk {
        id: [u8; 32],
        data: Vec<u8>,
    },
    Missing {
        id: [u8; 32],
    },
    Error {
        message: String,
    },
    // v2
    HasLayers {
        ids: Vec<[u8; 32]>,
    },
    PutChunk {
        volume: String,
        token: u64,
        id: [u8; 32],
        data: Vec<u8>,
    },
    Stored {
        id: [u8; 32],
        new: bool,
    },
}

/// The plaintext preamble: magic, count, versions (u16 BE).
pub fn preamble(versions: &[u16]) -> Vec<u8> {
    let mut v = b"VOLFSPR\0".to_vec();
    v.push(versions.len() as u8);
    for x in versions {
        v.extend(x.to_be_bytes());
    }
    v
}

pub struct Fake {
    pub s: TcpStream,
    t: snow::TransportState,
    /// The version both sides chose (the highest both offered).
    pub version: u16,
}

fn read_handshake(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut l = [0u8; 2];
    s.read_exact(&mut l).ok()?;
    let mut m = vec![0u8; u16::from_be_bytes(l) as usize];
    s.read_exact(&mut m).ok()?;
    Some(m)
}

fn write_handshake(s: &mut TcpStream, m: &[u8]) -> Option<()> {
    let mut v = (m.len() as u16).to_be_bytes().to_vec();
    v.extend(m);
    s.write_all(&v).ok()
}

impl Fake {
    /// Preambles (offering `versions`) and the Noise handshake, as initiator or responder.
    /// `None` when the other side closes or the handshake fails.
    pub fn handshake(
        mut s: TcpStream,
        key: &[u8; 32],
        initiator: bool,
        versions: &[u16],
    ) -> Option<Fake> {
        s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
        let ours = preamble(versions);
        s.write_all(&ours).ok()?;
        let mut head = [0u8; 9];
        s.read_exact(&mut head).ok()?;
        let mut vs = vec![0u8; 2 * head[8] as usize];
        s.read_exact(&mut vs).ok()?;
        let offered: Vec<u16> = vs
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        let version = versions
            .iter()
            .filter(|v| offered.contains(v))
            .max()
            .copied()?;
        let mut theirs = head.to_vec();
        theirs.extend(&vs);
        let (ini, resp) = if initiator {
            (&ours, &theirs)
        } else {
            (&theirs, &ours)
        };
        let mut prologue = b"volfs peer protocol".to_vec();
        prologue.extend(version.to_be_bytes());
        prologue.extend(ini);
        prologue.extend(resp);
        let b = snow::Builder::new("Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s".parse().ok()?)
            .prologue(&prologue)
            .psk(0, key);
        let mut buf = vec![0u8; 65535];
        let t = if initiator {
            let mut hs = b.build_initiator().ok()?;
            let n = hs.write_message(&[], &mut buf).ok()?;
            write_handshake(&mut s, &buf[..n])?;
            let m = read_handshake(&mut s)?;
            hs.read_message(&m, &mut buf).ok()?;
            hs.into_transport_mode().ok()?
        } else {
            let mut hs = b.build_responder().ok()?;
            let m = read_handshake(&mut s)?;
            hs.read_message(&m, &mut buf).ok()?;
            let n = hs.write_message(&[], &mut buf).ok()?;
            write_handshake(&mut s, &buf[..n])?;
            hs.into_transport_mode().ok()?
        };
        Some(Fake { s, t, version })
    }

    /// Connects (initiator, offering `versions`) and exchanges hellos as `host`; panics
    /// when that fails (test setup).
    pub fn connect(addr: &str, key: &[u8; 32], host: &str, versions: &[u16]) -> Fake {
        let s = TcpStream::connect(addr).expect("connecting to the daemon's peer port");
        let mut f = Fake::handshake(s, key, true, versions).expect("a handshake");
        let version = f.version;
        f.send(&Msg::Hello {
            host: host.into(),
            version,
        })
        .expect("sending the hello");
        match f.recv() {
            Some(Msg::Hello { version: v, .. }) if v == version => f,
            m => panic!("expected a hello of version {version}, got {m:?}"),
        }
    }

    /// Sends one message in one frame; `None` when the connection is gone.
    pub fn send(&mut self, m: &Msg) -> Option<()> {
        let plain = postcard::to_stdvec(m).ok()?;
        let mut ct: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 65535];
        for p in plain.chunks(65535 - 16) {
            let n = self.t.write_message(p, &mut buf).ok()?;
            ct.extend(&buf[..n]);
        }
        let mut f = (ct.len() as u32).to_be_bytes().to_vec();
        f.extend(ct);
        self.s.write_all(&f).ok()
    }

    /// The next message; `None` when the connection is closed or the frame is not one.
    pub fn recv(&mut self) -> Option<Msg> {
        let mut l = [0u8; 4];
        self.s.read_exact(&mut l).ok()?;
        let mut ct = vec![0u8; u32::from_be_bytes(l) as usize];
        self.s.read_exact(&mut ct).ok()?;
        let mut plain = Vec::new();
        let mut buf = vec![0u8; 65535];
        for p in ct.chunks(65535) {
            let n = self.t.read_message(p, &mut buf).ok()?;
            plain.extend(&buf[..n]);
        }
        postcard::from_bytes(&plain).ok()
    }
}
