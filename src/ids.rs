//! Typed identifiers: content ids ([`ChunkId`], [`LayerId`]), numeric ids ([`VolumeId`],
//! [`TreeId`]) and validated names ([`VolumeName`]).
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

macro_rules! hash_id {
    ($name:ident, $what:literal) => {
        #[doc = concat!("BLAKE3-256 of ", $what, ".")]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            pub fn of(data: &[u8]) -> Self {
                $name(*blake3::hash(data).as_bytes())
            }
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), &self.to_hex()[..16])
            }
        }
        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).map_err(|_| {
                    Error::Invalid(format!("{s:?} is not a 64-digit hex {}", stringify!($name)))
                })?;
                Ok($name(out))
            }
        }
    };
}

hash_id!(ChunkId, "a chunk's uncompressed bytes");
hash_id!(LayerId, "a layer's canonical encoding");

/// Internal number of a volume; keys in the metadata index use it instead of the name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VolumeId(pub u64);

/// A namespace of inodes, directory entries, extents and xattrs in the metadata index. A
/// volume's writable top is a tree; so is every frozen, imported or merged layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TreeId(pub u64);

/// A volume's name, valid by Docker's rule `[a-zA-Z0-9][a-zA-Z0-9_.-]*` (at most 128 bytes).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeName(String);

impl VolumeName {
    pub fn new(s: &str) -> Result<Self> {
        let mut chars = s.chars();
        let ok = match chars.next() {
            Some(c) if c.is_ascii_alphanumeric() => {
                chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            }
            _ => false,
        };
        if !ok || s.len() > 128 {
            return Err(Error::Invalid(format!(
                "invalid volume name {s:?}: names must match [a-zA-Z0-9][a-zA-Z0-9_.-]* and be at most 128 characters"
            )));
        }
        Ok(VolumeName(s.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl TryFrom<String> for VolumeName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        VolumeName::new(&s)
    }
}
impl From<VolumeName> for String {
    fn from(v: VolumeName) -> String {
        v.0
    }
}
impl FromStr for VolumeName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        VolumeName::new(s)
    }
}

/// What can be mounted: a volume, or a snapshot of one (`VOLUME@SNAPSHOT`, always read-only).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VolumeRef {
    pub volume: VolumeName,
    pub snapshot: Option<String>,
    text: String,
}

impl VolumeRef {
    pub fn parse(s: &str) -> Result<Self> {
        let (volume, snapshot) = crate::layer::split_ref(s)?;
        Ok(VolumeRef {
            volume,
            snapshot,
            text: s.to_string(),
        })
    }
    /// `VOLUME` or `VOLUME@SNAPSHOT`.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl From<VolumeName> for VolumeRef {
    fn from(v: VolumeName) -> Self {
        VolumeRef {
            text: v.to_string(),
            volume: v,
            snapshot: None,
        }
    }
}

impl fmt::Display for VolumeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names_follow_docker_rule() {
        for ok in ["a", "data1", "my_vol.v2-x", "0abc"] {
            assert!(VolumeName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "a/b", "a b", "ä", "_x", &"x".repeat(129)] {
            let err = VolumeName::new(bad).unwrap_err();
            assert_eq!(err.errno(), libc::EINVAL, "{bad}");
        }
    }

    #[test]
    fn chunk_id_hex_round_trip() {
        let id = ChunkId::of(b"hello");
        assert_eq!(id.to_hex().parse::<ChunkId>().unwrap(), id);
        assert!("zz".parse::<ChunkId>().is_err());
    }
}
