//! Records of the metadata index and the keys they live under. Every value starts with a
//! one-byte record version followed by the postcard encoding of the struct; every key is built
//! here from big-endian integers so that keys sort by tree, inode and offset. The full table is
//! in docs/FORMAT.md; change both together.
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::{ChunkId, LayerId, TreeId, VolumeId};

/// The schema version of the whole index, stored under `meta/schema_version`. Upgrades run
/// step by step at open (see `store::check_schema` and docs/FORMAT.md):
/// - 1 -> 2 (layers): the `trees`, `layers` and `snapshots` column families are created;
///   version 1 volume records are read as version 2 ([`VolumeRecord::decode`]). No rewrite.
pub const SCHEMA_VERSION: u32 = 2;

pub fn encode<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
    let mut v = vec![version];
    // postcard only fails on writer errors, which a Vec never has.
    v.extend(postcard::to_stdvec(value).unwrap_or_default());
    v
}

pub fn decode<T: DeserializeOwned>(version: u8, what: &str, bytes: &[u8]) -> Result<T> {
    match bytes.split_first() {
        Some((v, rest)) if *v == version => {
            Ok(postcard::from_bytes(rest).map_err(|e| Error::Encoding(format!("{what}: {e}")))?)
        }
        Some((v, _)) => Err(Error::Encoding(format!(
            "{what}: record version {v}, this volfs reads version {version}"
        ))),
        None => Err(Error::Encoding(format!("{what}: empty record"))),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            0 => Kind::File,
            _ => return None,
        })
    }
}

/// A point in time: seconds and nanoseconds since the epoch (seconds may be negative).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Ts {
    pub secs: i64,
    pub nsec: u32,
}

impl Ts {
    pub fn now() -> Ts {
        Ts::from(SystemTime::now())
    }
}

impl From<SystemTime> for Ts {
    fn from(t: SystemTime) -> Ts {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Ts {
                secs: d.as_secs() as i64,
                nsec: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                if d.subsec_nanos() == 0 {
                    Ts {
                        secs: -(d.as_secs() as i64),
                        nsec: 0,
                    }
                } else {
                    Ts {
                        secs: -(d.as_secs() as i64) - 1,
                        nsec: 1_000_000_000 - d.subsec_nanos(),
                    }
                }
            }
        }
    }
}

impl From<Ts> for SystemTime {
    fn from(t: Ts) -> SystemTime {
        if t.secs >= 0 {
            UNIX_EPOCH + Duration::new(t.secs as u64, t.nsec)
        } else {
            UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
                + Duration::from_nanos(t.nsec as u64)
        }
    }
}

pub const INODE_VERSION: u8 = 1;

/// `inodes`: tree | ino -> InodeRecord.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InodeRecord {
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (no file type bits).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Bytes of the file covered by extents (not holes); `st_blocks` is derived from it.
    pub alloc: u64,
    pub nlink: u32,
    pub rdev: u32,
    pub atime: Ts,
    pub mtime: Ts,
    pub ctime: Ts,
    pub btime: Ts,
    /// Symlink target; empty for other kinds.
    pub target: Vec<u8>,
}

impl InodeRecord {
    pub fn new(kind: Kind, perm: u32, uid: u32, gid: u32) -> Self {
        let now = Ts::now();
        InodeRecord {
            kind,
            perm: perm & 0o7777,
            uid,
            gid,
            size: 0,
            alloc: 0,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            rdev: 0,
            atime: now,
            mtime: now,
            ctime: now,
            btime: now,
            target: Vec::new(),
        }
    }
}

pub const DIRENT_VERSION: u8 = 1;

/// `dirents`: tree | parent ino | name -> Dirent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dirent {
    pub ino: u64,
    pub kind: Kind,
}

pub const EXTENT_VERSION: u8 = 1;

/// `extents`: tree | ino | file offset -> Extent: bytes `[chunk_off, chunk_off + len)` of a
/// chunk are the file's bytes `[offset, offset + len)`. Gaps between extents are holes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub chunk: ChunkId,
    pub chunk_off: u32,
    pub len: u32,
}

pub const VOLUME_VERSION: u8 = 2;

/// `volumes`: volume name -> VolumeRecord (version 2; version 1 records are read and upgraded
/// in memory, see [`VolumeRecord::decode`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub name: String,
    /// Unix seconds.
    pub created: i64,
    pub labels: BTreeMap<String, String>,
    /// Quota in bytes.
    pub size: Option<u64>,
    pub read_only: bool,
    /// The writable tree on top of `lower`.
    pub top: TreeId,
    /// Frozen trees below the top, topmost first (see crate::layer).
    pub lower: Vec<TreeId>,
    /// The image layers the volume was built from (`--layers`), bottom first; for display.
    pub image: Vec<LayerId>,
}

/// Version 1 of the volume record (volfs 0.1): no lower trees.
#[derive(Serialize, Deserialize)]
struct VolumeRecordV1 {
    id: VolumeId,
    name: String,
    created: i64,
    labels: BTreeMap<String, String>,
    size: Option<u64>,
    read_only: bool,
    top: TreeId,
    layers: Vec<LayerId>,
}

impl VolumeRecord {
    pub fn encode(&self) -> Vec<u8> {
        encode(VOLUME_VERSION, self)
    }

    /// Reads a version 2 record, or upgrades a version 1 record (the migration step 1 -> 2).
    pub fn decode(bytes: &[u8]) -> Result<VolumeRecord> {
        if bytes.first() == Some(&1) {
            let v1: VolumeRecordV1 = decode(1, "volume record", bytes)?;
            return Ok(VolumeRecord {
                id: v1.id,
                name: v1.name,
                created: v1.created,
                labels: v1.labels,
                size: v1.size,
                read_only: v1.read_only,
                top: v1.top,
                lower: Vec::new(),
                image: v1.layers,
            });
        }
        decode(VOLUME_VERSION, "volume record", bytes)
    }

    /// The volume's trees, topmost first.
    pub fn trees(&self) -> Vec<TreeId> {
        let mut t = vec![self.top];
        t.extend_from_slice(&self.lower);
        t
    }
}

pub const MOUNT_VERSION: u8 = 1;

/// `mounts`: target path -> MountRecord, restored when the daemon starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    pub volume: String,
    pub read_only: bool,
}

fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

pub fn tree_prefix(t: TreeId) -> Vec<u8> {
    t.0.to_be_bytes().to_vec()
}
pub fn inode_key(t: TreeId, ino: u64) -> Vec<u8> {
    key(&[&t.0.to_be_bytes(), &ino.to_be_bytes()])
}
pub fn dirent_prefix(t: TreeId, parent: u64) -> Vec<u8> {
    inode_key(t, parent)
}
pub fn dirent_key(t: TreeId, parent: u64, name: &[u8]) -> Vec<u8> {
    key(&[&t.0.to_be_bytes(), &parent.to_be_bytes(), name])
}
pub fn extent_key(t: TreeId, ino: u64, off: u64) -> Vec<u8> {
    key(&[&t.0.to_be_bytes(), &ino.to_be_bytes(), &off.to_be_bytes()])
}
pub fn xattr_key(t: TreeId, ino: u64, name: &[u8]) -> Vec<u8> {
    dirent_key(t, ino, name)
}
pub fn used_key(v: VolumeId) -> Vec<u8> {
    key(&[b"used/", &v.0.to_be_bytes()])
}
pub fn ino_hw_key(t: TreeId) -> Vec<u8> {
    key(&[b"ino_hw/", &t.0.to_be_bytes()])
}
/// Decodes the offset from an extent key.
pub fn extent_offset(k: &[u8]) -> Result<u64> {
    k.get(16..24)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| Error::Encoding("short extent key".into()))
}
pub fn u64_at(k: &[u8], at: usize) -> Result<u64> {
    k.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| Error::Encoding("short key".into()))
}

/// `meta` key of this host's cluster state (JSON, see docs/FORMAT.md, "Cluster state in etcd
/// v1": the lease id, and which local volumes this host owns or holds as replicas), so that
/// a restarted server keeps its lease and ownerships.
pub const CLUSTER_STATE_KEY: &[u8] = b"cluster/v1";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_reject_other_versions() {
        let r = InodeRecord::new(Kind::File, 0o644, 1, 2);
        let b = encode(INODE_VERSION, &r);
        assert_eq!(
            decode::<InodeRecord>(INODE_VERSION, "inode", &b).unwrap(),
            r
        );
        let mut bad = b.clone();
        bad[0] = 99;
        assert!(decode::<InodeRecord>(INODE_VERSION, "inode", &bad).is_err());
        assert!(decode::<InodeRecord>(INODE_VERSION, "inode", &[]).is_err());
    }

    #[test]
    fn version_1_volume_records_upgrade() {
        let old = encode(
            1,
            &VolumeRecordV1 {
                id: VolumeId(3),
                name: "db".into(),
                created: 7,
                labels: BTreeMap::new(),
                size: Some(10),
                read_only: true,
                top: TreeId(9),
                layers: Vec::new(),
            },
        );
        let r = VolumeRecord::decode(&old).unwrap();
        assert_eq!(
            (r.id, r.top, r.size, r.read_only),
            (VolumeId(3), TreeId(9), Some(10), true)
        );
        assert!(r.lower.is_empty());
        assert_eq!(VolumeRecord::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn timestamps_before_epoch() {
        for secs in [-5i64, 0, 12345] {
            for nsec in [0u32, 1, 999_999_999] {
                let t = Ts { secs, nsec };
                assert_eq!(Ts::from(SystemTime::from(t)), t);
            }
        }
    }

    #[test]
    fn extent_keys_sort_by_offset() {
        let t = TreeId(3);
        assert!(extent_key(t, 5, 10) < extent_key(t, 5, 256));
        assert_eq!(extent_offset(&extent_key(t, 5, 777)).unwrap(), 777);
    }
}

/// A peer host (`volfs peer add`): the value under [`peer_key`] in the `meta` column family,
/// record version [`PEER_VERSION`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub name: String,
    /// `host:port` of the peer's listener (`peer_listen` there).
    pub addr: String,
    /// Unix seconds when it was added.
    pub added: i64,
}

pub const PEER_VERSION: u8 = 1;
/// The prefix of every peer record's key in the `meta` column family.
pub const PEER_PREFIX: &[u8] = b"peer/";

/// `peer/<name>`: a peer record's key in the `meta` column family.
pub fn peer_key(name: &str) -> Vec<u8> {
    key(&[PEER_PREFIX, name.as_bytes()])
}

/// Checks a peer name: the rules of volume names.
pub fn check_peer_name(name: &str) -> Result<()> {
    crate::ids::VolumeName::new(name).map(|_| ()).map_err(|_| {
        Error::Invalid(format!(
            "invalid peer name {name:?}: names must match [a-zA-Z0-9][a-zA-Z0-9_.-]* and be at most 128 characters"
        ))
    })
}

/// Checks a peer address: `host:port`, with a host name, an IPv4 address or a bracketed IPv6
/// address, and a port from 1 to 65535.
pub fn check_peer_addr(addr: &str) -> Result<()> {
    let bad = |why: &str| {
        Error::Invalid(format!(
            "invalid peer address {addr:?}: {why}; expected HOST:PORT"
        ))
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(bad("the port is not a number from 1 to 65535")),
    }
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let ok = host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(bad("the host is neither an IP address nor a host name"))
    }
}

/// Every peer record, by name.
pub fn peers(engine: &dyn crate::db::Engine) -> Result<Vec<PeerRecord>> {
    engine
        .scan_prefix(crate::db::Cf::Meta, PEER_PREFIX)?
        .into_iter()
        .map(|(_, v)| decode(PEER_VERSION, "peer record", &v))
        .collect()
}

#[cfg(test)]
mod peer_tests {
    use super::*;

    #[test]
    fn peer_names_and_addresses() {
        assert!(check_peer_name("host-b.1").is_ok());
        assert!(check_peer_name("-x").is_err());
        assert!(check_peer_name("a/b").is_err());
        for ok in [
            "10.0.0.1:9568",
            "host-b:1",
            "b.example.org:9568",
            "[::1]:9568",
        ] {
            assert!(check_peer_addr(ok).is_ok(), "{ok}");
        }
        for bad in [
            "host",
            "host:0",
            "host:x",
            ":9568",
            "a b:1",
            "host:65536",
            "a..b:1",
        ] {
            assert!(check_peer_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn peer_record_round_trip() {
        let r = PeerRecord {
            name: "b".into(),
            addr: "10.0.0.2:9568".into(),
            added: 5,
        };
        let v = encode(PEER_VERSION, &r);
        assert_eq!(v[0], PEER_VERSION);
        assert_eq!(decode::<PeerRecord>(PEER_VERSION, "peer", &v).unwrap(), r);
        assert_eq!(peer_key("b"), b"peer/b".to_vec());
    }
}
