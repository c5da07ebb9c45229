//! Content-defined chunking of file data with FastCDC (2020 variant).
//!
//! Sizes: min 16 KiB, average 64 KiB, max 256 KiB (the casync/puzzlefs choice): small enough
//! that a random 4 KiB write rewrites little, large enough to keep the index small. Cut points
//! depend only on content, so data shifted by an insertion chunks the same after the edit.
pub const MIN_CHUNK: u32 = 16 * 1024;
pub const AVG_CHUNK: u32 = 64 * 1024;
pub const MAX_CHUNK: u32 = 256 * 1024;

/// Lengths of the chunks `data` splits into. When `is_end` is false the data continues past
/// the buffer, so the last piece (cut only by the buffer's end) is left out: its length is
/// `data.len() - sum(returned)`.
pub fn split(data: &[u8], is_end: bool) -> Vec<usize> {
    if data.is_empty() {
        return Vec::new();
    }
    let mut out: Vec<usize> = fastcdc::v2020::FastCDC::new(data, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
        .map(|c| c.length)
        .collect();
    if !is_end {
        // The final piece ends at the buffer's end, not at a content boundary.
        out.pop();
    }
    out
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
}
