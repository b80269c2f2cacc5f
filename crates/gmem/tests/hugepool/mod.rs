//! Shared by the HugeTLB test binaries: growing the pool (restored on drop) and probing.
#![allow(dead_code, clippy::cast_possible_truncation)]

use gmem::{PoolGuard, PoolStats};
pub use gmem_conformance::probe::Touch;

/// Grows the pool of `page`-byte pages by `pages` (serialised process-wide, restored when the
/// guard drops), or prints why it cannot and returns `None`.
pub fn pool(page: u64, pages: u64) -> Option<PoolGuard> {
    match PoolGuard::grow(page, pages) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!(
                "skipped: cannot reserve {pages} huge pages of {} KiB: {e}",
                page / 1024
            );
            None
        }
    }
}

/// Pool counters of `page`-byte pages.
pub fn stats(page: u64) -> PoolStats {
    PoolStats::read(page).expect("pool stats")
}

/// Reads one byte at `p`, reporting a SIGBUS instead of dying.
pub fn touch(p: *const u8) -> Touch {
    // SAFETY: the probe catches the SIGBUS a private, poisoned or past-EOF page raises; the
    // callers pass addresses inside live views.
    unsafe { gmem_conformance::probe::read(p) }
}

/// Writes one byte at `p`, reporting a SIGBUS instead of dying.
pub fn poke(p: *mut u8, v: u8) -> Touch {
    // SAFETY: as in `touch`.
    unsafe { gmem_conformance::probe::write(p, v) }
}

/// A byte pattern that differs per 4 KiB page and per byte.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let at = offset + i;
            ((at / 4096).wrapping_mul(31) ^ (at % 251)) as u8
        })
        .collect()
}
