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
//! References are taken only while holding the attribute lock for reading and after checking
//! that the pages are shared; conversion to private checks them while holding it for writing.
//! Releasing needs no lock.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::sys::mapping::Mapping;

/// Reference counts, one per base page.
#[derive(Debug)]
pub(crate) struct RefTable {
    map: Mapping,
    pages: usize,
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
        Ok(RefTable { map, pages })
    }

    fn counts(&self) -> &[AtomicU32] {
        // SAFETY: the mapping is `pages` zero-initialised (valid) `AtomicU32`s, page aligned,
        // owned by this table and alive as long as it; shared access is through atomics only.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<AtomicU32>(), self.pages) }
    }

    fn slot(&self, page: u64) -> &AtomicU32 {
        &self.counts()[usize::try_from(page).unwrap_or(usize::MAX)]
    }

    /// Takes one reference on each page of `[start, end)`. Returns the first page that is
    /// saturated, having taken nothing.
    pub fn get(&self, start: u64, end: u64) -> Result<(), u64> {
        for p in start..end {
            if self.slot(p).fetch_add(1, Ordering::Acquire) >= MAX_REFS {
                self.put(start, p + 1);
                return Err(p);
            }
        }
        Ok(())
    }

    /// Drops one reference on each page of `[start, end)`.
    pub fn put(&self, start: u64, end: u64) {
        for p in start..end {
            self.slot(p).fetch_sub(1, Ordering::Release);
        }
    }

    /// The first page of `[start, end)` that holds a reference.
    pub fn first_busy(&self, start: u64, end: u64) -> Option<u64> {
        (start..end).find(|&p| self.slot(p).load(Ordering::Acquire) != 0)
    }
}
