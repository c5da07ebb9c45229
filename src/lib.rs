//! volfs core library: everything that is not FUSE, HTTP or process plumbing.
//!
//! Layers, bottom up:
//! - [`db`]: the metadata index, a small key-value trait with a RocksDB engine and an
//!   in-memory engine for unit tests.
//! - [`chunk`]: the content-addressed chunk store (append-only pack files indexed in `db`).
//! - [`chunker`]: content-defined chunking (FastCDC) of file data.
//! - [`meta`]: the versioned records kept in `db` (inodes, directory entries, extents, volumes).
//! - [`volume`]: the volume registry (create, list, remove, options, labels).
//! - [`fs`]: the POSIX filesystem of one volume, used by the FUSE adapter in `volfs-mountd`.
//! - [`api`] and [`client`]: the control API's wire types and a blocking client for the CLI.
//!
//! The library never imports FUSE; `volfs-mountd` adapts [`fs::VolumeFs`] to the kernel.
pub mod api;
pub mod chunk;
pub mod chunker;
pub mod client;
pub mod db;
pub mod error;
pub mod fs;
pub mod ids;
pub mod meta;
pub mod store;
pub mod volume;

pub use error::{Error, Result};
