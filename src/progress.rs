//! Progress of long-running work (gc, scrub, fsck): the worker updates a shared [`Progress`]
//! as it goes, and anyone holding it (the daemon's status, a CLI progress line) reads a
//! [`ProgressView`] at any time. Updates are lock-free counters plus a phase name; reading
//! never blocks the worker. Nothing here is persisted.
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

#[derive(Debug, Default)]
pub struct Progress {
    phase: Mutex<&'static str>,
    done: AtomicU64,
    total: AtomicU64,
}

/// A point-in-time reading of a [`Progress`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProgressView {
    /// What the work is doing now, e.g. `mark`, `sweep`, `compact`, `scrub`.
    pub phase: String,
    /// Units done in this phase, out of `total` (0 when the phase has no known size).
    pub done: u64,
    pub total: u64,
}

impl Progress {
    /// Starts a phase of `total` units (0 if unknown).
    pub fn phase(&self, name: &'static str, total: u64) {
        *self.phase.lock() = name;
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    pub fn view(&self) -> ProgressView {
        ProgressView {
            phase: (*self.phase.lock()).to_string(),
            done: self.done.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
        }
    }
}

impl ProgressView {
    /// `sweep 40% (400/1000)`, or just the phase when its size is unknown.
    pub fn describe(&self) -> String {
        if self.total == 0 {
            return self.phase.clone();
        }
        let pct = (self.done.min(self.total) * 100) / self.total;
        format!("{} {pct}% ({}/{})", self.phase, self.done, self.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_reset_the_count() {
        let p = Progress::default();
        p.phase("sweep", 10);
        p.add(4);
        assert_eq!(p.view().describe(), "sweep 40% (4/10)");
        p.phase("compact", 0);
        p.add(2);
        assert_eq!(p.view().describe(), "compact");
        assert_eq!(p.view().done, 2);
    }
}
