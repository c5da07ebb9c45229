//! Content-defined chunking of file data with FastCDC (2020 variant).
//!
//! Sizes: min 16 KiB, average 64 KiB, max 256 KiB (the casync/puzzlefs choice): small enough
//! that a random 4 KiB write rewrites little, large enough to keep the index small. Cut points
//! depend only on content, so data shifted by an insertion chunks the same after the edit.
use std::collections::HashSet;

pub const MIN_CHUNK: u32 = 16 * 1024;
pub const AVG_CHUNK: u32 = 64 * 1024;
pub const MAX_CHUNK: u32 = 256 * 1024;

/// Buffers at least this long are cut (and their chunks hashed, `chunk::ids_of`) on two
/// threads.
pub const PARALLEL_MIN: usize = 4 << 20;

/// Lengths of the chunks `data` splits into. When `is_end` is false the data continues past
/// the buffer, so the last piece (cut only by the buffer's end) is left out: its length is
/// `data.len() - sum(returned)`.
///
/// Large buffers are cut on two threads with the same result as one: a cut point depends only
/// on where the previous chunk started and the bytes after it, so a second thread cuts the
/// second half as if a chunk started at its middle, and the first thread, cutting from the
/// start, stops as soon as it cuts at a point the second thread also cut at (usually within a
/// few chunks of the middle); from there on both agree.
pub fn split(data: &[u8], is_end: bool) -> Vec<usize> {
    if data.is_empty() {
        return Vec::new();
    }
    let mut out = if data.len() >= PARALLEL_MIN {
        split_parallel(data)
    } else {
        cut_ends(data, 0)
    };
    if !is_end {
        // The final piece ends at the buffer's end, not at a content boundary.
        out.pop();
    }
    let mut prev = 0;
    out.into_iter()
        .map(|end| {
            let n = end - prev;
            prev = end;
            n
        })
        .collect()
}

/// End offsets (relative to `data`) of the chunks cut from `start`.
fn cut_ends(data: &[u8], start: usize) -> Vec<usize> {
    fastcdc::v2020::FastCDC::new(&data[start..], MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
        .map(|c| start + c.offset + c.length)
        .collect()
}

fn split_parallel(data: &[u8]) -> Vec<usize> {
    let mid = data.len() / 2;
    std::thread::scope(|s| {
        let second = s.spawn(|| cut_ends(data, mid));
        // Cut from the start up to the first cut at or past the middle.
        let mut first = Vec::new();
        let mut pos = 0;
        while pos < mid {
            pos = cut_once(data, pos);
            first.push(pos);
        }
        let second = second.join().unwrap_or_else(|_| cut_ends(data, mid));
        // The middle counts as a cut point of the second half: a chunk started there.
        let theirs: HashSet<usize> = second.iter().copied().chain([mid]).collect();
        while pos < data.len() && !theirs.contains(&pos) {
            pos = cut_once(data, pos);
            first.push(pos);
        }
        first.extend(second.into_iter().filter(|&e| e > pos));
        first
    })
}

/// End offset of the one chunk cut from `start`.
fn cut_once(data: &[u8], start: usize) -> usize {
    fastcdc::v2020::FastCDC::new(&data[start..], MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
        .next()
        .map(|c| start + c.length)
        .unwrap_or(data.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn chunks_cover_data_within_bounds() {
        let d = pseudo_random(3 << 20, 1);
        let parts = split(&d, true);
        assert_eq!(parts.iter().sum::<usize>(), d.len());
        for p in &parts[..parts.len() - 1] {
            assert!(*p >= MIN_CHUNK as usize && *p <= MAX_CHUNK as usize);
        }
        let partial = split(&d, false);
        assert!(partial.iter().sum::<usize>() < d.len());
    }

    #[test]
    fn insertion_only_changes_nearby_chunks() {
        let d = pseudo_random(4 << 20, 2);
        let mut e = d.clone();
        e.splice(1_000_000..1_000_000, b"inserted bytes".iter().copied());
        let ids = |v: &[u8]| {
            let mut off = 0;
            split(v, true)
                .into_iter()
                .map(|n| {
                    let h = blake3::hash(&v[off..off + n]);
                    off += n;
                    h
                })
                .collect::<std::collections::HashSet<_>>()
        };
        let (a, b) = (ids(&d), ids(&e));
        let shared = a.intersection(&b).count();
        assert!(shared + 3 >= a.len(), "shared {shared} of {}", a.len());
    }

    #[test]
    fn two_threads_cut_like_one() {
        for (len, seed) in [(4 << 20, 3), (9 << 20, 4), ((6 << 20) + 12345, 5)] {
            let d = pseudo_random(len, seed);
            assert_eq!(
                split_parallel(&d),
                cut_ends(&d, 0),
                "random data, {len} bytes"
            );
        }
        // Data without content boundaries (all max-size chunks) never resynchronises: the
        // first thread cuts it all.
        let z = vec![0u8; 5 << 20];
        assert_eq!(split_parallel(&z), cut_ends(&z, 0));
        let mut mixed = pseudo_random(8 << 20, 6);
        mixed[(3 << 20)..(5 << 20)].fill(7);
        assert_eq!(split_parallel(&mixed), cut_ends(&mixed, 0));
    }
}
