//! One device listener per guest memory file: the adapter's view of each page's state, and
//! the veto that keeps held pages shared.
//!
//! The listener ([`gmem::DeviceListener`]) keeps one byte per page of the file: *shared* (set
//! when a conversion to shared has committed, that is after gmem restored every host view),
//! *converting* (set in `prepare` of a conversion to private, cleared by its commit or abort)
//! and *poisoned* (set when gmem reports a memory failure, cleared when a punch-hole gives the
//! page fresh memory). A device's hold ([`crate::hold`]) is granted only on pages that are
//! exactly *shared* (not converting, not poisoned), so the host view the slice points into
//! maps them; `prepare` vetoes (`EAGAIN`, naming the first held page) when a hold exists. The
//! state starts from the snapshot gmem takes when it registers the listener, replayed under
//! the same lock the commits take, so no conversion or poison is lost or applied twice.
//!
//! A page poisoned while a device holds it faults in the host view (gmem's marker), as a
//! touch of a failed page does; the adapter refuses new holds on it from the moment gmem
//! tells its listeners, just after the marker is in place.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};

use gmem::{
    Attr, Conversion, ConversionListener, DeviceListener, DeviceListenerId, Errno, FileId,
    GuestMemfd, Veto, PAGE_SIZE,
};

use crate::hold::{self, Slot};

const SHARED: u8 = 1;
const CONVERTING: u8 = 2;
const POISONED: u8 = 4;

/// The listener: page states of one file.
#[derive(Debug)]
pub(crate) struct Core {
    state: Box<[AtomicU8]>,
    /// Taken by every change but `prepare`/`abort` (which only flip `CONVERTING`), and across
    /// the registration and the replay of its snapshot.
    changes: Mutex<()>,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, ()> {
        self.changes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The states of the pages of `[offset, offset + len)`, clipped to the file.
    fn pages(&self, offset: u64, len: u64) -> &[AtomicU8] {
        let n = self.state.len();
        let first = usize::try_from(offset / PAGE_SIZE).unwrap_or(n).min(n);
        let end = usize::try_from(offset.saturating_add(len).div_ceil(PAGE_SIZE))
            .unwrap_or(n)
            .clamp(first, n);
        &self.state[first..end]
    }

    fn key(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }
}

impl ConversionListener for Core {
    fn prepare(&self, conv: &Conversion) -> Result<(), Veto> {
        if conv.to == Attr::Shared {
            return Ok(());
        }
        let pages = self.pages(conv.offset, conv.len);
        for s in pages {
            s.fetch_or(CONVERTING, Ordering::Relaxed);
        }
        // After the marks, the barrier on every thread, then the scan: either a device's
        // slot is seen here, or the device sees the mark (see `crate::hold`).
        let first = conv.offset / PAGE_SIZE;
        let end = first + to_u64(pages.len());
        if let Some(p) = hold::first_held(self.key(), first, end) {
            for s in pages {
                s.fetch_and(!CONVERTING, Ordering::Relaxed);
            }
            return Err(Veto {
                offset: p * PAGE_SIZE,
                reason: "a device holds the page through a vm-memory slice".into(),
            });
        }
        Ok(())
    }

    fn commit(&self, conv: &Conversion) {
        let _g = self.lock();
        for s in self.pages(conv.offset, conv.len) {
            match conv.to {
                Attr::Shared => s.fetch_or(SHARED, Ordering::Release),
                Attr::Private => s.fetch_and(!(SHARED | CONVERTING), Ordering::Release),
            };
        }
    }

    fn abort(&self, conv: &Conversion) {
        if conv.to == Attr::Private {
            for s in self.pages(conv.offset, conv.len) {
                s.fetch_and(!CONVERTING, Ordering::Relaxed);
            }
        }
    }
}

impl DeviceListener for Core {
    fn poisoned(&self, offset: u64) {
        let _g = self.lock();
        for s in self.pages(offset, PAGE_SIZE) {
            s.fetch_or(POISONED, Ordering::Release);
        }
    }

    fn unpoisoned(&self, offset: u64, len: u64) {
        let _g = self.lock();
        for s in self.pages(offset, len) {
            s.fetch_and(!POISONED, Ordering::Release);
        }
    }
}

fn to_u64(v: usize) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// Why a page cannot be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Denied {
    Private(u64),
    Converting(u64),
    Poisoned(u64),
}

impl Denied {
    /// Why the page at byte offset `page`, in state `v` (not exactly `SHARED`), is refused.
    #[cold]
    fn of(v: u8, page: u64) -> Denied {
        if v & POISONED != 0 {
            Denied::Poisoned(page)
        } else if v & CONVERTING != 0 {
            Denied::Converting(page)
        } else {
            Denied::Private(page)
        }
    }
}

/// A registered listener; dropping the last reference unregisters it.
#[derive(Debug)]
pub(crate) struct Tracker {
    core: Arc<Core>,
    file: GuestMemfd,
    id: DeviceListenerId,
    key: FileId,
}

fn trackers() -> MutexGuard<'static, HashMap<FileId, Weak<Tracker>>> {
    static MAP: LazyLock<Mutex<HashMap<FileId, Weak<Tracker>>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));
    // A poisoned lock still holds a consistent map (entries are inserted whole).
    MAP.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tracker {
    /// The tracker of `file` (the owner's handle), registering one if there is none.
    pub fn for_file(file: &GuestMemfd, key: FileId) -> std::io::Result<Arc<Tracker>> {
        let mut map = trackers();
        if let Some(t) = map.get(&key).and_then(Weak::upgrade) {
            return Ok(t);
        }
        let pages = usize::try_from(file.size() / PAGE_SIZE)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let core = Arc::new(Core {
            state: (0..pages).map(|_| AtomicU8::new(0)).collect(),
            changes: Mutex::new(()),
        });
        let id = {
            // Held across the registration and the replay: every change gmem tells after its
            // snapshot waits for the replay, and lands on top of it.
            let _g = core.lock();
            let (id, snap) = file
                .add_device_listener(core.clone())
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
            for run in &snap.runs {
                let bit = if run.attr == Attr::Shared { SHARED } else { 0 };
                for s in core.pages(run.offset, run.len) {
                    // `CONVERTING` may already be set by a `prepare` since the snapshot.
                    let keep = s.load(Ordering::Relaxed) & CONVERTING;
                    s.store(keep | bit, Ordering::Release);
                }
            }
            for &p in &snap.poisoned {
                for s in core.pages(p, PAGE_SIZE) {
                    s.fetch_or(POISONED, Ordering::Release);
                }
            }
            id
        };
        let t = Arc::new(Tracker {
            core,
            file: file.clone(),
            id,
            key,
        });
        map.insert(key, Arc::downgrade(&t));
        Ok(t)
    }

    /// The device path's handle on this tracker. It must not outlive the tracker: keep the
    /// `Arc<Tracker>` next to it.
    pub fn fast(&self) -> Fast {
        Fast {
            key: self.core.key(),
            states: std::ptr::NonNull::from(&*self.core.state).cast(),
            pages: self.core.state.len(),
        }
    }

    /// Whether every page of `[first, end)` is shared, not converting and not poisoned (no
    /// hold taken).
    pub fn accessible(&self, first: u64, end: u64) -> Result<(), Denied> {
        for p in first..end {
            let v = usize::try_from(p)
                .ok()
                .and_then(|i| self.core.state.get(i))
                .map_or(0, |s| s.load(Ordering::Acquire));
            if v != SHARED {
                return Err(Denied::of(v, p * PAGE_SIZE));
            }
        }
        Ok(())
    }
}

/// A tracker as the device's hold sees it: its key and its page states, without the pointer
/// chase through the tracker and its listener (three dependent loads on every hold).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fast {
    key: usize,
    states: std::ptr::NonNull<AtomicU8>,
    pages: usize,
}

// SAFETY: `states` points to the `pages` atomic bytes of a tracker's listener, which the
// holder of a `Fast` keeps alive (an `Arc<Tracker>` beside it, `Tracker::fast`); atomics may
// be read from any thread.
unsafe impl Send for Fast {}
// SAFETY: as for `Send`: shared access is to atomics only.
unsafe impl Sync for Fast {}

impl Fast {
    /// Holds file pages `[first, end)` for the calling thread. `Ok(None)`: the slot path
    /// cannot carry this hold; take a gmem pin instead.
    #[inline(always)]
    pub fn hold(
        &self,
        first: u64,
        end: u64,
        dirty: usize,
        origin: usize,
    ) -> Result<Option<&'static Slot>, Denied> {
        let (Ok(a), Ok(b)) = (usize::try_from(first), usize::try_from(end)) else {
            return Ok(None);
        };
        // SAFETY: `states` is the start of `pages` live atomic bytes (see `Send`).
        let all = unsafe { std::slice::from_raw_parts(self.states.as_ptr(), self.pages) };
        let Some(states) = all.get(a..b) else {
            return Ok(None);
        };
        let Some(slot) = hold::record(self.key, first, end, dirty, origin) else {
            return Ok(None);
        };
        for (i, s) in states.iter().enumerate() {
            let v = s.load(Ordering::Acquire);
            if v != SHARED {
                slot.unshare();
                return Err(Denied::of(v, (first + to_u64(i)) * PAGE_SIZE));
            }
        }
        Ok(Some(slot))
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.file.remove_device_listener(self.id);
        let mut map = trackers();
        if map.get(&self.key).is_some_and(|w| w.strong_count() == 0) {
            map.remove(&self.key);
        }
    }
}
