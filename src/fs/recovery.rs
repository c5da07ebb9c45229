//! Taking over from a server process that died: the write log's uncommitted writes are
//! buffered again before the new process answers anything, and the log is kept short by
//! committing what sits in it too long. See [`crate::writelog`] for the log itself.
use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;

use super::{data::Commit, VolumeFs};
use crate::error::{Error, Result};
use crate::writelog::{Pending, WriteLog, PRESSURE_SPAN};

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub writes: u64,
    pub bytes: u64,
    /// Writes that could not be buffered again, with why (the inode is gone, ...).
    pub failed: Vec<String>,
}

impl VolumeFs {
    /// From now on, every write is logged in `log` before it is acknowledged.
    pub fn attach_log(&self, log: WriteLog) -> Result<()> {
        self.log
            .set(log)
            .map_err(|_| Error::Busy(format!("volume {}'s write log", self.name)))
    }

    /// The raw fd of the write log, if one is attached.
    pub fn log_fd(&self) -> Option<std::os::fd::RawFd> {
        self.log.get().map(|l| l.as_raw_fd())
    }

    /// Buffers again the writes a previous process acknowledged and never committed (from
    /// [`WriteLog::open`]), in their order. Their records stay in the log as the inodes'
    /// ([`WriteLog::adopt`]): the replay needs no space in it.
    pub fn replay(&self, pending: Vec<Pending>) -> Replayed {
        let mut r = Replayed::default();
        let _w = self.gate();
        for w in pending {
            match self.buffer(w.ino, w.off, &w.data, false, Some(w.pos)) {
                Ok(_) => {
                    r.writes += 1;
                    r.bytes += w.data.len() as u64;
                }
                // An inode deleted after its write (it was unlinked and closed): nothing to keep.
                Err(Error::Posix(libc::ENOENT)) => {}
                Err(e) => r.failed.push(format!(
                    "{} bytes of inode {} at offset {}: {e}",
                    w.data.len(),
                    w.ino,
                    w.off
                )),
            }
        }
        if let Some(log) = self.log.get() {
            log.replayed();
        }
        r
    }

    /// Commits files whose oldest buffered write is older than `age`, or which keep more
    /// than `span` bytes of write log behind them. Runs off the request path.
    pub fn commit_stale(&self, age: Duration, span: u64) -> Result<()> {
        let Some(log) = self.log.get() else {
            return Ok(());
        };
        for ino in log.stale(age, span) {
            let _w = self.gate();
            if let Ok(mut st) = self.lock(ino) {
                self.commit(ino, &mut st, Commit::All, false)?;
                self.maybe_evict(ino, &mut st);
            }
        }
        Ok(())
    }

    /// The write log's flusher: until the volume shuts down (or is dropped), commits what
    /// sits in the log longer than `age`, at least every `interval`, and at once the files
    /// that keep the log long ([`crate::writelog::PRESSURE_SPAN`]). Runs on a thread of its
    /// own, off the request path.
    pub fn flush_log_loop(fs: Weak<VolumeFs>, age: Duration, interval: Duration) {
        loop {
            let Some(f) = fs.upgrade() else { return };
            if f.shut.load(Ordering::SeqCst) {
                return;
            }
            let Some(log) = f.log.get() else { return };
            log.wait_pressure(interval);
            log.trim_idle(crate::writelog::IDLE_TRIM);
            log.trim_unused(Duration::from_secs(1));
            if let Err(e) = f.commit_stale(age, PRESSURE_SPAN / 2) {
                tracing::warn!(volume = %f.name, "committing buffered writes: {e}");
                // Not again at once (a full disk, say): the pressure would bring us back
                // at once.
                std::thread::sleep(Duration::from_millis(100));
            } else if log.is_full() {
                // The file holding the tail could not be committed now (busy or gone).
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Bytes of write log between its tail and its head.
    pub fn log_span(&self) -> u64 {
        self.log.get().map(|l| l.span()).unwrap_or(0)
    }
}
