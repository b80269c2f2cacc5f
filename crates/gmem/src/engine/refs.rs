//! Host references: one atomic count per base page.
//!
//! This plays the role of the page refcount the kernel checks before converting a guest_memfd
//! page to private: pins, borrowed ranges and accessor calls in flight each hold one reference
//! on every page they use. The table is a private anonymous mapping, zero-filled by the kernel
//! on first touch, so only the parts that are ever written cost memory (4 bytes per base page,
//! like a sparse `struct page` refcount) and creating a table for a large file costs one
//! `mmap`, never a `memset` (a heap allocation would be cleared eagerly once the allocator
//! serves that size from its heap).
//!
//! References are taken only while holding the page-state lock for reading and after checking
//! that the pages are shared; conversion to private checks them while holding it for writing.
//! Releasing needs no lock.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::model::units::PageRange;
use crate::sys::mapping::Mapping;

/// Reference counts, one per base page.
#[derive(Debug)]
pub(crate) struct RefTable {
    map: Mapping,
    pages: usize,
    /// References held in all, in per-shard counters so that two threads pinning do not
    /// share a cache line (the sum is exact whichever shard a release lands in).
    totals: [Total; SHARDS],
}

/// One shard of [`RefTable::total`], on its own cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Total(std::sync::atomic::AtomicI64);

const SHARDS: usize = 8;

fn shard() -> usize {
    super::shard_lock::thread_number() % SHARDS
}

/// Refused when a page already holds this many references (the kernel's GUP fails the same way
/// with `ENOMEM` on refcount saturation).
pub(crate) const MAX_REFS: u32 = u32::MAX / 2;

impl RefTable {
    /// A table for `pages` pages, all zero. Fails with `ENOMEM` when it cannot be mapped
    /// (a file far larger than memory), rather than aborting.
    pub fn new(pages: usize) -> std::io::Result<Self> {
        let pages = pages.max(1);
        let enomem = || std::io::Error::from_raw_os_error(libc::ENOMEM);
        let len = pages
            .checked_mul(std::mem::size_of::<AtomicU32>())
            .ok_or_else(enomem)?;
        // Accounted like the heap (no MAP_NORESERVE): a table larger than the commit limit
        // fails here with ENOMEM.
        let map = Mapping::map(
            None,
            0,
            len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            libc::PROT_READ | libc::PROT_WRITE,
        )?;
        Ok(RefTable {
            map,
            pages,
            totals: Default::default(),
        })
    }

    fn counts(&self) -> &[AtomicU32] {
        // SAFETY: the mapping is `pages` zero-initialised (valid) `AtomicU32`s, page aligned,
        // owned by this table and alive as long as it; shared access is through atomics only.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<AtomicU32>(), self.pages) }
    }

    fn slot(&self, page: u64) -> &AtomicU32 {
        &self.counts()[usize::try_from(page).unwrap_or(usize::MAX)]
    }

    /// Takes one reference on each page of `r`. Returns the first page that is saturated,
    /// having taken nothing.
    pub fn get(&self, r: PageRange) -> Result<(), u64> {
        for p in r.iter() {
            if self.slot(p).fetch_add(1, Ordering::Acquire) >= MAX_REFS {
                self.put_counts(PageRange::new(r.start, p + 1));
                return Err(p);
            }
        }
        self.add_total(r.len(), true);
        Ok(())
    }

    fn add_total(&self, n: u64, up: bool) {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        let t = &self.totals[shard()].0;
        if up {
            t.fetch_add(n, Ordering::Relaxed);
        } else {
            t.fetch_sub(n, Ordering::Relaxed);
        }
    }

    /// References held on all pages, in all.
    pub fn total(&self) -> u64 {
        let sum: i64 = self
            .totals
            .iter()
            .map(|t| t.0.load(Ordering::Acquire))
            .sum();
        u64::try_from(sum).unwrap_or(0)
    }

    /// Drops one reference on each page of `r`.
    pub fn put(&self, r: PageRange) {
        self.put_counts(r);
        self.add_total(r.len(), false);
    }

    fn put_counts(&self, r: PageRange) {
        for p in r.iter() {
            self.slot(p).fetch_sub(1, Ordering::Release);
        }
    }

    /// The first page of `r` that holds a reference.
    pub fn first_busy(&self, r: PageRange) -> Option<u64> {
        r.iter()
            .find(|&p| self.slot(p).load(Ordering::Acquire) != 0)
    }

    /// References held on the pages of `r`, in all.
    pub fn count(&self, r: PageRange) -> u64 {
        r.iter()
            .map(|p| u64::from(self.slot(p).load(Ordering::Acquire)))
            .sum()
    }
}
