//! The chunk store: content-addressed chunks in append-only pack files, indexed by the
//! `chunks` column family of the metadata index.
//!
//! Pack file layout (`<data dir>/packs/<pack id, 8 hex digits>.pack`, version 1):
//! ```text
//! header: "VOLFSPK\0" (8) | format version u32 LE (=1) | pack id u32 LE
//! record: "VFSC" (4) | record version u8 (=1) | compression u8 (0 none, 1 lz4, 2 zstd)
//!         | reserved u16 | raw length u32 LE | stored length u32 LE | chunk id [32]
//!         | payload [stored length]
//! ```
//! A record is 48 bytes of header plus its payload. Records are only appended; a torn record
//! at the end of a pack (a crash mid-append) is never referenced by the index.
//!
//! Write path: records are gathered in an aligned buffer in memory and written in batches of
//! whole 4 KiB blocks with `O_DIRECT`, so pack data does not pass through the page cache
//! (copying it there cost about half the daemon's CPU on large writes). The incomplete last
//! block is written through the page cache when the records in it must reach the OS, and
//! again, whole, with `O_DIRECT` once it fills. A file system without `O_DIRECT` (tmpfs on old
//! kernels) gets plain buffered writes.
//!
//! Durability contract: [`ChunkStore::put`] returns with the record possibly still in the
//! daemon's buffer, and the index entry it returns not yet stored. The caller calls
//! [`ChunkStore::flush`] (record in the OS: survives `kill -9`) or [`ChunkStore::sync`]
//! (durable against power loss) before it writes the batch that holds the index entry and the
//! extents referencing the chunk; so no index entry, synced or not, points at a record that
//! is less durable than itself.
//!
//! Every read verifies the chunk against its id (BLAKE3-256 of the uncompressed bytes). A
//! mismatch is logged with the chunk id and returned as [`Error::Corrupt`] (EIO); wrong bytes
//! are never returned.
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::db::{Batch, Cf, Engine};
use crate::error::{Error, Result};
use crate::ids::ChunkId;

const PACK_MAGIC: &[u8; 8] = b"VOLFSPK\0";
const PACK_VERSION: u32 = 1;
const PACK_HEADER_LEN: u64 = 16;
const RECORD_MAGIC: &[u8; 4] = b"VFSC";
const RECORD_VERSION: u8 = 1;
pub const RECORD_HEADER_LEN: usize = 48;
/// Packs are closed for appending once they reach this size.
const PACK_TARGET_SIZE: u64 = 256 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Compression {
    #[default]
    None,
    Lz4,
    Zstd,
}

impl Compression {
    fn code(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Lz4 => 1,
            Compression::Zstd => 2,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(Compression::None),
            1 => Some(Compression::Lz4),
            2 => Some(Compression::Zstd),
            _ => None,
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" | "off" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            _ => Err(Error::Invalid(format!(
                "unknown compression {s:?} (expected none, lz4 or zstd)"
            ))),
        }
    }
}

/// Where a chunk is stored: the value of the `chunks` column family (after a version byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkLoc {
    pub pack: u32,
    /// Offset of the record header in the pack.
    pub offset: u64,
    pub stored_len: u32,
    pub raw_len: u32,
    pub compression: u8,
}

const LOC_VERSION: u8 = 1;

impl ChunkLoc {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![LOC_VERSION];
        v.extend(postcard::to_stdvec(self).unwrap_or_default());
        v
    }
    pub fn decode(v: &[u8]) -> Result<Self> {
        match v.split_first() {
            Some((&LOC_VERSION, rest)) => Ok(postcard::from_bytes(rest)?),
            _ => Err(Error::Encoding(
                "chunk location with unknown version".into(),
            )),
        }
    }
}

/// Block size of `O_DIRECT` writes (offsets, lengths and buffer addresses).
const BLOCK: usize = 4096;
/// Buffered records are written out once this many whole blocks are ready.
const DIRECT_BATCH: usize = 8 << 20;

/// A byte buffer whose start is `BLOCK`-aligned in memory, as `O_DIRECT` requires.
struct AlignedBuf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn with_capacity(cap: usize) -> AlignedBuf {
        let mem = vec![0u8; cap + BLOCK];
        let start = mem.as_ptr().align_offset(BLOCK).min(BLOCK);
        AlignedBuf { mem, start, len: 0 }
    }
    fn capacity(&self) -> usize {
        self.mem.len() - BLOCK
    }
    fn bytes(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }
    fn extend(&mut self, parts: &[&[u8]]) {
        let n: usize = parts.iter().map(|p| p.len()).sum();
        if self.len + n > self.capacity() {
            let mut bigger = AlignedBuf::with_capacity((self.len + n).next_power_of_two());
            bigger.extend(&[self.bytes()]);
            *self = bigger;
        }
        for p in parts {
            let at = self.start + self.len;
            self.mem[at..at + p.len()].copy_from_slice(p);
            self.len += p.len();
        }
    }
    /// Forgets everything after the first `len` bytes.
    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
    /// Drops the first `n` bytes (a multiple of `BLOCK`), keeping the rest at the start.
    fn consume(&mut self, n: usize) {
        let s = self.start;
        self.mem.copy_within(s + n..s + self.len, s);
        self.len -= n;
    }
}

/// The pack being appended to. `buf` holds the pack's bytes from `base` (a block boundary) to
/// `len`; the OS has every byte below `os_len` (`os_len <= len`); a write in flight holds the
/// bytes from its offset up to `base`.
///
/// Whole blocks are written with `O_DIRECT` by a writer thread while the next records gather
/// in a second buffer, so that the device works while the daemon chunks and hashes. At most
/// one write is in flight; [`PackWriter::flush`] waits for it.
struct PackWriter {
    id: u32,
    file: File,
    direct: Option<Arc<File>>,
    base: u64,
    os_len: u64,
    len: u64,
    buf: AlignedBuf,
    /// The writer thread (absent if it could not be started: writes are then made in place).
    thread: Option<DirectWriter>,
    /// Offset of the write in flight.
    inflight: Option<u64>,
    /// The buffer of the last finished write, reused for the next.
    spare: Option<AlignedBuf>,
    /// The writer thread died with a buffer: records are lost, the pack takes no more.
    broken: bool,
}

/// A thread that writes whole-block buffers with `O_DIRECT` and hands each buffer back with
/// the result (`Ok(true)`: the file system refused `O_DIRECT` and it went buffered).
struct DirectWriter {
    jobs: std::sync::mpsc::Sender<(AlignedBuf, u64)>,
    done: std::sync::mpsc::Receiver<(AlignedBuf, std::io::Result<bool>)>,
}

impl DirectWriter {
    fn start(direct: Arc<File>, file: File) -> Option<DirectWriter> {
        let (jobs, job_rx) = std::sync::mpsc::channel::<(AlignedBuf, u64)>();
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("pack-write".into())
            .spawn(move || {
                for (buf, at) in job_rx {
                    let r = write_direct(&direct, &file, buf.bytes(), at);
                    if done_tx.send((buf, r)).is_err() {
                        break;
                    }
                }
            })
            .ok()?;
        Some(DirectWriter { jobs, done })
    }
}

/// Writes `data` at `at` with `O_DIRECT`; if the file system took the open but refuses the
/// write (`EINVAL`), through the page cache instead. `Ok(true)`: it was refused, and later
/// writes should go buffered.
fn write_direct(direct: &File, file: &File, data: &[u8], at: u64) -> std::io::Result<bool> {
    match direct.write_all_at(data, at) {
        Ok(()) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!("O_DIRECT writes refused ({e}); pack writes go buffered");
            file.write_all_at(data, at).map(|()| true)
        }
        Err(e) => Err(e),
    }
}

impl PackWriter {
    /// Waits for the write in flight. On failure its bytes go back to the start of `buf`
    /// (the pack's bytes from its offset on), so the next flush writes them again.
    fn settle(&mut self) -> std::io::Result<()> {
        let Some(at) = self.inflight else {
            return Ok(());
        };
        let got = self.thread.as_ref().and_then(|t| t.done.recv().ok());
        self.inflight = None;
        let Some((done, r)) = got else {
            self.broken = true;
            self.thread = None;
            return Err(std::io::Error::other("the pack writer thread died"));
        };
        match r {
            Ok(refused) => {
                if refused {
                    self.direct = None;
                }
                self.os_len = self.os_len.max(at + done.len as u64);
                self.spare = Some(done);
                Ok(())
            }
            Err(e) => {
                let mut back = done;
                back.extend(&[self.buf.bytes()]);
                self.buf = back;
                self.base = at;
                Err(e)
            }
        }
    }

    /// Writes the whole blocks in `buf` with `O_DIRECT` (or, without it, everything): handed
    /// to the writer thread once the previous write finished, or in place without one.
    fn write_blocks(&mut self) -> std::io::Result<()> {
        if self.broken {
            return Err(std::io::Error::other("the pack writer thread died"));
        }
        self.settle()?;
        let whole = if self.direct.is_some() {
            self.buf.len / BLOCK * BLOCK
        } else {
            self.buf.len
        };
        if whole == 0 {
            return Ok(());
        }
        let (Some(t), Some(_)) = (&self.thread, &self.direct) else {
            return self.write_in_place(whole);
        };
        let mut next = self
            .spare
            .take()
            .unwrap_or_else(|| AlignedBuf::with_capacity(self.buf.capacity()));
        next.truncate(0);
        next.extend(&[&self.buf.bytes()[whole..]]);
        let mut out = std::mem::replace(&mut self.buf, next);
        out.truncate(whole);
        let at = self.base;
        match t.jobs.send((out, at)) {
            Ok(()) => {
                self.base += whole as u64;
                self.inflight = Some(at);
                Ok(())
            }
            Err(std::sync::mpsc::SendError((mut out, _))) => {
                // The thread is gone: take the bytes back and write in place from now on.
                out.extend(&[self.buf.bytes()]);
                self.buf = out;
                self.thread = None;
                self.write_in_place(whole)
            }
        }
    }

    fn write_in_place(&mut self, whole: usize) -> std::io::Result<()> {
        let data = &self.buf.bytes()[..whole];
        let refused = match &self.direct {
            Some(d) => write_direct(d, &self.file, data, self.base)?,
            None => {
                self.file.write_all_at(data, self.base)?;
                false
            }
        };
        if refused {
            self.direct = None;
        }
        self.base += whole as u64;
        self.os_len = self.os_len.max(self.base);
        self.buf.consume(whole);
        Ok(())
    }

    /// Puts every buffered byte into the OS: whole blocks direct, the rest through the page
    /// cache (written again, whole, when its block fills). On failure nothing is dropped:
    /// writes are positional, so the next flush simply writes the same bytes again.
    fn flush(&mut self) -> Result<()> {
        let r = self
            .write_blocks()
            .and_then(|()| self.settle())
            .and_then(|()| {
                if self.len > self.os_len {
                    let from = (self.os_len - self.base) as usize;
                    self.file
                        .write_all_at(&self.buf.bytes()[from..], self.os_len)?;
                    self.os_len = self.len;
                }
                Ok(())
            });
        r.map_err(|e| Error::io(format!("writing pack {:08x}", self.id), e))
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        // A write in flight finishes before the pack's files are closed.
        let _ = self.settle();
    }
}

pub struct ChunkStore {
    dir: PathBuf,
    engine: Arc<dyn Engine>,
    compression: Compression,
    writer: Mutex<Option<PackWriter>>,
    next_pack: Mutex<u32>,
    readers: RwLock<HashMap<u32, Arc<File>>>,
    /// Packs written since the last [`ChunkStore::sync`].
    unsynced: Mutex<HashSet<u32>>,
    cache: quick_cache::sync::Cache<ChunkId, Arc<Vec<u8>>, ChunkWeighter>,
    pub stats: ChunkStats,
    /// Held shared by every writer from its first `put` (or its first read of extents it will
    /// copy) until the index batch that references the chunks is written
    /// ([`ChunkStore::writer`]); gc holds it exclusively while it marks and sweeps.
    gc_gate: RwLock<()>,
    /// Where a read gets a chunk that is not in the index (a lazily shipped replica's chunks
    /// are fetched from peers): set by the daemon, `None` in the core's own use.
    fallback: RwLock<Option<Arc<dyn ChunkSource + Send>>>,
}

/// `meta` key of a chunk a replica references but does not hold yet: `missing/` + the
/// chunk id (32 bytes). The value is [`MISSING_VERSION`] + postcard of [`MissingChunk`].
pub fn missing_key(id: &ChunkId) -> Vec<u8> {
    let mut k = b"missing/".to_vec();
    k.extend_from_slice(&id.0);
    k
}

/// Prefix of every [`missing_key`].
pub const MISSING_PREFIX: &[u8] = b"missing/";
pub const MISSING_VERSION: u8 = 1;

/// What a replica knows about a chunk it lacks (see [`missing_key`]): written in the commit
/// batch of a lazily shipped snapshot, deleted in the batch that indexes the chunk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingChunk {
    /// The replica volume that referenced it first.
    pub volume: String,
    /// The replica's origin host (asked first).
    pub origin: String,
    /// The bytes its extents cover (a lower bound of its length, for progress).
    pub len: u32,
}

/// Counters since the store opened (for /metrics and status; not persisted).
#[derive(Default)]
pub struct ChunkStats {
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// Reads that failed verification (the same chunk read twice counts twice).
    pub corrupt: AtomicU64,
    pub written: AtomicU64,
    pub deduplicated: AtomicU64,
    /// The distinct chunks known to fail verification: added by every failed read, replaced
    /// by what each complete scrub finds (so a repaired store reads healthy again).
    known_corrupt: parking_lot::Mutex<std::collections::BTreeSet<ChunkId>>,
    /// Chunks (and their bytes) that were not local, fetched through the fallback
    /// [`ChunkSource`] by a read ([`ChunkStore::get`]).
    pub fetched_on_read: AtomicU64,
    pub fetched_on_read_bytes: AtomicU64,
    /// Chunks (and bytes) `volfs volume pull` fetched.
    pub fetched_by_pull: AtomicU64,
    pub fetched_by_pull_bytes: AtomicU64,
    /// Chunks the fallback could not get (no source had a verified copy, or the deadline).
    pub fetch_failures: AtomicU64,
}

impl ChunkStats {
    pub fn known_corrupt(&self) -> Vec<ChunkId> {
        self.known_corrupt.lock().iter().copied().collect()
    }

    /// A complete scrub found exactly these.
    pub fn set_known_corrupt(&self, ids: impl IntoIterator<Item = ChunkId>) {
        *self.known_corrupt.lock() = ids.into_iter().collect();
    }
}

#[derive(Clone)]
struct ChunkWeighter;
impl quick_cache::Weighter<ChunkId, Arc<Vec<u8>>> for ChunkWeighter {
    fn weight(&self, _k: &ChunkId, v: &Arc<Vec<u8>>) -> u64 {
        v.len() as u64 + 64
    }
}

impl ChunkStore {
    pub fn open(
        dir: &Path,
        engine: Arc<dyn Engine>,
        compression: Compression,
        cache_bytes: u64,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let mut max = 0u32;
        let rd = std::fs::read_dir(dir)
            .map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
        for ent in rd {
            let ent = ent.map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
            if let Some(id) = pack_id_of(&ent.file_name().to_string_lossy()) {
                max = max.max(id);
            }
        }
        Ok(ChunkStore {
            dir: dir.to_path_buf(),
            engine,
            compression,
            writer: Mutex::new(None),
            next_pack: Mutex::new(max + 1),
            readers: RwLock::new(HashMap::new()),
            unsynced: Mutex::new(HashSet::new()),
            cache: quick_cache::sync::Cache::with_weighter(
                4096,
                cache_bytes.max(1 << 20),
                ChunkWeighter,
            ),
            stats: ChunkStats::default(),
            gc_gate: RwLock::new(()),
            fallback: RwLock::new(None),
        })
    }

    pub fn pack_path(&self, id: u32) -> PathBuf {
        self.dir.join(format!("{id:08x}.pack"))
    }

    /// Stores `data` unless a chunk with its id exists. Returns the id and, for a new chunk,
    /// the index entry the caller must add to its batch (see the module's durability contract).
    pub fn put(&self, data: &[u8]) -> Result<(ChunkId, Option<ChunkLoc>)> {
        self.put_hashed(ChunkId::of(data), data)
    }

    /// [`ChunkStore::put`] for a chunk whose id the caller computed ([`ids_of`]).
    pub fn put_hashed(&self, id: ChunkId, data: &[u8]) -> Result<(ChunkId, Option<ChunkLoc>)> {
        self.put_hashed_cached(id, data, true)
    }

    /// [`ChunkStore::put_hashed`], keeping a copy in the read cache only with `cache`: the
    /// middle of a large streamed write is rarely read back soon, and copying it costs.
    pub fn put_hashed_cached(
        &self,
        id: ChunkId,
        data: &[u8],
        cache: bool,
    ) -> Result<(ChunkId, Option<ChunkLoc>)> {
        debug_assert_eq!(id, ChunkId::of(data));
        if self.contains(&id)? {
            self.stats.deduplicated.fetch_add(1, Ordering::Relaxed);
            return Ok((id, None));
        }
        let loc = self.append(&id, data)?;
        if cache {
            self.cache.insert(id, Arc::new(data.to_vec()));
        }
        self.stats.written.fetch_add(1, Ordering::Relaxed);
        Ok((id, Some(loc)))
    }

    /// Enters the gc gate for a write: hold the guard from the first `put` until the batch
    /// that references the chunks is written.
    pub fn writer(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.gc_gate.read_recursive()
    }

    /// Keeps gc out of the store's chunks (gc's own use).
    pub fn exclusive(&self) -> parking_lot::RwLockWriteGuard<'_, ()> {
        self.gc_gate.write()
    }

    /// Closes the pack being appended to; the next `put` starts a new one (gc compacts only
    /// closed packs).
    pub fn rotate(&self) -> Result<()> {
        let mut guard = self.writer.lock();
        if let Some(w) = guard.as_mut() {
            w.flush()?;
        }
        *guard = None;
        Ok(())
    }

    /// Appends a copy of a live chunk to the current pack (gc moving it out of a pack being
    /// compacted). The caller writes the returned location to the index.
    pub fn relocate(&self, id: &ChunkId, data: &[u8]) -> Result<ChunkLoc> {
        self.append(id, data)
    }

    /// Deletes a pack file that no index entry points into any more.
    pub fn remove_pack(&self, pack: u32) -> Result<()> {
        if self.writer.lock().as_ref().is_some_and(|w| w.id == pack) {
            return Err(Error::Busy(format!("pack {pack:08x} is being written")));
        }
        self.drop_reader(pack);
        self.unsynced.lock().remove(&pack);
        let path = self.pack_path(pack);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
        }
    }

    /// Ids and sizes of the pack files on disk.
    pub fn packs(&self) -> Result<Vec<(u32, u64)>> {
        let rd = std::fs::read_dir(&self.dir)
            .map_err(|e| Error::io(format!("reading {}", self.dir.display()), e))?;
        let mut out = Vec::new();
        for ent in rd.flatten() {
            if let Some(id) = pack_id_of(&ent.file_name().to_string_lossy()) {
                out.push((id, ent.metadata().map(|m| m.len()).unwrap_or(0)));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The pack being appended to, if any.
    pub fn current_pack(&self) -> Option<u32> {
        self.writer.lock().as_ref().map(|w| w.id)
    }

    pub fn contains(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.engine.get(Cf::Chunks, &id.0)?.is_some())
    }

    /// Adds the index entries of newly written chunks to `batch`.
    pub fn index(batch: &mut Batch, id: &ChunkId, loc: &ChunkLoc) {
        batch.put(Cf::Chunks, id.0.to_vec(), loc.encode());
    }

    fn append(&self, id: &ChunkId, data: &[u8]) -> Result<ChunkLoc> {
        let (payload, comp): (std::borrow::Cow<'_, [u8]>, Compression) = match self.compression {
            Compression::None => (data.into(), Compression::None),
            Compression::Lz4 => {
                let c = lz4_flex::compress(data);
                if c.len() < data.len() {
                    (c.into(), Compression::Lz4)
                } else {
                    (data.into(), Compression::None)
                }
            }
            Compression::Zstd => match zstd::bulk::compress(data, 1) {
                Ok(c) if c.len() < data.len() => (c.into(), Compression::Zstd),
                _ => (data.into(), Compression::None),
            },
        };
        let mut hdr = [0u8; RECORD_HEADER_LEN];
        hdr[0..4].copy_from_slice(RECORD_MAGIC);
        hdr[4] = RECORD_VERSION;
        hdr[5] = comp.code();
        hdr[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
        hdr[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        hdr[16..48].copy_from_slice(&id.0);

        let mut guard = self.writer.lock();
        if guard
            .as_ref()
            .is_none_or(|w| w.len >= PACK_TARGET_SIZE || w.broken)
        {
            // A full pack is closed only once its records are in the OS: other writers may
            // still have to flush records of it before they index them. (A broken pack lost
            // records that nothing indexed: their writers' flushes failed.)
            if let Some(old) = guard.as_mut().filter(|w| !w.broken) {
                old.flush()?;
            }
            *guard = Some(self.new_pack()?);
        }
        let w = guard
            .as_mut()
            .ok_or_else(|| Error::Db("no pack writer".into()))?;
        let offset = w.len;
        let record = RECORD_HEADER_LEN + payload.len();
        w.buf.extend(&[&hdr, &payload]);
        w.len += record as u64;
        if w.buf.len >= DIRECT_BATCH {
            if let Err(e) = w.write_blocks() {
                // Undo this record, the last in the buffer (its caller fails and never indexes
                // it); the records before it stay buffered for the next flush, which rewrites
                // the same offsets.
                w.buf.truncate(w.buf.len - record);
                w.len = offset;
                return Err(Error::io(format!("appending chunk {id} to pack"), e));
            }
        }
        self.unsynced.lock().insert(w.id);
        Ok(ChunkLoc {
            pack: w.id,
            offset,
            stored_len: payload.len() as u32,
            raw_len: data.len() as u32,
            compression: comp.code(),
        })
    }

    fn new_pack(&self) -> Result<PackWriter> {
        let mut next = self.next_pack.lock();
        let id = *next;
        *next += 1;
        let path = self.pack_path(id);
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .read(true)
            .open(&path)
            .map_err(|e| Error::io(format!("creating pack {}", path.display()), e))?;
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .ok()
            .map(Arc::new);
        let thread = match (&direct, file.try_clone()) {
            (Some(d), Ok(f)) => DirectWriter::start(d.clone(), f),
            _ => None,
        };
        let mut hdr = Vec::with_capacity(PACK_HEADER_LEN as usize);
        hdr.extend_from_slice(PACK_MAGIC);
        hdr.extend_from_slice(&PACK_VERSION.to_le_bytes());
        hdr.extend_from_slice(&id.to_le_bytes());
        file.write_all_at(&hdr, 0)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        // The new directory entry must be durable before any index entry points into it.
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        let mut buf = AlignedBuf::with_capacity(DIRECT_BATCH + (1 << 20));
        buf.extend(&[&hdr]);
        Ok(PackWriter {
            id,
            file,
            direct,
            base: 0,
            os_len: PACK_HEADER_LEN,
            len: PACK_HEADER_LEN,
            buf,
            thread,
            inflight: None,
            spare: None,
            broken: false,
        })
    }

    /// Puts every record appended so far into the OS (survives `kill -9`, not power loss).
    pub fn flush(&self) -> Result<()> {
        match self.writer.lock().as_mut() {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }

    /// Whether [`ChunkStore::flush`] or an append would wait now: another thread holds the
    /// pack writer, or a pack write is in flight.
    pub fn flush_would_wait(&self) -> bool {
        match self.writer.try_lock() {
            Some(w) => w.as_ref().is_some_and(|w| w.inflight.is_some()),
            None => true,
        }
    }

    /// Makes every record appended so far durable (fdatasync of each pack written to).
    pub fn sync(&self) -> Result<()> {
        self.flush()?;
        let ids: Vec<u32> = self.unsynced.lock().drain().collect();
        for id in ids {
            let f = self.reader(id)?;
            if let Err(e) = f.sync_data() {
                self.unsynced.lock().insert(id);
                return Err(Error::io(format!("syncing pack {id:08x}"), e));
            }
        }
        Ok(())
    }

    fn reader(&self, pack: u32) -> Result<Arc<File>> {
        if let Some(f) = self.readers.read().get(&pack) {
            return Ok(f.clone());
        }
        let path = self.pack_path(pack);
        let f = Arc::new(
            File::open(&path)
                .map_err(|e| Error::io(format!("opening pack {}", path.display()), e))?,
        );
        self.readers.write().insert(pack, f.clone());
        Ok(f)
    }

    /// Forgets open file handles of a pack (after compaction removed it).
    pub fn drop_reader(&self, pack: u32) {
        self.readers.write().remove(&pack);
    }

    pub fn location(&self, id: &ChunkId) -> Result<Option<ChunkLoc>> {
        self.engine
            .get(Cf::Chunks, &id.0)?
            .map(|v| ChunkLoc::decode(&v))
            .transpose()
    }

    /// Reads and verifies a chunk. A chunk that is not in the index is fetched through the
    /// fallback source when one is set ([`ChunkStore::set_fallback`]): verified against its
    /// id, stored and indexed (synced), so the next read is local.
    pub fn get(&self, id: &ChunkId) -> Result<Arc<Vec<u8>>> {
        self.get_cached(id, true)
    }

    /// [`ChunkStore::get`], keeping a chunk read from disk in the read cache only with
    /// `cache`: a streaming read that uses a chunk whole will not ask for it again (the
    /// kernel's page cache has its bytes), and caching it would push out chunks that partial
    /// reads come back for, and fault in fresh cache memory at disk speed.
    pub fn get_cached(&self, id: &ChunkId, cache: bool) -> Result<Arc<Vec<u8>>> {
        if let Some(d) = self.cache.get(id) {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(d);
        }
        self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
        let data = match self.location(id)? {
            Some(loc) => self.read_at(id, loc)?,
            None => {
                let src = self.fallback.read().clone();
                match src {
                    Some(src) => return self.fetch_missing(id, &*src).map(|(d, _)| d),
                    None => return Err(self.corrupt(id, "missing from the chunk index".into())),
                }
            }
        };
        let data = Arc::new(data);
        if cache {
            self.cache.insert(*id, data.clone());
        }
        Ok(data)
    }

    /// Sets (or clears) where reads get chunks that are not local.
    pub fn set_fallback(&self, src: Option<Arc<dyn ChunkSource + Send>>) {
        *self.fallback.write() = src;
    }

    /// The fallback source, if one is set.
    pub fn fallback(&self) -> Option<Arc<dyn ChunkSource + Send>> {
        self.fallback.read().clone()
    }

    /// What the index says about a chunk a replica lacks, if anything.
    pub fn missing_record(&self, id: &ChunkId) -> Result<Option<MissingChunk>> {
        self.engine
            .get(Cf::Meta, &missing_key(id))?
            .map(|v| match v.split_first() {
                Some((&MISSING_VERSION, rest)) => Ok(postcard::from_bytes(rest)?),
                _ => Err(Error::Encoding(
                    "missing-chunk record with unknown version".into(),
                )),
            })
            .transpose()
    }

    /// Fetches a chunk that is not local from `src` (the replica's origin asked first, by
    /// its `missing/` record), then stores it like [`ChunkStore::repair`] does: checked
    /// against `id`, appended to the current pack, synced, indexed in a synced batch that
    /// also deletes its `missing/` record. Returns the bytes and where they came from. A
    /// chunk no source can give is an error (EIO) logged with the chunk id and what each
    /// source answered. Counted as fetched on read; [`ChunkStore::fetch_counted`] lets a
    /// caller (pull) count elsewhere.
    pub fn fetch_missing(
        &self,
        id: &ChunkId,
        src: &(dyn ChunkSource + Send),
    ) -> Result<(Arc<Vec<u8>>, String)> {
        let r = self.fetch_counted(id, src)?;
        self.stats.fetched_on_read.fetch_add(1, Ordering::Relaxed);
        self.stats
            .fetched_on_read_bytes
            .fetch_add(r.0.len() as u64, Ordering::Relaxed);
        Ok(r)
    }

    /// [`ChunkStore::fetch_missing`] without counting it as fetched on read.
    pub fn fetch_counted(
        &self,
        id: &ChunkId,
        src: &(dyn ChunkSource + Send),
    ) -> Result<(Arc<Vec<u8>>, String)> {
        let (data, from) = self.fetch_only(id, src)?;
        self.store_fetched(&[(*id, &data)])?;
        let data = Arc::new(data);
        self.cache.insert(*id, data.clone());
        Ok((data, from))
    }

    /// Fetches and verifies a chunk that is not local, without storing it (pull stores many
    /// at once with [`ChunkStore::store_fetched`]).
    pub fn fetch_only(
        &self,
        id: &ChunkId,
        src: &(dyn ChunkSource + Send),
    ) -> Result<(Vec<u8>, String)> {
        let origin = self.missing_record(id).ok().flatten().map(|m| m.origin);
        let (data, from) = match src.fetch_preferring(id, origin.as_deref()) {
            Ok(x) => x,
            Err(why) => {
                self.stats.fetch_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(chunk = %id, "chunk is not local and no peer could give it: {why}");
                return Err(Error::io(
                    format!("chunk {id} is not local and no peer could give it ({why})"),
                    std::io::Error::from_raw_os_error(libc::EIO),
                ));
            }
        };
        if ChunkId::of(&data) != *id {
            self.stats.fetch_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(chunk = %id, from, "fetched bytes do not match the chunk's hash; not stored");
            return Err(Error::io(
                format!("chunk {id}: the bytes from {from} do not match its hash (not stored)"),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok((data, from))
    }

    /// Stores verified chunks that were not local: appended, synced once, indexed in one
    /// synced batch that also deletes their `missing/` records. Chunks another reader stored
    /// meanwhile are skipped; bytes that do not hash to their id are refused (nothing is
    /// written).
    pub fn store_fetched(&self, chunks: &[(ChunkId, &[u8])]) -> Result<()> {
        for (id, data) in chunks {
            if ChunkId::of(data) != *id {
                return Err(Error::Invalid(format!(
                    "the bytes offered for chunk {id} do not match its hash; not stored"
                )));
            }
        }
        let _gate = self.writer();
        let mut b = Batch::new();
        let mut n = 0u64;
        for (id, data) in chunks {
            if self.location(id)?.is_some() {
                continue;
            }
            let loc = self.append(id, data)?;
            Self::index(&mut b, id, &loc);
            b.delete(Cf::Meta, missing_key(id));
            n += 1;
        }
        if n == 0 {
            return Ok(());
        }
        self.sync()?;
        self.engine.write(b, true)?;
        self.stats.written.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    /// Reads a chunk from disk, bypassing the cache, and checks it against its id.
    pub fn read_verified(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let loc = self
            .location(id)?
            .ok_or_else(|| self.corrupt(id, "missing from the chunk index".into()))?;
        self.read_at(id, loc)
    }

    /// [`ChunkStore::read_verified`] at a location just looked up.
    fn read_at(&self, id: &ChunkId, mut loc: ChunkLoc) -> Result<Vec<u8>> {
        let f = match self.reader(loc.pack) {
            Ok(f) => f,
            Err(_) => {
                // gc may have moved the chunk and removed its old pack since we looked it up.
                loc = self
                    .location(id)?
                    .ok_or_else(|| self.corrupt(id, "missing from the chunk index".into()))?;
                self.reader(loc.pack)
                    .map_err(|e| self.corrupt(id, format!("pack {:08x}: {e}", loc.pack)))?
            }
        };
        // Header and payload in one system call, the payload straight into the buffer that
        // is returned (and cached): no copies for uncompressed chunks.
        let mut hdr = [0u8; RECORD_HEADER_LEN];
        let mut payload = vec![0u8; loc.stored_len as usize];
        read_exact_vectored_at(&f, &mut hdr, &mut payload, loc.offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.corrupt(id, format!("pack {:08x} is truncated", loc.pack))
            } else {
                Error::io(format!("reading chunk {id} from pack {:08x}", loc.pack), e)
            }
        })?;
        if &hdr[0..4] != RECORD_MAGIC || hdr[4] != RECORD_VERSION || hdr[16..48] != id.0 {
            return Err(self.corrupt(id, "record header does not match".into()));
        }
        let raw_len = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
        let data = match Compression::from_code(hdr[5]) {
            Some(Compression::None) => payload,
            Some(Compression::Lz4) => lz4_flex::decompress(&payload, raw_len)
                .map_err(|e| self.corrupt(id, format!("lz4: {e}")))?,
            Some(Compression::Zstd) => zstd::bulk::decompress(&payload, raw_len)
                .map_err(|e| self.corrupt(id, format!("zstd: {e}")))?,
            None => return Err(self.corrupt(id, format!("unknown compression {}", hdr[5]))),
        };
        if ChunkId::of(&data) != *id {
            return Err(self.corrupt(id, "content does not match its hash".into()));
        }
        Ok(data)
    }

    fn corrupt(&self, id: &ChunkId, why: String) -> Error {
        self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
        self.stats.known_corrupt.lock().insert(*id);
        tracing::error!(chunk = %id, "corrupt chunk: {why}");
        Error::Corrupt { id: *id, why }
    }

    /// Evicts a chunk from the read cache (tests and scrub use it to force a disk read).
    pub fn evict(&self, id: &ChunkId) {
        self.cache.remove(id);
    }

    /// Bytes the decoded-chunk cache holds now.
    pub fn cache_bytes(&self) -> u64 {
        self.cache.weight()
    }

    /// Empties the decoded-chunk cache; returns the bytes it held.
    pub fn clear_cache(&self) -> u64 {
        let held = self.cache.weight();
        self.cache.clear();
        held
    }

    /// Bytes in pack files on disk.
    pub fn disk_bytes(&self) -> u64 {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        rd.flatten()
            .filter(|e| pack_id_of(&e.file_name().to_string_lossy()).is_some())
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    }
}

/// Ids of the consecutive chunks of `data` with lengths `cuts`, hashed on two threads when
/// there is much to hash.
pub fn ids_of(data: &[u8], cuts: &[usize]) -> Vec<ChunkId> {
    let pieces: Vec<&[u8]> = cuts
        .iter()
        .scan(0usize, |pos, &n| {
            let p = &data[*pos..*pos + n];
            *pos += n;
            Some(p)
        })
        .collect();
    if data.len() < crate::chunker::PARALLEL_MIN || pieces.len() < 2 {
        return pieces.into_iter().map(ChunkId::of).collect();
    }
    let (a, b) = pieces.split_at(pieces.len() / 2);
    std::thread::scope(|s| {
        let second = s.spawn(|| b.iter().map(|p| ChunkId::of(p)).collect::<Vec<_>>());
        let mut ids: Vec<ChunkId> = a.iter().map(|p| ChunkId::of(p)).collect();
        match second.join() {
            Ok(rest) => ids.extend(rest),
            Err(_) => ids.extend(b.iter().map(|p| ChunkId::of(p))),
        }
        ids
    })
}

/// `pread` of `a` then `b` from `offset`, retried until both are full; EOF before that is
/// `UnexpectedEof`.
fn read_exact_vectored_at(
    f: &File,
    a: &mut [u8],
    b: &mut [u8],
    offset: u64,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let total = a.len() + b.len();
    let mut done = 0usize;
    while done < total {
        let (pa, pb): (&mut [u8], &mut [u8]) = if done < a.len() {
            (&mut a[done..], &mut b[..])
        } else {
            (&mut [], &mut b[done - a.len()..])
        };
        let iov = [
            libc::iovec {
                iov_base: pa.as_mut_ptr().cast(),
                iov_len: pa.len(),
            },
            libc::iovec {
                iov_base: pb.as_mut_ptr().cast(),
                iov_len: pb.len(),
            },
        ];
        // SAFETY: both iovecs point into live, exclusively borrowed buffers of the given
        // lengths, and the kernel writes at most that many bytes into them.
        let n = unsafe {
            libc::preadv(
                f.as_raw_fd(),
                iov.as_ptr(),
                2,
                (offset + done as u64) as libc::off_t,
            )
        };
        match n {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            n => done += n as usize,
        }
    }
    Ok(())
}

fn pack_id_of(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(".pack")?;
    u32::from_str_radix(stem, 16).ok()
}

/// Somewhere else that may hold an intact copy of a chunk: the daemon's peers. fsck and the
/// scrub take one as `&dyn ChunkSource` to repair corrupt chunks, so that the core library
/// does no networking itself.
pub trait ChunkSource: Sync {
    /// Fetches chunk `id`. `Ok((data, from))` when a copy was found, `from` naming where it
    /// came from; implementations verify `data` against `id` before returning it (and
    /// [`ChunkStore::repair`] checks it again). `Err(why)` says what each place answered.
    fn fetch(&self, id: &ChunkId) -> std::result::Result<(Vec<u8>, String), String>;

    /// [`ChunkSource::fetch`], asking the place named `first` (a replica's origin host)
    /// before the others when the source knows it.
    fn fetch_preferring(
        &self,
        id: &ChunkId,
        first: Option<&str>,
    ) -> std::result::Result<(Vec<u8>, String), String> {
        let _ = first;
        self.fetch(id)
    }
}

impl ChunkStore {
    /// Replaces a corrupt chunk with an intact copy from elsewhere: `data` is checked against
    /// `id`, appended to the current pack like gc's compaction moves a chunk, synced, and the
    /// chunk's index entry is repointed at it in a synced batch. The old record stays where
    /// it was until gc compacts its pack. Refused when `data` does not hash to `id` (nothing
    /// is written), and when the chunk is no longer in the index (gc freed it meanwhile).
    pub fn repair(&self, id: &ChunkId, data: &[u8]) -> Result<ChunkLoc> {
        if ChunkId::of(data) != *id {
            return Err(Error::Invalid(format!(
                "the copy offered for chunk {id} does not match its hash; not stored"
            )));
        }
        // Shared gc gate: gc cannot sweep the chunk between the check and the index write.
        let _gate = self.writer();
        if self.location(id)?.is_none() {
            return Err(Error::NotFound(format!(
                "chunk {id} is no longer in the index"
            )));
        }
        let loc = self.append(id, data)?;
        self.sync()?;
        let mut b = Batch::new();
        Self::index(&mut b, id, &loc);
        self.engine.write(b, true)?;
        self.cache.remove(id);
        self.stats.known_corrupt.lock().remove(id);
        Ok(loc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::MemEngine;

    fn store(dir: &Path, c: Compression) -> ChunkStore {
        ChunkStore::open(dir, Arc::new(MemEngine::default()), c, 1 << 20).unwrap()
    }

    #[test]
    fn put_get_dedup_and_compression() {
        for c in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let dir = tempfile::tempdir().unwrap();
            let s = store(dir.path(), c);
            let data = vec![7u8; 100_000];
            let (id, loc) = s.put(&data).unwrap();
            let loc = loc.expect("new chunk");
            let mut b = Batch::new();
            ChunkStore::index(&mut b, &id, &loc);
            s.flush().unwrap();
            s.engine.write(b, false).unwrap();
            assert!(s.put(&data).unwrap().1.is_none(), "second put deduplicates");
            s.sync().unwrap();
            s.clear_cache();
            assert_eq!(&*s.get(&id).unwrap(), &data[..]);
            if c != Compression::None {
                assert!(loc.stored_len < loc.raw_len);
            }
        }
    }

    #[test]
    fn corrupt_record_is_an_error_not_data() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), Compression::None);
        let (id, loc) = s.put(b"hello world, this is a chunk").unwrap();
        let loc = loc.unwrap();
        let mut b = Batch::new();
        ChunkStore::index(&mut b, &id, &loc);
        s.flush().unwrap();
        s.engine.write(b, false).unwrap();
        // Flip one payload byte on disk.
        let path = s.pack_path(loc.pack);
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(b"J", loc.offset + RECORD_HEADER_LEN as u64)
            .unwrap();
        s.clear_cache();
        let err = s.get(&id).unwrap_err();
        assert_eq!(err.errno(), libc::EIO);
        assert!(err.to_string().contains(&id.to_hex()));
        assert_eq!(s.stats.corrupt.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn repair_takes_only_the_right_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), Compression::Lz4);
        let data = b"a chunk that will be damaged and repaired".repeat(50);
        let (id, loc) = s.put(&data).unwrap();
        let loc = loc.unwrap();
        let mut b = Batch::new();
        ChunkStore::index(&mut b, &id, &loc);
        s.flush().unwrap();
        s.engine.write(b, false).unwrap();
        let f = OpenOptions::new()
            .write(true)
            .open(s.pack_path(loc.pack))
            .unwrap();
        f.write_all_at(b"\xff\xff", loc.offset + RECORD_HEADER_LEN as u64)
            .unwrap();
        s.clear_cache();
        assert!(s.read_verified(&id).is_err());
        assert_eq!(s.stats.known_corrupt(), vec![id]);
        let mut wrong = data.clone();
        wrong[0] ^= 1;
        assert!(s.repair(&id, &wrong).is_err(), "wrong bytes are refused");
        assert_eq!(s.location(&id).unwrap(), Some(loc), "index untouched");
        let new = s.repair(&id, &data).unwrap();
        assert_ne!(new, loc);
        assert_eq!(s.read_verified(&id).unwrap(), data);
        assert!(s.stats.known_corrupt().is_empty());
        let gone = ChunkId::of(b"not stored");
        assert!(
            s.repair(&gone, b"not stored").is_err(),
            "only indexed chunks"
        );
    }

    struct Fake {
        answers: Vec<(String, Option<Vec<u8>>)>,
        asked: Mutex<Vec<String>>,
    }
    impl ChunkSource for Fake {
        fn fetch(&self, id: &ChunkId) -> std::result::Result<(Vec<u8>, String), String> {
            let mut why = Vec::new();
            for (name, a) in &self.answers {
                self.asked.lock().push(name.clone());
                match a {
                    Some(d) if ChunkId::of(d) == *id => return Ok((d.clone(), name.clone())),
                    Some(_) => why.push(format!("{name}: wrong bytes, rejected")),
                    None => why.push(format!("{name}: does not hold it")),
                }
            }
            Err(why.join("; "))
        }
    }

    #[test]
    fn a_missing_chunk_is_fetched_through_the_fallback_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), Compression::None);
        let data = b"a chunk that only a peer holds".repeat(100);
        let id = ChunkId::of(&data);
        let mut b = Batch::new();
        b.put(Cf::Meta, missing_key(&id), {
            let mut v = vec![MISSING_VERSION];
            v.extend(
                postcard::to_stdvec(&MissingChunk {
                    volume: "db".into(),
                    origin: "a".into(),
                    len: data.len() as u32,
                })
                .unwrap(),
            );
            v
        });
        s.engine.write(b, false).unwrap();
        assert_eq!(s.missing_record(&id).unwrap().unwrap().origin, "a");
        // No fallback: EIO, as before.
        assert_eq!(s.get(&id).unwrap_err().errno(), libc::EIO);
        let mut wrong = data.clone();
        wrong[3] ^= 1;
        let src = Arc::new(Fake {
            answers: vec![
                ("liar".into(), Some(wrong)),
                ("empty".into(), None),
                ("good".into(), Some(data.clone())),
            ],
            asked: Mutex::new(Vec::new()),
        });
        s.set_fallback(Some(src.clone()));
        assert_eq!(&*s.get(&id).unwrap(), &data[..]);
        assert_eq!(src.asked.lock().len(), 3);
        assert!(s.location(&id).unwrap().is_some(), "stored and indexed");
        assert!(s.missing_record(&id).unwrap().is_none(), "record deleted");
        assert_eq!(s.stats.fetched_on_read.load(Ordering::Relaxed), 1);
        s.clear_cache();
        assert_eq!(s.read_verified(&id).unwrap(), data);
        assert_eq!(&*s.get(&id).unwrap(), &data[..]);
        assert_eq!(src.asked.lock().len(), 3, "the second read is local");

        // Nobody has it (or only wrong bytes): EIO naming the chunk, nothing stored.
        let other = b"nobody has this one".to_vec();
        let oid = ChunkId::of(&other);
        s.set_fallback(Some(Arc::new(Fake {
            answers: vec![("liar".into(), Some(b"not it".to_vec()))],
            asked: Mutex::new(Vec::new()),
        })));
        let e = s.get(&oid).unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        assert!(e.to_string().contains(&oid.to_hex()), "{e}");
        assert!(e.to_string().contains("liar"), "{e}");
        assert!(s.location(&oid).unwrap().is_none());
        assert_eq!(s.stats.fetch_failures.load(Ordering::Relaxed), 1);
    }
}
