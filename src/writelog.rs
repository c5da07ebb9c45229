//! The write log: every write a volume acknowledges before it is committed, kept where it
//! outlives the process that serves the volume.
//!
//! A write lands in the daemon's per-inode dirty buffer and is answered; the bytes become
//! chunks only at the next commit (close, fsync, buffer limits). With a supervisor keeping the
//! FUSE connection alive across a crash of the server process, the kernel never resends a
//! write that was answered, so without this log those bytes would be gone and a later
//! `fsync` (answered by the new server) would report success for data that no longer exists.
//! The log closes that gap: each write is appended here before it is answered, and a server
//! that takes over a connection replays the log's uncommitted writes into its dirty buffers
//! before it answers anything.
//!
//! The file is normally a memfd the supervisor also holds, so it costs memory, not disk I/O.
//!
//! Layout (version 1, little-endian; see docs/FORMAT.md "Write log"):
//!
//! ```text
//! offset 0     header: magic "VOLFSWL1" (8) | version u32 | 0 u32 | tail u64   (rest of 4 KiB: 0)
//! offset 4096  records, each starting at a multiple of 8:
//!              magic u32 "VWLR" | kind u8 | 0 u8 x3 | len u32 | 0 u32 | pos u64 | ino u64 | arg u64
//!              data [len] | 0-padding to a multiple of 8 | pos ^ TRAILER_KEY u64
//! ```
//!
//! - kind 1 (`write`): `len` bytes of `ino` at file offset `arg`.
//! - kind 2 (`committed`): every record of `ino` at a position below `arg` is committed (in the
//!   index) or discarded; replay skips them.
//! - `tail`: no record before it is needed; the space before it may be freed (holes read as
//!   zeros).
//!
//! Durability contract: a record is complete once its append returned; the trailer is written
//! after the rest of the record (one sequential write), so a record cut short by a crash has
//! no valid trailer and ends the log: it was never acknowledged, and the kernel sends its
//! request again. Appends are serialised, so nothing valid follows an invalid record. The log
//! survives the death of the process that writes it (not a power loss: it protects what the
//! kernel was told, not what `fsync` promises, which lives in the store).
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"VOLFSWL1";
const VERSION: u32 = 1;
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"VWLR");
const TRAILER_KEY: u64 = 0x5a17_c0de_0b5e_55ed;
const HEADER_SIZE: u64 = 4096;
const RECORD_HEADER: usize = 40;
/// Larger records are refused on append and treated as the end of the log on replay.
const MAX_RECORD: usize = 64 << 20;
/// Space before the tail is given back in steps of this size.
const PUNCH_STEP: u64 = 2 << 20;

const KIND_WRITE: u8 = 1;
const KIND_COMMITTED: u8 = 2;

/// A write found in the log that no later `committed` record covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub ino: u64,
    pub off: u64,
    pub data: Vec<u8>,
}

/// Where an inode's records start in the log: it holds the log's space from there on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held(u64);

struct State {
    /// Position of the next record.
    head: u64,
    /// The tail last written to the header.
    tail: u64,
    /// Everything in `[HEADER_SIZE, punched)` was given back.
    punched: u64,
    /// The first live record of each inode that has some, by position: (inode, since when).
    live: BTreeMap<u64, (u64, Instant)>,
}

pub struct WriteLog {
    file: File,
    st: Mutex<State>,
    /// Signalled when the log holds more than [`PRESSURE_SPAN`] behind its head.
    pressure: Condvar,
}

/// A log longer than this (tail to head) wakes its flusher (see [`WriteLog::wait_pressure`]):
/// one file with a small, old dirty buffer must not pin the log's memory behind a stream of
/// other writes.
pub const PRESSURE_SPAN: u64 = 128 << 20;

fn pad8(n: usize) -> usize {
    (n + 7) & !7
}

fn record_size(len: usize) -> u64 {
    (RECORD_HEADER + pad8(len) + 8) as u64
}

fn io(what: &str, e: std::io::Error) -> Error {
    Error::io(format!("write log: {what}"), e)
}

impl WriteLog {
    /// Starts an empty log in `file` (anything in it is discarded).
    pub fn create(file: File) -> Result<WriteLog> {
        file.set_len(0).map_err(|e| io("truncating", e))?;
        let log = WriteLog {
            file,
            st: Mutex::new(State {
                head: HEADER_SIZE,
                tail: HEADER_SIZE,
                punched: HEADER_SIZE,
                live: BTreeMap::new(),
            }),
            pressure: Condvar::new(),
        };
        log.write_header(HEADER_SIZE)?;
        Ok(log)
    }

    /// Opens a log a previous process wrote, and returns the writes it holds that were never
    /// committed, in the order they were made. Until [`WriteLog::replayed`] is called, the
    /// space of those records is kept (a crash during the replay finds them again).
    pub fn open(file: File) -> Result<(WriteLog, Vec<Pending>)> {
        let mut hdr = [0u8; 24];
        file.read_exact_at(&mut hdr, 0)
            .map_err(|e| io("reading the header", e))?;
        if &hdr[0..8] != MAGIC {
            return Err(Error::Encoding("write log: bad magic".into()));
        }
        let version = u32::from_le_bytes(hdr[8..12].try_into().unwrap_or_default());
        if version != VERSION {
            return Err(Error::Encoding(format!(
                "write log: version {version}, this build reads {VERSION}"
            )));
        }
        let tail = u64::from_le_bytes(hdr[16..24].try_into().unwrap_or_default());
        let file_len = file.metadata().map_err(|e| io("stat", e))?.len();
        if tail < HEADER_SIZE || tail % 8 != 0 {
            return Err(Error::Encoding(format!("write log: bad tail {tail}")));
        }
        // Pending writes per inode, in log order.
        let mut per_ino: BTreeMap<u64, Vec<(u64, Pending)>> = BTreeMap::new();
        let mut pos = tail;
        let mut h = [0u8; RECORD_HEADER];
        while pos + record_size(0) <= file_len {
            if file.read_exact_at(&mut h, pos).is_err() {
                break;
            }
            let word = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap_or_default());
            let magic = u32::from_le_bytes(h[0..4].try_into().unwrap_or_default());
            let kind = h[4];
            let len = u32::from_le_bytes(h[8..12].try_into().unwrap_or_default()) as usize;
            if magic != RECORD_MAGIC || word(16) != pos || len > MAX_RECORD {
                break;
            }
            let size = record_size(len);
            if pos + size > file_len {
                break;
            }
            let mut trailer = [0u8; 8];
            if file.read_exact_at(&mut trailer, pos + size - 8).is_err()
                || u64::from_le_bytes(trailer) != pos ^ TRAILER_KEY
            {
                break;
            }
            let (ino, arg) = (word(24), word(32));
            match kind {
                KIND_WRITE => {
                    let mut data = vec![0u8; len];
                    file.read_exact_at(&mut data, pos + RECORD_HEADER as u64)
                        .map_err(|e| io("reading a record", e))?;
                    per_ino.entry(ino).or_default().push((
                        pos,
                        Pending {
                            ino,
                            off: arg,
                            data,
                        },
                    ));
                }
                KIND_COMMITTED => {
                    if let Some(v) = per_ino.get_mut(&ino) {
                        v.retain(|(p, _)| *p >= arg);
                    }
                }
                _ => break,
            }
            pos += size;
        }
        // Whatever follows the last valid record (a record cut short) is zeroed, so that new
        // records never sit next to stale bytes.
        if file_len > pos {
            punch(&file, pos, file_len - pos).map_err(|e| io("clearing a cut-off record", e))?;
        }
        let mut by_pos: BTreeMap<u64, Pending> = BTreeMap::new();
        for (_, v) in per_ino {
            for (p, w) in v {
                by_pos.insert(p, w);
            }
        }
        let pending: Vec<Pending> = by_pos.into_values().collect();
        let mut live = BTreeMap::new();
        // Keeps the old records until the replay has logged them again.
        live.insert(tail, (u64::MAX, Instant::now()));
        let log = WriteLog {
            file,
            st: Mutex::new(State {
                head: pos,
                tail,
                punched: tail - tail % PUNCH_STEP,
                live,
            }),
            pressure: Condvar::new(),
        };
        Ok((log, pending))
    }

    /// The pending writes returned by [`WriteLog::open`] are buffered again (and logged
    /// anew): their old records may go.
    pub fn replayed(&self) {
        let mut st = self.st.lock();
        st.live.retain(|_, (ino, _)| *ino != u64::MAX);
        self.reclaim(&mut st);
    }

    fn write_header(&self, tail: u64) -> Result<()> {
        let mut hdr = [0u8; 24];
        hdr[0..8].copy_from_slice(MAGIC);
        hdr[8..12].copy_from_slice(&VERSION.to_le_bytes());
        hdr[16..24].copy_from_slice(&tail.to_le_bytes());
        self.file
            .write_all_at(&hdr, 0)
            .map_err(|e| io("writing the header", e))
    }

    /// Appends one record; returns its position.
    fn append(&self, st: &mut State, kind: u8, ino: u64, arg: u64, data: &[u8]) -> Result<u64> {
        if data.len() > MAX_RECORD {
            return Err(Error::Invalid(format!(
                "write log: a {}-byte record is over the {MAX_RECORD}-byte limit",
                data.len()
            )));
        }
        let pos = st.head;
        let mut head = [0u8; RECORD_HEADER];
        head[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        head[4] = kind;
        head[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
        head[16..24].copy_from_slice(&pos.to_le_bytes());
        head[24..32].copy_from_slice(&ino.to_le_bytes());
        head[32..40].copy_from_slice(&arg.to_le_bytes());
        let pad = [0u8; 8];
        let trailer = (pos ^ TRAILER_KEY).to_le_bytes();
        let parts: [&[u8]; 4] = [&head, data, &pad[..pad8(data.len()) - data.len()], &trailer];
        write_all_vectored_at(&self.file, &parts, pos).map_err(|e| io("appending", e))?;
        st.head = pos + record_size(data.len());
        Ok(pos)
    }

    /// Logs a write of `ino`. `held` is the inode's hold on the log (set by its first record).
    pub fn write(&self, ino: u64, off: u64, data: &[u8], held: &mut Option<Held>) -> Result<()> {
        let mut st = self.st.lock();
        let pos = self.append(&mut st, KIND_WRITE, ino, off, data)?;
        if held.is_none() {
            st.live.insert(pos, (ino, Instant::now()));
            *held = Some(Held(pos));
        }
        if st.head - st.tail > PRESSURE_SPAN {
            self.pressure.notify_one();
        }
        Ok(())
    }

    /// Waits until the log is longer than [`PRESSURE_SPAN`], or `timeout` passed.
    pub fn wait_pressure(&self, timeout: Duration) {
        let mut st = self.st.lock();
        if st.head - st.tail <= PRESSURE_SPAN {
            self.pressure.wait_for(&mut st, timeout);
        }
    }

    /// Everything logged for `ino` so far is committed or discarded, except `keep`: buffered
    /// ranges that stay dirty, which are logged again first.
    pub fn committed(
        &self,
        ino: u64,
        held: &mut Option<Held>,
        keep: &BTreeMap<u64, Vec<u8>>,
    ) -> Result<()> {
        let Some(Held(first)) = *held else {
            return Ok(());
        };
        let mut st = self.st.lock();
        let upto = st.head;
        let mut new_first = None;
        for (off, data) in keep {
            let pos = self.append(&mut st, KIND_WRITE, ino, *off, data)?;
            new_first.get_or_insert(pos);
        }
        self.append(&mut st, KIND_COMMITTED, ino, upto, &[])?;
        st.live.remove(&first);
        *held = new_first.map(|p| {
            st.live.insert(p, (ino, Instant::now()));
            Held(p)
        });
        self.reclaim(&mut st);
        Ok(())
    }

    /// Moves the tail to the first live record and gives back whole steps before it.
    fn reclaim(&self, st: &mut State) {
        let tail = st.live.keys().next().copied().unwrap_or(st.head);
        if tail == st.tail {
            return;
        }
        if let Err(e) = self.write_header(tail) {
            tracing::warn!("{e}");
            return;
        }
        st.tail = tail;
        let upto = tail - tail % PUNCH_STEP;
        if upto > st.punched {
            let from = st.punched.max(HEADER_SIZE);
            if let Err(e) = punch(&self.file, from, upto - from) {
                tracing::warn!("write log: freeing space: {e}");
            } else {
                st.punched = upto;
            }
        }
    }

    /// Inodes whose oldest uncommitted write is older than `age`, or which hold more than
    /// `span` bytes of log behind the head: committing them lets the log shrink.
    pub fn stale(&self, age: Duration, span: u64) -> Vec<u64> {
        let st = self.st.lock();
        st.live
            .iter()
            .filter(|(pos, (ino, since))| {
                *ino != u64::MAX && (since.elapsed() >= age || st.head - **pos > span)
            })
            .map(|(_, (ino, _))| *ino)
            .collect()
    }

    /// Bytes between the tail and the head (what a replay would read).
    pub fn span(&self) -> u64 {
        let st = self.st.lock();
        st.head - st.tail
    }

    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

/// Frees `[off, off + len)` of a file (reads as zeros afterwards).
fn punch(file: &File, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a fd we hold; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One positional gathered write, repeated until everything is written. The parts are
/// written in order, so a write cut short leaves a prefix.
fn write_all_vectored_at(file: &File, parts: &[&[u8]], mut pos: u64) -> std::io::Result<()> {
    let mut bufs: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    while !bufs.is_empty() {
        let iov: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: every iovec points into a live slice for the duration of the call.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                pos as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut n = n as usize;
        pos += n as u64;
        while n > 0 {
            if n >= bufs[0].len() {
                n -= bufs[0].len();
                bufs.remove(0);
            } else {
                bufs[0] = &bufs[0][n..];
                n = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reopen(log: &WriteLog) -> (WriteLog, Vec<Pending>) {
        WriteLog::open(log.file.try_clone().unwrap()).unwrap()
    }

    fn w(ino: u64, off: u64, d: &[u8]) -> Pending {
        Pending {
            ino,
            off,
            data: d.to_vec(),
        }
    }

    #[test]
    fn uncommitted_writes_come_back_in_order() {
        let log = WriteLog::create(tempfile::tempfile().unwrap()).unwrap();
        let (mut a, mut b) = (None, None);
        log.write(5, 0, b"hello", &mut a).unwrap();
        log.write(6, 10, b"other", &mut b).unwrap();
        log.write(5, 5, b" world", &mut a).unwrap();
        let (_, p) = reopen(&log);
        assert_eq!(
            p,
            vec![w(5, 0, b"hello"), w(6, 10, b"other"), w(5, 5, b" world")]
        );
        // Committing 5 keeps only 6's write, and a kept tail of 5 logged again.
        let keep: BTreeMap<u64, Vec<u8>> = [(9u64, b"tail".to_vec())].into();
        log.committed(5, &mut a, &keep).unwrap();
        assert!(a.is_some());
        let (_, p) = reopen(&log);
        assert_eq!(p, vec![w(6, 10, b"other"), w(5, 9, b"tail")]);
        log.committed(5, &mut a, &BTreeMap::new()).unwrap();
        log.committed(6, &mut b, &BTreeMap::new()).unwrap();
        assert!(a.is_none() && b.is_none());
        let (_, p) = reopen(&log);
        assert!(p.is_empty());
        assert_eq!(log.span(), 0);
    }

    #[test]
    fn a_record_cut_short_ends_the_log_and_is_cleared() {
        let f = tempfile::tempfile().unwrap();
        let log = WriteLog::create(f.try_clone().unwrap()).unwrap();
        let mut a = None;
        log.write(1, 0, b"kept", &mut a).unwrap();
        let cut = log.st.lock().head;
        log.write(1, 4, &[7u8; 100], &mut a).unwrap();
        // Simulate a crash in the middle of the second record: its trailer never landed.
        let end = log.st.lock().head;
        f.write_all_at(&[0u8; 8], end - 8).unwrap();
        let (log2, p) = WriteLog::open(f.try_clone().unwrap()).unwrap();
        assert_eq!(p, vec![w(1, 0, b"kept")]);
        assert_eq!(log2.st.lock().head, cut);
        // The cut-off bytes were zeroed: the new log's next records are the last ones.
        let (mut a2, mut b) = (None, None);
        log2.write(1, 0, b"kept", &mut a2).unwrap(); // the replay logs it again
        log2.write(2, 0, b"x", &mut b).unwrap();
        log2.replayed();
        let (_, p) = WriteLog::open(f).unwrap();
        assert_eq!(p, vec![w(1, 0, b"kept"), w(2, 0, b"x")]);
    }

    #[test]
    fn old_records_stay_until_replayed_and_space_is_given_back() {
        let f = tempfile::tempfile().unwrap();
        let log = WriteLog::create(f.try_clone().unwrap()).unwrap();
        let mut a = None;
        let big = vec![1u8; 1 << 20];
        for i in 0..8 {
            log.write(3, i << 20, &big, &mut a).unwrap();
        }
        let (log2, p) = WriteLog::open(f.try_clone().unwrap()).unwrap();
        assert_eq!(p.len(), 8);
        // Replay: the writes are logged again; the old ones stay until `replayed`.
        let mut a2 = None;
        for w in &p {
            log2.write(w.ino, w.off, &w.data, &mut a2).unwrap();
        }
        let (_, again) = WriteLog::open(f.try_clone().unwrap()).unwrap();
        assert_eq!(
            again.len(),
            16,
            "old and new records both replay until `replayed`"
        );
        log2.replayed();
        log2.committed(3, &mut a2, &BTreeMap::new()).unwrap();
        let (_, none) = WriteLog::open(f.try_clone().unwrap()).unwrap();
        assert!(none.is_empty());
        // The freed space reads as zeros: the file's blocks were given back.
        let mut probe = [1u8; 8];
        f.read_exact_at(&mut probe, HEADER_SIZE).unwrap();
        assert_eq!(probe, [0u8; 8]);
    }

    #[test]
    fn a_foreign_file_is_refused() {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(b"not a log at all, no", 0).unwrap();
        assert!(WriteLog::open(f).is_err());
    }
}
