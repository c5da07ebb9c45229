//! Memory advice for the daemon's large buffers: the streaming write buffers of
//! `fs::bufpool` and the pack writer's `O_DIRECT` buffers.
//!
//! These buffers are filled at once, end to end, right after they are mapped. In 4 KiB pages
//! that is a page fault per 4 KiB, and on a VM whose host backs each guest page on its first
//! touch (or takes freed pages back, with free page reporting) each fault is expensive: a
//! fifth of the daemon's CPU in a 2 GiB sequential write. Transparent huge pages make it one
//! fault per 2 MiB.

/// Buffers at least this large are worth huge pages.
pub const HUGE_FROM: usize = 8 << 20;

/// Asks the kernel to back `len` bytes at `ptr` (part of one allocation) with transparent
/// huge pages (`MADV_HUGEPAGE`: THP's "madvise" mode, the usual default, gives them only to
/// regions that ask). Only the whole pages inside the range are advised. Best effort: without
/// THP the call fails and nothing changes.
pub fn advise_huge(ptr: *const u8, len: usize) {
    const PAGE: usize = 4096;
    let start = ptr as usize;
    let end = start + len;
    let from = (start + PAGE - 1) & !(PAGE - 1);
    if len < HUGE_FROM || end <= from + PAGE {
        return;
    }
    let n = (end - from) & !(PAGE - 1);
    // SAFETY: advice on whole pages inside the caller's own allocation; it changes how the
    // kernel backs them, never their contents or the mapping's validity.
    unsafe {
        libc::madvise(from as *mut libc::c_void, n, libc::MADV_HUGEPAGE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advised_buffers_keep_their_bytes() {
        let mut v = vec![7u8; HUGE_FROM + 12_345];
        advise_huge(v.as_ptr(), v.len());
        v[HUGE_FROM] = 9;
        assert!(v[..HUGE_FROM].iter().all(|b| *b == 7));
        assert_eq!(v[HUGE_FROM], 9);
        // Small or tiny ranges are left alone (no page to advise, or not worth it).
        advise_huge(v.as_ptr(), 100);
        advise_huge(v.as_ptr(), 0);
    }
}
