//! [`GmemMemory`]: vm-memory's permissioned `GuestMemory` over a layout of gmem regions.

use std::cell::Cell;
use std::io;
use std::iter::FusedIterator;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use gmem::{AccessError, Errno, FileId, GuestMemfd, HostView, PAGE_SIZE};
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryRegion, GuestMemoryRegionBytes,
    GuestRegionCollection, GuestUsize, Permissions, VolatileSlice,
};

use crate::bitmap::{DirtyLog, GmemSlice, PinRec};
use crate::layout::{HoldMode, LayoutError, RegionSpec};
use crate::tracker::{Denied, Fast, Tracker};

/// Why the adapter refused device code an access. Every refusal is also recorded in the
/// memory's [`RefusalLog`] (virtio-queue drops errors on some paths: an unreadable descriptor
/// ends a chain, an unreadable avail ring makes `pop_descriptor_chain` return `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No region covers the address (`EFAULT`).
    #[error("guest address {gpa:#x} is in no region")]
    Hole {
        /// First address not covered.
        gpa: u64,
    },
    /// The page is private to the guest (`EFAULT`).
    #[error("guest page {gpa:#x} is private")]
    Private {
        /// First private byte of the request.
        gpa: u64,
    },
    /// A conversion of the page to private is being decided (`EAGAIN`: retry).
    #[error("guest page {gpa:#x} is being converted to private")]
    Converting {
        /// The page.
        gpa: u64,
    },
    /// The page is poisoned (`EHWPOISON`).
    #[error("guest page {gpa:#x} is poisoned")]
    Poisoned {
        /// The page.
        gpa: u64,
    },
    /// The page holds the maximum number of references (`ENOMEM`).
    #[error("guest page {gpa:#x} holds too many references")]
    TooManyRefs {
        /// The page.
        gpa: u64,
    },
    /// `gpa + len` wraps around the address space (`EINVAL`).
    #[error("range {gpa:#x}+{len:#x} wraps")]
    Wraps {
        /// Start of the request.
        gpa: u64,
        /// Length of the request.
        len: u64,
    },
    /// gmem gave no host address for the page (`ENODEV`).
    #[error("guest page {gpa:#x} has no host mapping")]
    NoHostMapping {
        /// The page.
        gpa: u64,
    },
    /// This process may no longer reach the file: it was handed over by a live update, or
    /// this is a forked child (`EPERM`).
    #[error("guest page {gpa:#x}: this process may not reach the file")]
    NotPermitted {
        /// The page.
        gpa: u64,
    },
    /// Setting up gmem's device view failed (the syscall's errno, for example `ENOMEM`).
    #[error("guest page {gpa:#x}: setting up the device view failed with errno {errno}")]
    Os {
        /// The page.
        gpa: u64,
        /// The errno.
        errno: i32,
    },
}

impl Refusal {
    /// The errno of the refusal.
    pub fn errno(&self) -> i32 {
        match self {
            Refusal::Hole { .. } | Refusal::Private { .. } => libc::EFAULT,
            Refusal::Converting { .. } => libc::EAGAIN,
            Refusal::Poisoned { .. } => libc::EHWPOISON,
            Refusal::TooManyRefs { .. } => libc::ENOMEM,
            Refusal::Wraps { .. } => libc::EINVAL,
            Refusal::NoHostMapping { .. } => libc::ENODEV,
            Refusal::NotPermitted { .. } => libc::EPERM,
            Refusal::Os { errno, .. } => *errno,
        }
    }

    /// The guest-physical address refused.
    pub fn gpa(&self) -> u64 {
        match *self {
            Refusal::Hole { gpa }
            | Refusal::Private { gpa }
            | Refusal::Converting { gpa }
            | Refusal::Poisoned { gpa }
            | Refusal::TooManyRefs { gpa }
            | Refusal::Wraps { gpa, .. }
            | Refusal::NoHostMapping { gpa }
            | Refusal::NotPermitted { gpa }
            | Refusal::Os { gpa, .. } => gpa,
        }
    }

    /// The refusal carried by a vm-memory error the adapter returned, if it is one.
    pub fn of(err: &GuestMemoryError) -> Option<Refusal> {
        match err {
            GuestMemoryError::InvalidGuestAddress(a) => Some(Refusal::Hole { gpa: a.0 }),
            GuestMemoryError::IOError(e) => e.get_ref()?.downcast_ref::<Refusal>().copied(),
            _ => None,
        }
    }

    fn into_error(self) -> GuestMemoryError {
        match self {
            Refusal::Hole { gpa } => GuestMemoryError::InvalidGuestAddress(GuestAddress(gpa)),
            other => GuestMemoryError::IOError(io::Error::other(other)),
        }
    }
}

/// One recorded refusal: what was asked, and why it was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusalRecord {
    /// Why.
    pub refusal: Refusal,
    /// Start of the request.
    pub gpa: u64,
    /// Length of the request.
    pub len: usize,
    /// Access requested.
    pub access: Permissions,
}

/// The refusals of one memory (shared by every snapshot of a [`GmemAddressSpace`]): a count
/// and the last one, for device code whose queue library swallowed the error.
///
/// [`GmemAddressSpace`]: crate::GmemAddressSpace
#[derive(Debug, Default)]
pub struct RefusalLog {
    count: AtomicU64,
    last: Mutex<Option<RefusalRecord>>,
}

impl RefusalLog {
    fn record(&self, r: RefusalRecord) {
        self.count.fetch_add(1, Ordering::Relaxed);
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    }

    /// How many accesses were refused so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The last refusal, if any.
    pub fn last(&self) -> Option<RefusalRecord> {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last refusal, clearing it (the count stays).
    pub fn take(&self) -> Option<RefusalRecord> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// How a region reaches its pages.
#[derive(Debug)]
enum Access {
    Tracked {
        tracker: Arc<Tracker>,
        /// The tracker as the device's path reads it (`tracker` keeps it valid).
        fast: Fast,
        /// Start of `view`, kept so the device's path makes no call for it.
        base: usize,
        /// The host view slices point into; kept mapped while the region lives.
        #[allow(dead_code)]
        view: HostView,
    },
    Pinned,
}

/// One region of a [`GmemMemory`], shared by the snapshots that contain it.
#[derive(Debug)]
pub(crate) struct Region {
    gpa: u64,
    len: u64,
    offset: u64,
    file: GuestMemfd,
    id: FileId,
    access: Access,
    dirty: Option<DirtyLog>,
}

impl Region {
    fn open(spec: &RegionSpec, id: FileId, dirty: bool) -> Result<Region, LayoutError> {
        let gpa = spec.gpa;
        let access = match spec.hold_mode() {
            HoldMode::Pinned => Access::Pinned,
            HoldMode::Tracked if !crate::hold::fast_path_available() => Access::Pinned,
            HoldMode::Tracked => {
                let tracker = Tracker::for_file(&spec.file, id)
                    .map_err(|source| LayoutError::File { gpa, source })?;
                let view = spec
                    .file
                    .map(spec.offset, spec.len)
                    .map_err(|source| LayoutError::Map { gpa, source })?;
                let base = view.as_ptr() as usize;
                Access::Tracked {
                    fast: tracker.fast(),
                    tracker,
                    base,
                    view,
                }
            }
        };
        let len = usize::try_from(spec.len).map_err(|_| LayoutError::TooLarge { gpa })?;
        Ok(Region {
            gpa,
            len: spec.len,
            offset: spec.offset,
            file: spec.file.clone(),
            id,
            access,
            dirty: dirty.then(|| DirtyLog::new(len)),
        })
    }

    fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.len
    }

    /// Holds `[gpa, gpa + len)` (inside this region): the host address of `gpa` and the word
    /// of the bitmap slice that carries the hold (never 0).
    #[inline(always)]
    fn hold(&self, gpa: u64, len: usize) -> Result<(usize, usize), Refusal> {
        let rel = gpa - self.gpa;
        let off = self.offset + rel;
        let len64 = u64::try_from(len).unwrap_or(u64::MAX);
        let (first, end) = (off / PAGE_SIZE, (off + len64).div_ceil(PAGE_SIZE));
        let rel_usize = usize::try_from(rel).unwrap_or(usize::MAX);
        let dirty = self
            .dirty
            .as_ref()
            .map_or(0, |d| std::ptr::from_ref(d) as usize);
        match &self.access {
            Access::Tracked { fast, base, .. } => match fast.hold(first, end, dirty, *base) {
                Ok(Some(slot)) => Ok((base + rel_usize, GmemSlice::slot_word(slot))),
                Ok(None) => self.pin(off, len64, gpa),
                Err(d) => Err(denied(d, |p| self.gpa + (p - self.offset).max(rel))),
            },
            Access::Pinned => self.pin(off, len64, gpa),
        }
    }

    #[cold]
    #[inline(never)]
    fn pin(&self, off: u64, len: u64, gpa: u64) -> Result<(usize, usize), Refusal> {
        let refuse = |e: AccessError| self.refusal(e, off, gpa);
        let pin = self.file.pin(off, len).map_err(refuse)?;
        // The device view's address: an enforced mapping, where the pinned pages stay mapped
        // while the pin lives.
        let ptr = pin.as_ptr().map_err(refuse)?;
        let dirty = self
            .dirty
            .as_ref()
            .map_or(0, |d| std::ptr::from_ref(d) as usize);
        // Where the region's first byte is in the device view.
        let origin = (ptr as usize).wrapping_sub(usize::try_from(off - self.offset).unwrap_or(0));
        match crate::hold::record_pin(pin, dirty, origin) {
            Ok(slot) => Ok((ptr as usize, GmemSlice::slot_word(slot))),
            Err(pin) => {
                let rec = PinRec {
                    pin,
                    dirty: self.dirty.as_ref().map(std::ptr::NonNull::from),
                    origin,
                };
                Ok((ptr as usize, GmemSlice::pin_word(Rc::new(rec))))
            }
        }
    }

    /// The refusal for gmem's `e` on a request at file offset `off` (gpa `gpa`).
    #[cold]
    fn refusal(&self, e: AccessError, off: u64, gpa: u64) -> Refusal {
        let to_gpa = |o: u64| self.gpa + (o.max(off) - self.offset);
        match e {
            AccessError::Private { offset } => Refusal::Private {
                gpa: to_gpa(offset),
            },
            AccessError::Poisoned { offset } => Refusal::Poisoned {
                gpa: to_gpa(offset),
            },
            AccessError::TooManyRefs { offset } => Refusal::TooManyRefs {
                gpa: to_gpa(offset),
            },
            AccessError::NoMapping | AccessError::Range(_) => Refusal::NoHostMapping { gpa },
            AccessError::Gate(_) | AccessError::NoGuestView => Refusal::NotPermitted { gpa },
            AccessError::Os { errno } => Refusal::Os { gpa, errno },
        }
    }

    /// Checks `[gpa, gpa + len)` (inside this region) without holding anything.
    fn check(&self, gpa: u64, len: u64) -> Result<(), Refusal> {
        let off = self.offset + (gpa - self.gpa);
        let (first, end) = (off / PAGE_SIZE, (off + len).div_ceil(PAGE_SIZE));
        let to_gpa = |p: u64| self.gpa + (p - self.offset).max(gpa - self.gpa);
        match &self.access {
            Access::Tracked { tracker, .. } => {
                tracker.accessible(first, end).map_err(|d| match d {
                    Denied::Private(p) => Refusal::Private { gpa: to_gpa(p) },
                    Denied::Converting(p) => Refusal::Converting { gpa: to_gpa(p) },
                    Denied::Poisoned(p) => Refusal::Poisoned { gpa: to_gpa(p) },
                })
            }
            Access::Pinned => {
                // One lookup per run, not per page: a hostile length costs the runs it spans.
                let runs = self
                    .file
                    .runs(first * PAGE_SIZE, (end - first) * PAGE_SIZE)
                    .map_err(|_| Refusal::NoHostMapping { gpa })?;
                if let Some(run) = runs.iter().find(|r| r.attr != gmem::Attr::Shared) {
                    return Err(Refusal::Private {
                        gpa: to_gpa(run.offset),
                    });
                }
                for p in first..end {
                    let o = p * PAGE_SIZE;
                    if self
                        .file
                        .is_poisoned(o)
                        .map_err(|_| Refusal::NoHostMapping { gpa })?
                    {
                        return Err(Refusal::Poisoned { gpa: to_gpa(o) });
                    }
                }
                Ok(())
            }
        }
    }
}

#[cold]
#[inline(never)]
fn denied(d: Denied, to_gpa: impl Fn(u64) -> u64) -> Refusal {
    match d {
        Denied::Private(p) => Refusal::Private { gpa: to_gpa(p) },
        Denied::Converting(p) => Refusal::Converting { gpa: to_gpa(p) },
        Denied::Poisoned(p) => Refusal::Poisoned { gpa: to_gpa(p) },
    }
}

/// Builds a [`GmemMemory`].
#[derive(Debug, Default)]
pub struct GmemMemoryBuilder {
    regions: Vec<RegionSpec>,
    dirty: bool,
}

impl GmemMemoryBuilder {
    /// Adds a region.
    pub fn region(mut self, spec: RegionSpec) -> Self {
        self.regions.push(spec);
        self
    }

    /// Adds regions.
    pub fn regions(mut self, specs: impl IntoIterator<Item = RegionSpec>) -> Self {
        self.regions.extend(specs);
        self
    }

    /// Tracks the pages device code writes in a [`DirtyLog`] per region (for migration).
    pub fn dirty_tracking(mut self, on: bool) -> Self {
        self.dirty = on;
        self
    }

    /// Validates the layout and maps it. Nothing is registered or mapped on error.
    pub fn build(self) -> Result<GmemMemory, LayoutError> {
        let empty = GmemMemory {
            regions: Vec::new(),
            dirty: self.dirty,
            refusals: Arc::new(RefusalLog::default()),
        };
        empty.with_regions(self.regions)
    }
}

/// A VM's guest memory as device code sees it: vm-memory 0.18's permissioned
/// [`GuestMemory`] over regions of gmem files, with holes between them.
///
/// - shared pages give ordinary `VolatileSlice`s, each holding host references on its pages
///   for as long as it (or any clone or sub-slice) lives: converting a held page to private
///   fails with `EAGAIN` naming it;
/// - private pages are refused: [`GuestMemory::check_range`] is false and
///   [`GuestMemory::get_slices`] yields an error carrying a [`Refusal`] that names the gpa;
///   poisoned pages likewise (`EHWPOISON`); addresses in no region give
///   `InvalidGuestAddress`. Nothing faults.
/// - every refusal is counted and the last one kept ([`GmemMemory::refusals`]).
///
/// A `GmemMemory` is an immutable snapshot; [`GmemMemory::insert_region`] and
/// [`GmemMemory::remove_region`] return new ones, and a [`GmemAddressSpace`] swaps them.
///
/// [`GmemAddressSpace`]: crate::GmemAddressSpace
#[derive(Debug, Clone)]
pub struct GmemMemory {
    regions: Vec<Arc<Region>>,
    dirty: bool,
    refusals: Arc<RefusalLog>,
}

impl GmemMemory {
    /// Starts building a memory.
    pub fn builder() -> GmemMemoryBuilder {
        GmemMemoryBuilder::default()
    }

    /// A memory of `regions`, without dirty tracking.
    pub fn new(regions: impl IntoIterator<Item = RegionSpec>) -> Result<Self, LayoutError> {
        Self::builder().regions(regions).build()
    }

    fn with_regions(&self, specs: Vec<RegionSpec>) -> Result<GmemMemory, LayoutError> {
        // Validate everything first: nothing is mapped or registered for a refused layout.
        let mut ids = Vec::with_capacity(specs.len());
        let existing: Vec<(u64, u64, u64, FileId)> = self
            .regions
            .iter()
            .map(|r| (r.gpa, r.len, r.offset, r.id))
            .collect();
        for (i, spec) in specs.iter().enumerate() {
            spec.check()?;
            let id = spec.file.id().map_err(|e| LayoutError::File {
                gpa: spec.gpa,
                source: io::Error::from_raw_os_error(e.errno()),
            })?;
            if spec.binding_file.is_some_and(|b| b != id) {
                return Err(LayoutError::NotBindingFile { gpa: spec.gpa });
            }
            for &(g, l, o, other) in &existing {
                spec.check_against(g, l, o, other == id)?;
            }
            for (prev, prev_id) in specs[..i].iter().zip(&ids) {
                spec.check_against(prev.gpa, prev.len, prev.offset, *prev_id == id)?;
            }
            ids.push(id);
        }
        let mut regions = self.regions.clone();
        for (spec, id) in specs.iter().zip(ids) {
            regions.push(Arc::new(Region::open(spec, id, self.dirty)?));
        }
        regions.sort_by_key(|r| r.gpa);
        Ok(GmemMemory {
            regions,
            dirty: self.dirty,
            refusals: self.refusals.clone(),
        })
    }

    /// A new snapshot with `spec` added (this one is unchanged). Regions already present are
    /// shared, with their dirty logs and holds.
    pub fn insert_region(&self, spec: RegionSpec) -> Result<GmemMemory, LayoutError> {
        self.with_regions(vec![spec])
    }

    /// A new snapshot without the region that starts at `gpa` (this one is unchanged; slices
    /// taken from it keep their pages held until dropped).
    pub fn remove_region(&self, gpa: u64) -> Result<GmemMemory, LayoutError> {
        let i = self
            .regions
            .iter()
            .position(|r| r.gpa == gpa)
            .ok_or(LayoutError::NoRegion { gpa })?;
        let mut regions = self.regions.clone();
        regions.remove(i);
        Ok(GmemMemory {
            regions,
            dirty: self.dirty,
            refusals: self.refusals.clone(),
        })
    }

    /// The regions, as `(gpa, len, file offset)`, in address order.
    pub fn regions(&self) -> Vec<(u64, u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.gpa, r.len, r.offset))
            .collect()
    }

    /// The regions with their files, as `(gpa, len, file offset, file)`, in address order.
    pub fn region_files(&self) -> Vec<(u64, u64, u64, &GuestMemfd)> {
        self.regions
            .iter()
            .map(|r| (r.gpa, r.len, r.offset, &r.file))
            .collect()
    }

    /// The hold mode of the region containing `gpa`.
    pub fn hold_mode(&self, gpa: u64) -> Option<HoldMode> {
        self.find(gpa).map(|r| match r.access {
            Access::Tracked { .. } => HoldMode::Tracked,
            Access::Pinned => HoldMode::Pinned,
        })
    }

    /// The refusals so far (shared by every snapshot derived from this one).
    pub fn refusals(&self) -> &RefusalLog {
        &self.refusals
    }

    /// Guest-physical addresses of the pages device code wrote since the last call, in
    /// order, clearing them. Empty without dirty tracking.
    pub fn take_dirty(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for r in &self.regions {
            if let Some(d) = &r.dirty {
                out.extend(
                    d.take()
                        .into_iter()
                        .map(|o| r.gpa + u64::try_from(o).unwrap_or(0)),
                );
            }
        }
        out
    }

    /// True when device code wrote the page containing `gpa` since the last
    /// [`GmemMemory::take_dirty`].
    pub fn is_dirty(&self, gpa: u64) -> bool {
        use vm_memory::bitmap::Bitmap;
        self.find(gpa).is_some_and(|r| {
            r.dirty
                .as_ref()
                .is_some_and(|d| d.dirty_at(usize::try_from(gpa - r.gpa).unwrap_or(usize::MAX)))
        })
    }

    #[inline(always)]
    fn find(&self, gpa: u64) -> Option<&Region> {
        if let [only] = self.regions.as_slice() {
            return only.contains(gpa).then_some(&**only);
        }
        let i = self.regions.partition_point(|r| r.gpa <= gpa);
        let r = self.regions.get(i.checked_sub(1)?)?;
        r.contains(gpa).then_some(&**r)
    }

    fn refuse(&self, refusal: Refusal, gpa: u64, len: usize, access: Permissions) {
        self.refusals.record(RefusalRecord {
            refusal,
            gpa,
            len,
            access,
        });
    }
}

/// The slices of one request, made (and held) one at a time.
///
/// `next` is a small inline shell around one out-of-line function that finds the region and
/// takes the hold, and takes the iterator's fields by value rather than the iterator by
/// reference: the iterator then stays in registers, and vm-memory's generic code around
/// `get_slices` (`stop_on_error`, `Peekable`, `try_fold`) small enough to be inlined into the
/// device's code. (An iterator passed by reference to an out-of-line `next` is spilled and
/// reloaded through every adapter; that cost twice the whole access here.)
#[derive(Debug)]
pub struct GmemSlices<'a> {
    mem: &'a GmemMemory,
    addr: u64,
    count: usize,
    /// Bytes of the request made into slices so far.
    done: usize,
    access: Permissions,
}

thread_local! {
    /// Why the calling thread's last step refused (read at once by the same `next`).
    static WHY: std::cell::Cell<Option<Refusal>> = const { std::cell::Cell::new(None) };
}

impl<'a> Iterator for GmemSlices<'a> {
    type Item = Result<VolatileSlice<'a, GmemSlice<'a>>, GuestMemoryError>;

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.count == 0 {
            return None;
        }
        let (ptr, word) = step(self.mem, self.addr, self.count);
        if word == 0 {
            let e = error(self.mem, self.addr, self.count, self.done, self.access);
            self.count = 0;
            return Some(Err(e));
        }
        let len = if word & CLIPPED == 0 {
            self.count
        } else {
            CLIPPED_LEN.with(Cell::get)
        };
        self.count -= len;
        self.done += len;
        self.addr = self
            .addr
            .wrapping_add(u64::try_from(len).unwrap_or(u64::MAX));
        let bitmap = GmemSlice::from_word(word & !CLIPPED, ptr);
        // SAFETY: `step` returned the host address of `len` bytes of shared guest memory (the
        // rest of the request, or up to the end of its region when `CLIPPED`) and the hold
        // that keeps them so: either a host view of the region (mapped for the region's whole
        // length), whose pages stay shared and mapped while the hold in `bitmap` lives
        // (conversions to private are vetoed), or the device-view address of a gmem pin of
        // exactly these bytes, valid while the pin (kept in `bitmap`) lives. Every sub-slice
        // or clone shares that hold, and none outlives `'a`, the borrow of the memory. The
        // guest may write the memory concurrently, which is what volatile access is for.
        Some(Ok(unsafe {
            VolatileSlice::with_bitmap(ptr as *mut u8, len, bitmap, None)
        }))
    }
}

/// A hold word's flag (free: slots and pin records are 8-byte aligned, and the tag takes two
/// bits) saying the slice stops at the end of its region, before the end of the request.
const CLIPPED: usize = 4;
const _: () = assert!(std::mem::align_of::<crate::hold::Slot>() >= 8);

/// Makes the next slice of a request (at `addr`, `count` bytes left): finds its region and
/// holds its pages. Returns the slice's host address and its hold word (with [`CLIPPED`] when
/// the slice ends at its region's end, before the request's), in two registers; a zero word
/// when refused (the refusal is kept for [`error`]).
///
/// Out of line, taking the iterator's fields by value and returning in registers: see
/// [`GmemSlices`].
#[inline(never)]
fn step(m: &GmemMemory, addr: u64, count: usize) -> (usize, usize) {
    let Some(region) = m.find(addr) else {
        refused(Refusal::Hole { gpa: addr });
        return (0, 0);
    };
    let len = region_len(region, addr, count);
    match region.hold(addr, len) {
        Ok((ptr, word)) if len == count => (ptr, word),
        Ok((ptr, word)) => {
            CLIPPED_LEN.with(|c| c.set(len));
            (ptr, word | CLIPPED)
        }
        Err(r) => {
            refused(r);
            (0, 0)
        }
    }
}

/// The length of the slice at `addr` (inside `region`) of a request with `count` bytes left.
#[inline]
fn region_len(region: &Region, addr: u64, count: usize) -> usize {
    let left = region.gpa + region.len - addr;
    usize::try_from(left).map_or(count, |l| l.min(count))
}

thread_local! {
    /// The length of the slice the calling thread's last [`step`] clipped at the end of its
    /// region (read at once by the same `next`).
    static CLIPPED_LEN: Cell<usize> = const { Cell::new(0) };
}

/// Keeps `r` for the [`error`] the same `next` builds.
#[cold]
#[inline(never)]
fn refused(r: Refusal) {
    let _ = WHY.try_with(|w| w.set(Some(r)));
}

/// Records the refusal [`step`] just made on this thread, at `addr` of a request with `count`
/// bytes left after `done`, and returns its error.
#[cold]
#[inline(never)]
fn error(
    m: &GmemMemory,
    addr: u64,
    count: usize,
    done: usize,
    access: Permissions,
) -> GuestMemoryError {
    let r = WHY
        .try_with(Cell::take)
        .ok()
        .flatten()
        .unwrap_or(Refusal::Hole { gpa: addr });
    let start = addr.wrapping_sub(u64::try_from(done).unwrap_or(0));
    m.refuse(r, start, done.saturating_add(count), access);
    r.into_error()
}

impl FusedIterator for GmemSlices<'_> {}

impl<'a> vm_memory::guest_memory::GuestMemorySliceIterator<'a, GmemSlice<'a>> for GmemSlices<'a> {}

impl GuestMemory for GmemMemory {
    type PhysicalMemory = GuestRegionCollection<NoPhysicalMemory>;
    type Bitmap = DirtyLog;

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        self.check(addr.0, count, access).is_ok()
    }

    // The concrete iterator type is part of the API: devices may name it.
    #[allow(refining_impl_trait)]
    #[inline]
    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> Result<GmemSlices<'a>, GuestMemoryError> {
        let len = u64::try_from(count).unwrap_or(u64::MAX);
        if count > 0 && addr.0.checked_add(len - 1).is_none() {
            return Err(self.wraps(addr.0, count, access));
        }
        Ok(GmemSlices {
            mem: self,
            addr: addr.0,
            count,
            done: 0,
            access,
        })
    }
}

impl GmemMemory {
    /// Refuses a request whose end wraps (out of line: the device's path stays small).
    #[cold]
    #[inline(never)]
    fn wraps(&self, gpa: u64, count: usize, access: Permissions) -> GuestMemoryError {
        let r = Refusal::Wraps {
            gpa,
            len: u64::try_from(count).unwrap_or(u64::MAX),
        };
        self.refuse(r, gpa, count, access);
        r.into_error()
    }

    /// Why `check_range` would be false for this request (nothing is held or recorded).
    pub fn check(&self, gpa: u64, count: usize, access: Permissions) -> Result<(), Refusal> {
        let _ = access;
        let len = u64::try_from(count).unwrap_or(u64::MAX);
        if count == 0 {
            return Ok(());
        }
        let Some(last) = gpa.checked_add(len - 1) else {
            return Err(Refusal::Wraps { gpa, len });
        };
        let mut at = gpa;
        loop {
            let region = self.find(at).ok_or(Refusal::Hole { gpa: at })?;
            let region_last = region.gpa + (region.len - 1);
            let part_last = region_last.min(last);
            region.check(at, part_last - at + 1)?;
            if part_last == last {
                return Ok(());
            }
            at = part_last + 1;
        }
    }
}

/// The type vm-memory's `GuestMemory::PhysicalMemory` names for the adapter. It has no
/// values: the adapter never exposes an unchecked physical view
/// ([`GuestMemory::physical_memory`] is `None`), since that would bypass the checks.
#[derive(Debug)]
pub enum NoPhysicalMemory {}

impl GuestMemoryRegion for NoPhysicalMemory {
    type B = ();

    fn len(&self) -> GuestUsize {
        match *self {}
    }

    fn start_addr(&self) -> GuestAddress {
        match *self {}
    }

    fn bitmap(&self) {
        match *self {}
    }
}

impl GuestMemoryRegionBytes for NoPhysicalMemory {}
