//! Host references that cost no shared atomic operation on the device's path.
//!
//! A device reads a descriptor, a ring index or a packet many millions of times a second; an
//! atomic read-modify-write on a counter shared with every other device thread costs more than
//! the access itself (about 7 ns here, against 5 ns for a whole `read_obj::<u64>` through
//! `GuestMemoryMmap`). So a hold is recorded in a *slot* of a table owned by the calling
//! thread, with plain stores, and the rare side — a conversion to private — pays instead:
//!
//! - device thread: write the slot (tracker, page range), compiler barrier, then read the
//!   pages' state; refuse (and free the slot) unless every page is shared and no conversion
//!   is preparing;
//! - conversion (a [`gmem::ConversionListener`]'s `prepare`): mark the pages *converting*,
//!   then `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which makes every thread of the
//!   process execute a full memory barrier, then scan every table for a slot on those pages.
//!
//! This is the asymmetric Dekker pattern (`membarrier(2)`: "barrier() on the fast path,
//! membarrier on the slow path"): either the conversion sees the slot and vetoes (`EAGAIN`
//! naming the page), or the device sees the page converting and refuses. Both may happen
//! (a device that was refused leaves a conversion that was vetoed): a spurious `EAGAIN` the
//! guest retries, exactly like the kernel's transient page references.
//!
//! Slots are shared by sub-slices through a count that only the owning thread touches:
//! `VolatileSlice` is `!Send`, and so is everything holding a slot. A thread that holds more
//! than [`SLOTS`] slices at once, a range the slot encoding cannot carry, or a process where
//! `membarrier` is unavailable falls back to a [`gmem::Pin`] per slice (correct, slower).
//!
//! Regions that hold with pins (HugeTLB, or asked for) keep each slice's [`gmem::Pin`] in a slot
//! too, with no tracker (the pin is what gmem checks): sub-slices share it through the same
//! count, and no allocation is made per slice.
//!
//! Tables are never freed: a thread's table goes back to a pool when the thread ends and the
//! next new thread takes it, so their number is the largest number of threads that ever held
//! slices at once.

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Slots per thread: more than a virtio queue of 256 descriptors holds through one `Reader`
/// and one `Writer` in the common case; past it, holds become gmem pins.
pub const SLOTS: usize = 512;

const WORDS: usize = SLOTS / 64;

/// One hold: which tracker, which pages, how many slices share it.
#[derive(Debug)]
pub(crate) struct Slot {
    /// Address of the tracker the pages belong to; 0 when the slot is free.
    tracker: AtomicUsize,
    /// `first_page << 32 | end_page`, file pages.
    range: AtomicU64,
    /// Slices sharing the slot. Touched by the owning thread only.
    shares: AtomicU32,
    /// Index of the slot in its table.
    index: u32,
    table: AtomicUsize,
    /// Address of the dirty log of the region the slice is in (0: none). Owning thread only.
    dirty: AtomicUsize,
    /// Host address of the region's first byte in the mapping the slices point into (for
    /// the dirty log). Owning thread only.
    origin: AtomicUsize,
    /// The gmem pin of a slot that holds with one (its `tracker` is 0). Owning thread only.
    pin: UnsafeCell<Option<gmem::Pin>>,
}

// SAFETY: other threads (a conversion's scan) read a slot's atomics only; `pin`, the one
// non-atomic field, is touched only by the thread that owns the slot's table (it took the
// slot, and the `!Send` slices sharing it live and drop there).
unsafe impl Sync for Slot {}

/// The slots of one thread.
#[derive(Debug)]
pub(crate) struct Table {
    slots: Box<[Slot]>,
    /// Free slots, one bit each. Touched by the owning thread only.
    free: [AtomicU64; WORDS],
    /// True while a thread owns the table.
    owned: AtomicBool,
}

impl Table {
    fn new() -> &'static Table {
        let slots = (0..SLOTS)
            .map(|i| Slot {
                tracker: AtomicUsize::new(0),
                range: AtomicU64::new(0),
                shares: AtomicU32::new(0),
                index: u32::try_from(i).unwrap_or(0),
                table: AtomicUsize::new(0),
                dirty: AtomicUsize::new(0),
                origin: AtomicUsize::new(0),
                pin: UnsafeCell::new(None),
            })
            .collect();
        let table: &'static Table = Box::leak(Box::new(Table {
            slots,
            free: std::array::from_fn(|_| AtomicU64::new(u64::MAX)),
            owned: AtomicBool::new(true),
        }));
        let addr = std::ptr::from_ref(table) as usize;
        for s in table.slots.iter() {
            s.table.store(addr, Ordering::Relaxed);
        }
        table
    }

    /// Takes a free slot (owning thread only).
    #[inline]
    fn take(&self) -> Option<&Slot> {
        for (w, word) in self.free.iter().enumerate() {
            let bits = word.load(Ordering::Relaxed);
            if bits != 0 {
                let bit = bits.trailing_zeros();
                word.store(bits & !(1u64 << bit), Ordering::Relaxed);
                let i = w * 64 + usize::try_from(bit).unwrap_or(0);
                return self.slots.get(i);
            }
        }
        None
    }

    /// Returns a slot (owning thread only).
    #[inline]
    fn give_back(&self, index: u32) {
        let i = usize::try_from(index).unwrap_or(0);
        let (w, bit) = (i / 64, i % 64);
        if let Some(word) = self.free.get(w) {
            word.store(
                word.load(Ordering::Relaxed) | (1u64 << bit),
                Ordering::Relaxed,
            );
        }
    }
}

/// Every table ever made, for the conversion's scan; and the tables no thread owns.
struct Registry {
    all: Vec<&'static Table>,
    pool: Vec<&'static Table>,
}

fn registry() -> MutexGuard<'static, Registry> {
    static REG: Mutex<Registry> = Mutex::new(Registry {
        all: Vec::new(),
        pool: Vec::new(),
    });
    REG.lock().unwrap_or_else(|e| e.into_inner())
}

/// Gives the thread's table back to the pool when the thread ends.
struct Owner(&'static Table);

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = TABLE.try_with(|t| t.set(None));
        self.0.owned.store(false, Ordering::Relaxed);
        registry().pool.push(self.0);
    }
}

thread_local! {
    static TABLE: Cell<Option<&'static Table>> = const { Cell::new(None) };
    static OWNER: Cell<Option<Owner>> = const { Cell::new(None) };
}

#[inline(always)]
fn my_table() -> Option<&'static Table> {
    if let Ok(Some(t)) = TABLE.try_with(Cell::get) {
        return Some(t);
    }
    first_table()
}

/// The calling thread's first hold: takes a table from the pool or makes one.
#[cold]
#[inline(never)]
fn first_table() -> Option<&'static Table> {
    if !fast_path_available() {
        return None;
    }
    let table = {
        let mut reg = registry();
        match reg.pool.pop() {
            Some(t) => {
                t.owned.store(true, Ordering::Relaxed);
                t
            }
            None => {
                let t = Table::new();
                reg.all.push(t);
                t
            }
        }
    };
    // A thread that is ending cannot keep a table: give it back at once and use pins.
    if OWNER.try_with(|o| o.set(Some(Owner(table)))).is_err() {
        table.owned.store(false, Ordering::Relaxed);
        registry().pool.push(table);
        return None;
    }
    TABLE.try_with(|t| t.set(Some(table))).ok()?;
    Some(table)
}

const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

/// True when this process may use the slot path: `membarrier` private expedited works.
pub fn fast_path_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        // SAFETY: membarrier takes no pointer; registering only changes this process's
        // scheduler state.
        let r = unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
                0,
                0,
            )
        };
        r == 0 && heavy_barrier()
    })
}

/// A full memory barrier on every running thread of the process.
fn heavy_barrier() -> bool {
    // SAFETY: membarrier takes no pointer.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) };
    r == 0
}

/// A hold recorded in the calling thread's table, or nothing when the slot path is not
/// available (no table, none free, a range it cannot encode).
#[inline(always)]
pub(crate) fn record(
    tracker: usize,
    first: u64,
    end: u64,
    dirty: usize,
    origin: usize,
) -> Option<&'static Slot> {
    let (Ok(first32), Ok(end32)) = (u32::try_from(first), u32::try_from(end)) else {
        return None;
    };
    let slot = my_table()?.take()?;
    slot.range.store(
        (u64::from(first32) << 32) | u64::from(end32),
        Ordering::Relaxed,
    );
    slot.tracker.store(tracker, Ordering::Relaxed);
    slot.shares.store(1, Ordering::Relaxed);
    slot.dirty.store(dirty, Ordering::Relaxed);
    slot.origin.store(origin, Ordering::Relaxed);
    // The asymmetric barrier's fast side: the slot is written before the state is read; the
    // conversion's `membarrier` orders the hardware.
    compiler_fence(Ordering::SeqCst);
    Some(slot)
}

/// A slot of the calling thread holding `pin` (no tracker: gmem checks the pin), or the pin
/// back when the thread has no free slot.
#[inline]
pub(crate) fn record_pin(
    pin: gmem::Pin,
    dirty: usize,
    origin: usize,
) -> Result<&'static Slot, gmem::Pin> {
    let Some(slot) = my_table().and_then(Table::take) else {
        return Err(pin);
    };
    // SAFETY: the slot was just taken from the calling thread's table: no other reference to
    // its pin exists (see `Sync for Slot`).
    unsafe { *slot.pin.get() = Some(pin) };
    slot.shares.store(1, Ordering::Relaxed);
    slot.dirty.store(dirty, Ordering::Relaxed);
    slot.origin.store(origin, Ordering::Relaxed);
    Ok(slot)
}

impl Slot {
    /// True when the slot holds with a gmem pin (owning thread only).
    pub(crate) fn holds_pin(&self) -> bool {
        // SAFETY: called by the owning thread only (see `Sync for Slot`); a shared read.
        unsafe { (*self.pin.get()).is_some() }
    }

    /// The dirty log address recorded with the hold (0: none).
    #[inline]
    pub(crate) fn dirty(&self) -> usize {
        self.dirty.load(Ordering::Relaxed)
    }

    /// Where the hold's region starts in the mapping its slices point into.
    #[inline]
    pub(crate) fn origin(&self) -> usize {
        self.origin.load(Ordering::Relaxed)
    }

    /// One more slice shares the slot (owning thread only).
    #[inline]
    pub(crate) fn share(&self) {
        let n = self.shares.load(Ordering::Relaxed);
        self.shares.store(n.saturating_add(1), Ordering::Relaxed);
    }

    /// One slice sharing the slot is gone; the last one frees it (owning thread only).
    #[inline]
    pub(crate) fn unshare(&self) {
        let n = self.shares.load(Ordering::Relaxed);
        if n > 1 {
            self.shares.store(n - 1, Ordering::Relaxed);
            return;
        }
        self.shares.store(0, Ordering::Relaxed);
        // Release: the device's accesses through the slice happen before the page is seen
        // free by a conversion that then revokes it.
        self.tracker.store(0, Ordering::Release);
        // SAFETY: owning thread only (see `Sync for Slot`); the last slice sharing the slot
        // is going, so nothing else refers to the pin.
        let pin = unsafe { (*self.pin.get()).take() };
        let table = self.table.load(Ordering::Relaxed) as *const Table;
        // SAFETY: `table` is the address of the leaked, never-freed table this slot is part
        // of (set once at creation).
        let table = unsafe { &*table };
        table.give_back(self.index);
        drop(pin);
    }
}

/// The first page of `[first, end)` that some thread holds for `tracker`, after a full
/// barrier on every thread. `None` also when the barrier fails (then no slot was ever
/// handed out: the slot path is off).
pub(crate) fn first_held(tracker: usize, first: u64, end: u64) -> Option<u64> {
    if !fast_path_available() {
        return None;
    }
    // Without the barrier, a hold recorded just before might not be visible yet; treat a
    // failure (which registration ruled out) as every page held.
    if !heavy_barrier() {
        return Some(first);
    }
    let reg = registry();
    let mut found: Option<u64> = None;
    for table in reg.all.iter() {
        for s in table.slots.iter() {
            if s.tracker.load(Ordering::Acquire) != tracker {
                continue;
            }
            let r = s.range.load(Ordering::Relaxed);
            let (a, b) = (r >> 32, r & 0xffff_ffff);
            if a < end && first < b {
                let p = a.max(first);
                found = Some(found.map_or(p, |f| f.min(p)));
            }
        }
    }
    found
}
