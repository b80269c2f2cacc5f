//! The bitmap slice of every `VolatileSlice` the adapter hands out: dirty-page tracking, and
//! the host reference that keeps the slice's pages shared.
//!
//! vm-memory gives memory one hook into a slice's life: its bitmap slice. A
//! `VolatileSlice<'a, B>` is a pointer, a length and a `B`, `Copy` when `B` is (the default
//! `()`), so memory cannot see a `()`-slice go away. [`GmemSlice`] is not `Copy`: it carries
//! the hold taken when the slice was made, every clone and sub-slice (`offset`, `subslice`,
//! `split_at`, the `VolatileRef`s of `load`/`store` all go through
//! [`Bitmap::slice_at`]) shares it, and the last one
//! dropped releases it. While any of them lives, converting one of its pages to private fails
//! with `EAGAIN` naming the page.
//!
//! A sub-slice shares its parent's whole hold (it may hold more pages than it covers, never
//! fewer).

use std::fmt;
use std::marker::PhantomData;
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
        // A window onto the log alone: its `at` is the region offset itself (origin 0).
        GmemSlice::tagged(std::ptr::from_ref(self) as usize | TAG_LOG, offset)
    }
}

/// A gmem pin shared by the slices made from one `get_slices` item, with the dirty log of
/// their region.
pub(crate) struct PinRec {
    /// Held for its drop: the pages stay pinned while any slice shares the record.
    #[allow(dead_code)]
    pub pin: gmem::Pin,
    pub dirty: Option<std::ptr::NonNull<DirtyLog>>,
    /// Host address of the region's first byte in the mapping the pin's slices point into.
    pub origin: usize,
}

const TAG_MASK: usize = 3;
const TAG_NONE: usize = 0;
const TAG_SLOT: usize = 1;
const TAG_PIN: usize = 2;
const TAG_LOG: usize = 3;

/// The bitmap slice of the adapter's `VolatileSlice`s: a share of the slice's host reference
/// and a window onto its region's [`DirtyLog`]. Not `Copy`, not `Send`: dropping the last
/// slice made from one `get_slices` item releases its pages.
///
/// Two words, so that vm-memory's generic code moves slices as cheaply as it can: a tagged
/// address (nothing; a thread slot; a shared gmem pin; the dirty log alone) and the host
/// address of the slice's first byte (the region offset, for a window onto the log alone).
/// The hold records where its region starts in that mapping, so a write's dirty page is
/// `at + offset - origin`.
pub struct GmemSlice<'a> {
    word: usize,
    at: usize,
    _life: PhantomData<&'a DirtyLog>,
    _not_send: PhantomData<*const ()>,
}

impl<'a> GmemSlice<'a> {
    /// The word of a slice holding its pages through a thread slot (never 0).
    pub(crate) fn slot_word(slot: &'static Slot) -> usize {
        std::ptr::from_ref(slot) as usize | TAG_SLOT
    }

    /// The word of a slice holding its pages through a gmem pin (never 0). The word owns one
    /// strong count of the record: it must become a slice ([`GmemSlice::from_word`]).
    pub(crate) fn pin_word(rec: Rc<PinRec>) -> usize {
        Rc::into_raw(rec) as usize | TAG_PIN
    }

    /// The slice owning `word` (from [`GmemSlice::slot_word`] or [`GmemSlice::pin_word`]),
    /// starting at host address `at`.
    #[inline(always)]
    pub(crate) fn from_word(word: usize, at: usize) -> Self {
        Self::tagged(word, at)
    }

    #[inline(always)]
    fn tagged(word: usize, at: usize) -> Self {
        GmemSlice {
            word,
            at,
            _life: PhantomData,
            _not_send: PhantomData,
        }
    }

    fn addr(&self) -> usize {
        self.word & !TAG_MASK
    }

    /// The dirty log of the slice's region, and where the region starts in the mapping the
    /// slice's `at` is an address of.
    fn log(&self) -> Option<(&'a DirtyLog, usize)> {
        let (addr, origin) = match self.word & TAG_MASK {
            TAG_NONE => (0, 0),
            TAG_SLOT => {
                // SAFETY: a slot tag carries the address of a leaked, never-freed slot.
                let slot = unsafe { &*(self.addr() as *const Slot) };
                (slot.dirty(), slot.origin())
            }
            TAG_PIN => {
                // SAFETY: a pin tag carries `Rc::into_raw` of a record this slice holds one
                // strong count of, so it is alive.
                let rec = unsafe { &*(self.addr() as *const PinRec) };
                (rec.dirty.map_or(0, |p| p.as_ptr() as usize), rec.origin)
            }
            _ => (self.addr(), 0),
        };
        // SAFETY: a non-zero address is that of the dirty log of the region this slice was
        // made from, which lives at least as long as `'a` (the borrow of the memory).
        (addr != 0).then(|| (unsafe { &*(addr as *const DirtyLog) }, origin))
    }

    /// The region offset of byte `offset` of the slice.
    fn rel(&self, origin: usize, offset: usize) -> usize {
        self.at.wrapping_sub(origin).saturating_add(offset)
    }

    /// True when this slice holds its pages through a gmem [`Pin`](gmem::Pin) (regions of
    /// followers and HugeTLB files, or a thread out of slots) rather than through a tracked
    /// thread slot.
    pub fn holds_pin(&self) -> bool {
        match self.word & TAG_MASK {
            TAG_PIN => true,
            TAG_SLOT => {
                // SAFETY: a slot tag carries the address of a leaked, never-freed slot, owned
                // by this (the slice's) thread.
                let slot = unsafe { &*(self.addr() as *const Slot) };
                slot.holds_pin()
            }
            _ => false,
        }
    }

    /// True when this slice holds host references on its pages.
    pub fn holds_pages(&self) -> bool {
        matches!(self.word & TAG_MASK, TAG_SLOT | TAG_PIN)
    }
}

impl fmt::Debug for GmemSlice<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hold = match self.word & TAG_MASK {
            TAG_SLOT => "slot",
            TAG_PIN => "pin",
            _ => "none",
        };
        f.debug_struct("GmemSlice")
            .field("hold", &hold)
            .field("dirty_tracked", &self.log().is_some())
            .field("at", &self.at)
            .finish()
    }
}

impl Clone for GmemSlice<'_> {
    #[inline(always)]
    fn clone(&self) -> Self {
        match self.word & TAG_MASK {
            TAG_SLOT => {
                // SAFETY: a slot tag carries the address of a leaked, never-freed slot.
                let slot = unsafe { &*(self.addr() as *const Slot) };
                slot.share();
            }
            TAG_PIN => share_pin(self.word),
            _ => {}
        }
        Self::tagged(self.word, self.at)
    }
}

/// One more slice shares the gmem pin of `word`. Out of line: the pin path is the slow one.
#[cold]
#[inline(never)]
fn share_pin(word: usize) {
    // SAFETY: the record is alive (the slice being cloned holds a strong count) and was made
    // by `Rc::into_raw`; the clone takes one more count, released by its drop.
    unsafe { Rc::increment_strong_count((word & !TAG_MASK) as *const PinRec) };
}

/// A slice sharing the gmem pin of `word` is gone.
#[cold]
#[inline(never)]
fn unshare_pin(word: usize) {
    // SAFETY: the slice being dropped held one strong count of the record, made by
    // `Rc::into_raw`; it is given back here, once.
    unsafe { Rc::decrement_strong_count((word & !TAG_MASK) as *const PinRec) };
}

impl Drop for GmemSlice<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        match self.word & TAG_MASK {
            TAG_SLOT => {
                // SAFETY: a slot tag carries the address of a leaked, never-freed slot.
                let slot = unsafe { &*(self.addr() as *const Slot) };
                slot.unshare();
            }
            TAG_PIN => unshare_pin(self.word),
            _ => {}
        }
    }
}

impl<'a> WithBitmapSlice<'_> for GmemSlice<'a> {
    type S = GmemSlice<'a>;
}

impl BitmapSlice for GmemSlice<'_> {}

impl<'a> Bitmap for GmemSlice<'a> {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some((d, origin)) = self.log() {
            d.mark(self.rel(origin, offset), len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.log()
            .is_some_and(|(d, origin)| d.is_dirty(self.rel(origin, offset)))
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> GmemSlice<'a> {
        let mut s = self.clone();
        s.at = self.at.wrapping_add(offset);
        s
    }
}
