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
//! Layout (version 2, little-endian; see docs/FORMAT.md "Write log"):
//!
//! ```text
//! offset 0     header: magic "VOLFSWL1" (8) | version u32 | 0 u32 | tail u64 | ring u64
//!              | key u64   (rest of 4 KiB: 0)
//! offset 4096  the ring: `ring` bytes of records, each starting at a multiple of 8:
//!              magic u32 "VWLR" | kind u8 | 0 u8 x3 | len u32 | 0 u32 | pos u64 | ino u64 | arg u64
//!              data [len] | 0-padding to a multiple of 8 | pos ^ key u64
//! ```
//!
//! - kind 1 (`write`): `len` bytes of `ino` at file offset `arg`.
//! - kind 2 (`committed`): every record of `ino` at a position below `arg` is committed (in the
//!   index) or discarded; replay skips them.
//! - `pos` is a position in an endless log; the record lies at file offset
//!   `4096 + (pos - 4096) % ring`. A record never wraps: one that would cross the end of the
//!   ring starts at the next lap, `4096 + k * ring`. The `pos` field tells a record of this
//!   lap from an older one at the same place.
//! - `tail`: no record before it is needed; the space before it is reused by later laps.
//! - `key`: random, drawn when the log is created. The ring holds stale bytes of older laps,
//!   file data among them; a record is valid only with its trailer, so no data a volume's
//!   user wrote can pass for a record (the user never sees the key).
//!
//! Why a ring: version 1 appended at ever higher offsets and punched the space behind its
//! tail, so each logged byte cost a fresh shmem page and its release: a quarter of the
//! daemon's CPU in a sequential write. The ring's pages are reused. The flusher gives back
//! the free part of the ring beyond what the head will reach soon ([`WriteLog::trim_unused`]:
//! twice what was appended since its last pass, at least [`KEEP_AHEAD`]), so a log that is
//! written slowly keeps ~16 MiB, and a burst's pages go after it; and the whole ring when the
//! log has been empty for [`IDLE_TRIM`]. Version 1 logs (24-byte header, no ring: `pos` is
//! the file offset, the key is a constant) are still read, and written on in that form.
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
const VERSION: u32 = 2;
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"VWLR");
/// The trailer key of version 1 logs.
const V1_KEY: u64 = 0x5a17_c0de_0b5e_55ed;
const HEADER_SIZE: u64 = 4096;
const RECORD_HEADER: usize = 40;
/// Larger records are refused on append and treated as the end of the log on replay.
const MAX_RECORD: usize = 64 << 20;
/// Space before the tail (version 1) or free space of the ring (version 2) is given back in
/// steps of at least this size.
const PUNCH_STEP: u64 = 2 << 20;
/// Size of a new log's ring. Twice [`PRESSURE_SPAN`], at which the flusher starts
/// committing the files that hold the log's tail.
pub const RING: u64 = 256 << 20;
/// Writes leave this much of the ring to `committed` records and the tails they log again,
/// so that a commit can always free space.
const RESERVE: u64 = 16 << 20;
/// The least of the ring's free space ahead of the head that [`WriteLog::trim_unused`] keeps.
pub const KEEP_AHEAD: u64 = 16 << 20;
/// A log with no live record and no append for this long gives its pages back.
pub const IDLE_TRIM: Duration = Duration::from_secs(30);

const KIND_WRITE: u8 = 1;
const KIND_COMMITTED: u8 = 2;

/// A write found in the log that no later `committed` record covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Where the record is in the log.
    pub pos: u64,
    pub ino: u64,
    pub off: u64,
    pub data: Vec<u8>,
}

/// Where an inode's records start in the log: it holds the log's space from there on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held(u64);

/// An inode's first live record.
#[derive(Clone, Copy)]
struct Live {
    ino: u64,
    since: Instant,
}

struct State {
    /// Position of the next record.
    head: u64,
    /// The tail last written to the header.
    tail: u64,
    /// Everything in `[HEADER_SIZE, punched)` was given back (version 1).
    punched: u64,
    /// Bytes appended since the last [`WriteLog::trim_unused`], and when that was.
    appended: u64,
    last_trim: Instant,
    /// (head, tail) when `trim_unused` last gave space back: nothing new to give until one
    /// moves.
    trim_mark: (u64, u64),
    /// The first live record of each inode that has some, by position.
    live: BTreeMap<u64, Live>,
    /// A write found the ring full since the tail last moved: the flusher commits the file
    /// that holds the tail, however little it holds.
    full: bool,
    /// While a replay runs: the tail the log was opened with (its records stay).
    replay_hold: Option<u64>,
    /// The last append, and whether the ring's pages were given back since.
    last_append: Instant,
    trimmed: bool,
}

pub struct WriteLog {
    file: File,
    /// Size of the ring; 0 for a version 1 log (positions are file offsets).
    ring: u64,
    /// The trailer key.
    key: u64,
    st: Mutex<State>,
    /// Signalled when the log holds more than [`PRESSURE_SPAN`] behind its head.
    pressure: Condvar,
    /// Signalled when the tail moves (space in the ring was freed).
    space: Condvar,
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
    /// Starts an empty log in `file` (anything in it is discarded), with a ring of [`RING`]
    /// bytes.
    pub fn create(file: File) -> Result<WriteLog> {
        Self::create_with_ring(file, RING)
    }

    fn create_with_ring(file: File, ring: u64) -> Result<WriteLog> {
        file.set_len(0).map_err(|e| io("truncating", e))?;
        file.set_len(HEADER_SIZE + ring)
            .map_err(|e| io("sizing", e))?;
        let log = Self::with(file, ring, random_key()?, HEADER_SIZE);
        log.write_header(HEADER_SIZE)?;
        Ok(log)
    }

    fn with(file: File, ring: u64, key: u64, tail: u64) -> Self {
        WriteLog {
            file,
            ring,
            key,
            st: Mutex::new(State {
                head: tail,
                tail,
                punched: tail - tail % PUNCH_STEP,
                appended: 0,
                last_trim: Instant::now(),
                trim_mark: (0, 0),
                live: BTreeMap::new(),
                full: false,
                replay_hold: None,
                last_append: Instant::now(),
                trimmed: false,
            }),
            pressure: Condvar::new(),
            space: Condvar::new(),
        }
    }

    /// The file offset of log position `pos`.
    fn at(&self, pos: u64) -> u64 {
        if self.ring == 0 {
            pos
        } else {
            HEADER_SIZE + (pos - HEADER_SIZE) % self.ring
        }
    }

    /// The position where a record of `size` bytes goes, the head being at `pos`: the next
    /// lap if it would cross the end of the ring.
    fn placed(&self, pos: u64, size: u64) -> u64 {
        if self.ring == 0 || self.at(pos) + size <= HEADER_SIZE + self.ring {
            pos
        } else {
            self.next_lap(pos)
        }
    }

    /// The start of the lap after the one `pos` is in (version 2).
    fn next_lap(&self, pos: u64) -> u64 {
        pos + (HEADER_SIZE + self.ring - self.at(pos))
    }

    /// Opens a log a previous process wrote, and returns the writes it holds that were never
    /// committed, in the order they were made. Until [`WriteLog::replayed`] is called, the
    /// space of every record from the tail on is kept (a crash during the replay finds them
    /// again); the replay then takes over the pending records ([`WriteLog::adopt`]).
    pub fn open(file: File) -> Result<(WriteLog, Vec<Pending>)> {
        let mut hdr = [0u8; 40];
        file.read_exact_at(&mut hdr[..24], 0)
            .map_err(|e| io("reading the header", e))?;
        if &hdr[0..8] != MAGIC {
            return Err(Error::Encoding("write log: bad magic".into()));
        }
        let word =
            |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let version = u32::from_le_bytes(hdr[8..12].try_into().unwrap_or_default());
        let (ring, key) = match version {
            1 => (0, V1_KEY),
            VERSION => {
                file.read_exact_at(&mut hdr[24..], 24)
                    .map_err(|e| io("reading the header", e))?;
                (word(&hdr, 24), word(&hdr, 32))
            }
            _ => {
                return Err(Error::Encoding(format!(
                    "write log: version {version}, this build reads 1 and {VERSION}"
                )))
            }
        };
        let tail = word(&hdr, 16);
        let file_len = file.metadata().map_err(|e| io("stat", e))?.len();
        if tail < HEADER_SIZE || tail % 8 != 0 {
            return Err(Error::Encoding(format!("write log: bad tail {tail}")));
        }
        if version == VERSION && (ring < record_size(MAX_RECORD) || ring % 8 != 0) {
            return Err(Error::Encoding(format!("write log: bad ring size {ring}")));
        }
        let mut log = Self::with(file, ring, key, tail);
        let end = if ring == 0 {
            file_len
        } else {
            HEADER_SIZE + ring
        };
        // Pending writes per inode, in log order.
        let mut per_ino: BTreeMap<u64, Vec<Pending>> = BTreeMap::new();
        let mut pos = tail;
        loop {
            let rec = match log.record_at(pos, end)? {
                Some(r) => Some((pos, r)),
                // A record that did not fit before the end of the ring is at the next lap.
                None if ring != 0 && log.at(pos) != HEADER_SIZE => {
                    let next = log.next_lap(pos);
                    log.record_at(next, end)?.map(|r| (next, r))
                }
                None => None,
            };
            let Some((at, (kind, ino, arg, data, size))) = rec else {
                break;
            };
            match kind {
                KIND_WRITE => per_ino.entry(ino).or_default().push(Pending {
                    pos: at,
                    ino,
                    off: arg,
                    data,
                }),
                KIND_COMMITTED => {
                    if let Some(v) = per_ino.get_mut(&ino) {
                        v.retain(|p| p.pos >= arg);
                    }
                }
                _ => {}
            }
            pos = at + size;
        }
        // Whatever follows the last valid record of a version 1 log (a record cut short) is
        // zeroed, so that new records never sit next to stale bytes. In a ring, stale bytes
        // carry an older lap's `pos` and never pass for a record.
        if ring == 0 && file_len > pos {
            punch(&log.file, pos, file_len - pos)
                .map_err(|e| io("clearing a cut-off record", e))?;
        }
        let mut by_pos: BTreeMap<u64, Pending> = BTreeMap::new();
        for (_, v) in per_ino {
            for w in v {
                by_pos.insert(w.pos, w);
            }
        }
        let pending: Vec<Pending> = by_pos.into_values().collect();
        {
            let st = log.st.get_mut();
            st.head = pos;
            // Keeps the old records until the replay has taken them over.
            st.replay_hold = Some(tail);
        }
        Ok((log, pending))
    }

    /// The valid record at `pos`, if there is one: (kind, ino, arg, data, size).
    #[allow(clippy::type_complexity)]
    fn record_at(&self, pos: u64, end: u64) -> Result<Option<(u8, u64, u64, Vec<u8>, u64)>> {
        let off = self.at(pos);
        if off + record_size(0) > end {
            return Ok(None);
        }
        let mut h = [0u8; RECORD_HEADER];
        if self.file.read_exact_at(&mut h, off).is_err() {
            return Ok(None);
        }
        let word = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap_or_default());
        let magic = u32::from_le_bytes(h[0..4].try_into().unwrap_or_default());
        let kind = h[4];
        let len = u32::from_le_bytes(h[8..12].try_into().unwrap_or_default()) as usize;
        if magic != RECORD_MAGIC
            || word(16) != pos
            || len > MAX_RECORD
            || !matches!(kind, KIND_WRITE | KIND_COMMITTED)
        {
            return Ok(None);
        }
        let size = record_size(len);
        if off + size > end {
            return Ok(None);
        }
        let mut trailer = [0u8; 8];
        if self
            .file
            .read_exact_at(&mut trailer, off + size - 8)
            .is_err()
            || u64::from_le_bytes(trailer) != pos ^ self.key
        {
            return Ok(None);
        }
        let mut data = vec![0u8; if kind == KIND_WRITE { len } else { 0 }];
        self.file
            .read_exact_at(&mut data, off + RECORD_HEADER as u64)
            .map_err(|e| io("reading a record", e))?;
        Ok(Some((kind, word(24), word(32), data, size)))
    }

    /// A replayed write, buffered again by the new process: its record (at `pos`, from
    /// [`WriteLog::open`]) stays in the log as the inode's, instead of being logged anew.
    /// Nothing of the inode may be committed between its first and last adoption (the
    /// `committed` record would cover the later ones): the replay runs before the flusher
    /// starts and before any request is answered.
    pub fn adopt(&self, ino: u64, pos: u64, held: &mut Option<Held>) {
        if held.is_none() {
            let since = Instant::now();
            self.st.lock().live.insert(pos, Live { ino, since });
            *held = Some(Held(pos));
        }
    }

    /// The pending writes returned by [`WriteLog::open`] are buffered again and adopted:
    /// the records before the first adopted one may go.
    pub fn replayed(&self) {
        let mut st = self.st.lock();
        st.replay_hold = None;
        self.reclaim(&mut st);
    }

    fn write_header(&self, tail: u64) -> Result<()> {
        let mut hdr = [0u8; 40];
        hdr[0..8].copy_from_slice(MAGIC);
        let version = if self.ring == 0 { 1 } else { VERSION };
        hdr[8..12].copy_from_slice(&version.to_le_bytes());
        hdr[16..24].copy_from_slice(&tail.to_le_bytes());
        let len = if self.ring == 0 { 24 } else { 40 };
        hdr[24..32].copy_from_slice(&self.ring.to_le_bytes());
        hdr[32..40].copy_from_slice(&self.key.to_le_bytes());
        self.file
            .write_all_at(&hdr[..len], 0)
            .map_err(|e| io("writing the header", e))
    }

    /// Appends one record; returns its position, or `None` if the ring has no room for it
    /// within `limit` bytes of the tail.
    fn append(
        &self,
        st: &mut State,
        kind: u8,
        ino: u64,
        arg: u64,
        data: &[u8],
        limit: u64,
    ) -> Result<Option<u64>> {
        if data.len() > MAX_RECORD {
            return Err(Error::Invalid(format!(
                "write log: a {}-byte record is over the {MAX_RECORD}-byte limit",
                data.len()
            )));
        }
        let size = record_size(data.len());
        let pos = self.placed(st.head, size);
        if self.ring != 0 && pos + size - st.tail > limit {
            return Ok(None);
        }
        let mut head = [0u8; RECORD_HEADER];
        head[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        head[4] = kind;
        head[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
        head[16..24].copy_from_slice(&pos.to_le_bytes());
        head[24..32].copy_from_slice(&ino.to_le_bytes());
        head[32..40].copy_from_slice(&arg.to_le_bytes());
        let pad = [0u8; 8];
        let trailer = (pos ^ self.key).to_le_bytes();
        let parts: [&[u8]; 4] = [&head, data, &pad[..pad8(data.len()) - data.len()], &trailer];
        write_all_vectored_at(&self.file, &parts, self.at(pos)).map_err(|e| io("appending", e))?;
        st.head = pos + size;
        st.appended += size;
        st.last_append = Instant::now();
        st.trimmed = false;
        Ok(Some(pos))
    }

    /// Logs a write of `ino`. `held` is the inode's hold on the log (set by its first record).
    /// Returns false, logging nothing, when the ring is full: the caller lets go of what it
    /// holds, waits ([`WriteLog::wait_space`]) and tries again.
    pub fn write(&self, ino: u64, off: u64, data: &[u8], held: &mut Option<Held>) -> Result<bool> {
        let mut st = self.st.lock();
        let limit = self.ring.saturating_sub(RESERVE);
        let Some(pos) = self.append(&mut st, KIND_WRITE, ino, off, data, limit)? else {
            st.full = true;
            self.pressure.notify_one();
            return Ok(false);
        };
        if held.is_none() {
            let since = Instant::now();
            st.live.insert(pos, Live { ino, since });
            *held = Some(Held(pos));
        }
        if st.head - st.tail > PRESSURE_SPAN {
            self.pressure.notify_one();
        }
        Ok(true)
    }

    /// Waits (at most `timeout`) for the tail to move, after [`WriteLog::write`] found the
    /// ring full; the flusher was woken to commit the files that hold it.
    pub fn wait_space(&self, timeout: Duration) {
        let mut st = self.st.lock();
        self.pressure.notify_one();
        self.space.wait_for(&mut st, timeout);
    }

    /// Waits until the log is longer than [`PRESSURE_SPAN`], or `timeout` passed.
    pub fn wait_pressure(&self, timeout: Duration) {
        let mut st = self.st.lock();
        if !st.full && st.head - st.tail <= PRESSURE_SPAN {
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
        let full = || Error::Busy("write log: the ring is full".into());
        let mut new_first = None;
        for (off, data) in keep {
            let pos = self
                .append(&mut st, KIND_WRITE, ino, *off, data, self.ring)?
                .ok_or_else(full)?;
            new_first.get_or_insert(pos);
        }
        self.append(&mut st, KIND_COMMITTED, ino, upto, &[], self.ring)?
            .ok_or_else(full)?;
        st.live.remove(&first);
        *held = new_first.map(|p| {
            let since = Instant::now();
            st.live.insert(p, Live { ino, since });
            Held(p)
        });
        self.reclaim(&mut st);
        Ok(())
    }

    /// Moves the tail to the first live record; a version 1 log gives back whole steps
    /// before it.
    fn reclaim(&self, st: &mut State) {
        let first = st.live.keys().next().copied();
        let tail = first
            .into_iter()
            .chain(st.replay_hold)
            .min()
            .unwrap_or(st.head);
        if tail == st.tail {
            return;
        }
        if let Err(e) = self.write_header(tail) {
            tracing::warn!("{e}");
            return;
        }
        st.tail = tail;
        st.full = false;
        self.space.notify_all();
        if self.ring != 0 {
            return;
        }
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

    /// Gives the ring's pages back if the log holds nothing and was not appended to for
    /// `idle` (run by the flusher). Returns whether it did.
    pub fn trim_idle(&self, idle: Duration) -> bool {
        let mut st = self.st.lock();
        if self.ring == 0 || st.trimmed || !st.live.is_empty() || st.last_append.elapsed() < idle {
            return false;
        }
        if let Err(e) = punch(&self.file, HEADER_SIZE, self.ring) {
            tracing::warn!("write log: freeing the ring: {e}");
            return false;
        }
        st.trimmed = true;
        true
    }

    /// Gives back the ring's free space beyond what the head will soon reach: twice what was
    /// appended since the last pass, at least [`KEEP_AHEAD`] (run by the flusher, at most
    /// once per `every`). A log written fast keeps its whole ring (its pages are reused at
    /// once); one written slowly keeps little. Returns the bytes given back.
    pub fn trim_unused(&self, every: Duration) -> u64 {
        let mut st = self.st.lock();
        if self.ring == 0 || st.trimmed || st.last_trim.elapsed() < every {
            return 0;
        }
        let ahead = st.appended.saturating_mul(2).max(KEEP_AHEAD);
        st.appended = 0;
        st.last_trim = Instant::now();
        // Free: [head, tail + ring) in positions; keep the first `ahead` bytes of it.
        let (from, to) = (st.head + ahead, st.tail + self.ring);
        if from + PUNCH_STEP > to || st.trim_mark == (st.head, st.tail) {
            return 0;
        }
        let start = self.at(from);
        let first = (to - from).min(HEADER_SIZE + self.ring - start);
        let mut r = punch(&self.file, start, first);
        if r.is_ok() && first < to - from {
            r = punch(&self.file, HEADER_SIZE, to - from - first);
        }
        if let Err(e) = r {
            tracing::warn!("write log: freeing unused space: {e}");
            return 0;
        }
        st.trim_mark = (st.head, st.tail);
        to - from
    }

    /// Inodes whose oldest uncommitted write is older than `age`, or which hold more than
    /// `span` bytes of log behind the head, and, when a write found the ring full, the one
    /// that holds the tail: committing them lets the log shrink.
    pub fn stale(&self, age: Duration, span: u64) -> Vec<u64> {
        let st = self.st.lock();
        st.live
            .iter()
            .enumerate()
            .filter(|(i, (pos, l))| {
                (st.full && *i == 0) || l.since.elapsed() >= age || st.head - **pos > span
            })
            .map(|(_, (_, l))| l.ino)
            .collect()
    }

    /// Whether a write found the ring full and the tail has not moved since.
    pub fn is_full(&self) -> bool {
        self.st.lock().full
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

/// A trailer key for a new log, from the kernel's random source.
fn random_key() -> Result<u64> {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        return Err(io("drawing a key", std::io::Error::last_os_error()));
    }
    Ok(u64::from_le_bytes(b))
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

    /// The smallest ring `open` accepts.
    const SMALL: u64 = (MAX_RECORD as u64 + 48 + (1 << 20)) & !7;

    fn reopen(log: &WriteLog) -> (WriteLog, Vec<Pending>) {
        WriteLog::open(log.file.try_clone().unwrap()).unwrap()
    }

    fn plain(p: &[Pending]) -> Vec<(u64, u64, Vec<u8>)> {
        p.iter().map(|w| (w.ino, w.off, w.data.clone())).collect()
    }

    fn w(ino: u64, off: u64, d: &[u8]) -> (u64, u64, Vec<u8>) {
        (ino, off, d.to_vec())
    }

    /// A log as a version 1 build made it.
    fn create_v1(file: File) -> WriteLog {
        file.set_len(0).unwrap();
        let log = WriteLog::with(file, 0, V1_KEY, HEADER_SIZE);
        log.write_header(HEADER_SIZE).unwrap();
        log
    }

    #[test]
    fn uncommitted_writes_come_back_in_order() {
        let log = WriteLog::create(tempfile::tempfile().unwrap()).unwrap();
        let (mut a, mut b) = (None, None);
        assert!(log.write(5, 0, b"hello", &mut a).unwrap());
        log.write(6, 10, b"other", &mut b).unwrap();
        log.write(5, 5, b" world", &mut a).unwrap();
        let (_, p) = reopen(&log);
        assert_eq!(
            plain(&p),
            vec![w(5, 0, b"hello"), w(6, 10, b"other"), w(5, 5, b" world")]
        );
        // Committing 5 keeps only 6's write, and a kept tail of 5 logged again.
        let keep: BTreeMap<u64, Vec<u8>> = [(9u64, b"tail".to_vec())].into();
        log.committed(5, &mut a, &keep).unwrap();
        assert!(a.is_some());
        let (_, p) = reopen(&log);
        assert_eq!(plain(&p), vec![w(6, 10, b"other"), w(5, 9, b"tail")]);
        log.committed(5, &mut a, &BTreeMap::new()).unwrap();
        log.committed(6, &mut b, &BTreeMap::new()).unwrap();
        assert!(a.is_none() && b.is_none());
        let (_, p) = reopen(&log);
        assert!(p.is_empty());
        assert_eq!(log.span(), 0);
    }

    #[test]
    fn a_record_cut_short_ends_the_log() {
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
        assert_eq!(plain(&p), vec![w(1, 0, b"kept")]);
        assert_eq!(log2.st.lock().head, cut);
        // The next record takes the cut one's place; what is left of that never replays.
        let (mut a2, mut b) = (None, None);
        log2.adopt(1, p[0].pos, &mut a2);
        log2.write(2, 0, b"x", &mut b).unwrap();
        log2.replayed();
        let (_, p) = WriteLog::open(f).unwrap();
        assert_eq!(plain(&p), vec![w(1, 0, b"kept"), w(2, 0, b"x")]);
    }

    #[test]
    fn the_ring_wraps_and_replays_across_laps() {
        let f = tempfile::tempfile().unwrap();
        let log = WriteLog::create_with_ring(f.try_clone().unwrap(), SMALL).unwrap();
        // Records of a size that does not divide the ring: some skip to the next lap.
        let data = |i: u64| vec![(i % 251) as u8; (1 << 20) + 3 + (i as usize % 5) * 8];
        let (mut a, mut b) = (None, None);
        let mut a_live = Vec::new();
        for i in 0..400u64 {
            // Inode 1 writes on; inode 2 commits after every fourth write.
            assert!(log.write(1, i << 21, &data(i), &mut a).unwrap());
            a_live.push(w(1, i << 21, &data(i)));
            assert!(log.write(2, i, &data(i + 1), &mut b).unwrap());
            if i % 4 == 3 {
                log.committed(2, &mut b, &BTreeMap::new()).unwrap();
            }
            if i % 16 == 15 {
                let (_, p) = reopen(&log);
                assert_eq!(plain(&p), a_live, "after write {i}");
                log.committed(1, &mut a, &BTreeMap::new()).unwrap();
                a_live.clear();
            }
        }
        assert!(
            log.st.lock().head > 8 * SMALL,
            "the log went round the ring"
        );
        assert_eq!(f.metadata().unwrap().len(), HEADER_SIZE + SMALL);
    }

    /// Bytes of the file that take memory or disk.
    fn resident(f: &File) -> u64 {
        use std::os::unix::fs::MetadataExt;
        f.metadata().unwrap().blocks() * 512
    }

    #[test]
    fn a_log_written_slowly_gives_back_what_it_does_not_use() {
        let f = tempfile::tempfile().unwrap();
        let log = WriteLog::create(f.try_clone().unwrap()).unwrap();
        let mut a = None;
        let burst = vec![5u8; 1 << 20];
        // A burst: 100 MiB held at once, then committed.
        for i in 0..100 {
            log.write(1, i << 20, &burst, &mut a).unwrap();
        }
        log.committed(1, &mut a, &BTreeMap::new()).unwrap();
        assert!(resident(&f) >= 100 << 20);
        // Right after it, the head may soon need twice as much again: little goes.
        let given = log.trim_unused(Duration::ZERO);
        assert!(given < 60 << 20, "{given}");
        assert_eq!(log.trim_unused(Duration::ZERO), 0, "nothing moved since");
        // Then a trickle, each write committed soon: the burst's pages go.
        let small = vec![6u8; 64 << 10];
        for i in 0..4000u64 {
            log.write(2, i << 16, &small, &mut a).unwrap();
            if i % 8 == 7 {
                log.committed(2, &mut a, &BTreeMap::new()).unwrap();
            }
            if i % 16 == 15 {
                log.trim_unused(Duration::ZERO);
            }
        }
        assert!(
            log.st.lock().head > HEADER_SIZE + RING,
            "the head went round"
        );
        let r = resident(&f);
        assert!(r <= KEEP_AHEAD + (4 << 20), "{r} bytes resident");
        assert_eq!(plain(&reopen(&log).1), Vec::new());
        log.write(3, 0, b"still found", &mut a).unwrap();
        assert_eq!(plain(&reopen(&log).1), vec![w(3, 0, b"still found")]);
    }

    #[test]
    fn a_full_ring_refuses_writes_until_a_commit_frees_it() {
        let f = tempfile::tempfile().unwrap();
        let log = std::sync::Arc::new(WriteLog::create_with_ring(f, SMALL).unwrap());
        let mut a = None;
        assert!(log.write(1, 0, b"first", &mut a).unwrap());
        assert!(log.stale(Duration::from_secs(3600), u64::MAX).is_empty());
        let mut n = 1u64;
        for size in [4 << 20, 4096, 1] {
            while log.write(1, n << 22, &vec![3u8; size], &mut a).unwrap() {
                n += 1;
                assert!(n < 20_000, "a ring of {SMALL} bytes never fills");
            }
        }
        assert!(log.span() <= SMALL - RESERVE);
        let hour = Duration::from_secs(3600);
        let mut b = None;
        assert!(!log.write(2, 0, b"small too", &mut b).unwrap());
        assert!(b.is_none());
        // The flusher is told to commit the file that holds the tail, however young.
        assert!(log.is_full());
        assert_eq!(log.stale(hour, u64::MAX), vec![1]);
        // A writer that found it full waits for space and tries again.
        let l2 = log.clone();
        let waiter = std::thread::spawn(move || {
            let mut b = None;
            while !l2.write(2, 0, b"small too", &mut b).unwrap() {
                l2.wait_space(Duration::from_millis(100));
            }
        });
        // A commit still finds room, for its record and a kept tail.
        let keep: BTreeMap<u64, Vec<u8>> = [(7u64, vec![1u8; 1 << 20])].into();
        log.committed(1, &mut a, &keep).unwrap();
        waiter.join().unwrap();
        let (_, p) = reopen(&log);
        assert_eq!(
            plain(&p),
            vec![w(1, 7, &[1u8; 1 << 20]), w(2, 0, b"small too")]
        );
    }

    #[test]
    fn a_replay_adopts_the_records_and_keeps_them_until_replayed() {
        let f = tempfile::tempfile().unwrap();
        let log = WriteLog::create(f.try_clone().unwrap()).unwrap();
        let (mut a, mut b) = (None, None);
        log.write(3, 0, b"three", &mut a).unwrap();
        log.write(4, 0, b"four", &mut b).unwrap();
        log.write(3, 5, b"more", &mut a).unwrap();
        let span = log.span();
        drop(log);
        let (log2, p) = WriteLog::open(f.try_clone().unwrap()).unwrap();
        assert_eq!(p.len(), 3);
        // Inode 4 is adopted and committed first: the tail stays for inode 3's records.
        let (mut a2, mut b2) = (None, None);
        log2.adopt(4, p[1].pos, &mut b2);
        log2.committed(4, &mut b2, &BTreeMap::new()).unwrap();
        log2.adopt(3, p[0].pos, &mut a2);
        log2.adopt(3, p[2].pos, &mut a2);
        assert_eq!(a2, Some(Held(p[0].pos)));
        log2.replayed();
        // Nothing was logged again: the records are inode 3's now, and a crash finds them.
        assert!(log2.span() < span + record_size(0) + 1);
        let (_, again) = reopen(&log2);
        assert_eq!(plain(&again), vec![w(3, 0, b"three"), w(3, 5, b"more")]);
        log2.committed(3, &mut a2, &BTreeMap::new()).unwrap();
        assert!(reopen(&log2).1.is_empty());
        assert_eq!(log2.span(), 0);
    }

    #[test]
    fn an_idle_empty_log_gives_its_pages_back() {
        let f = tempfile::tempfile().unwrap();
        let log = WriteLog::create(f.try_clone().unwrap()).unwrap();
        let mut a = None;
        log.write(1, 0, &[9u8; 4096], &mut a).unwrap();
        assert!(!log.trim_idle(Duration::ZERO), "a live record stays");
        log.committed(1, &mut a, &BTreeMap::new()).unwrap();
        assert!(!log.trim_idle(Duration::from_secs(3600)), "not idle yet");
        assert!(log.trim_idle(Duration::ZERO));
        assert!(!log.trim_idle(Duration::ZERO), "once");
        let mut probe = [1u8; 64];
        f.read_exact_at(&mut probe, HEADER_SIZE).unwrap();
        assert_eq!(probe, [0u8; 64]);
        // It goes on where it was.
        log.write(1, 0, b"again", &mut a).unwrap();
        assert_eq!(plain(&reopen(&log).1), vec![w(1, 0, b"again")]);
    }

    #[test]
    fn a_record_without_the_logs_key_is_not_replayed() {
        let f = tempfile::tempfile().unwrap();
        let log = WriteLog::create(f.try_clone().unwrap()).unwrap();
        let mut a = None;
        log.write(1, 0, b"real", &mut a).unwrap();
        let head = log.st.lock().head;
        // A forged record where the next one goes, with the version 1 key (file data in an
        // older lap could hold exactly this).
        let mut rec = vec![0u8; record_size(8) as usize];
        rec[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        rec[4] = KIND_WRITE;
        rec[8..12].copy_from_slice(&8u32.to_le_bytes());
        rec[16..24].copy_from_slice(&head.to_le_bytes());
        rec[24..32].copy_from_slice(&99u64.to_le_bytes());
        let n = rec.len();
        rec[n - 8..].copy_from_slice(&(head ^ V1_KEY).to_le_bytes());
        f.write_all_at(&rec, log.at(head)).unwrap();
        assert_eq!(plain(&reopen(&log).1), vec![w(1, 0, b"real")]);
    }

    #[test]
    fn a_version_1_log_is_read_and_written_on() {
        let f = tempfile::tempfile().unwrap();
        let log = create_v1(f.try_clone().unwrap());
        assert!(WriteLog::open(f.try_clone().unwrap()).unwrap().1.is_empty());
        let mut a = None;
        let big = vec![1u8; 1 << 20];
        for i in 0..8 {
            assert!(log.write(3, i << 20, &big, &mut a).unwrap());
        }
        let cut = log.st.lock().head;
        log.write(3, 8 << 20, b"cut", &mut a).unwrap();
        let end = log.st.lock().head;
        f.write_all_at(&[0u8; 8], end - 8).unwrap();
        let (log2, p) = WriteLog::open(f.try_clone().unwrap()).unwrap();
        assert_eq!(p.len(), 8);
        assert_eq!(log2.ring, 0);
        // What followed the last valid record was zeroed.
        let mut probe = [1u8; 8];
        f.read_exact_at(&mut probe, cut).unwrap();
        assert_eq!(probe, [0u8; 8]);
        let mut a2 = None;
        for w in &p {
            log2.adopt(w.ino, w.pos, &mut a2);
        }
        log2.replayed();
        log2.committed(3, &mut a2, &BTreeMap::new()).unwrap();
        let (_, none) = WriteLog::open(f.try_clone().unwrap()).unwrap();
        assert!(none.is_empty());
        // The freed space reads as zeros: the file's blocks were given back.
        f.read_exact_at(&mut probe, HEADER_SIZE).unwrap();
        assert_eq!(probe, [0u8; 8]);
        let mut hdr = [0u8; 12];
        f.read_exact_at(&mut hdr, 0).unwrap();
        assert_eq!(u32::from_le_bytes(hdr[8..12].try_into().unwrap()), 1);
    }

    #[test]
    fn a_foreign_file_is_refused() {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(b"not a log at all, no", 0).unwrap();
        assert!(WriteLog::open(f).is_err());
        let f = tempfile::tempfile().unwrap();
        let mut hdr = [0u8; 40];
        hdr[0..8].copy_from_slice(MAGIC);
        hdr[8..12].copy_from_slice(&VERSION.to_le_bytes());
        hdr[16..24].copy_from_slice(&HEADER_SIZE.to_le_bytes());
        hdr[24..32].copy_from_slice(&4096u64.to_le_bytes());
        f.write_all_at(&hdr, 0).unwrap();
        assert!(WriteLog::open(f).is_err(), "a ring too small for a record");
    }
}
