//! One conversion listener per guest memory file: the adapter's view of each page's state, and
//! the veto that keeps held pages shared.
//!
//! The listener keeps one byte per page of the file: *shared* (set when a conversion to shared
//! has committed, that is after gmem restored every host view) and *converting* (set in
//! `prepare` of a conversion to private, cleared by its commit or abort). A device's hold
//! ([`crate::hold`]) is granted only on pages that are shared and not converting, so the
//! host view the slice points into always maps them; `prepare` vetoes (`EAGAIN`, naming the
//! first held page) when a hold exists. The state is read once at registration under the
//! same lock the commits take, so a conversion racing the registration is never lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};

use gmem::{
    Attr, Conversion, ConversionListener, Errno, FileId, GuestMemfd, ListenerId, Veto, PAGE_SIZE,
};

use crate::hold::{self, Slot};

const SHARED: u8 = 1;
const CONVERTING: u8 = 2;

/// The listener: page states of one file.
#[derive(Debug)]
pub(crate) struct Core {
    state: Box<[AtomicU8]>,
    commits: Mutex<()>,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, ()> {
        self.commits.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pages(&self, conv: &Conversion) -> std::ops::Range<usize> {
        let n = self.state.len();
        let first = usize::try_from(conv.offset / PAGE_SIZE).unwrap_or(n).min(n);
        let end = usize::try_from(conv.offset.saturating_add(conv.len).div_ceil(PAGE_SIZE))
            .unwrap_or(n)
            .min(n);
        first..end
    }

    fn key(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    fn clear_converting(&self, pages: std::ops::Range<usize>) {
        for s in &self.state[pages] {
            s.fetch_and(!CONVERTING, Ordering::Relaxed);
        }
    }
}

impl ConversionListener for Core {
    fn prepare(&self, conv: &Conversion) -> Result<(), Veto> {
        if conv.to == Attr::Shared {
            return Ok(());
        }
        let pages = self.pages(conv);
        for s in &self.state[pages.clone()] {
            s.fetch_or(CONVERTING, Ordering::Relaxed);
        }
        let (first, end) = (to_u64(pages.start), to_u64(pages.end));
        if let Some(p) = hold::first_held(self.key(), first, end) {
            self.clear_converting(pages);
            return Err(Veto {
                offset: p * PAGE_SIZE,
                reason: "a device holds the page through a vm-memory slice".into(),
            });
        }
        Ok(())
    }

    fn commit(&self, conv: &Conversion) {
        let _g = self.lock();
        let pages = self.pages(conv);
        let v = if conv.to == Attr::Shared { SHARED } else { 0 };
        for s in &self.state[pages] {
            s.store(v, Ordering::Release);
        }
    }

    fn abort(&self, conv: &Conversion) {
        if conv.to == Attr::Private {
            self.clear_converting(self.pages(conv));
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

/// A registered listener; dropping the last reference unregisters it.
#[derive(Debug)]
pub(crate) struct Tracker {
    core: Arc<Core>,
    file: GuestMemfd,
    id: ListenerId,
    key: FileId,
}

fn trackers() -> MutexGuard<'static, HashMap<FileId, Weak<Tracker>>> {
    static MAP: LazyLock<Mutex<HashMap<FileId, Weak<Tracker>>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));
    // A poisoned lock still holds a consistent map (entries are inserted whole).
    MAP.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tracker {
    /// The tracker of `file`, registering one if there is none.
    pub fn for_file(file: &GuestMemfd, key: FileId) -> std::io::Result<Arc<Tracker>> {
        let mut map = trackers();
        if let Some(t) = map.get(&key).and_then(Weak::upgrade) {
            return Ok(t);
        }
        let pages = usize::try_from(file.size() / PAGE_SIZE)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let core = Arc::new(Core {
            state: (0..pages).map(|_| AtomicU8::new(0)).collect(),
            commits: Mutex::new(()),
        });
        let g = core.lock();
        let id = file.add_listener(core.clone());
        // Registered: every conversion from here on is heard. Read the state under the commit
        // lock, keeping `CONVERTING` bits a prepare may already have set.
        let runs = match file.runs(0, file.size()) {
            Ok(r) => r,
            Err(e) => {
                drop(g);
                file.remove_listener(id);
                return Err(std::io::Error::from_raw_os_error(e.errno()));
            }
        };
        for run in runs {
            let first = usize::try_from(run.offset / PAGE_SIZE).unwrap_or(pages);
            let end = usize::try_from((run.offset + run.len) / PAGE_SIZE).unwrap_or(pages);
            for s in &core.state[first.min(pages)..end.min(pages)] {
                if run.attr == Attr::Shared {
                    s.fetch_or(SHARED, Ordering::Release);
                } else {
                    s.fetch_and(!SHARED, Ordering::Release);
                }
            }
        }
        drop(g);
        let t = Arc::new(Tracker {
            core,
            file: file.clone(),
            id,
            key,
        });
        map.insert(key, Arc::downgrade(&t));
        Ok(t)
    }

    /// Holds file pages `[first, end)` for the calling thread. `Ok(None)`: the slot path
    /// cannot carry this hold; take a gmem pin instead.
    #[inline(always)]
    pub fn hold(
        &self,
        first: u64,
        end: u64,
        dirty: usize,
    ) -> Result<Option<&'static Slot>, Denied> {
        let Some(slot) = hold::record(self.core.key(), first, end, dirty) else {
            return Ok(None);
        };
        let (a, b) = (
            usize::try_from(first).unwrap_or(usize::MAX),
            usize::try_from(end).unwrap_or(usize::MAX),
        );
        let Some(states) = self.core.state.get(a..b) else {
            slot.unshare();
            return Ok(None);
        };
        for (i, s) in states.iter().enumerate() {
            let v = s.load(Ordering::Acquire);
            if v != SHARED {
                slot.unshare();
                let page = (first + to_u64(i)) * PAGE_SIZE;
                return Err(if v & CONVERTING != 0 {
                    Denied::Converting(page)
                } else {
                    Denied::Private(page)
                });
            }
        }
        for p in first..end {
            if self.file.is_poisoned(p * PAGE_SIZE) {
                slot.unshare();
                return Err(Denied::Poisoned(p * PAGE_SIZE));
            }
        }
        Ok(Some(slot))
    }

    /// True when every page of `[first, end)` is shared, not converting and not poisoned
    /// (no hold taken).
    pub fn accessible(&self, first: u64, end: u64) -> Result<(), Denied> {
        for p in first..end {
            let v = usize::try_from(p)
                .ok()
                .and_then(|i| self.core.state.get(i))
                .map_or(0, |s| s.load(Ordering::Acquire));
            if v != SHARED {
                return Err(if v & CONVERTING != 0 {
                    Denied::Converting(p * PAGE_SIZE)
                } else {
                    Denied::Private(p * PAGE_SIZE)
                });
            }
            if self.file.is_poisoned(p * PAGE_SIZE) {
                return Err(Denied::Poisoned(p * PAGE_SIZE));
            }
        }
        Ok(())
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.file.remove_listener(self.id);
        let mut map = trackers();
        if map.get(&self.key).is_some_and(|w| w.strong_count() == 0) {
            map.remove(&self.key);
        }
    }
}
