//! Host references: one atomic count per base page.
//!
//! This plays the role of the page refcount the kernel checks before converting a guest_memfd
//! page to private: pins, borrowed ranges and accessor calls in flight each hold one reference
//! on every page they use. The table is a zero-initialised allocation, so only the parts that
//! are ever written cost memory (4 bytes per base page, like a sparse `struct page` refcount).
//!
//! References are taken only while holding the attribute lock for reading and after checking
//! that the pages are shared; conversion to private checks them while holding it for writing.
//! Releasing needs no lock.

use std::sync::atomic::{AtomicU32, Ordering};

/// Reference counts, one per base page.
#[derive(Debug)]
pub(crate) struct RefTable {
    counts: Box<[AtomicU32]>,
}

/// Refused when a page already holds this many references (the kernel's GUP fails the same way
/// with `ENOMEM` on refcount saturation).
pub(crate) const MAX_REFS: u32 = u32::MAX / 2;

impl RefTable {
    /// A table for `pages` pages, all zero. Fails with `ENOMEM` when it cannot be allocated
    /// (a file far larger than memory), rather than aborting.
    pub fn new(pages: usize) -> std::io::Result<Self> {
        let pages = pages.max(1);
        let enomem = || std::io::Error::from_raw_os_error(libc::ENOMEM);
        let layout = std::alloc::Layout::array::<AtomicU32>(pages).map_err(|_| enomem())?;
        // SAFETY: `layout` has a non-zero size; zeroed memory is a valid `AtomicU32` array.
        // Large zeroed allocations come lazily from mmap, so untouched counts cost nothing.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<AtomicU32>();
        if ptr.is_null() {
            return Err(enomem());
        }
        let slice = std::ptr::slice_from_raw_parts_mut(ptr, pages);
        // SAFETY: `slice` was allocated by the global allocator with the layout of
        // `[AtomicU32; pages]` and is initialised (zeroed); the box takes sole ownership.
        let counts = unsafe { Box::from_raw(slice) };
        Ok(RefTable { counts })
    }

    fn slot(&self, page: u64) -> &AtomicU32 {
        &self.counts[usize::try_from(page).unwrap_or(usize::MAX)]
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
