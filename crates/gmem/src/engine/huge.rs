//! HugeTLB restructuring: splitting a huge page whose 4 KiB pages are mixed into 4 KiB
//! pieces, and merging it back. These are primitives the conversion plan calls; they never
//! convert anything themselves.
//!
//! # Why not split in place
//!
//! The kernel splits a huge folio in place. A userspace process cannot: a HugeTLB mapping is
//! managed in whole huge pages (`mprotect`, `munmap` or `MAP_FIXED` of 4 KiB inside one fail
//! with `EINVAL`, `MADV_DONTNEED` needs a huge-aligned start, and neither poison nor guard
//! markers work on HugeTLB pages at 4 KiB), and shmem THP would give up the HugeTLB pool and
//! its reservation, which is the reason to use HugeTLB at all.
//!
//! # Mechanism: companion pieces
//!
//! Every HugeTLB file has a *companion* memfd (shmem, 4 KiB pages, same size, sparse). To split
//! huge page `H`, with the control lock held, when no pin holds a page of `H`:
//!
//! 1. *freeze*: `H`'s window is write-protected with userfaultfd in gmem's guest mapping and
//!    in every host view. Readers go on; a writer (the guest, a host view, the kernel through
//!    any of them) blocks in its page fault. The pins are checked under the page-state lock
//!    for writing, held until the windows are frozen: a pin taken after it reaches `H` only
//!    through the frozen windows. Participants hold off their own writers
//!    ([`Step::Freeze`]: a peer process write-protects its windows, or refuses naming a page
//!    it pins);
//! 2. *copy*: `H` is copied into the companion at the same offset;
//! 3. *participants*: peer processes map the pieces over their windows ([`Step::Split`]) and
//!    let their writers go on;
//! 4. *remap*: the companion is mapped over `H`'s window in the guest mapping, and in every
//!    view a mapping of the pieces is built aside with guard markers on its private (and
//!    poisoned) pieces, registered with the view userfaultfd, and moved over the window with
//!    one `mremap` (so the window is never a mapping the tracker cannot see);
//! 5. *thaw*: the waiting writers are woken; their faults retry on the pieces.
//!
//! Nothing written is lost and nothing private is ever shown. A pin stops a split (`EAGAIN`
//! naming its page) because its pointer may be in the kernel's hands (an io_uring fixed
//! buffer, `O_DIRECT` in flight, a DMA mapping): such a reference holds the huge page itself
//! and would go on reading and writing it after the copy, unseen by the guest, as the
//! kernel refuses to split a folio with unexpected references. For the same reason a merge
//! waits until no pin holds a piece. The huge page stays allocated
//! (and reserved) while `H` is split, so pool accounting stays honest and merging never needs
//! a new page. Merging (when `H` is uniform, unpoisoned and no host reference holds a piece)
//! freezes again, copies the pieces back, maps the huge page (or a hole, when private) over
//! every window and thaws. The pieces stay allocated for a quick split of the same page, up
//! to [`PIECE_CACHE_BYTES`](crate::model::huge::PIECE_CACHE_BYTES) per file.
//!
//! A split costs 2 MiB of shmem on top of the huge page while it lasts: the file holds at
//! most its *piece limit* of pieces (a quarter of the file, at least 16 MiB, by default,
//! [`Builder::max_piece_bytes`](crate::Builder::max_piece_bytes)); a split past it fails with
//! `ENOMEM` before anything changes, so a guest cannot make the host double its memory.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use super::gate::GateError;
use super::participant::Step;
use super::{Control, Engine};
use crate::backing::Backing;
use crate::model::attr::Attr;
use crate::model::huge::{Accounting, HugeState};
use crate::model::units::{ByteRange, HugeGeometry};
use crate::sys::mapping::Mapping;
use crate::sys::uffd::Uffd;
use crate::sys::{fd, numa, to_off, to_usize};

/// The restructuring side of a HugeTLB file.
#[derive(Debug)]
pub(crate) struct Huge {
    pub geo: HugeGeometry,
    /// gmem's mapping of the companion (copies into cached pieces go through it). Declared
    /// before the descriptor so it is unmapped first.
    pieces: Mapping,
    companion: OwnedFd,
    /// Write-protects the guest mapping's windows during a split or merge (no events).
    guest_uffd: Mutex<Option<Arc<Uffd>>>,
    state: Mutex<HugeState>,
    /// The state's counters, reachable without its lock (a forked child asks for them too).
    acct: Arc<Accounting>,
}

/// Why a split or merge did not happen.
#[derive(Debug)]
pub(crate) enum RestructureError {
    /// A pin of this process or a peer process holds a page of the huge page (`EAGAIN` at
    /// `offset`, the first such page).
    Busy { offset: u64 },
    /// The piece limit would be exceeded, or the process is near `vm.max_map_count`.
    NoMem { offset: u64 },
    /// A participant failed otherwise.
    Participant { offset: u64, errno: i32 },
    /// A syscall failed.
    Os { offset: u64, source: io::Error },
}

impl Huge {
    /// State for a HugeTLB file of `size` bytes with `page`-byte huge pages: a new companion
    /// file, or the owner's when the backing was received from another process.
    pub fn for_backing(
        backing: &dyn Backing,
        size: u64,
        page: u64,
        limit: u64,
    ) -> io::Result<Self> {
        let companion = match backing.companion() {
            Some(fd) => fd.try_clone_to_owned()?,
            None => {
                let fd = fd::memfd_create(c"gmem-pieces", 0)?;
                fd::ftruncate(fd.as_fd(), size)?;
                fd::add_seals(
                    fd.as_fd(),
                    libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
                )?;
                fd
            }
        };
        let len = to_usize(size)?;
        let mut pieces = Mapping::shared(companion.as_fd(), 0, len, libc::MAP_NORESERVE)?;
        pieces.keep_from_children()?;
        let state = HugeState::new(page, size / page, limit);
        Ok(Huge {
            geo: HugeGeometry { size: page },
            pieces,
            companion,
            guest_uffd: Mutex::new(None),
            acct: state.accounting(),
            state: Mutex::new(state),
        })
    }

    /// The restructuring counters (a handle that outlives the file).
    pub fn accounting(&self) -> Arc<Accounting> {
        self.acct.clone()
    }

    pub fn companion(&self) -> BorrowedFd<'_> {
        self.companion.as_fd()
    }

    pub fn state(&self) -> MutexGuard<'_, HugeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn guest_uffd(&self) -> io::Result<Arc<Uffd>> {
        let mut g = self.guest_uffd.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(u) = g.as_ref() {
            return Ok(u.clone());
        }
        let u = Arc::new(Uffd::new(false)?);
        *g = Some(u.clone());
        Ok(u)
    }

    /// Drops the pieces of huge page `h` from the companion file. The companion is shmem,
    /// whose punch unmaps the pieces from every mapping before it truncates them, so every
    /// view's guard markers stay (see `moves.rs`).
    pub fn punch_pieces(&self, h: u64) -> io::Result<()> {
        let hr = self.geo.bytes(h);
        fd::fallocate(
            self.companion(),
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
            hr.start,
            hr.len(),
        )
    }

    /// The pieces of huge page `h` after a split that did not happen: taken from the piece
    /// cache (`cached`), they go back into it, as they were before the split; otherwise they
    /// are dropped.
    fn unused_pieces(&self, h: u64, cached: bool) {
        let drop = if cached {
            self.state().cache(h)
        } else {
            Some(h)
        };
        if let Some(d) = drop {
            if let Err(e) = self.punch_pieces(d) {
                tracing::error!(huge_page = d, "dropping pieces: {e}");
            }
        }
    }

    /// gmem's mapping of the companion file.
    pub fn pieces_map(&self) -> &Mapping {
        &self.pieces
    }
}

/// Which way a copy goes between the huge mapping and the companion file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToPieces,
    FromPieces,
}

/// Copies `r` between `huge` (gmem's mapping of the huge pages) and `pieces` (gmem's mapping
/// of the companion, pieces already allocated): a plain memory copy.
fn copy_mapped(huge: &Mapping, pieces: &Mapping, r: ByteRange, dir: Dir) -> io::Result<()> {
    let start = to_usize(r.start)?;
    let len = to_usize(r.len())?;
    let fits = |m: &Mapping| matches!(start.checked_add(len), Some(e) if e <= m.len());
    if !fits(huge) || !fits(pieces) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let h = huge.as_ptr().wrapping_add(start);
    let p = pieces.as_ptr().wrapping_add(start);
    let (from, to) = match dir {
        Dir::ToPieces => (h, p),
        Dir::FromPieces => (p, h),
    };
    // SAFETY: both ranges lie inside live mappings of different files (checked above), so
    // they do not overlap; the bytes are copied as plain memory, no reference covers them.
    unsafe { std::ptr::copy_nonoverlapping(from, to, len) };
    Ok(())
}

/// Copies `r` from gmem's huge-page mapping into the companion file at the same offset with
/// `pwrite` (allocating pieces without faulting a mapping: about half the cost of a first
/// touch through a mapping).
fn copy_to_companion(huge: &Mapping, pieces: BorrowedFd<'_>, r: ByteRange) -> io::Result<()> {
    let start = to_usize(r.start)?;
    let len = to_usize(r.len())?;
    if !matches!(start.checked_add(len), Some(e) if e <= huge.len()) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut done = 0usize;
    while done < len {
        let p = huge
            .as_ptr()
            .wrapping_add(start + done)
            .cast::<libc::c_void>();
        let off = to_off(r.start + done as u64)?;
        // SAFETY: `[p, p + len - done)` lies inside the live huge mapping (checked above); the
        // kernel reads it as plain bytes.
        let n = unsafe { libc::pwrite(pieces.as_raw_fd(), p, len - done, off) };
        match usize::try_from(n) {
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
            Ok(n) => done += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Writers of one huge page held off: the guest mapping's window and every view window.
#[derive(Debug)]
struct Frozen {
    guest: Arc<Uffd>,
    views: Option<Arc<Uffd>>,
    windows: Vec<(bool, usize, usize)>,
}

impl Frozen {
    fn thaw(self) {
        for &(guest, addr, len) in &self.windows {
            if guest {
                // Unregistered, not just write-unprotected: unregistering waits for the faults
                // in flight on the window (it takes the mapping's write lock), so every writer
                // that saw the write protection is queued by the time of the wake below. After
                // a plain unprotect a writer could queue after the wake and sleep until the
                // next thaw, holding the page-state lock if it was an accessor's copy. The
                // guest mapping's userfaultfd carries no events; the next freeze registers the
                // window again.
                if let Err(e) = self.guest.unregister(addr, len) {
                    tracing::error!(addr, "unregistering a frozen guest window: {e}");
                }
                if let Err(e) = self.guest.wake(addr, len) {
                    tracing::error!(addr, "waking writers: {e}");
                }
                continue;
            }
            let Some(u) = self.views.as_ref() else {
                continue;
            };
            if let Err(e) = u.write_protect(addr, len, false) {
                tracing::debug!(addr, "write-unprotect after a remap: {e}");
            }
            if let Err(e) = u.wake(addr, len) {
                tracing::error!(addr, "waking writers: {e}");
            }
        }
    }
}

/// A follower's huge page held for its owner's split or merge ([`Step::Freeze`]): its
/// writers wait until the owner's next step about it.
#[derive(Debug)]
pub(crate) struct HeldForOwner {
    h: u64,
    frozen: Frozen,
    /// The follower's own remaps of the page, announced from the freeze to the thaw.
    own: Option<super::views::tracker::OwnGuard>,
}

impl HeldForOwner {
    /// Lets the writers go on (on whatever the windows show now).
    fn thaw(self) {
        self.frozen.thaw();
        drop(self.own);
    }
}

impl Engine {
    fn huge_parts(&self) -> io::Result<(&Huge, &Mapping, &Mapping)> {
        let einval = || io::Error::from_raw_os_error(libc::EINVAL);
        let huge = self.huge().ok_or_else(einval)?;
        let map = self
            .backing()
            .as_hugetlb()
            .map(|h| h.huge_mapping())
            .ok_or_else(einval)?;
        let guest = self
            .guest_map()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))?;
        Ok((huge, map, guest))
    }

    /// Write-protects huge page `h` in the guest mapping and every view, and announces the
    /// view windows as gmem's own remaps.
    fn freeze_writers(&self, ctl: &mut Control, h: u64) -> io::Result<Frozen> {
        let (huge, _, guest) = self.huge_parts()?;
        let hr = huge.geo.bytes(h);
        let g = (guest.addr() + to_usize(hr.start)?, to_usize(hr.len())?);
        let gu = huge.guest_uffd()?;
        gu.register(g.0, g.1)?;
        let windows = ctl.views.huge_windows(huge.geo, h);
        let mut frozen = Frozen {
            guest: gu,
            views: ctl.views.uffd().cloned(),
            windows: Vec::new(),
        };
        let mut all = vec![(true, g.0, g.1)];
        all.extend(windows.into_iter().map(|(a, l)| (false, a, l)));
        for w in all {
            let u = if w.0 {
                Some(&frozen.guest)
            } else {
                frozen.views.as_ref()
            };
            if let Some(u) = u {
                if let Err(e) = u.write_protect(w.1, w.2, true) {
                    if !w.0 && crate::sys::mapping::vacant(w.1, w.2) {
                        // The VMM moved or unmapped this view meanwhile: nothing to freeze
                        // there; the view is given up when the change is neutralised.
                        if let Some(t) = &ctl.views.tracker {
                            t.own.note_foreign();
                        }
                        continue;
                    }
                    frozen.thaw();
                    return Err(e);
                }
            }
            frozen.windows.push(w);
        }
        Ok(frozen)
    }

    /// Maps `fd` over huge page `h`'s window in the guest mapping.
    pub(crate) fn remap_guest_window(&self, h: u64, fd: BorrowedFd<'_>) -> io::Result<()> {
        let (huge, _, guest) = self.huge_parts()?;
        let hr = huge.geo.bytes(h);
        let (off, len) = (to_usize(hr.start)?, to_usize(hr.len())?);
        guest.map_file_at(off, len, fd, hr.start)?;
        guest.advise(off, len, libc::MADV_DONTFORK)?;
        guest.advise(off, len, libc::MADV_RANDOM)?;
        if let Some(p) = self.numa_policy_set() {
            numa::mbind(guest, off, len, &p)?;
        }
        Ok(())
    }

    /// Before a conversion touches the views: a view the VMM moved or unmapped while the
    /// control lock was held elsewhere (its event waits for the lock) is neutralised, and
    /// given up, now. So gmem does not go on working on the address range the move left
    /// empty, which any other mapping of the process may take meanwhile. An atomic load
    /// unless the reader waits for the lock.
    pub(crate) fn settle(&self, ctl: &mut Control) {
        if !ctl
            .views
            .tracker
            .as_ref()
            .is_some_and(|t| t.own.reader_waits())
        {
            return;
        }
        let Some(u) = ctl.views.uffd().cloned() else {
            return;
        };
        // One neutralisation per event, as the reader does (see `tracker::read_one`).
        while u.pending() {
            self.neutralize(ctl);
            match &ctl.views.tracker {
                Some(t) if t.take_event(&u) => {}
                _ => return,
            }
        }
    }

    /// Ends a remap of own registered windows: a foreign event that arrived meanwhile is
    /// neutralised now.
    pub(crate) fn after_own_remap(&self, ctl: &mut Control) {
        let foreign = ctl
            .views
            .tracker
            .as_ref()
            .is_some_and(|t| t.own.take_foreign());
        if foreign {
            self.neutralize(ctl);
        }
    }

    /// `Busy` naming the first page of `hp` a pin holds. A huge page is split or merged only
    /// while no pin holds a page of it: a pin's pointer may have handed the page to the
    /// kernel (an io_uring fixed buffer, `O_DIRECT`, a DMA mapping), whose reads and writes
    /// would keep reaching the copy the restructuring leaves behind. The kernel refuses to
    /// split a folio with unexpected references in the same way.
    fn held_in(&self, hp: crate::model::units::PageRange) -> Result<(), RestructureError> {
        match self.refs().first_busy(hp) {
            Some(p) => Err(RestructureError::Busy {
                offset: crate::model::units::page_offset(p),
            }),
            None => Ok(()),
        }
    }

    /// Holds off the writers of huge page `h` ([`Engine::freeze_writers`]) once no pin holds
    /// a page of it (`Busy` naming the first pinned page otherwise). The check and the freeze
    /// are made under the page-state lock for writing, where pins are taken for reading: a
    /// pin taken after it reaches the page only through write-protected windows, so every
    /// write through it (a kernel reference's included) waits for the restructuring to end.
    /// Nothing is frozen yet in this process, so no accessor holds the lock while it waits
    /// on a frozen window.
    fn freeze_unpinned(&self, ctl: &mut Control, h: u64) -> Result<Frozen, RestructureError> {
        let (huge, _, _) = self
            .huge_parts()
            .map_err(|source| RestructureError::Os { offset: 0, source })?;
        let _st = self.write_pages();
        self.held_in(huge.geo.pages(h))?;
        self.freeze_writers(ctl, h)
            .map_err(|source| RestructureError::Os {
                offset: huge.geo.bytes(h).start,
                source,
            })
    }

    /// Splits huge page `h` into pieces (the caller holds the control lock). A no-op when it
    /// is split already. Changes nothing on error.
    pub(crate) fn split(&self, ctl: &mut Control, h: u64) -> Result<(), RestructureError> {
        let (huge, map, _) = self
            .huge_parts()
            .map_err(|source| RestructureError::Os { offset: 0, source })?;
        let hr = huge.geo.bytes(h);
        {
            let st = huge.state();
            if st.is_split(h) {
                return Ok(());
            }
            if !st.may_split() {
                return Err(RestructureError::NoMem { offset: hr.start });
            }
        }
        // Checked first without the lock, so that a held page costs no freeze.
        self.held_in(huge.geo.pages(h))?;
        self.headroom(ctl, 2)
            .map_err(|_| RestructureError::NoMem { offset: hr.start })?;
        // Other processes' writers are held off first: one that holds a page of `h` refuses
        // before anything is frozen here.
        ctl.participants.apply(&Step::Freeze(hr)).map_err(refused)?;
        // Announced from the freeze to the thaw: the reader then takes every event at once,
        // so a remap by the VMM meanwhile never holds up the write-protection (the kernel
        // refuses it with `EAGAIN` while an event is unread).
        let own = ctl.views.announce(huge.geo, h);
        let frozen = match self.freeze_unpinned(ctl, h) {
            Ok(f) => f,
            Err(e) => {
                ctl.participants.undo(&Step::Freeze(hr));
                return Err(e);
            }
        };
        let res = self.split_frozen(ctl, huge, map, h);
        frozen.thaw();
        // The announcement ends first: a foreign event read until then is seen below.
        drop(own);
        self.after_own_remap(ctl);
        res
    }

    fn split_frozen(
        &self,
        ctl: &mut Control,
        huge: &Huge,
        map: &Mapping,
        h: u64,
    ) -> Result<(), RestructureError> {
        let hr = huge.geo.bytes(h);
        let os = |source| RestructureError::Os {
            offset: hr.start,
            source,
        };
        let cached = huge.state().take_cached(h);
        let copied = if cached {
            copy_mapped(map, huge.pieces_map(), hr, Dir::ToPieces)
        } else {
            copy_to_companion(map, huge.companion(), hr)
        };
        if let Err(e) = copied {
            huge.unused_pieces(h, cached);
            ctl.participants.undo(&Step::Freeze(hr));
            return Err(os(e));
        }
        if let Err(e) = ctl.participants.apply(&Step::Split(hr)) {
            huge.unused_pieces(h, cached);
            ctl.participants.undo(&Step::Freeze(hr));
            return Err(refused(e));
        }
        let undo = |ctl: &mut Control, this: &Engine| {
            ctl.participants.undo(&Step::Split(hr));
            let _ = this.remap_guest_window(h, this.fd());
            huge.unused_pieces(h, cached);
        };
        if let Err(e) = self.remap_guest_window(h, huge.companion()) {
            undo(ctl, self);
            return Err(os(e));
        }
        huge.state().set_split(h);
        let numa = self.numa_policy_set();
        let res = {
            let st = self.read_pages();
            let hs = huge.state();
            let shown = self.shown(&st, Some(&hs));
            ctl.views.split(&self.view_ctx(numa.as_ref()), h, shown)
        };
        if let Err(e) = res {
            let private = {
                let st = self.read_pages();
                let hp = huge.geo.pages(h);
                st.attrs.all(hp.start, hp.end, Attr::Private)
            };
            if let Err(e2) = ctl.views.merge(&self.view_ctx(numa.as_ref()), h, private) {
                tracing::error!(offset = hr.start, "undoing a split in a view: {e2}");
            }
            huge.state().set_merged(h);
            undo(ctl, self);
            return Err(os(e));
        }
        Ok(())
    }

    /// Merges split huge page `h` (uniform, unpoisoned and unreferenced: checked here). With
    /// `keep` the pieces' contents are copied back; without (a punch-hole) they are dropped.
    /// Returns false (and changes nothing) when it cannot merge now.
    pub(crate) fn merge(
        &self,
        ctl: &mut Control,
        h: u64,
        keep: bool,
    ) -> Result<bool, RestructureError> {
        let (huge, map, _) = self
            .huge_parts()
            .map_err(|source| RestructureError::Os { offset: 0, source })?;
        let hr = huge.geo.bytes(h);
        let hp = huge.geo.pages(h);
        let os = |source| RestructureError::Os {
            offset: hr.start,
            source,
        };
        let private = {
            let st = self.read_pages();
            if !huge.state().is_split(h) {
                return Ok(false);
            }
            let uniform = st.attrs.all(hp.start, hp.end, Attr::Private)
                || (st.attrs.all(hp.start, hp.end, Attr::Shared) && !st.poison.any_in(hp));
            if !uniform {
                huge.state().set_waiting(h, false);
                self.note_merge_waiting(huge.state().any_waiting());
                return Ok(false);
            }
            if self.refs().first_busy(hp).is_some()
                || self.gate().phase() != super::gate::Phase::Live
            {
                huge.state().set_waiting(h, true);
                self.note_merge_waiting(true);
                return Ok(false);
            }
            st.attrs.all(hp.start, hp.end, Attr::Private)
        };
        // Other processes' writers are held off first: one that holds a piece refuses before
        // anything is frozen here.
        let held = ctl
            .participants
            .apply(&Step::Freeze(hr))
            .map_err(refused)
            .and_then(|()| {
                let own = ctl.views.announce(huge.geo, h);
                match self.freeze_unpinned(ctl, h) {
                    Ok(frozen) => Ok((own, frozen)),
                    Err(e) => {
                        ctl.participants.undo(&Step::Freeze(hr));
                        Err(e)
                    }
                }
            });
        let (own, frozen) = match held {
            Ok(held) => held,
            Err(RestructureError::Busy { .. }) => {
                // A piece is held (here, by a pin taken since the check above, or in a peer
                // process): the page stays split for it.
                huge.state().set_waiting(h, true);
                self.note_merge_waiting(true);
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let res = (|| {
            let copied = if keep {
                copy_mapped(map, huge.pieces_map(), hr, Dir::FromPieces).map_err(os)
            } else {
                Ok(())
            };
            if let Err(e) =
                copied.and_then(|()| ctl.participants.apply(&Step::Merge(hr)).map_err(refused))
            {
                ctl.participants.undo(&Step::Freeze(hr));
                return Err(e);
            }
            self.remap_guest_window(h, self.fd()).map_err(os)?;
            let numa = self.numa_policy_set();
            ctl.views
                .merge(&self.view_ctx(numa.as_ref()), h, private)
                .map_err(os)?;
            huge.state().set_merged(h);
            Ok(())
        })();
        frozen.thaw();
        drop(own);
        self.after_own_remap(ctl);
        if let Err(e) = res {
            if let RestructureError::Busy { .. } = e {
                huge.state().set_waiting(h, true);
                self.note_merge_waiting(true);
                return Ok(false);
            }
            return Err(e);
        }
        self.note_merge_waiting(huge.state().any_waiting());
        // The pieces stay for a quick split of the same page; the oldest cached ones go.
        if !keep {
            huge.punch_pieces(h).map_err(os)?;
        } else if let Some(old) = huge.state().cache(h) {
            huge.punch_pieces(old).map_err(os)?;
        }
        Ok(true)
    }

    /// Merges every split huge page among `hs` that can merge now; returns how many merged.
    pub(crate) fn merge_all(&self, ctl: &mut Control, hs: &[u64]) -> u64 {
        let mut n = 0;
        for &h in hs {
            match self.merge(ctl, h, true) {
                Ok(true) => n += 1,
                Ok(false) => {}
                Err(e) => tracing::error!(huge_page = h, "merging: {e:?}"),
            }
        }
        n
    }

    /// A follower holds off the writers of huge page `h` for its owner's split or merge
    /// (the owner's [`Step::Freeze`]) until the owner's next step about it; `Busy` naming
    /// the first page a pin of this process holds, checked as the owner checks its own
    /// ([`Engine::freeze_unpinned`]). Already held: nothing to do.
    pub(crate) fn hold_for_owner(&self, ctl: &mut Control, h: u64) -> Result<(), RestructureError> {
        if ctl.held_for_owner.iter().any(|held| held.h == h) {
            return Ok(());
        }
        // The owner restructures one huge page at a time: a hold left from an earlier step
        // (whose `Thaw` was lost with a stalled link) is over.
        for held in std::mem::take(&mut ctl.held_for_owner) {
            held.thaw();
        }
        let (huge, _, _) = self
            .huge_parts()
            .map_err(|source| RestructureError::Os { offset: 0, source })?;
        let own = ctl.views.announce(huge.geo, h);
        let frozen = self.freeze_unpinned(ctl, h)?;
        ctl.held_for_owner.push(HeldForOwner { h, frozen, own });
        Ok(())
    }

    /// True when huge page `h`'s writers are held for the owner ([`Engine::hold_for_owner`]).
    pub(crate) fn held_for_owner(ctl: &Control, h: u64) -> bool {
        ctl.held_for_owner.iter().any(|held| held.h == h)
    }

    /// Lets the writers of huge page `h` go on, if they were held for the owner.
    pub(crate) fn release_for_owner(ctl: &mut Control, h: u64) {
        if let Some(i) = ctl.held_for_owner.iter().position(|held| held.h == h) {
            ctl.held_for_owner.swap_remove(i).thaw();
        }
    }

    /// True when this follower holds writers for its owner ([`Engine::hold_for_owner`]).
    pub(crate) fn holds_for_owner(&self) -> bool {
        !self.control_unchecked().held_for_owner.is_empty()
    }

    /// Lets every writer held for the owner go on (the owner is gone, or gave up).
    pub(crate) fn release_all_for_owner(&self) {
        let mut ctl = self.control_unchecked();
        for held in std::mem::take(&mut ctl.held_for_owner) {
            held.thaw();
        }
    }

    /// Merges every split huge page that is uniform and no longer held, under the control
    /// lock once the file is live; returns how many merged (0 at once for other backings).
    pub(crate) fn merge_pending(&self) -> Result<u64, GateError> {
        let Some(huge) = self.huge() else {
            return Ok(0);
        };
        let mut ctl = self.control_live()?;
        let all = huge.state().split_in(0, u64::MAX);
        Ok(self.merge_all(&mut ctl, &all))
    }

    /// After host references on `r` were dropped: merges waiting huge pages among them that
    /// are now free. Left for later when the control lock is held elsewhere.
    pub(crate) fn after_release(&self, r: crate::model::units::PageRange) {
        if !self.merge_waiting() || !self.gate().in_creator() {
            return;
        }
        let Some(huge) = self.huge() else { return };
        let hs = {
            let c = huge.geo.covering(r);
            huge.state().waiting_in(c.start, c.end)
        };
        if hs.is_empty() {
            return;
        }
        let Some(mut ctl) = self.try_control() else {
            return;
        };
        self.merge_all(&mut ctl, &hs);
    }
}

fn refused(e: super::participant::StepError) -> RestructureError {
    if e.errno == libc::EAGAIN {
        RestructureError::Busy { offset: e.offset }
    } else {
        RestructureError::Participant {
            offset: e.offset,
            errno: e.errno,
        }
    }
}
