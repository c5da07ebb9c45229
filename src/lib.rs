//! volfs core library: everything that is not FUSE, HTTP or process plumbing.
//!
//! Layers, bottom up:
//! - [`db`]: the metadata index, a small key-value trait with a RocksDB engine and an
//!   in-memory engine for unit tests.
//! - [`chunk`]: the content-addressed chunk store (append-only pack files indexed in `db`).
//! - [`chunker`]: content-defined chunking (FastCDC) of file data.
//! - [`meta`]: the versioned records kept in `db` (inodes, directory entries, extents, volumes).
//! - [`layer`]: trees, layers and snapshots; overlay lookups through a volume's stack.
//! - [`image`]: image layer tarballs: import, export, and merging a stack of them.
//! - [`backup`]: backup repositories (incremental, deduplicated backups and restores) and
//!   new volumes from imported trees (`volume import`, `restore`).
//! - [`volume`]: the volume registry (create, clone, snapshot, rollback, list, remove).
//! - [`fs`]: the POSIX filesystem of one volume, used by the FUSE adapter in `volfs-mountd`.
//! - [`writelog`]: acknowledged, uncommitted writes, kept outside the serving process so
//!   that a process taking over a live FUSE connection after a crash can replay them.
//! - [`gc`] and [`fsck`]: garbage collection, pack compaction and `df`; consistency checks
//!   and scrub.
//! - [`api`] and [`client`]: the control API's wire types and a blocking client for the CLI.
//!
//! The library never imports FUSE; `volfs-mountd` adapts [`fs::VolumeFs`] to the kernel.
pub mod api;
pub mod backup;
pub mod chunk;
pub mod chunker;
pub mod client;
pub mod db;
pub mod error;
pub mod fs;
pub mod fsck;
pub mod gc;
pub mod ids;
pub mod image;
pub mod layer;
pub mod meta;
pub mod progress;
pub mod replica;
pub mod store;
pub mod volume;
pub mod writelog;

pub use error::{Error, Result};
