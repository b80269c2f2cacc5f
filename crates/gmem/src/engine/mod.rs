//! The engine: the one owner of the invariant
//!
//! > the attributes, every host view, every participant (peer processes, the kernel's
//! > attributes), the HugeTLB restructuring and the poison records agree: a page the
//! > attributes call private (or a poisoned page) faults in every host mapping gmem has
//! > handed out, and no host reference holds it.
//!
//! Every change of that state goes through an engine method that takes the *control lock*
//! (only the engine takes it), plans the change, applies it to its own views and to every
//! participant, and undoes all of it on any failure. See `ARCHITECTURE.md` for the layers
//! and the flow of a conversion.
//!
//! Locks, in the order they are taken: the control lock ([`Control`]), then the page-state
//! lock ([`PageState`], a sharded read-write lock that accessors take for reading), then the
//! restructuring state's mutex. Host references ([`refs`]) are atomics.

pub(crate) mod access;
pub(crate) mod convert;
#[cfg(test)]
mod forked;
pub(crate) mod gate;
pub(crate) mod huge;
pub(crate) mod lifecycle;
pub(crate) mod listener;
pub(crate) mod moves;
pub(crate) mod participant;
pub(crate) mod poison;
pub(crate) mod prealloc;
pub(crate) mod punch;
mod query;
pub(crate) mod refs;
pub(crate) mod remote;
pub(crate) mod shard_lock;
pub(crate) mod views;

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use shard_lock::{ShardLock, ShardReadGuard, ShardWriteGuard};

use crate::backing::{Backing, BackingKind};
use crate::model::attr::{Attr, AttrMap, Run};
use crate::model::error::Errno;
use crate::model::flags::Flags;
use crate::model::numa::{NumaError, NumaPolicy};
use crate::model::poison::PoisonSet;
use crate::model::units::{ByteRange, HugeGeometry, PageRange, RangeError, PAGE_SIZE};
use crate::sys::mapping::Mapping;
use crate::sys::to_usize;

use gate::{Gate, GateError};
use huge::Huge;
use listener::ListenerSet;
use participant::Participants;
use refs::RefTable;
use views::slot::Mech;
use views::{Ctx, Shown, ViewSet};

/// Why a guest memory file could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// Size is zero or not a multiple of the backing's block size (`EINVAL`).
    #[error("size {size:#x} is zero or not a multiple of {block:#x}")]
    InvalidSize {
        /// Size requested.
        size: u64,
        /// Block size of the backing.
        block: u64,
    },
    /// A flag bit gmem does not know (`EINVAL`).
    #[error("unknown flags {bits:#x}")]
    UnknownFlags {
        /// The unknown bits.
        bits: u64,
    },
    /// The HugeTLB backing could not be created: unsupported page size (`EINVAL`) or a pool
    /// too short to reserve the whole file (`ENOMEM`, naming the shortfall).
    #[error(transparent)]
    HugeTlb(#[from] crate::backing::hugetlb::HugeTlbError),
    /// The NUMA policy was refused (`EINVAL`) or could not be applied.
    #[error(transparent)]
    Numa(#[from] NumaError),
    /// Preallocation failed.
    #[error(transparent)]
    Prealloc(#[from] prealloc::PreallocError),
    /// The backing could not be created or mapped.
    #[error("{op} failed: {source}")]
    Backing {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Errno for CreateError {
    fn errno(&self) -> i32 {
        match self {
            CreateError::InvalidSize { .. } | CreateError::UnknownFlags { .. } => libc::EINVAL,
            CreateError::Backing { source, .. } => crate::model::error::os_errno(source),
            CreateError::HugeTlb(e) => e.errno(),
            CreateError::Numa(e) => e.errno(),
            CreateError::Prealloc(e) => e.errno(),
        }
    }
}

/// Checks creation arguments against the backing's block size.
pub(crate) fn check_args(size: u64, flags: Flags, block: u64) -> Result<(), CreateError> {
    let unknown = flags.difference(Flags::ALL);
    if !unknown.is_empty() {
        return Err(CreateError::UnknownFlags {
            bits: unknown.bits(),
        });
    }
    if size == 0 || block == 0 || size % block != 0 {
        return Err(CreateError::InvalidSize { size, block });
    }
    Ok(())
}

/// Per-page state that accessors read: attributes and poison records.
#[derive(Debug)]
pub(crate) struct PageState {
    pub(in crate::engine) attrs: AttrMap,
    pub(in crate::engine) poison: PoisonSet,
}

/// State that changes only under the control lock.
#[derive(Debug)]
pub(crate) struct Control {
    pub(in crate::engine) views: ViewSet,
    pub(in crate::engine) listeners: ListenerSet,
    pub(in crate::engine) participants: Participants,
    /// Buffers a conversion reuses, so that converting a page allocates nothing.
    pub(in crate::engine) scratch: Scratch,
    /// A follower's huge pages whose writers are held off for the owner's split or merge
    /// (its `Freeze` step), until the `Split`, `Merge` or `Thaw` that follows.
    pub(in crate::engine) held_for_owner: Vec<huge::HeldForOwner>,
}

/// Buffers kept between conversions (see [`Control::scratch`]).
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    /// The runs a range held before its conversion.
    pub(in crate::engine) runs: Vec<Run>,
    /// The page ranges that change.
    pub(in crate::engine) parts: Vec<PageRange>,
}

impl Scratch {
    /// The most entries a buffer keeps between conversions: a bulk conversion's buffers
    /// are freed, not held.
    const KEEP: usize = 64;

    /// Both buffers, empty, for one conversion.
    pub(in crate::engine) fn take(&mut self) -> (Vec<Run>, Vec<PageRange>) {
        let (mut runs, mut parts) = (
            std::mem::take(&mut self.runs),
            std::mem::take(&mut self.parts),
        );
        runs.clear();
        parts.clear();
        (runs, parts)
    }

    /// Gives the buffers back once the conversion is done with them.
    pub(in crate::engine) fn give_back(&mut self, runs: Vec<Run>, parts: Vec<PageRange>) {
        if runs.capacity() <= Self::KEEP {
            self.runs = runs;
        }
        if parts.capacity() <= Self::KEEP {
            self.parts = parts;
        }
    }
}

impl Control {
    /// True when a kernel reference to a page of `r` may exist (see `engine::moves`): a view
    /// of this process shows it, or showed it since it last moved, or another process maps
    /// the file (a peer follower, whose kernel references this process cannot see).
    pub(in crate::engine) fn may_be_referenced(&self, r: PageRange) -> bool {
        self.participants.maps_elsewhere() || self.views.exposed(r)
    }

    /// The pages of `r` hold no kernel reference any more (moved to fresh memory, punched,
    /// or found not resident once every view revoked them). Remembered as shown while
    /// another process maps the file: it may take a new reference at any time, and one taken
    /// before it leaves outlives it.
    pub(in crate::engine) fn forget_shown(&mut self, r: PageRange) {
        if !self.participants.maps_elsewhere() {
            self.views.forget_history(r);
        }
    }
}

/// The least default piece limit of a HugeTLB file: 16 MiB (eight 2 MiB pages).
pub(crate) const DEFAULT_PIECE_FLOOR: u64 = 16 << 20;

/// How an engine is put together (beyond backing, size and flags).
#[derive(Debug, Clone, Default)]
pub(crate) struct Assembly {
    /// Attributes received from elsewhere (a peer's owner, a hand-over) instead of the
    /// flags' initial state.
    pub attrs: Option<AttrMap>,
    /// The file follows another process's owner.
    pub follower: bool,
    /// HugeTLB: the most bytes of 4 KiB pieces the file may hold (`None`: the default,
    /// a quarter of the file, at least 16 MiB and one huge page).
    pub piece_limit: Option<u64>,
}

/// One guest memory file's shared state. [`crate::GuestMemfd`] handles, views and pins hold
/// it by `Arc`.
#[derive(Debug)]
pub(crate) struct Engine {
    /// This engine, for the view tracker (which must not keep the file alive).
    me: std::sync::Weak<Engine>,
    backing: Box<dyn Backing>,
    size: u64,
    flags: Flags,
    pages: ShardLock<PageState>,
    refs: RefTable,
    /// gmem's own mapping of the whole file: the guest's path, and the path checked accessors
    /// copy through. Never handed to host code, never forked.
    guest: Option<Mapping>,
    /// The guest mapping's address was handed out ([`crate::GuestView::as_ptr`]: an hva
    /// memslot, a software vCPU): from then on something outside gmem may fault its pages at
    /// any moment.
    guest_handed_out: AtomicBool,
    /// Stretches of faults gmem makes through the guest mapping without the page-state lock
    /// (a HugeTLB preallocation), bumped at the start and the end of each: odd while one
    /// runs.
    unlocked_faults: AtomicU64,
    huge: Option<Huge>,
    control: Mutex<Control>,
    gate: Gate,
    numa: Mutex<Option<NumaPolicy>>,
    /// A NUMA policy is recorded in `numa`: conversions of a file without one read this
    /// load and take no lock.
    numa_recorded: AtomicBool,
    /// Some split huge page waits for its references to go before it merges (one load on
    /// every pin release).
    merge_waiting: AtomicBool,
    /// Address of the device view (0 until it exists).
    device_base: std::sync::atomic::AtomicUsize,
    /// The file was given to another process (a peer follower, a hand-over): its pages are
    /// never discarded when this process lets go.
    shared_out: AtomicBool,
}

impl Engine {
    /// Puts an engine together over `backing`. `size` and `flags` are validated against the
    /// backing's block size.
    pub fn assemble(
        backing: Box<dyn Backing>,
        size: u64,
        flags: Flags,
        how: Assembly,
    ) -> Result<Arc<Engine>, CreateError> {
        let block = backing.block_size();
        check_args(size, flags, block)?;
        let os = |op| move |source| CreateError::Backing { op, source };
        let pages = size / PAGE_SIZE;
        let init = if flags.contains(Flags::INIT_SHARED) {
            Attr::Shared
        } else {
            Attr::Private
        };
        let someone_elses = how.follower || how.attrs.is_some();
        let attrs = match how.attrs {
            Some(a) if a.pages() == pages => a,
            Some(_) => {
                return Err(CreateError::InvalidSize { size, block });
            }
            None => AttrMap::new(pages, init),
        };
        let len = to_usize(size).map_err(os("size"))?;
        let guest = if backing.mappable(flags) {
            let mut map = Mapping::shared(backing.as_fd(), 0, len, libc::MAP_NORESERVE)
                .map_err(os("mmap"))?;
            map.keep_from_children().map_err(os("madvise"))?;
            // No fault-around: a fault here maps only the page it touched, never a private
            // neighbour (a private page mapped here while it is punched would lose its
            // markers in every view; see `Engine::refresh`).
            map.advise(0, len, libc::MADV_RANDOM)
                .map_err(os("madvise"))?;
            Some(map)
        } else {
            None
        };
        let huge = match backing.kind() {
            BackingKind::HugeTlb(page) => {
                let limit = how
                    .piece_limit
                    .unwrap_or_else(|| (size / 4).max(DEFAULT_PIECE_FLOOR).max(page));
                Some(Huge::for_backing(backing.as_ref(), size, page, limit).map_err(os("pieces"))?)
            }
            _ => None,
        };
        let refs =
            RefTable::new(to_usize(pages).map_err(os("size"))?).map_err(os("reference table"))?;
        let mech = match backing.kind() {
            BackingKind::HugeTlb(_) => Mech::Huge,
            _ if backing.userfaultfd_capable() => Mech::Guards,
            _ => Mech::Sealed,
        };
        Ok(Arc::new_cyclic(|me| Engine {
            me: me.clone(),
            backing,
            size,
            flags,
            pages: ShardLock::new(PageState {
                attrs,
                poison: PoisonSet::default(),
            }),
            refs,
            guest,
            huge,
            control: Mutex::new(Control {
                views: {
                    let mut v = ViewSet::new(mech);
                    if someone_elses {
                        // Another process's mappings showed any page of it.
                        v.note_shown(PageRange::new(0, pages));
                    }
                    v
                },
                listeners: ListenerSet::default(),
                participants: Participants::default(),
                held_for_owner: Vec::new(),
                scratch: Scratch::default(),
            }),
            gate: Gate::new(how.follower),
            numa: Mutex::new(None),
            numa_recorded: AtomicBool::new(false),
            merge_waiting: AtomicBool::new(false),
            device_base: std::sync::atomic::AtomicUsize::new(0),
            // Only the process that created the file may give its memory back when done: a
            // follower's or a new owner's file is someone else's too.
            shared_out: AtomicBool::new(someone_elses),
            guest_handed_out: AtomicBool::new(false),
            unlocked_faults: AtomicU64::new(0),
        }))
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn pages_total(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    pub fn flags(&self) -> Flags {
        self.flags
    }

    pub fn backing(&self) -> &dyn Backing {
        self.backing.as_ref()
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.backing.as_fd()
    }

    pub fn block_size(&self) -> u64 {
        self.backing.block_size()
    }

    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    pub fn huge(&self) -> Option<&Huge> {
        self.huge.as_ref()
    }

    pub fn guest_map(&self) -> Option<&Mapping> {
        self.guest.as_ref()
    }

    /// The guest mapping's address, for the vCPU path (null when the file cannot be mapped).
    /// Recorded before it is returned: whatever faults a page through it afterwards comes
    /// after the record.
    pub fn hand_out_guest_map(&self) -> *mut u8 {
        match self.guest_map() {
            Some(m) => {
                self.guest_handed_out.store(true, Ordering::SeqCst);
                m.as_ptr()
            }
            None => std::ptr::null_mut(),
        }
    }

    /// Marks the faults gmem makes through the guest mapping without the page-state lock
    /// until the guard drops (see [`Engine::unlocked_faults_seq`]).
    pub(crate) fn unlocked_faults(&self) -> UnlockedFaults<'_> {
        self.unlocked_faults.fetch_add(1, Ordering::SeqCst);
        UnlockedFaults(&self.unlocked_faults)
    }

    /// The count of starts and ends of faults through the guest mapping without the
    /// page-state lock: odd while such faults run.
    pub(crate) fn unlocked_faults_seq(&self) -> u64 {
        self.unlocked_faults.load(Ordering::SeqCst)
    }

    /// True when something may have faulted a page of the guest mapping outside gmem's
    /// locked paths since `since` ([`Engine::unlocked_faults_seq`], read before): the guest
    /// mapping's address was handed out, a participant is registered (a peer follower maps
    /// the file in its own process; any participant hears of the refresh), or gmem's own
    /// unlocked faults ran meanwhile. Read after a punch, it says whether anything could
    /// have mapped a page between gmem unmapping it and punching it.
    pub(crate) fn others_may_have_mapped(&self, ctl: &Control, since: u64) -> bool {
        self.guest_handed_out.load(Ordering::SeqCst)
            || !ctl.participants.is_empty()
            || since % 2 == 1
            || self.unlocked_faults_seq() != since
    }

    pub fn refs(&self) -> &RefTable {
        &self.refs
    }

    pub fn mark_shared_out(&self) {
        self.shared_out.store(true, Ordering::Release);
    }

    /// The page-state lock, for reading.
    pub(in crate::engine) fn read_pages(&self) -> ShardReadGuard<'_, PageState> {
        self.pages.read()
    }

    /// The page-state lock, for reading, or `EPERM` instead of a wait in a forked child (the
    /// parent's writer, if one held it at the fork, is not in the child to give it back).
    pub(in crate::engine) fn read_pages_unless_forked(
        &self,
    ) -> Result<ShardReadGuard<'_, PageState>, GateError> {
        self.pages.read_unless(|| self.gate.creator())
    }

    /// The page-state lock, for writing.
    pub(in crate::engine) fn write_pages(&self) -> ShardWriteGuard<'_, PageState> {
        self.pages.write()
    }

    /// The control lock, for work that is not a conversion (views, listeners): refused in a
    /// forked child and once handed over.
    pub(in crate::engine) fn control(&self) -> Result<MutexGuard<'_, Control>, GateError> {
        self.gate.access()?;
        Ok(self.control_unchecked())
    }

    /// The control lock whatever the gate says (drops, hand-over, the follower agent).
    pub(in crate::engine) fn control_unchecked(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The control lock once the file is live (waits while frozen; `EPERM` on a follower,
    /// once handed over, in a forked child).
    pub(in crate::engine) fn control_live(&self) -> Result<MutexGuard<'_, Control>, GateError> {
        self.gate.lock_live(&self.control)
    }

    pub(in crate::engine) fn try_control(&self) -> Option<MutexGuard<'_, Control>> {
        views::tracker::try_lock(&self.control)
    }

    /// The NUMA policy set on the file.
    pub(crate) fn numa_policy_set(&self) -> Option<NumaPolicy> {
        if !self.numa_recorded.load(Ordering::Acquire) {
            return None;
        }
        self.numa.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set_numa_record(&self, p: Option<NumaPolicy>) {
        let mut numa = self.numa.lock().unwrap_or_else(|e| e.into_inner());
        self.numa_recorded.store(p.is_some(), Ordering::Release);
        *numa = p;
    }

    /// Checks a page-aligned range inside the file.
    pub fn page_range(&self, offset: u64, len: u64) -> Result<ByteRange, RangeError> {
        ByteRange::checked(offset, len, PAGE_SIZE, self.size)
    }

    /// The page containing byte `offset`, which must lie inside the file.
    pub fn page_at(&self, offset: u64) -> Result<u64, RangeError> {
        if offset >= self.size {
            return Err(RangeError::OutOfBounds {
                offset,
                len: 1,
                size: self.size,
            });
        }
        Ok(crate::model::units::page_of(offset))
    }

    /// Checks a byte range (any alignment) inside the file.
    pub fn byte_range(&self, offset: u64, len: u64) -> Result<ByteRange, RangeError> {
        ByteRange::checked(offset, len, 1, self.size)
    }

    /// The HugeTLB geometry, when the file is HugeTLB.
    pub fn geometry(&self) -> Option<HugeGeometry> {
        self.huge.as_ref().map(|h| h.geo)
    }

    /// What the views need to change their page tables (`numa` is the policy to apply).
    pub(crate) fn view_ctx<'a>(&'a self, numa: Option<&'a NumaPolicy>) -> Ctx<'a> {
        Ctx {
            fd: self.backing.as_fd(),
            size: self.size,
            huge: self.huge.as_ref().map(|h| (h.geo, h.companion())),
            numa,
        }
    }

    /// The attributes and poison as the views must show them.
    pub(crate) fn shown<'a>(
        &'a self,
        st: &'a PageState,
        hs: Option<&'a crate::model::huge::HugeState>,
    ) -> Shown<'a> {
        Shown {
            attrs: &st.attrs,
            poison: &st.poison,
            huge: hs,
        }
    }

    /// Forgets the device view's address (it was lost to a remap by the VMM).
    pub(crate) fn forget_device(&self) {
        self.device_base.store(0, Ordering::Release);
    }

    pub(crate) fn note_merge_waiting(&self, waiting: bool) {
        self.merge_waiting.store(waiting, Ordering::Release);
    }

    pub(crate) fn merge_waiting(&self) -> bool {
        self.merge_waiting.load(Ordering::Acquire)
    }

    /// All pages of the file.
    pub fn all_pages(&self) -> PageRange {
        PageRange::new(0, self.pages_total())
    }
}

impl views::tracker::Tracked for Engine {
    fn try_neutralize(&self, pending: &dyn Fn() -> bool, take: &dyn Fn()) -> bool {
        let Some(mut ctl) = self.try_control() else {
            return false;
        };
        if pending() {
            self.neutralize(&mut ctl);
            take();
        }
        true
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let ctl = self.control.get_mut().unwrap_or_else(|e| e.into_inner());
        // Stop the reader before the views go (it holds only a weak reference).
        ctl.views.tracker = None;
        // A file no other process holds, whose sealed views keep it referenced until this
        // process exits: give its memory back now. A follower never does: the file is its
        // owner's, which goes on using the memory.
        if self.gate.in_creator()
            && !self.gate.is_follower()
            && !self.shared_out.load(Ordering::Acquire)
            && ctl.views.holds_sealed()
        {
            let _ = self.backing.fallocate(
                libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
                0,
                self.size,
            );
        }
    }
}

/// Mappings kept free below `vm.max_map_count`: a thread needs two (stack and guard), the
/// allocator some, the VMM its own. gmem operations that add mappings (a HugeTLB view, the
/// split of a huge page: one or two per view) fail with `ENOMEM` rather than eat into it, so
/// a guest's conversion pattern never leaves the VMM unable to start a thread.
pub const MAP_HEADROOM: usize = 1024;

impl Engine {
    /// Fails with `ENOMEM` when adding `per_view` mappings to every view (and the guest
    /// mapping) would bring the process within [`MAP_HEADROOM`] of `vm.max_map_count`.
    pub(crate) fn headroom(&self, ctl: &Control, per_view: usize) -> io::Result<()> {
        static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let max = *MAX.get_or_init(|| crate::sys::proc::max_map_count().unwrap_or(65_530));
        let now = crate::sys::proc::map_count()?;
        let need = per_view.saturating_mul(ctl.views.slots().len() + 1);
        if now + need + MAP_HEADROOM > max {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Ok(())
    }

    /// Creates a host view of `len` bytes (block multiple) from `offset` (block aligned);
    /// returns its id and address.
    /// On failure, names what failed (`userfaultfd`, `mmap`).
    pub(crate) fn map_view(
        &self,
        offset: u64,
        len: usize,
    ) -> Result<(u64, usize), (&'static str, io::Error)> {
        let mut ctl = self
            .control()
            .map_err(|_| ("gate", io::Error::from_raw_os_error(libc::EPERM)))?;
        if ctl.views.mech() == Mech::Huge {
            self.headroom(&ctl, 3).map_err(|e| ("mmap", e))?;
        }
        if ctl.views.mech() != Mech::Sealed {
            ctl.views.uffd_or_open().map_err(|e| ("userfaultfd", e))?;
        }
        let numa = self.numa_policy_set();
        let out = {
            let st = self.read_pages();
            let hs = self.huge().map(|h| h.state());
            let shown = self.shown(&st, hs.as_deref());
            ctl.views
                .create(&self.view_ctx(numa.as_ref()), offset, len, shown)
                .map_err(|e| ("mmap", e))?
        };
        self.ensure_tracker(&mut ctl).map_err(|e| ("spawn", e))?;
        Ok(out)
    }

    /// Starts the reader of the view userfaultfd once a view is registered with it.
    pub(crate) fn ensure_tracker(&self, ctl: &mut Control) -> io::Result<()> {
        if ctl.views.tracker.is_none() && ctl.views.mech() != Mech::Sealed {
            if let Some(u) = ctl.views.uffd().cloned() {
                ctl.views.tracker = Some(views::tracker::Tracker::spawn(u, self.me.clone())?);
            }
        }
        Ok(())
    }

    /// Drops view `id` (its owner let go of it).
    pub(crate) fn drop_view(&self, id: u64) {
        if !self.gate.in_creator() {
            return;
        }
        let mut ctl = self.control_unchecked();
        ctl.views.remove(id);
    }

    /// The identities the tracker needs to tell views, aliases and gmem's own mappings apart.
    fn known(&self) -> views::tracker::Known {
        let id = |fd: BorrowedFd<'_>| {
            crate::sys::fd::fstat(fd)
                .ok()
                .map(|st| (crate::sys::proc::dev_pair(st.st_dev), st.st_ino))
        };
        let mut files: Vec<_> = id(self.fd()).into_iter().collect();
        let mut internal = Vec::new();
        if let Some(g) = self.guest_map() {
            internal.push((g.addr(), g.len()));
        }
        if let Some(h) = self.huge() {
            files.extend(id(h.companion()));
            internal.push((h.pieces_map().addr(), h.pieces_map().len()));
        }
        if let Some(m) = self.backing().as_hugetlb().map(|h| h.huge_mapping()) {
            internal.push((m.addr(), m.len()));
        }
        views::tracker::Known {
            files,
            hole: views::slot::hole_fd().ok().and_then(id),
            internal,
        }
    }

    /// The VMM moved or unmapped a view: see [`views::tracker`].
    pub(crate) fn neutralize(&self, ctl: &mut Control) {
        let known = self.known();
        let numa = self.numa_policy_set();
        let lost = {
            let st = self.read_pages();
            let hs = self.huge().map(|h| h.state());
            let shown = self.shown(&st, hs.as_deref());
            ctl.views
                .neutralize(&self.view_ctx(numa.as_ref()), shown, &known)
        };
        if !lost.is_empty() && ctl.views.device_base().is_none() {
            self.forget_device();
        }
    }

    /// After a punch-hole of `r`: the kernel's truncation drops every marker at the offset of a
    /// page that something still mapped at that moment (`unmap_mapping_folio` with
    /// `ZAP_FLAG_DROP_MARKER`), so the markers of the range's private and poisoned pages go
    /// back in every view, here and in every participant.
    ///
    /// The caller holds the page state (`st`), for writing when accessors must not run
    /// meanwhile (a punch-hole): participants are told before it is released.
    pub(crate) fn refresh(
        &self,
        ctl: &mut Control,
        st: &PageState,
        r: PageRange,
    ) -> io::Result<()> {
        let numa = self.numa_policy_set();
        {
            let hs = self.huge().map(|h| h.state());
            let shown = self.shown(st, hs.as_deref());
            ctl.views
                .reenforce_range(&self.view_ctx(numa.as_ref()), shown, r)?;
        }
        ctl.participants
            .notify(&participant::Step::Refresh(r.bytes()));
        Ok(())
    }

    /// Hand-over done: every view and the guest mapping stop reaching the file.
    pub(crate) fn release_mappings(&self, ctl: &mut Control) {
        ctl.views.release_all();
        self.after_own_remap(ctl);
        if let Some(g) = self.guest_map() {
            let res = views::slot::hole_fd().and_then(|fd| {
                g.map_fixed(
                    0,
                    g.len(),
                    Some(fd),
                    0,
                    libc::MAP_SHARED,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            });
            if let Err(e) = res {
                tracing::error!("revoking the guest mapping at hand-over: {e}");
            }
        }
    }
}

impl Engine {
    /// Applies `policy` to gmem's mappings and every view, then records it (new windows get
    /// it too).
    pub(crate) fn set_numa(&self, policy: &NumaPolicy) -> Result<(), NumaError> {
        self.gate.access().map_err(|_| NumaError::NotOwner)?;
        let guest = self.guest.as_ref().ok_or(NumaError::NoMapping)?;
        let mut ctl = self.control_unchecked();
        // A view the VMM moved before this took the lock is given up first (no `mbind` of
        // the range the move left empty).
        self.settle(&mut ctl);
        let os = |source| NumaError::Os {
            op: "mbind",
            source,
        };
        crate::sys::numa::mbind(guest, 0, guest.len(), policy).map_err(os)?;
        if let Some(huge) = self.backing.as_hugetlb() {
            let m = huge.huge_mapping();
            crate::sys::numa::mbind(m, 0, m.len(), policy).map_err(os)?;
        }
        ctl.views.mbind_all(policy).map_err(os)?;
        self.set_numa_record(Some(policy.clone()));
        Ok(())
    }
}

impl Engine {
    /// How a touch of byte `at` of view `id` faults (see [`crate::HostView::fault_at`]).
    pub(crate) fn fault_at(&self, id: u64, at: usize) -> Option<crate::model::fault::HostFault> {
        if !self.gate.in_creator() {
            return Some(crate::model::fault::HostFault::Segv);
        }
        let (offset, len, in_file) = {
            let ctl = self.control_unchecked();
            let slot = ctl.views.slots().iter().find(|s| s.id == id)?;
            (slot.offset, slot.len, slot.in_file)
        };
        if at >= len {
            return None;
        }
        if self.gate.phase() == gate::Phase::Released {
            return Some(self.revoked_fault());
        }
        if at >= in_file {
            return Some(crate::model::fault::HostFault::Bus);
        }
        self.host_fault(offset + at as u64)
    }

    /// How a view revoked at a hand-over faults everywhere: guard markers over the whole
    /// view, or, on HugeTLB (whose views are `Mech::Huge`, as the backing decides at
    /// assembly), one hole mapping over it ([`ViewSet::release_all`]). Derived from the
    /// backing, so no lock is taken: a listener may ask while the release holds the control
    /// lock.
    fn revoked_fault(&self) -> crate::model::fault::HostFault {
        match self.backing.kind() {
            BackingKind::HugeTlb(_) => crate::model::fault::HostFault::Bus,
            _ => crate::model::fault::HostFault::Segv,
        }
    }

    /// How a host view's touch of the page at file offset `offset` faults, if it does: the
    /// same in every view (they show the same windows).
    pub(crate) fn host_fault(&self, offset: u64) -> Option<crate::model::fault::HostFault> {
        use crate::model::fault::HostFault;
        if !self.gate.in_creator() {
            return Some(HostFault::Segv);
        }
        if self.gate.phase() == gate::Phase::Released {
            return Some(self.revoked_fault());
        }
        if offset >= self.size {
            return Some(HostFault::Bus);
        }
        let page = crate::model::units::page_of(offset);
        let st = self.read_pages();
        let private = st.attrs.get(page) == Attr::Private;
        let blocked = private || st.poison.any_in(PageRange::one(page));
        if !blocked {
            return None;
        }
        match self.huge() {
            Some(h) if !h.state().is_split(h.geo.of_page(page)) && private => Some(HostFault::Bus),
            _ => Some(HostFault::Segv),
        }
    }
}

/// Faults through the guest mapping without the page-state lock are running while this
/// lives ([`Engine::unlocked_faults`]).
pub(crate) struct UnlockedFaults<'a>(&'a AtomicU64);

impl Drop for UnlockedFaults<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}
