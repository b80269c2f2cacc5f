//! The bitmap slice of every `VolatileSlice` the adapter hands out: dirty-page tracking, and
//! the host reference that keeps the slice's pages shared.
//!
//! vm-memory gives memory one hook into a slice's life: its bitmap slice. A
//! `VolatileSlice<'a, B>` is a pointer, a length and a `B`, `Copy` when `B` is (the default
//! `()`), so memory cannot see a `()`-slice go away. [`GmemSlice`] is not `Copy`: it carries
//! the hold taken when the slice was made, every clone and sub-slice (`offset`, `subslice`,
//! `split_at`, the `VolatileRef`s of `load`/`store` all go through
//! [`Bitmap::slice_at`](vm_memory::bitmap::Bitmap::slice_at)) shares it, and the last one
//! dropped releases it. While any of them lives, converting one of its pages to private fails
//! with `EAGAIN` naming the page.
//!
//! A sub-slice shares its parent's whole hold (it may hold more pages than it covers, never
//! fewer).

use std::fmt;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};

use crate::hold::Slot;

/// Bytes per dirty bit (the base page).
pub const DIRTY_PAGE: usize = 4096;

/// The dirty pages of one region, one bit per 4 KiB page, set by the adapter's slices when
/// device code writes through them (vm-memory calls `mark_dirty` on every write path).
///
/// This is the region-wide [`Bitmap`]; a VMM that migrates reads and clears it with
/// [`GmemMemory::take_dirty`](crate::GmemMemory::take_dirty). Writes by the guest itself
/// are not here: KVM's dirty log has those.
#[derive(Debug)]
pub struct DirtyLog {
    words: Box<[AtomicU64]>,
    len: usize,
}

impl DirtyLog {
    /// A clean log for `len` bytes.
    pub fn new(len: usize) -> Self {
        let pages = len.div_ceil(DIRTY_PAGE);
        DirtyLog {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            len,
        }
    }

    /// Length covered, in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a log of zero bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn mark(&self, offset: usize, len: usize) {
        if len == 0 || offset >= self.len {
            return;
        }
        let last = offset.saturating_add(len - 1).min(self.len - 1);
        for page in offset / DIRTY_PAGE..=last / DIRTY_PAGE {
            if let Some(w) = self.words.get(page / 64) {
                w.fetch_or(1u64 << (page % 64), Ordering::Relaxed);
            }
        }
    }

    fn is_dirty(&self, offset: usize) -> bool {
        let page = offset / DIRTY_PAGE;
        offset < self.len
            && self
                .words
                .get(page / 64)
                .is_some_and(|w| w.load(Ordering::Relaxed) & (1u64 << (page % 64)) != 0)
    }

    /// Byte offsets (page aligned) of the dirty pages, clearing them.
    pub fn take(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, w) in self.words.iter().enumerate() {
            let mut bits = w.swap(0, Ordering::Relaxed);
            while bits != 0 {
                let b = usize::try_from(bits.trailing_zeros()).unwrap_or(0);
                bits &= bits - 1;
                out.push((i * 64 + b) * DIRTY_PAGE);
            }
        }
        out
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyLog {
    type S = GmemSlice<'a>;
}

impl Bitmap for DirtyLog {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.mark(offset, len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.is_dirty(offset)
    }

    fn slice_at(&self, offset: usize) -> GmemSlice<'_> {
        GmemSlice {
            hold: Hold::None,
            dirty: Some(self),
            base: offset,
        }
    }
}

/// What keeps a slice's pages shared.
pub(crate) enum Hold {
    /// Nothing (a slice of the bitmap itself, not of memory).
    None,
    /// A slot in the calling thread's table (see [`crate::hold`]).
    Slot(&'static Slot),
    /// A gmem pin (followers, HugeTLB, and the fallback of the slot path).
    Pin(Rc<gmem::Pin>),
}

/// The bitmap slice of the adapter's `VolatileSlice`s: a share of the slice's host reference
/// and a window onto its region's [`DirtyLog`]. Not `Copy`, not `Send`: dropping the last
/// slice made from one `get_slices` item releases its pages.
pub struct GmemSlice<'a> {
    pub(crate) hold: Hold,
    pub(crate) dirty: Option<&'a DirtyLog>,
    /// Offset of the slice's first byte in the region (for the dirty log).
    pub(crate) base: usize,
}

impl GmemSlice<'_> {
    /// True when this slice holds its pages through a gmem [`Pin`](gmem::Pin) (the slow
    /// path) rather than a thread slot.
    pub fn holds_pin(&self) -> bool {
        matches!(self.hold, Hold::Pin(_))
    }

    /// True when this slice holds host references on its pages.
    pub fn holds_pages(&self) -> bool {
        !matches!(self.hold, Hold::None)
    }
}

impl fmt::Debug for GmemSlice<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hold = match &self.hold {
            Hold::None => "none",
            Hold::Slot(_) => "slot",
            Hold::Pin(_) => "pin",
        };
        f.debug_struct("GmemSlice")
            .field("hold", &hold)
            .field("dirty_tracked", &self.dirty.is_some())
            .field("base", &self.base)
            .finish()
    }
}

impl Clone for GmemSlice<'_> {
    fn clone(&self) -> Self {
        let hold = match &self.hold {
            Hold::None => Hold::None,
            Hold::Slot(s) => {
                s.share();
                Hold::Slot(s)
            }
            Hold::Pin(p) => Hold::Pin(Rc::clone(p)),
        };
        GmemSlice {
            hold,
            dirty: self.dirty,
            base: self.base,
        }
    }
}

impl Drop for GmemSlice<'_> {
    fn drop(&mut self) {
        if let Hold::Slot(s) = self.hold {
            s.unshare();
        }
    }
}

impl<'a> WithBitmapSlice<'_> for GmemSlice<'a> {
    type S = GmemSlice<'a>;
}

impl BitmapSlice for GmemSlice<'_> {}

impl<'a> Bitmap for GmemSlice<'a> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some(d) = self.dirty {
            d.mark(self.base.saturating_add(offset), len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.dirty
            .is_some_and(|d| d.is_dirty(self.base.saturating_add(offset)))
    }

    fn slice_at(&self, offset: usize) -> GmemSlice<'a> {
        let mut s = self.clone();
        s.base = self.base.saturating_add(offset);
        s
    }
}
