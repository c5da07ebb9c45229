//! Reused write buffers for streaming writes.
//!
//! The daemon's allocator hands out every buffer over 1 MiB as a fresh mapping (a fixed
//! mmap threshold, see `volfs-mountd`'s `tune_malloc`) and unmaps it on free. A file being
//! streamed fills a dirty buffer up to [`BUF_CAP`] bytes, commits it and starts the next, so
//! without reuse each buffer's pages are faulted in and zeroed by the kernel again: a
//! quarter of the daemon's CPU time in a sequential write was page faults. Buffers that a
//! range outgrows past a quarter of [`POOLED_FROM`] bytes come from here (`data::write_at`),
//! and a commit gives them back.
//!
//! The pool keeps at most [`MAX_POOLED`] buffers (about 260 MiB; one streamed file needs two:
//! the range being committed and the tail that goes on, and kernel writeback starts a few
//! ranges out of order that later join) and lets them all go when no
//! buffer was taken for [`IDLE`] (`trim`, called by the daemon's periodic memory release),
//! so that idle daemons stay small.
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Capacity of a pooled buffer: a file's dirty limit plus one maximal FUSE write plus one
/// maximal kept tail, so a streamed range never outgrows it before its commit.
pub(crate) const BUF_CAP: usize = super::data::FILE_DIRTY_LIMIT as usize + (2 << 20);
/// A dirty range that grows past this many bytes moves into a pooled buffer.
pub(crate) const POOLED_FROM: usize = 1 << 20;
const MAX_POOLED: usize = 4;
const IDLE: Duration = Duration::from_secs(30);

struct Pool {
    free: Vec<Vec<u8>>,
    last_take: Option<Instant>,
}

impl Pool {
    const fn new() -> Mutex<Pool> {
        Mutex::new(Pool {
            free: Vec::new(),
            last_take: None,
        })
    }
}

fn pool() -> &'static Mutex<Pool> {
    static POOL: Mutex<Pool> = Pool::new();
    &POOL
}

fn take_from(pool: &Mutex<Pool>) -> Vec<u8> {
    let mut p = pool.lock();
    p.last_take = Some(Instant::now());
    match p.free.pop() {
        Some(v) => v,
        None => {
            drop(p);
            Vec::with_capacity(BUF_CAP)
        }
    }
}

fn give_to(pool: &Mutex<Pool>, mut v: Vec<u8>) {
    if v.capacity() < BUF_CAP || v.capacity() > 2 * BUF_CAP {
        return;
    }
    v.clear();
    let mut p = pool.lock();
    if p.free.len() < MAX_POOLED {
        p.free.push(v);
    }
}

fn trim_of(pool: &Mutex<Pool>) -> usize {
    let mut p = pool.lock();
    if p.last_take.is_some_and(|t| t.elapsed() < IDLE) {
        return 0;
    }
    let n = p.free.len();
    p.free = Vec::new();
    n
}

/// An empty buffer with capacity [`BUF_CAP`], reused if one is free.
pub(crate) fn take() -> Vec<u8> {
    take_from(pool())
}

/// Gives a buffer back; buffers that are not pool-sized, and any beyond the pool's bound,
/// are freed.
pub(crate) fn give(v: Vec<u8>) {
    give_to(pool(), v)
}

/// Frees the pooled buffers if none was taken for a while. Returns how many were freed.
pub fn trim() -> usize {
    trim_of(pool())
}

/// Frees every pooled buffer now (`volfs cache drop`).
pub fn clear() {
    pool().lock().free = Vec::new();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_bounded() {
        let pool = Pool::new();
        let a = take_from(&pool);
        assert!(a.capacity() >= BUF_CAP);
        let ptr = a.as_ptr();
        give_to(&pool, a);
        let b = take_from(&pool);
        assert_eq!(b.as_ptr(), ptr, "the freed buffer is handed out again");
        assert!(b.is_empty());
        give_to(&pool, b);
        // Small buffers are not pooled.
        give_to(&pool, Vec::with_capacity(1024));
        assert_eq!(pool.lock().free.len(), 1);
        for _ in 0..MAX_POOLED + 2 {
            give_to(&pool, Vec::with_capacity(BUF_CAP));
        }
        assert_eq!(pool.lock().free.len(), MAX_POOLED);
        // Taken a moment ago: trim keeps them; idle: trim frees them.
        assert_eq!(trim_of(&pool), 0);
        pool.lock().last_take = Instant::now().checked_sub(IDLE * 2);
        assert_eq!(trim_of(&pool), MAX_POOLED);
        assert!(pool.lock().free.is_empty());
    }
}
