//! When the VMM itself moves or unmaps a view: the view userfaultfd's events, read by one
//! thread per file, and the *neutralisation* that follows.
//!
//! Views of shmem and HugeTLB files are registered with a userfaultfd that has
//! `UFFD_FEATURE_EVENT_REMAP` and `UFFD_FEATURE_EVENT_UNMAP`: an `mremap` (move, grow,
//! `MREMAP_DONTUNMAP`), `munmap` or `MAP_FIXED` over a registered range stops the calling
//! thread until the event is read. The reader takes the file's control lock *before* it
//! reads, so the thread that moved the view is still stopped while gmem:
//!
//! 1. finds every mapping of the file (or of its companion file of HugeTLB pieces) that
//!    still carries the view registration but is no longer a view gmem knows — the moved
//!    view, its grown part, the target of a `MREMAP_DONTUNMAP` — and replaces it with an
//!    empty mapping: every touch there is `SIGBUS`, so the alias shows nothing. "This
//!    file's registration" is the kernel's answer, not a guess from `/proc`: a mapping
//!    registered with another userfaultfd (the views and guest mapping of a second engine
//!    of the same file in this process, such as a follower served in-process) is that
//!    engine's to track and is left alone;
//! 2. gives up each view that is no longer whole at its address (gmem never touches that
//!    address range again, and the view's owner gets `SIGBUS`/`SIGSEGV` there);
//! 3. puts the markers of every remaining view back (a `MREMAP_DONTUNMAP` leaves the old
//!    range mapped but moves its markers away).
//!
//! Only then is the event read and the thread released: what it gets back from `mremap` is
//! a range that faults. Events are read one per neutralisation, and only one that was
//! pending, with the control lock held, before the look: a move made while the mappings
//! were being looked at has its event queued after the look, and is neutralised by the next
//! one before its thread goes on. The view cannot grow in place (a fence page follows every
//! view), so every growth is a move.
//!
//! gmem's own remaps of registered ranges (a HugeTLB window replaced at a split, a merge, or a
//! whole huge page's conversion) announce the ranges they expect events for. A replacement
//! is built aside and registered *before* it moves over the window, so no moment leaves a
//! mapping of the file at a view's address that nothing tracks. A foreign event that arrives
//! meanwhile (a remap of a view is always foreign: gmem moves only its asides) is read at
//! once, which lets the VMM's thread go on, and neutralised before the operation returns; so
//! is a view that gmem finds gone under it (`ENOMEM`/`ENOENT` where it was, and nothing
//! mapped there). An announcement wakes the reader if it sleeps, and the reader takes events
//! as they come for as long as the announcement lasts, so the remapping thread does not wait
//! for a wake-up at each event (`follow_own`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, TryLockError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::sys::uffd::{Event, Uffd};

/// gmem's own remaps of registered ranges, announced to the reader.
#[derive(Debug)]
pub(crate) struct OwnOps {
    active: AtomicUsize,
    expected: Mutex<Expected>,
    foreign: AtomicBool,
    /// The reader holds an event it could not neutralise: the control lock was taken.
    waiting: AtomicBool,
    /// Announcements started so far (the reader compares it with the count it last followed).
    starts: AtomicU64,
    /// The reader is in (or about to enter) its poll.
    asleep: AtomicBool,
    /// Wakes the reader when an announcement starts (an eventfd), so that it is awake
    /// before the announced remaps raise their events: a thread stopped on an event
    /// otherwise waits for the reader's wake-up.
    wake: OwnedFd,
}

/// Address ranges gmem's own remaps raise events for.
#[derive(Debug, Default)]
struct Expected {
    /// Ranges that may be unmapped (replaced windows, asides that failed to move).
    unmaps: Vec<(u64, u64)>,
    /// Registered mappings built aside that move over a window.
    moves: Vec<(u64, u64)>,
}

impl OwnOps {
    fn new() -> io::Result<Self> {
        Ok(OwnOps {
            active: AtomicUsize::new(0),
            expected: Mutex::default(),
            foreign: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
            starts: AtomicU64::new(0),
            asleep: AtomicBool::new(false),
            wake: eventfd()?,
        })
    }

    /// Announces remaps of `ranges` (addresses) until the guard is dropped.
    pub fn expect(self: &Arc<Self>, ranges: &[(usize, usize)]) -> OwnGuard {
        self.lock()
            .unmaps
            .extend(ranges.iter().map(|&(a, l)| (a as u64, (a + l) as u64)));
        self.active.fetch_add(1, Ordering::AcqRel);
        // Sequentially consistent with the reader's `asleep` store and `starts` load: the
        // reader either sees the new start before it polls or is woken here. Only the speed
        // of the events' reading depends on it, never what is read as own.
        self.starts.fetch_add(1, Ordering::SeqCst);
        if self.asleep.load(Ordering::SeqCst) {
            notify(&self.wake);
        }
        OwnGuard { own: self.clone() }
    }

    /// Announces a registered mapping built aside at `[addr, addr + len)`, about to move
    /// over a window (or to be unmapped if the move fails), under an active announcement.
    pub fn expect_aside(&self, addr: usize, len: usize) {
        let r = (addr as u64, (addr + len) as u64);
        let mut exp = self.lock();
        exp.unmaps.push(r);
        exp.moves.push(r);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Expected> {
        self.expected.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire) > 0
    }

    fn is_expected(&self, ev: &Event) -> bool {
        Self::expected_in(&self.lock(), ev)
    }

    fn expected_in(exp: &Expected, ev: &Event) -> bool {
        let inside = |v: &[(u64, u64)], a: u64, b: u64| v.iter().any(|&(s, e)| a >= s && b <= e);
        match *ev {
            Event::Unmap { start, end } => inside(&exp.unmaps, start, end),
            // gmem moves only its own asides: a view's window that moved was moved by the
            // VMM, whatever gmem was doing meanwhile.
            Event::Remap { from, len, .. } => inside(&exp.moves, from, from.saturating_add(len)),
            Event::Other => true,
        }
    }

    /// Records a change gmem found the VMM made to a view (a view moved or unmapped under a
    /// conversion): it is neutralised when the conversion ends.
    pub fn note_foreign(&self) {
        self.foreign.store(true, Ordering::Release);
    }

    /// True while the reader holds an event and waits for the control lock.
    pub fn reader_waits(&self) -> bool {
        self.waiting.load(Ordering::Acquire)
    }

    /// True (once) when a foreign event arrived during an own remap.
    pub fn take_foreign(&self) -> bool {
        // A load first: almost every conversion finds none and writes nothing.
        self.foreign.load(Ordering::Acquire) && self.foreign.swap(false, Ordering::AcqRel)
    }
}

/// Ends an announcement of own remaps.
#[derive(Debug)]
pub(crate) struct OwnGuard {
    own: Arc<OwnOps>,
}

impl Drop for OwnGuard {
    fn drop(&mut self) {
        let last = self.own.active.fetch_sub(1, Ordering::AcqRel) == 1;
        // Taking the lock waits for a read of events as own that is under way: once the last
        // guard is gone, every event read as own is recorded, so the caller's
        // `take_foreign` that follows sees a foreign one among them.
        let mut exp = self.own.lock();
        if last {
            *exp = Expected::default();
        }
    }
}

/// What the reader needs from the file.
pub(crate) trait Tracked: Send + Sync + 'static {
    /// Takes the control lock if it is free and, holding it, asks `pending` whether an event
    /// waits; if one does, neutralises, then calls `take` (which reads the oldest event,
    /// releasing the thread that raised it). False when the lock was held elsewhere.
    ///
    /// The question is asked under the lock, before the neutralisation looks at the
    /// mappings: the event the reader woke for may have been taken meanwhile (by a
    /// conversion's `settle`), and the oldest one then may come from a move made while the
    /// mappings were being looked at. Under the lock nobody else reads events, so the one
    /// `take` reads was pending before the look, and its move is in what was seen.
    fn try_neutralize(&self, pending: &dyn Fn() -> bool, take: &dyn Fn()) -> bool;
}

/// The reader thread of one file.
#[derive(Debug)]
pub(crate) struct Tracker {
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
    generation: u64,
    pub own: Arc<OwnOps>,
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer flags.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    let fd = crate::sys::cvt(fd)?;
    // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to eventfd `fd`'s counter, waking its poller. A full counter (`EAGAIN`) is
/// already readable, so a failure needs nothing more.
fn notify(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd the caller keeps open.
    let _ = unsafe {
        libc::write(
            fd.as_raw_fd(),
            (&one as *const u64).cast(),
            std::mem::size_of::<u64>(),
        )
    };
}

/// Resets eventfd `fd`'s counter (non-blocking: an empty counter is `EAGAIN`).
fn consume(fd: &OwnedFd) {
    let mut n: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64 from an eventfd the caller keeps open.
    let _ = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut n as *mut u64).cast(),
            std::mem::size_of::<u64>(),
        )
    };
}

impl Tracker {
    /// Starts the reader of `uffd` for `file`.
    pub fn spawn<T: Tracked>(uffd: Arc<Uffd>, file: Weak<T>) -> io::Result<Tracker> {
        let stop = eventfd()?;
        let stop_raw = stop.as_raw_fd();
        let own = Arc::new(OwnOps::new()?);
        let own2 = own.clone();
        let thread = std::thread::Builder::new()
            .name("gmem-views".into())
            .spawn(move || read_loop(&uffd, stop_raw, &own2, &file))?;
        Ok(Tracker {
            stop,
            thread: Some(thread),
            generation: crate::sys::fork::generation(),
            own,
        })
    }

    /// Reads the oldest pending event now (true when there was one), for a caller that holds
    /// the control lock and has just neutralised, as the reader does when it gets the lock.
    pub fn take_event(&self, uffd: &Uffd) -> bool {
        let got = read_one(uffd, &self.own);
        self.own.foreign.store(false, Ordering::Release);
        got
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if self.generation != crate::sys::fork::generation() {
            // A forked child: the thread exists only in the parent.
            if let Some(t) = self.thread.take() {
                std::mem::forget(t);
            }
            return;
        }
        notify(&self.stop);
        if let Some(t) = self.thread.take() {
            // The last handle of a file can be dropped by the reader itself (it holds the
            // file while it neutralises): it must not wait for itself.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// How long the reader keeps looking for the next event of an own remap before it sleeps,
/// once no own remap is announced.
const OWN_FOLLOW_UP: Duration = Duration::from_micros(200);

/// How long the reader keeps looking for the next event while an own remap is announced (a
/// split or merge announces from its freeze to its thaw, with a 2 MiB copy between two
/// events); past it, a silent announcement goes back to the poll.
const OWN_ANNOUNCED_WAIT: Duration = Duration::from_millis(2);

/// Reads every pending event; the unexpected ones mark a foreign event.
fn drain(uffd: &Uffd, own: &OwnOps) {
    while read_one(uffd, own) {}
}

/// While gmem's own remaps are announced: reads every pending event and says how many
/// (`None`, reading nothing, when none is announced). The record of expected ranges stays
/// locked meanwhile, so the announcement cannot end in the middle (see `OwnGuard::drop`).
fn drain_own(uffd: &Uffd, own: &OwnOps) -> Option<usize> {
    let exp = own.lock();
    if !own.is_active() {
        return None;
    }
    let mut n = 0;
    loop {
        match uffd.read_event() {
            Ok(Some(ev)) => {
                n += 1;
                if !OwnOps::expected_in(&exp, &ev) {
                    own.foreign.store(true, Ordering::Release);
                }
            }
            Ok(None) => return Some(n),
            Err(e) => {
                tracing::error!("reading the view userfaultfd: {e}");
                return Some(n);
            }
        }
    }
}

/// After reading events of gmem's own remaps: goes on taking them without sleeping for as
/// long as they keep coming at most [`OWN_ANNOUNCED_WAIT`] apart while an own remap is
/// announced, [`OWN_FOLLOW_UP`] once none is (a window replacement raises two, one after the
/// other; a split raises its second pair after copying the huge page, a merge after copying
/// it back; a conversion of many whole huge pages replaces one window after another). A
/// thread stopped on an event would otherwise wait for the reader's wake-up, and the wait
/// costs more than the spin. Returns when that time passes without one, or when an event
/// arrives outside an announcement (it is the caller's to neutralise).
fn follow_own(uffd: &Uffd, own: &OwnOps) {
    let mut last = std::time::Instant::now();
    loop {
        let wait = if own.is_active() {
            OWN_ANNOUNCED_WAIT
        } else {
            OWN_FOLLOW_UP
        };
        if last.elapsed() >= wait {
            return;
        }
        match drain_own(uffd, own) {
            Some(0) => {}
            Some(_) => last = std::time::Instant::now(),
            None if uffd.pending() => return,
            None => {}
        }
        std::hint::spin_loop();
    }
}

/// Reads the oldest pending event, if any (true when there was one); an unexpected one marks
/// a foreign event.
///
/// Outside gmem's own remaps, events are read one at a time, each right after a
/// neutralisation: reading an event lets the thread that raised it go on, and only an event
/// that was pending before the neutralisation looked at the mappings is sure to have its
/// move in what it saw (the move happens before its event is queued). Draining everything
/// after one neutralisation would let a move made in between go unneutralised.
fn read_one(uffd: &Uffd, own: &OwnOps) -> bool {
    match uffd.read_event() {
        Ok(Some(ev)) => {
            if !own.is_expected(&ev) {
                own.foreign.store(true, Ordering::Release);
            }
            true
        }
        Ok(None) => false,
        Err(e) => {
            tracing::error!("reading the view userfaultfd: {e}");
            false
        }
    }
}

fn read_loop<T: Tracked>(uffd: &Uffd, stop: i32, own: &OwnOps, file: &Weak<T>) {
    let poll = |fd: i32| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // The announcements followed so far.
    let mut seen = own.starts.load(Ordering::SeqCst);
    loop {
        let mut fds = [
            poll(uffd.as_fd().as_raw_fd()),
            poll(stop),
            poll(own.wake.as_raw_fd()),
        ];
        own.asleep.store(true, Ordering::SeqCst);
        let starts = own.starts.load(Ordering::SeqCst);
        // An announcement started since the last look: no sleep (see `OwnOps::expect`).
        let started = starts != seen;
        seen = starts;
        let n = if started {
            0
        } else {
            // SAFETY: `fds` is a valid array of three pollfd for the duration of the call.
            unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) }
        };
        own.asleep.store(false, Ordering::SeqCst);
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[2].revents != 0 {
            consume(&own.wake);
            // The start that woke the reader came after the load above.
            seen = own.starts.load(Ordering::SeqCst);
        }
        if started || fds[2].revents != 0 {
            // An announcement started: its events come soon, taken without a sleep. One
            // that stays silent past the follow-up is waited for in the poll again.
            follow_own(uffd, own);
            continue;
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        loop {
            if drain_own(uffd, own).is_some() {
                follow_own(uffd, own);
                // Back to the poll, which reports an event that arrived meanwhile.
                break;
            }
            let Some(f) = file.upgrade() else {
                drain(uffd, own);
                return;
            };
            let take = || {
                read_one(uffd, own);
                own.foreign.store(false, Ordering::Release);
            };
            if f.try_neutralize(&|| uffd.pending(), &take) {
                own.waiting.store(false, Ordering::Release);
                break;
            }
            own.waiting.store(true, Ordering::Release);
            drop(f);
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// Tries a lock without blocking: `None` when it is held elsewhere.
pub(crate) fn try_lock<G>(m: &Mutex<G>) -> Option<std::sync::MutexGuard<'_, G>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// Identities of the files a view may map, and gmem's own mappings that are not views.
#[derive(Debug, Clone)]
pub(crate) struct Known {
    /// `(dev, inode)` of the file and of its companion file of pieces.
    pub files: Vec<((u32, u32), u64)>,
    /// `(dev, inode)` of the empty memfd holes map.
    pub hole: Option<((u32, u32), u64)>,
    /// Address ranges of gmem's own mappings of the file (guest mapping, HugeTLB mappings).
    pub internal: Vec<(usize, usize)>,
}

impl Known {
    fn is_file(&self, v: &crate::sys::proc::Vma) -> bool {
        self.files.iter().any(|&(d, i)| d == v.dev && i == v.inode)
    }

    fn is_hole(&self, v: &crate::sys::proc::Vma) -> bool {
        self.hole.is_some_and(|(d, i)| d == v.dev && i == v.inode)
    }

    fn is_internal(&self, v: &crate::sys::proc::Vma) -> bool {
        self.internal
            .iter()
            .any(|&(a, l)| v.start >= a && v.end <= a + l)
    }
}

impl super::ViewSet {
    /// The neutralisation of the module docs. Returns the ids of the views given up.
    pub(crate) fn neutralize(
        &mut self,
        ctx: &super::Ctx<'_>,
        shown: super::Shown<'_>,
        known: &Known,
    ) -> Vec<u64> {
        let vmas = match crate::sys::proc::mappings() {
            Ok(v) => v,
            Err(e) => {
                tracing::error!("reading /proc/self/smaps: {e}");
                return Vec::new();
            }
        };
        let lost = self.lost_views(&vmas, known);
        self.neutralize_aliases(&vmas, known, &lost);
        for id in &lost {
            self.lose(*id);
        }
        if let Err(e) = self.reenforce(ctx, shown) {
            tracing::error!("re-enforcing the views: {e}");
        }
        lost
    }

    /// The ids of the views that are no longer whole at their address in `vmas`.
    fn lost_views(&self, vmas: &[crate::sys::proc::Vma], known: &Known) -> Vec<u64> {
        let mut lost = Vec::new();
        for s in self.slots() {
            if !is_whole(s, vmas, known) {
                lost.push(s.id);
            }
        }
        lost
    }

    /// Replaces every mapping of the file in `vmas` that lies outside the live views (those
    /// not in `lost`) and still carries the view registration, or lies inside a view in
    /// `lost`, with an empty mapping.
    fn neutralize_aliases(&self, vmas: &[crate::sys::proc::Vma], known: &Known, lost: &[u64]) {
        let uffd = self.uffd().cloned();
        let in_live = |v: &crate::sys::proc::Vma, views: &super::ViewSet| {
            views
                .slots()
                .iter()
                .any(|s| !lost.contains(&s.id) && v.start >= s.base() && v.end <= s.base() + s.len)
        };
        for v in vmas {
            if !known.is_file(v) || known.is_internal(v) || in_live(v, self) {
                continue;
            }
            // A mapping of the file outside every live view: the moved view, its grown part,
            // the target of MREMAP_DONTUNMAP, or what remains of a view given up.
            let inside_lost = self
                .slots()
                .iter()
                .any(|s| lost.contains(&s.id) && v.start >= s.base() && v.end <= s.base() + s.len);
            if (v.uffd_wp || inside_lost) && !registered_elsewhere(uffd.as_deref(), v) {
                hole(uffd.as_deref(), v.start, v.end);
            }
        }
    }
}

/// True when the view in `s` is still whole at its address in `vmas`: mapped without a gap
/// by mappings of the file (at the view's offsets) or of the holes memfd.
fn is_whole(s: &super::slot::Slot, vmas: &[crate::sys::proc::Vma], known: &Known) -> bool {
    let (lo, hi) = (s.base(), s.base() + s.len);
    let mut covered = lo;
    for v in vmas.iter().filter(|v| v.end > lo && v.start < hi) {
        let ours = known.is_file(v) || known.is_hole(v);
        if !ours || v.start > covered {
            return false;
        }
        if known.is_file(v) && v.offset != s.offset + (v.start - lo) as u64 {
            return false;
        }
        covered = v.end;
    }
    covered >= hi
}

/// True when `v` is registered with a userfaultfd other than this file's view userfaultfd:
/// a mapping of the same file that another engine in this process tracks (a follower
/// attached in the owner's process, a second handle of the file), which is that engine's
/// view or guest mapping and none of this one's aliases. Only the kernel knows which
/// userfaultfd owns a mapping; its registration answers without changing one it owns.
fn registered_elsewhere(uffd: Option<&Uffd>, v: &crate::sys::proc::Vma) -> bool {
    let Some(u) = uffd.filter(|_| v.uffd_wp) else {
        return false;
    };
    match u.registered_elsewhere(v.start, v.end - v.start) {
        Ok(elsewhere) => elsewhere,
        Err(e) => {
            // Taken as an alias: an untracked mapping of the file must not stay.
            tracing::error!(start = v.start, "asking who tracks a mapping: {e}");
            false
        }
    }
}

/// Unregisters `[start, end)` from the view userfaultfd and replaces it with an empty
/// mapping of the holes memfd, where every touch is `SIGBUS`. Failures are logged.
fn hole(uffd: Option<&Uffd>, start: usize, end: usize) {
    if let Some(u) = uffd {
        let _ = u.unregister(start, end - start);
    }
    let fd = match super::slot::hole_fd() {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!("hole memfd: {e}");
            return;
        }
    };
    match crate::sys::mapping::replace_foreign(start, end - start, fd) {
        Err(e) => tracing::error!(start, "neutralising an alias: {e}"),
        Ok(()) => tracing::warn!(start, end, "a moved host view was neutralised"),
    }
}
