//! The data dir: one RocksDB metadata index (`index/`), the pack files (`packs/`) and the lock
//! that keeps a second daemon out (`volfs.lock`, holding the owner's pid).
//!
//! ```text
//! <data dir>/volfs.lock     flock(2)ed by the running daemon; contains its pid
//! <data dir>/index/         RocksDB (column families: see crate::db::Cf)
//! <data dir>/packs/*.pack   chunk pack files (see crate::chunk)
//! ```
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::chunk::{ChunkStore, Compression};
use crate::db::{Batch, Cf, Engine, RocksEngine};
use crate::error::{Error, Result};
use crate::meta::SCHEMA_VERSION;

pub struct StoreOptions {
    pub compression: Compression,
    pub chunk_cache_bytes: u64,
    /// The pid the lock file names (default: this process): a daemon that runs as a
    /// supervisor and a server names the supervisor, the process users know.
    pub owner_pid: Option<u32>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            compression: Compression::None,
            chunk_cache_bytes: 256 << 20,
            owner_pid: None,
        }
    }
}

pub struct Store {
    pub data_dir: PathBuf,
    pub rocks: Arc<RocksEngine>,
    pub engine: Arc<dyn Engine>,
    pub chunks: Arc<ChunkStore>,
    ids: Mutex<()>,
    _lock: File,
}

impl Store {
    /// Opens (creating if needed) the data dir. Fails if another process holds it.
    pub fn open(data_dir: &Path, opts: &StoreOptions) -> Result<Store> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| Error::io(format!("cannot create data dir {}", data_dir.display()), e))?;
        let lock = lock_data_dir(data_dir, opts.owner_pid.unwrap_or_else(std::process::id))?;
        let rocks = Arc::new(RocksEngine::open(&data_dir.join("index")).map_err(|e| {
            Error::Db(format!(
                "opening metadata index in {}: {e}",
                data_dir.display()
            ))
        })?);
        let engine: Arc<dyn Engine> = rocks.clone();
        check_schema(&*engine, data_dir)?;
        let chunks = Arc::new(ChunkStore::open(
            &data_dir.join("packs"),
            engine.clone(),
            opts.compression,
            opts.chunk_cache_bytes,
        )?);
        Ok(Store {
            data_dir: data_dir.to_path_buf(),
            rocks,
            engine,
            chunks,
            ids: Mutex::new(()),
            _lock: lock,
        })
    }

    /// Allocates the next value of a store-wide counter (volume ids, tree ids).
    pub fn next_id(&self, name: &str) -> Result<u64> {
        let _g = self.ids.lock();
        let key = format!("next/{name}");
        let cur = match self.engine.get(Cf::Meta, key.as_bytes())? {
            Some(v) => u64::from_le_bytes(
                v.as_slice()
                    .try_into()
                    .map_err(|_| Error::Encoding(format!("counter {key}")))?,
            ),
            None => 1,
        };
        let mut b = Batch::new();
        b.put(Cf::Meta, key.into_bytes(), (cur + 1).to_le_bytes().to_vec());
        self.engine.write(b, false)?;
        Ok(cur)
    }

    /// Makes everything written so far durable against power loss: packs first, then the index.
    pub fn sync(&self) -> Result<()> {
        self.chunks.sync()?;
        self.engine.sync_wal()
    }
}

/// Checks the index's schema version, writing it into a new index and upgrading older ones
/// step by step (see `meta::SCHEMA_VERSION`).
fn check_schema(engine: &dyn Engine, data_dir: &Path) -> Result<()> {
    let set_current = || {
        let mut b = Batch::new();
        b.put(
            Cf::Meta,
            b"schema_version".to_vec(),
            SCHEMA_VERSION.to_le_bytes().to_vec(),
        );
        engine.write(b, true)
    };
    match engine.get(Cf::Meta, b"schema_version")? {
        None => set_current(),
        Some(v) if v == SCHEMA_VERSION.to_le_bytes() => Ok(()),
        Some(v) if v == 1u32.to_le_bytes() => {
            // 1 -> 2: the new column families exist once the index is open; volume records
            // of version 1 are upgraded as they are read.
            tracing::info!(data_dir = %data_dir.display(), "upgrading the index from schema 1 to 2");
            set_current()
        }
        Some(v) => Err(Error::Invalid(format!(
            "data dir {} has schema version {:?}; this volfs reads version {SCHEMA_VERSION}",
            data_dir.display(),
            v
        ))),
    }
}

fn lock_data_dir(data_dir: &Path, owner: u32) -> Result<File> {
    let path = data_dir.join("volfs.lock");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?;
    // A daemon that was just killed may take a moment to exit (its server process dies after
    // its supervisor): wait up to 2 s for the lock before calling the data dir busy.
    let mut rc = -1;
    for _ in 0..20 {
        // SAFETY: flock on a valid, owned fd.
        rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EWOULDBLOCK) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut s = String::new();
            let _ = f.read_to_string(&mut s);
            let pid = s.trim();
            return Err(Error::Busy(format!(
                "data dir {} (in use by volfs-mountd pid {})",
                data_dir.display(),
                if pid.is_empty() { "unknown" } else { pid }
            )));
        }
        return Err(Error::io(format!("cannot lock {}", path.display()), err));
    }
    f.set_len(0)
        .map_err(|e| Error::io("truncating lock file", e))?;
    f.rewind()
        .map_err(|e| Error::io("rewinding lock file", e))?;
    writeln!(f, "{owner}").map_err(|e| Error::io("writing lock file", e))?;
    Ok(f)
}
