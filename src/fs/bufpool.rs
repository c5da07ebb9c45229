//! Reused buffers for streaming writes and large reads.
//!
//! The daemon's allocator hands out every buffer over 1 MiB as a fresh mapping (a fixed
//! mmap threshold, see `volfs-mountd`'s `tune_malloc`) and unmaps it on free, so without
//! reuse each buffer's pages are faulted in and zeroed by the kernel again.
//!
//! - Write buffers ([`take`], [`give`]): a file being streamed fills a dirty buffer up to
//!   [`BUF_CAP`] bytes, commits it and starts the next: a quarter of the daemon's CPU time in a
//!   sequential write was page faults. Buffers that a range outgrows past a quarter of
//!   [`POOLED_FROM`] bytes come from here (`data::write_at`), and a commit gives them back.
//!   At most [`MAX_POOLED`] are kept (about 260 MiB; one streamed file needs two: the range
//!   being committed and the tail that goes on, and kernel writeback starts a few ranges out
//!   of order that later join).
//! - Read buffers ([`take_read`], [`give_read`]): the FUSE adapter reads into one and replies
//!   from it; a 1 MiB read (the kernel's largest) would otherwise map, fault in and unmap
//!   256 pages each time. At most [`MAX_READ_POOLED`] (one per dispatch thread busy at once).
//!
//! Both pools let their buffers go when none was taken for [`IDLE`] (`trim`, called by the
//! daemon's periodic memory release), so that idle daemons stay small.
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Capacity of a pooled buffer: a file's dirty limit plus one maximal FUSE write plus one
/// maximal kept tail, so a streamed range never outgrows it before its commit.
pub(crate) const BUF_CAP: usize = super::data::FILE_DIRTY_LIMIT as usize + (2 << 20);
/// A dirty range that grows past this many bytes moves into a pooled buffer.
pub(crate) const POOLED_FROM: usize = 1 << 20;
const MAX_POOLED: usize = 4;
/// Capacity of a read buffer: the largest read the kernel sends (256 pages).
pub const READ_CAP: usize = 1 << 20;
const MAX_READ_POOLED: usize = 8;
const IDLE: Duration = Duration::from_secs(30);

struct Pool {
    /// Capacity of the buffers handed out; buffers given back must have at least this much
    /// and at most twice as much.
    cap: usize,
    max: usize,
    free: Vec<Vec<u8>>,
    last_take: Option<Instant>,
}

impl Pool {
    const fn new(cap: usize, max: usize) -> Mutex<Pool> {
        Mutex::new(Pool {
            cap,
            max,
            free: Vec::new(),
            last_take: None,
        })
    }
}

static WRITE_POOL: Mutex<Pool> = Pool::new(BUF_CAP, MAX_POOLED);
static READ_POOL: Mutex<Pool> = Pool::new(READ_CAP, MAX_READ_POOLED);

fn take_from(pool: &Mutex<Pool>) -> Vec<u8> {
    let mut p = pool.lock();
    p.last_take = Some(Instant::now());
    match p.free.pop() {
        Some(v) => v,
        None => {
            let cap = p.cap;
            drop(p);
            Vec::with_capacity(cap)
        }
    }
}

fn give_to(pool: &Mutex<Pool>, mut v: Vec<u8>) {
    let mut p = pool.lock();
    if v.capacity() < p.cap || v.capacity() > 2 * p.cap || p.free.len() >= p.max {
        drop(p);
        return; // freed
    }
    v.clear();
    p.free.push(v);
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
    take_from(&WRITE_POOL)
}

/// Gives a buffer back; buffers that are not pool-sized, and any beyond the pool's bound,
/// are freed.
pub(crate) fn give(v: Vec<u8>) {
    give_to(&WRITE_POOL, v)
}

/// An empty buffer with capacity [`READ_CAP`], reused if one is free.
pub fn take_read() -> Vec<u8> {
    take_from(&READ_POOL)
}

/// Gives a read buffer back (freed if it is not pool-sized or the pool is full).
pub fn give_read(v: Vec<u8>) {
    give_to(&READ_POOL, v)
}

/// Frees the pooled buffers of a pool that none was taken from for a while. Returns how
/// many were freed.
pub fn trim() -> usize {
    trim_of(&WRITE_POOL) + trim_of(&READ_POOL)
}

/// Frees every pooled buffer now (`volfs cache drop`).
pub fn clear() {
    WRITE_POOL.lock().free = Vec::new();
    READ_POOL.lock().free = Vec::new();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_bounded() {
        let pool = Pool::new(BUF_CAP, MAX_POOLED);
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
        // Buffers grown past twice the pool's size are freed, not kept.
        give_to(&pool, Vec::with_capacity(3 * BUF_CAP));
        assert!(pool.lock().free.is_empty());
    }

    #[test]
    fn read_buffers_have_their_own_bound() {
        let pool = Pool::new(READ_CAP, MAX_READ_POOLED);
        let a = take_from(&pool);
        assert!(a.capacity() >= READ_CAP);
        for _ in 0..MAX_READ_POOLED + 3 {
            give_to(&pool, Vec::with_capacity(READ_CAP));
        }
        assert_eq!(pool.lock().free.len(), MAX_READ_POOLED);
        // A buffer handed back is empty when handed out again.
        let mut b = take_from(&pool);
        b.extend_from_slice(b"data");
        give_to(&pool, b);
        assert!(take_from(&pool).is_empty());
        // A write-sized buffer is more than twice a read buffer: not kept.
        pool.lock().free.clear();
        give_to(&pool, Vec::with_capacity(BUF_CAP));
        assert!(pool.lock().free.is_empty());
    }
}
