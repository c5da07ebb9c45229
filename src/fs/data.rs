//! File data: the write buffer, chunking on commit, reads that merge committed extents with
//! buffered data, truncate, fallocate, SEEK_DATA/SEEK_HOLE and chunk-sharing copy_file_range.
//!
//! Write path: `write` copies the bytes into the inode's dirty buffer and returns. A commit
//! (on flush/close, fsync, or when a file buffers more than [`FILE_DIRTY_LIMIT`]) turns each
//! dirty range into chunks: the range is widened to whole committed extents at its edges,
//! split with FastCDC, each chunk is stored (or found: dedup), and one index batch replaces the
//! old extents with the new ones and stores the inode record. A range at the end of a file that
//! is still being appended to keeps its last, incomplete chunk buffered, so that streaming
//! writes chunk exactly as the whole file would.
//!
//! Durability contract: after `fsync` returns, every byte written before it is in a pack file
//! that was fdatasync'ed, and the batch that references it was written with a synced WAL.
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{bufpool, NodeState, VolumeFs};
use crate::chunk::ChunkStore;
use crate::chunker;
use crate::db::{Batch, Cf};
use crate::error::{posix, Error, Result};
use crate::ids::ChunkId;
use crate::meta::{self, Extent, Kind, Ts};

/// A file buffering more than this commits its complete chunks. 64 MiB rather than 16: a
/// 1 GiB streamed write + fsync took 3.3-3.6 s against 3.4-4.1 s (fewer, larger commits,
/// each cut and hashed on two threads, its pack writes overlapping the next).
pub(super) const FILE_DIRTY_LIMIT: u64 = 64 << 20;
/// A volume buffering more than this commits the file being written in full.
const VOLUME_DIRTY_LIMIT: u64 = 256 << 20;
/// The most buffered bytes a `flush` commits on the dispatch thread ([`VolumeFs::flush_inline`]).
pub const INLINE_COMMIT_MAX: u64 = 64 << 10;
/// A write that finds the write log full for this long fails with `ENOSPC`.
const LOG_FULL_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Commit {
    /// Everything buffered.
    All,
    /// Everything but the incomplete last chunk of an append at the end of the file.
    KeepTail,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Whence {
    Data,
    Hole,
}

impl VolumeFs {
    pub(super) fn extents<'a>(
        &self,
        ino: u64,
        st: &'a mut NodeState,
    ) -> Result<&'a mut BTreeMap<u64, Extent>> {
        if st.extents.is_none() {
            let mut m = BTreeMap::new();
            let p = meta::inode_key(st.tree, ino);
            for (k, v) in self.engine.scan_prefix(Cf::Extents, &p)? {
                m.insert(
                    meta::extent_offset(&k)?,
                    meta::decode(meta::EXTENT_VERSION, "extent", &v)?,
                );
            }
            st.extents = Some(m);
        }
        st.extents
            .as_mut()
            .ok_or_else(|| Error::Db("extent map missing".into()))
    }

    /// Discards the buffered data of an inode that is being deleted.
    pub(super) fn drop_dirty(&self, ino: u64, st: &mut NodeState) {
        self.dirty_total
            .fetch_sub(st.dirty_bytes, Ordering::Relaxed);
        self.reserved.fetch_sub(st.reserved, Ordering::Relaxed);
        st.dirty.clear();
        st.dirty_bytes = 0;
        st.reserved = 0;
        self.log_committed(ino, st);
    }

    /// Tells the write log that everything logged for `ino` is in the index (or discarded),
    /// except what is still buffered, which it logs again. A failure leaves the records (and
    /// the node) in place for the next commit to retry; replaying committed writes again is
    /// harmless.
    pub(super) fn log_committed(&self, ino: u64, st: &mut NodeState) {
        if let (Some(log), Some(_)) = (self.log.get(), st.held) {
            if let Err(e) = log.committed(ino, &mut st.held, &st.dirty) {
                tracing::warn!(volume = %self.name, ino, "{e}");
            }
        }
    }

    pub fn read(&self, ino: u64, off: u64, len: u32) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.read_into(ino, off, len, &mut buf)?;
        Ok(buf)
    }

    /// [`VolumeFs::read`] into `buf` (cleared first), so that a caller can reuse one buffer:
    /// a fresh 1 MiB buffer per read is a fresh mapping whose pages the kernel faults in and
    /// zeroes, then unmaps (see `bufpool`).
    pub fn read_into(&self, ino: u64, off: u64, len: u32, buf: &mut Vec<u8>) -> Result<()> {
        buf.clear();
        let mut st = self.lock(ino)?;
        if st.rec.kind == Kind::Dir {
            return posix(libc::EISDIR);
        }
        let size = st.rec.size;
        if off >= size || len == 0 {
            return Ok(());
        }
        let end = size.min(off + len as u64);
        let pieces = overlapping(self.extents(ino, &mut st)?, off, end);
        let overlay: Vec<(u64, Vec<u8>)> = dirty_overlapping(&st.dirty, off, end)
            .map(|(a, d)| {
                let s = a.max(off);
                let e = (a + d.len() as u64).min(end);
                (s, d[(s - a) as usize..(e - a) as usize].to_vec())
            })
            .collect();
        drop(st);
        // Chunk reads happen without the inode lock; chunks are immutable.
        buf.resize((end - off) as usize, 0);
        for (eoff, e) in pieces {
            let s = eoff.max(off);
            let t = (eoff + e.len as u64).min(end);
            // A chunk this read uses whole is not cached (see `ChunkStore::get_cached`); one
            // cut by the read's edge is: the next read wants its other part.
            let whole = s == eoff && t == eoff + e.len as u64;
            let chunk = self.store.chunks.get_cached(&e.chunk, !whole)?;
            let src = (e.chunk_off as u64 + (s - eoff)) as usize;
            let src_end = src + (t - s) as usize;
            let bytes = chunk.get(src..src_end).ok_or_else(|| Error::Corrupt {
                id: e.chunk,
                why: format!(
                    "extent wants bytes {src}..{src_end} of a {}-byte chunk",
                    chunk.len()
                ),
            })?;
            buf[(s - off) as usize..(t - off) as usize].copy_from_slice(bytes);
        }
        for (s, d) in overlay {
            buf[(s - off) as usize..(s - off) as usize + d.len()].copy_from_slice(&d);
        }
        self.stats
            .bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Buffers `data` at `off`. `kill_privs`: the kernel asks us to drop set-user-ID,
    /// set-group-ID and capabilities (an unprivileged writer; FUSE_WRITE_KILL_SUIDGID).
    pub fn write(&self, ino: u64, off: u64, data: &[u8], kill_privs: bool) -> Result<u32> {
        let _w = self.writer()?;
        let mut st = self.buffer(ino, off, data, kill_privs, None)?;
        if st.dirty_bytes > FILE_DIRTY_LIMIT {
            self.commit(ino, &mut st, Commit::KeepTail, false)?;
        } else if self.dirty_total.load(Ordering::Relaxed) > VOLUME_DIRTY_LIMIT {
            self.commit(ino, &mut st, Commit::All, false)?;
        }
        Ok(data.len() as u32)
    }

    /// The part of `write` that logs and buffers the bytes; returns the locked node.
    /// `replay`: a write the previous server process acknowledged (see `recovery`), with the
    /// position of its record in the write log; the quota admitted it then and must not
    /// refuse it now.
    pub(super) fn buffer(
        &self,
        ino: u64,
        off: u64,
        data: &[u8],
        kill_privs: bool,
        replay: Option<u64>,
    ) -> Result<super::NodeGuard> {
        // A full write log (files holding its tail are being committed by its flusher) is
        // waited for with the inode unlocked, so that the flusher can commit this file too.
        let since = std::time::Instant::now();
        loop {
            if let Some(st) = self.try_buffer(ino, off, data, kill_privs, replay)? {
                return Ok(st);
            }
            if since.elapsed() > LOG_FULL_WAIT {
                return Err(Error::NoSpace(format!(
                    "volume {}: the write log stayed full for {} s (buffered writes could not be committed)",
                    self.name,
                    LOG_FULL_WAIT.as_secs()
                )));
            }
            if let Some(log) = self.log.get() {
                log.wait_space(std::time::Duration::from_millis(100));
            }
        }
    }

    /// One attempt of [`VolumeFs::buffer`]: `None` (nothing changed) if the write log had no
    /// room.
    fn try_buffer(
        &self,
        ino: u64,
        off: u64,
        data: &[u8],
        kill_privs: bool,
        replay: Option<u64>,
    ) -> Result<Option<super::NodeGuard>> {
        let end = off
            .checked_add(data.len() as u64)
            .ok_or(Error::Posix(libc::EFBIG))?;
        if end > i64::MAX as u64 {
            return posix(libc::EFBIG);
        }
        let mut st = self.lock(ino)?;
        if st.rec.kind != Kind::File {
            return posix(libc::EINVAL);
        }
        if data.is_empty() {
            return Ok(Some(st));
        }
        if kill_privs {
            self.own(ino, &mut st)?;
            let mut b = Batch::new();
            if self.kill_privs_locked(ino, &mut st, &mut b)? {
                st.rec.ctime = Ts::now();
                self.persist_rec(&mut b, ino, &st.rec);
                self.engine.write(b, false)?;
            }
        }
        // Quota: bytes that land on holes or past the end are new allocation.
        let mut reserve = 0i64;
        if let Some(q) = self.quota {
            let covered = covered_bytes(self.extents(ino, &mut st)?, off, end)
                + dirty_overlapping(&st.dirty, off, end)
                    .map(|(a, d)| (a + d.len() as u64).min(end) - a.max(off))
                    .sum::<u64>();
            let new = (end - off).saturating_sub(covered) as i64;
            if new > 0 {
                let used =
                    self.used.load(Ordering::Relaxed) + self.reserved.load(Ordering::Relaxed);
                if used + new > q as i64 && replay.is_none() {
                    return Err(Error::NoSpace(format!(
                        "volume {} is at its size limit of {q} bytes",
                        self.name
                    )));
                }
                reserve = new;
            }
        }
        // Logged before it is acknowledged: a server process that takes over after a crash
        // replays it (see `crate::writelog`).
        if let Some(log) = self.log.get() {
            match replay {
                Some(pos) => log.adopt(ino, pos, &mut st.held),
                None => {
                    if !log.write(ino, off, data, &mut st.held)? {
                        return Ok(None);
                    }
                }
            }
        }
        st.reserved += reserve;
        self.reserved.fetch_add(reserve, Ordering::Relaxed);
        let added = insert_dirty(&mut st.dirty, off, data);
        st.dirty_bytes += added;
        self.dirty_total.fetch_add(added, Ordering::Relaxed);
        if end > st.rec.size {
            st.rec.size = end;
        }
        // With the kernel's writeback cache the kernel keeps mtime/ctime of written files and
        // sends them with setattr; stamping our own clock here would move them later.
        if !self.kernel_times.load(Ordering::Relaxed) {
            let now = Ts::now();
            st.rec.mtime = now;
            st.rec.ctime = now;
        }
        st.rec_dirty = true;
        self.stats
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(Some(st))
    }

    /// Commits buffered data (see the module comment). With `sync`, packs are synced before
    /// the index batch, which is written with a synced WAL.
    pub(super) fn commit(
        &self,
        ino: u64,
        st: &mut NodeState,
        mode: Commit,
        sync: bool,
    ) -> Result<()> {
        if st.dirty.is_empty() && !st.rec_dirty {
            self.log_committed(ino, st);
            if sync {
                self.store.sync()?;
            }
            return Ok(());
        }
        self.own(ino, st)?;
        // Chunks put from here on are referenced by this batch: keep gc out until it is written.
        let _chunks = self.store.chunks.writer();
        let top = self.tree();
        let size = st.rec.size;
        let dirty = std::mem::take(&mut st.dirty);
        let dirty_before = st.dirty_bytes;
        let mut keep: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut b = Batch::new();
        let mut delta: i64 = 0;
        // Chunks stored by this commit are not in the index until its batch is written, and
        // the read cache may already have dropped them: a later range whose edge falls in one
        // of them (two ranges inside one old extent) reads it from here.
        let mut fresh: HashMap<ChunkId, (Arc<Vec<u8>>, usize)> = HashMap::new();
        // What a failed commit must put back: the ranges not reached yet, the one it failed
        // on, and the ones it chunked (as (offset, region, position in region, length)).
        let mut pending = dirty.into_iter();
        let mut failed: Option<(u64, Vec<u8>)> = None;
        let mut done: Vec<(u64, Arc<Vec<u8>>, usize, usize)> = Vec::new();
        let result = (|| -> Result<()> {
            for (a, data) in pending.by_ref() {
                let end = a + data.len() as u64;
                let chunks = self.store.chunks.clone();
                let ext = self.extents(ino, st)?;
                // Widen to whole committed extents at the edges.
                let left = straddling(ext, a);
                let right = straddling(ext, end);
                let start = left.map(|(o, _)| o).unwrap_or(a);
                let stop = right.map(|(o, e)| o + e.len as u64).unwrap_or(end);
                let keep_tail = mode == Commit::KeepTail && left.is_none() && end >= size;
                let region = if left.is_none() && right.is_none() {
                    data // the common case (appends, whole rewrites): no copy
                } else {
                    let edge = |e: &Extent, from: u32, len: u32| -> Result<Vec<u8>> {
                        match fresh.get(&e.chunk) {
                            Some((buf, pos)) => {
                                let s = pos + (e.chunk_off + from) as usize;
                                Ok(buf[s..s + len as usize].to_vec())
                            }
                            None => extent_bytes(&chunks, e, from, len),
                        }
                    };
                    let built = (|| -> Result<Vec<u8>> {
                        let mut region = Vec::with_capacity((stop - start) as usize);
                        if let Some((o, e)) = left {
                            region.extend_from_slice(&edge(&e, 0, (a - o) as u32)?);
                        }
                        region.extend_from_slice(&data);
                        if let Some((o, e)) = right {
                            let from = (end - o) as u32;
                            region.extend_from_slice(&edge(&e, from, e.len - from)?);
                        }
                        Ok(region)
                    })();
                    match built {
                        Ok(region) => region,
                        Err(e) => {
                            failed = Some((a, data));
                            return Err(e);
                        }
                    }
                };
                let len = (end - a) as usize;
                let cuts = chunker::split(&region, !keep_tail);
                let consumed: usize = cuts.iter().sum();
                // A streamed range (see `bufpool`): it caches only its last chunk (the one a
                // following write may have to merge with) and goes on in a reused buffer.
                let streamed = region.len() > bufpool::POOLED_FROM;
                if consumed == 0 {
                    // Only in keep-tail mode, which has no committed bytes at the edges: the
                    // region is the buffered data itself.
                    keep.insert(a, region);
                    continue;
                }
                let commit_end = start + consumed as u64;
                let region = Arc::new(region);
                done.push((a, region.clone(), (a - start) as usize, len));
                // Remove the old extents the committed part replaces.
                let old: Vec<u64> = ext.range(start..commit_end).map(|(o, _)| *o).collect();
                for o in old {
                    if let Some(e) = ext.remove(&o) {
                        delta -= e.len as i64;
                        b.delete(Cf::Extents, meta::extent_key(top, ino, o));
                    }
                }
                let ids = crate::chunk::ids_of(&region[..consumed], &cuts);
                let mut pos = 0usize;
                for (n, id) in cuts.into_iter().zip(ids) {
                    let piece = &region[pos..pos + n];
                    let cache = !streamed || pos + n == consumed;
                    let (id, loc) = chunks.put_hashed_cached(id, piece, cache)?;
                    if let Some(loc) = loc {
                        ChunkStore::index(&mut b, &id, &loc);
                    }
                    let e = Extent {
                        chunk: id,
                        chunk_off: 0,
                        len: n as u32,
                    };
                    let o = start + pos as u64;
                    b.put(
                        Cf::Extents,
                        meta::extent_key(top, ino, o),
                        meta::encode(meta::EXTENT_VERSION, &e),
                    );
                    ext.insert(o, e);
                    fresh.insert(id, (region.clone(), pos));
                    delta += n as i64;
                    pos += n;
                }
                if consumed < region.len() {
                    // Only in keep-tail mode; the region had no committed bytes on its left, so
                    // the kept tail is all uncommitted data.
                    let tail = &region[consumed..];
                    let kept = if streamed {
                        let mut v = bufpool::take();
                        v.extend_from_slice(tail);
                        v
                    } else {
                        tail.to_vec()
                    };
                    keep.insert(commit_end, kept);
                }
            }
            Ok(())
        })();
        drop(fresh);
        // The batch indexes the chunks just put: their records go to the OS (or disk) first.
        // Until the batch is written, the node keeps its old record and every buffered byte.
        let alloc = (st.rec.alloc as i64 + delta).max(0) as u64;
        let result = result
            .and_then(|()| {
                if sync {
                    self.store.chunks.sync()
                } else {
                    self.store.chunks.flush()
                }
            })
            .and_then(|()| {
                let mut rec = st.rec.clone();
                rec.alloc = alloc;
                self.persist_rec(&mut b, ino, &rec);
                b.add(Cf::Counters, meta::used_key(self.id), delta);
                self.engine.write(b, sync)
            });
        if let Err(e) = result {
            // Nothing was written to the index: put every buffered byte back, unchanged, so
            // that a retry (after the disk has room again, say) commits it. Chunks already
            // appended are unreferenced and collected by gc.
            st.extents = None;
            let mut back = keep;
            for (a, region, pos, len) in &done {
                insert_dirty(&mut back, *a, &region[*pos..*pos + *len]);
            }
            for (a, d) in failed.into_iter().chain(pending) {
                insert_dirty(&mut back, a, &d);
            }
            st.dirty = back;
            give_back(done);
            return Err(e);
        }
        give_back(done);
        let kept: u64 = keep.values().map(|d| d.len() as u64).sum();
        st.dirty = keep;
        st.dirty_bytes = kept;
        self.dirty_total
            .fetch_sub(dirty_before - kept, Ordering::Relaxed);
        st.rec.alloc = alloc;
        self.log_committed(ino, st);
        self.used.fetch_add(delta, Ordering::Relaxed);
        // Reservations are released once the data is committed (the used counter took over).
        let release = if st.dirty.is_empty() {
            st.reserved
        } else {
            st.reserved.min(delta.max(0))
        };
        st.reserved -= release;
        self.reserved.fetch_sub(release, Ordering::Relaxed);
        st.rec_dirty = false;
        Ok(())
    }

    /// Commits and makes durable everything written to `ino` (and, as a side effect, every
    /// earlier change in the store).
    pub fn fsync(&self, ino: u64) -> Result<()> {
        let _w = self.gate();
        let mut st = self.lock(ino)?;
        self.commit(ino, &mut st, Commit::All, true)?;
        drop(st);
        self.store.sync()
    }

    /// `flush` is sent on every close(2): commit so that the data reaches the store.
    pub fn flush(&self, ino: u64) -> Result<()> {
        let _w = self.gate();
        let mut st = self.lock(ino)?;
        self.commit(ino, &mut st, Commit::All, false)
    }

    /// [`VolumeFs::flush`] for a file with little buffered, done by the caller (a dispatch
    /// thread) when it blocks on nothing: the node and the pack writer are free, no
    /// committed extent straddles an edge of a buffered range (no chunk to read back), and
    /// at most [`INLINE_COMMIT_MAX`] bytes are buffered (hashing and compressing them takes
    /// microseconds). `None`: commit on an I/O thread instead. This spares the close of each
    /// small file a hand-off between threads, which on a paravirtualized host is a wakeup of
    /// the other CPU (untar: one of about ten round trips per file).
    pub fn flush_inline(&self, ino: u64) -> Option<Result<()>> {
        let _w = self.gate.try_read_recursive()?;
        let node = self.loaded(ino)?;
        let mut st = node.try_lock_arc()?;
        if st.evicted || st.dirty_bytes > INLINE_COMMIT_MAX || self.store.chunks.flush_would_wait()
        {
            return None;
        }
        if let Err(e) = self.extents(ino, &mut st) {
            return Some(Err(e));
        }
        let ext = st.extents.as_ref()?;
        if st.dirty.iter().any(|(a, d)| {
            straddling(ext, *a).is_some() || straddling(ext, a + d.len() as u64).is_some()
        }) {
            return None;
        }
        Some(self.commit(ino, &mut st, Commit::All, false))
    }

    /// Changes the size of a locked file; the caller persists the record.
    pub(super) fn truncate_locked(
        &self,
        ino: u64,
        st: &mut NodeState,
        size: u64,
        b: &mut Batch,
    ) -> Result<()> {
        if size > i64::MAX as u64 {
            return posix(libc::EFBIG);
        }
        if size < st.rec.size && st.held.is_some() {
            // The write log cannot express a truncation: commit the logged writes first, so
            // that a replay never brings back bytes past the new end.
            self.commit(ino, st, Commit::All, false)?;
        }
        if size < st.rec.size {
            // Trim buffered data.
            let keys: Vec<u64> = st.dirty.range(..).map(|(k, _)| *k).collect();
            let mut removed = 0u64;
            for k in keys {
                if k >= size {
                    removed += st.dirty.remove(&k).map(|d| d.len() as u64).unwrap_or(0);
                } else if let Some(d) = st.dirty.get_mut(&k) {
                    if k + d.len() as u64 > size {
                        removed += k + d.len() as u64 - size;
                        d.truncate((size - k) as usize);
                    }
                }
            }
            st.dirty_bytes -= removed;
            self.dirty_total.fetch_sub(removed, Ordering::Relaxed);
            let tree = self.tree();
            let ext = self.extents(ino, st)?;
            let mut delta = 0i64;
            let cut: Vec<u64> = ext.range(size..).map(|(o, _)| *o).collect();
            for o in cut {
                if let Some(e) = ext.remove(&o) {
                    delta -= e.len as i64;
                    b.delete(Cf::Extents, meta::extent_key(tree, ino, o));
                }
            }
            if let Some((o, e)) = ext.range_mut(..size).next_back() {
                if o + e.len as u64 > size {
                    let nl = (size - o) as u32;
                    delta -= (e.len - nl) as i64;
                    e.len = nl;
                    b.put(
                        Cf::Extents,
                        meta::extent_key(tree, ino, *o),
                        meta::encode(meta::EXTENT_VERSION, e),
                    );
                }
            }
            self.apply_delta(st, delta, b);
        }
        st.rec.size = size;
        Ok(())
    }

    fn apply_delta(&self, st: &mut NodeState, delta: i64, b: &mut Batch) {
        st.rec.alloc = (st.rec.alloc as i64 + delta).max(0) as u64;
        b.add(Cf::Counters, meta::used_key(self.id), delta);
        self.used.fetch_add(delta, Ordering::Relaxed);
    }

    /// Removes the extents in `[a, b)`, splitting those that straddle the edges.
    fn punch_locked(
        &self,
        ino: u64,
        st: &mut NodeState,
        a: u64,
        end: u64,
        b: &mut Batch,
    ) -> Result<()> {
        let tree = self.tree();
        let ext = self.extents(ino, st)?;
        let mut delta = 0i64;
        let hit: Vec<(u64, Extent)> = overlapping(ext, a, end);
        for (o, e) in hit {
            ext.remove(&o);
            b.delete(Cf::Extents, meta::extent_key(tree, ino, o));
            delta -= e.len as i64;
            let eend = o + e.len as u64;
            if o < a {
                let l = Extent {
                    len: (a - o) as u32,
                    ..e
                };
                b.put(
                    Cf::Extents,
                    meta::extent_key(tree, ino, o),
                    meta::encode(meta::EXTENT_VERSION, &l),
                );
                ext.insert(o, l);
                delta += l.len as i64;
            }
            if eend > end {
                let skip = (end - o) as u32;
                let r = Extent {
                    chunk: e.chunk,
                    chunk_off: e.chunk_off + skip,
                    len: e.len - skip,
                };
                b.put(
                    Cf::Extents,
                    meta::extent_key(tree, ino, end),
                    meta::encode(meta::EXTENT_VERSION, &r),
                );
                ext.insert(end, r);
                delta += r.len as i64;
            }
        }
        self.apply_delta(st, delta, b);
        Ok(())
    }

    pub fn fallocate(&self, ino: u64, off: u64, len: u64, mode: i32) -> Result<()> {
        let _w = self.writer()?;
        let end = off.checked_add(len).ok_or(Error::Posix(libc::EFBIG))?;
        if end > i64::MAX as u64 {
            return posix(libc::EFBIG);
        }
        let mut st = self.lock_own(ino)?;
        if st.rec.kind != Kind::File {
            return posix(libc::ENODEV);
        }
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        if mode
            & !(libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE)
            != 0
            || (punch && !keep_size)
        {
            return posix(libc::EOPNOTSUPP);
        }
        let mut b = Batch::new();
        if punch || zero {
            self.commit(ino, &mut st, Commit::All, false)?;
            let stop = if punch { end.min(st.rec.size) } else { end };
            if stop > off {
                self.punch_locked(ino, &mut st, off, stop, &mut b)?;
            }
        } else if let Some(q) = self.quota {
            // Mode 0 reserves nothing on disk (holes read as zeros), but must not promise space
            // beyond the quota.
            let covered = covered_bytes(self.extents(ino, &mut st)?, off, end);
            let need = (end - off - covered) as i64;
            if self.used.load(Ordering::Relaxed) + self.reserved.load(Ordering::Relaxed) + need
                > q as i64
            {
                return Err(Error::NoSpace(format!(
                    "volume {} is at its size limit of {q} bytes",
                    self.name
                )));
            }
        }
        if !keep_size && end > st.rec.size {
            st.rec.size = end;
        }
        let now = Ts::now();
        st.rec.mtime = now;
        st.rec.ctime = now;
        self.persist_rec(&mut b, ino, &st.rec);
        self.engine.write(b, false)?;
        st.rec_dirty = false;
        Ok(())
    }

    pub fn lseek(&self, ino: u64, off: u64, whence: Whence) -> Result<u64> {
        let _w = self.gate();
        let mut st = self.lock(ino)?;
        self.commit(ino, &mut st, Commit::All, false)?;
        let size = st.rec.size;
        if off >= size {
            return posix(libc::ENXIO);
        }
        let ext = self.extents(ino, &mut st)?;
        let mut pos = off;
        match whence {
            Whence::Data => {
                if let Some((o, e)) = ext.range(..=off).next_back() {
                    if o + e.len as u64 > off {
                        return Ok(off);
                    }
                }
                match ext.range(off..).next() {
                    Some((o, _)) if *o < size => Ok(*o),
                    _ => posix(libc::ENXIO),
                }
            }
            Whence::Hole => {
                // Walk contiguous extents from `off`.
                loop {
                    let cur = ext
                        .range(..=pos)
                        .next_back()
                        .map(|(o, e)| o + e.len as u64)
                        .filter(|e| *e > pos);
                    match cur {
                        Some(e) => pos = e,
                        None => return Ok(pos.min(size)),
                    }
                    if pos >= size {
                        return Ok(size);
                    }
                }
            }
        }
    }

    /// Copies `len` bytes by sharing chunks: the destination gets extents that point at the
    /// source's chunks; no file data is read or written.
    pub fn copy_file_range(
        &self,
        src: u64,
        off_in: u64,
        dst: u64,
        off_out: u64,
        len: u64,
    ) -> Result<u64> {
        let _w = self.writer()?;
        if off_out.checked_add(len).is_none_or(|e| e > i64::MAX as u64) {
            return posix(libc::EFBIG);
        }
        // The destination will reference the source's chunks: keep gc out until it does.
        let _chunks = self.store.chunks.writer();
        // Collect the source's extents for the range.
        let (pieces, n) = {
            let mut st = self.lock(src)?;
            if st.rec.kind != Kind::File {
                return posix(libc::EINVAL);
            }
            self.commit(src, &mut st, Commit::All, false)?;
            let size = st.rec.size;
            if off_in >= size {
                return Ok(0);
            }
            let n = len.min(size - off_in);
            (
                overlapping(self.extents(src, &mut st)?, off_in, off_in + n),
                n,
            )
        };
        let mut st = self.lock_own(dst)?;
        if st.rec.kind != Kind::File {
            return posix(libc::EINVAL);
        }
        self.commit(dst, &mut st, Commit::All, false)?;
        if let Some(q) = self.quota {
            let covered = covered_bytes(self.extents(dst, &mut st)?, off_out, off_out + n);
            let need = (n - covered.min(n)) as i64;
            if self.used.load(Ordering::Relaxed) + self.reserved.load(Ordering::Relaxed) + need
                > q as i64
            {
                return Err(Error::NoSpace(format!(
                    "volume {} is at its size limit of {q} bytes",
                    self.name
                )));
            }
        }
        let mut b = Batch::new();
        self.punch_locked(dst, &mut st, off_out, off_out + n, &mut b)?;
        let tree = self.tree();
        let mut delta = 0i64;
        let ext = self.extents(dst, &mut st)?;
        for (o, e) in pieces {
            // Clip the source extent to [off_in, off_in + n).
            let s = o.max(off_in);
            let t = (o + e.len as u64).min(off_in + n);
            let ne = Extent {
                chunk: e.chunk,
                chunk_off: e.chunk_off + (s - o) as u32,
                len: (t - s) as u32,
            };
            let at = off_out + (s - off_in);
            b.put(
                Cf::Extents,
                meta::extent_key(tree, dst, at),
                meta::encode(meta::EXTENT_VERSION, &ne),
            );
            ext.insert(at, ne);
            delta += ne.len as i64;
        }
        self.apply_delta(&mut st, delta, &mut b);
        if off_out + n > st.rec.size {
            st.rec.size = off_out + n;
        }
        let now = Ts::now();
        st.rec.mtime = now;
        st.rec.ctime = now;
        self.persist_rec(&mut b, dst, &st.rec);
        self.engine.write(b, false)?;
        st.rec_dirty = false;
        Ok(n)
    }
}

/// Returns a commit's buffers to the pool (see `bufpool`).
fn give_back(done: Vec<(u64, Arc<Vec<u8>>, usize, usize)>) {
    for (_, region, ..) in done {
        if let Ok(v) = Arc::try_unwrap(region) {
            bufpool::give(v);
        }
    }
}

/// Bytes `[from, from + len)` of an extent.
fn extent_bytes(chunks: &Arc<ChunkStore>, e: &Extent, from: u32, len: u32) -> Result<Vec<u8>> {
    let c = chunks.get(&e.chunk)?;
    let s = (e.chunk_off + from) as usize;
    c.get(s..s + len as usize)
        .map(|b| b.to_vec())
        .ok_or_else(|| Error::Corrupt {
            id: e.chunk,
            why: "extent points past the chunk's end".into(),
        })
}

/// Extents that overlap `[a, b)`.
/// The committed extent that starts before `at` and ends after it, if any: a commit of a
/// range with an edge at `at` widens to it and reads its chunk back.
fn straddling(ext: &BTreeMap<u64, Extent>, at: u64) -> Option<(u64, Extent)> {
    ext.range(..at)
        .next_back()
        .map(|(o, e)| (*o, *e))
        .filter(|(o, e)| o + e.len as u64 > at)
}

fn overlapping(ext: &BTreeMap<u64, Extent>, a: u64, b: u64) -> Vec<(u64, Extent)> {
    let mut out = Vec::new();
    if let Some((o, e)) = ext.range(..a).next_back() {
        if o + e.len as u64 > a {
            out.push((*o, *e));
        }
    }
    out.extend(ext.range(a..b).map(|(o, e)| (*o, *e)));
    out
}

fn covered_bytes(ext: &BTreeMap<u64, Extent>, a: u64, b: u64) -> u64 {
    overlapping(ext, a, b)
        .iter()
        .map(|(o, e)| (o + e.len as u64).min(b) - (*o).max(a))
        .sum()
}

fn dirty_overlapping(
    d: &BTreeMap<u64, Vec<u8>>,
    a: u64,
    b: u64,
) -> impl Iterator<Item = (u64, &Vec<u8>)> {
    let first = d
        .range(..a)
        .next_back()
        .filter(|(o, v)| **o + v.len() as u64 > a)
        .map(|(o, v)| (*o, v));
    first.into_iter().chain(d.range(a..b).map(|(o, v)| (*o, v)))
}

/// Adds `data` at `off` to the dirty ranges, merging with overlapping or adjacent ranges.
/// Returns by how many bytes the buffered total grew.
///
/// The range that starts at or before `off` keeps its buffer and grows in place, so that
/// writes arriving out of order (the kernel's writeback runs on several dispatch threads)
/// copy only their own bytes and those of the ranges they join, never the whole range.
fn insert_dirty(d: &mut BTreeMap<u64, Vec<u8>>, off: u64, data: &[u8]) -> u64 {
    let end = off + data.len() as u64;
    // Every range touching [off, end], in order.
    let mut touching: Vec<u64> = d
        .range(..off)
        .next_back()
        .filter(|(o, v)| **o + v.len() as u64 >= off)
        .map(|(o, _)| *o)
        .into_iter()
        .collect();
    touching.extend(d.range(off..=end).map(|(o, _)| *o));
    let mut parts: Vec<(u64, Vec<u8>)> = touching
        .into_iter()
        .filter_map(|o| d.remove(&o).map(|v| (o, v)))
        .collect();
    let old_total: usize = parts.iter().map(|(_, v)| v.len()).sum();
    let (start, mut buf) = match parts.first() {
        Some((o, _)) if *o <= off => parts.remove(0),
        _ => (off, Vec::new()),
    };
    // `buf` covers [start, start + len) and reaches `off`: overwrite and extend it.
    write_at(&mut buf, (off - start) as usize, data);
    // Joined ranges: only the part past `end` of the last one is not overwritten.
    for (o, v) in parts {
        let vend = o + v.len() as u64;
        if vend > end {
            let len = buf.len();
            write_at(&mut buf, len, &v[(end - o) as usize..]);
        }
        bufpool::give(v);
    }
    let grew = buf.len() - old_total;
    d.insert(start, buf);
    grew as u64
}

/// Writes `data` at `at` (at most `v.len()`) into `v`: overwrites what overlaps and appends
/// the rest. A buffer that outgrows [`bufpool::POOLED_FROM`]` / 4` continues in a pooled
/// one: kernel writeback sends a stream as writes of up to 1 MiB, several at a time and not
/// always in order, and about a hundred ranges per GiB start anew and later join their left
/// neighbour. Grown in the heap, each passed through a fresh 1 MiB mapping, faulted in and
/// unmapped again (a third of the daemon's page faults in a sequential write).
fn write_at(v: &mut Vec<u8>, at: usize, data: &[u8]) {
    let new_len = (at + data.len()).max(v.len());
    if new_len > v.capacity() && new_len > bufpool::POOLED_FROM / 4 && new_len <= bufpool::BUF_CAP {
        let mut pooled = bufpool::take();
        pooled.extend_from_slice(v);
        bufpool::give(std::mem::replace(v, pooled));
    }
    let overlap = v.len().saturating_sub(at).min(data.len());
    v[at..at + overlap].copy_from_slice(&data[..overlap]);
    v.extend_from_slice(&data[overlap..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_ranges_merge() {
        let mut d = BTreeMap::new();
        assert_eq!(insert_dirty(&mut d, 10, b"abc"), 3);
        assert_eq!(insert_dirty(&mut d, 13, b"de"), 2); // append in place
        assert_eq!(insert_dirty(&mut d, 20, b"xy"), 2); // separate range
        assert_eq!(d.len(), 2);
        assert_eq!(insert_dirty(&mut d, 8, b"0123456789abcd"), 7);
        assert_eq!(d.len(), 1);
        let (o, v) = d.iter().next().unwrap();
        assert_eq!(*o, 8);
        assert_eq!(v, b"0123456789abcd");
        assert_eq!(insert_dirty(&mut d, 9, b"Z"), 0); // overwrite inside
        assert_eq!(d[&8][1], b'Z');
    }

    /// Random writes, against a plain byte map: same bytes, same coverage, ranges disjoint
    /// and not adjacent, and the returned growth adds up.
    #[test]
    fn dirty_ranges_match_a_byte_map() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for round in 0..200 {
            let mut d = BTreeMap::new();
            let mut model: BTreeMap<u64, u8> = BTreeMap::new();
            let mut total = 0u64;
            for i in 0..40 {
                let off = rnd(4000);
                let len = 1 + rnd(300);
                let data: Vec<u8> = (0..len).map(|k| (round + i + k) as u8).collect();
                total += insert_dirty(&mut d, off, &data);
                for (k, b) in data.iter().enumerate() {
                    model.insert(off + k as u64, *b);
                }
            }
            let mut seen: BTreeMap<u64, u8> = BTreeMap::new();
            let mut prev_end = None;
            for (o, v) in &d {
                if let Some(pe) = prev_end {
                    assert!(*o > pe, "ranges overlap or touch at {o}");
                }
                prev_end = Some(o + v.len() as u64);
                for (k, b) in v.iter().enumerate() {
                    seen.insert(o + k as u64, *b);
                }
            }
            assert_eq!(seen, model, "round {round}");
            assert_eq!(total, model.len() as u64, "round {round}");
        }
    }
}
