//! Restructuring HugeTLB memory: splitting a huge page whose 4 KiB pages are mixed, and
//! merging it back.
//!
//! Attributes stay 4 KiB granular on every backing. On a HugeTLB file, a huge page whose
//! pages are not all in one state (or that holds a poisoned page next to shared ones) must be
//! *split*, so that every host view maps exactly its shared 4 KiB pages; when it is uniform
//! again and nothing holds its pieces, it is *merged* back.
//!
//! # Why not split in place
//!
//! The kernel splits a huge folio in place. A userspace process cannot: a HugeTLB mapping is
//! managed in whole huge pages (`mprotect`, `munmap` or `MAP_FIXED` of 4 KiB inside one fail
//! with `EINVAL`, `MADV_DONTNEED` needs a huge-aligned start, and `UFFDIO_POISON` on HugeTLB
//! works only on whole huge pages), and shmem THP would give up the HugeTLB pool and its
//! reservation, which is the reason to use HugeTLB at all.
//!
//! # Mechanism: companion pieces
//!
//! Every HugeTLB file has a *companion* memfd (shmem, 4 KiB pages, same size, sparse). To split
//! huge page `H`, with the file's control lock held:
//!
//! 1. *freeze*: `H`'s 2 MiB window is write-protected with the file's userfaultfd in gmem's
//!    guest mapping and in every host view. Readers go on; a writer (a pin holder, the guest
//!    view, a host view, the kernel through any of them) blocks in its page fault. Nobody reads
//!    the userfaultfd: the writers only wait;
//! 2. *copy*: `H` is copied into the companion at the same offset (one `pwrite` from gmem's
//!    never-remapped mapping of the huge pages, allocating 512 pieces);
//! 3. *remap*: the companion is mapped (`MAP_FIXED`) over `H`'s window in the guest mapping and
//!    in every host view; each new VMA is registered with the same userfaultfd in write-protect
//!    mode and `MADV_DONTFORK`ed, and in views its private (and poisoned) 4 KiB pages get poison
//!    markers, so the usual per-page enforcement applies;
//! 4. *thaw*: the waiting writers are woken; their faults retry on the pieces.
//!
//! Nothing written is lost, so a split needs no free pages: pinned pages of `H` stay pinned
//! (their address does not change, only what backs it), and per-page conversions of the other
//! pages of a huge page succeed while one is pinned, as the kernel's rules require.
//!
//! The huge page stays allocated (and reserved) while `H` is split, so the pool accounting is
//! honest: the file never holds less than its size in huge pages, and merging never needs a new
//! page. To merge, which needs `H` uniform, unpoisoned and *no host reference on any piece*,
//! the windows are frozen again, the companion range is copied back into the huge page, the HugeTLB file is mapped back over the window everywhere (re-registered, and
//! poisoned whole when the page is uniformly private), and writers are woken. The pieces stay
//! allocated for a quick split of the same page (the next copy goes through gmem's mapping of
//! the companion, a plain `memcpy`), up to [`PIECE_CACHE_BYTES`] per file, oldest punched out
//! first; a punch-hole drops them at once.
//!
//! A split huge page that is uniform again but still has a referenced piece (a pin, possibly
//! outliving every handle of the file) *waits*: it merges when the last reference is dropped
//! (the drop tries the control lock; if a conversion holds it, the merge happens at the end of
//! the next conversion or [`GuestMemfd::merge_pending`]).
//!
//! Peer processes ([`crate::peer`]) receive the companion with the file and follow every split
//! and merge (`SPLIT`/`MERGE` requests, before the owner remaps); a peer holding a reference on
//! a page of the huge page refuses (`EAGAIN`) and the owner backs out.
//!
//! # Cost
//!
//! A split is one 2 MiB copy (into freshly allocated shmem pages, or into cached ones),
//! `1 + v` `mmap` calls, `1 + v` write-protect and wake calls and as many userfaultfd
//! registrations (`v` = host views covering the page); a merge is one 2 MiB copy back (a
//! `memcpy` from gmem's mapping of the pieces) and the same calls. Two full copies make
//! 2× a 2 MiB `memcpy` the floor of this mechanism; `BENCHMARKS.md` (P8) measures 2.3×.
//! While split, a huge page costs 2 MiB of shmem on top of the huge page, and its window
//! takes 512 TLB entries instead of one.
//!
//! # Limits
//!
//! A writer in a peer process is not frozen: the peer refuses a split or merge only while it
//! holds a checked reference (pin, accessor), so a raw write through a peer's view during the
//! copy can be lost.

mod split;
pub(crate) mod step;

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::file::GuestMemfd;
use crate::sys::fd;

pub(crate) use split::{follow, split};

/// Restructuring counters of one HugeTLB file. The handle outlives the file, so a caller can
/// watch pieces that outlive it (a pin held after the last handle is closed) come back.
#[derive(Debug)]
pub struct Accounting {
    page_size: u64,
    huge_pages: u64,
    split: AtomicU64,
    waiting: AtomicU64,
    splits: AtomicU64,
    merges: AtomicU64,
    cached: AtomicU64,
}

impl Accounting {
    /// The huge page size of the file (its original allocation unit).
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Huge pages the file holds from the pool (reserved at creation, never fewer).
    pub fn huge_pages(&self) -> u64 {
        self.huge_pages
    }

    /// Huge pages currently split into 4 KiB pieces.
    pub fn split_pages(&self) -> u64 {
        self.split.load(Ordering::Acquire)
    }

    /// Split huge pages that are uniform again but wait for their pieces (held by the host)
    /// before merging.
    pub fn waiting_to_merge(&self) -> u64 {
        self.waiting.load(Ordering::Acquire)
    }

    /// Bytes of 4 KiB pieces currently in use (split pages times the huge page size).
    pub fn piece_bytes(&self) -> u64 {
        self.split_pages() * self.page_size
    }

    /// Bytes of pieces kept allocated after a merge, for a quick split of the same huge page
    /// (at most [`PIECE_CACHE_BYTES`]).
    pub fn cached_piece_bytes(&self) -> u64 {
        self.cached.load(Ordering::Acquire) * self.page_size
    }

    /// Splits performed since creation.
    pub fn splits(&self) -> u64 {
        self.splits.load(Ordering::Acquire)
    }

    /// Merges performed since creation.
    pub fn merges(&self) -> u64 {
        self.merges.load(Ordering::Acquire)
    }
}

/// Which huge pages are split and which wait to merge (indices of huge pages).
#[derive(Debug, Default)]
pub(crate) struct State {
    pub split: BTreeSet<u64>,
    pub waiting: BTreeSet<u64>,
    /// Merged huge pages whose pieces are still allocated (and mapped in gmem's mapping of the
    /// companion), oldest first, at most [`PIECE_CACHE_BYTES`] of them.
    pub cached: std::collections::VecDeque<u64>,
}

/// Bytes of pieces per file that stay allocated after merges, so that splitting one of those
/// huge pages again copies into memory that is already there (a plain `memcpy`) instead of
/// allocating 512 pages: eight 2 MiB pages; 1 GiB pages are never cached.
pub const PIECE_CACHE_BYTES: u64 = 16 << 20;

/// Restructuring state of a HugeTLB file.
#[derive(Debug)]
pub(crate) struct Restructure {
    pub page: u64,
    /// gmem's mapping of the companion file (copies into cached pieces go through it).
    /// Declared before the descriptor so it is unmapped first.
    pieces: crate::sys::mapping::Mapping,
    companion: OwnedFd,
    state: Mutex<State>,
    /// Number of waiting pages, read without the lock on every reference drop.
    waiting_hint: AtomicUsize,
    pub acct: Arc<Accounting>,
}

impl Restructure {
    /// State for a HugeTLB file of `size` bytes with `page`-byte huge pages: a new companion
    /// file, or the owner's when the backing was received from another process.
    pub fn for_backing(backing: &dyn crate::Backing, size: u64, page: u64) -> io::Result<Self> {
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
        let len = crate::sys::to_usize(size)?;
        let pieces =
            crate::sys::mapping::Mapping::shared(companion.as_fd(), 0, len, libc::MAP_NORESERVE)?;
        pieces.advise(0, len, libc::MADV_DONTFORK)?;
        Ok(Restructure {
            page,
            pieces,
            companion,
            state: Mutex::new(State::default()),
            waiting_hint: AtomicUsize::new(0),
            acct: Arc::new(Accounting {
                page_size: page,
                huge_pages: size / page,
                split: AtomicU64::new(0),
                waiting: AtomicU64::new(0),
                splits: AtomicU64::new(0),
                merges: AtomicU64::new(0),
                cached: AtomicU64::new(0),
            }),
        })
    }

    pub fn companion(&self) -> BorrowedFd<'_> {
        self.companion.as_fd()
    }

    /// gmem's mapping of the companion file.
    pub fn pieces(&self) -> &crate::sys::mapping::Mapping {
        &self.pieces
    }

    /// Takes `h` out of the piece cache; true when its pieces were still allocated.
    pub fn take_cached(&self, h: u64) -> bool {
        let mut st = self.state();
        let hit = match st.cached.iter().position(|&c| c == h) {
            Some(i) => st.cached.remove(i).is_some(),
            None => false,
        };
        self.acct
            .cached
            .store(st.cached.len() as u64, Ordering::Release);
        hit
    }

    /// Puts merged page `h` into the piece cache; returns the page pushed out, whose pieces
    /// must be punched.
    pub fn cache(&self, h: u64) -> Option<u64> {
        let mut st = self.state();
        st.cached.push_back(h);
        let cap = usize::try_from(PIECE_CACHE_BYTES / self.page).unwrap_or(0);
        let out = if st.cached.len() > cap {
            st.cached.pop_front()
        } else {
            None
        };
        self.acct
            .cached
            .store(st.cached.len() as u64, Ordering::Release);
        out
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_split(&self, h: u64) -> bool {
        self.state().split.contains(&h)
    }

    /// Records `h` as split (`true`) or merged (`false`).
    pub fn set_split(&self, h: u64, split: bool) {
        let mut st = self.state();
        if split {
            if st.split.insert(h) {
                self.acct.split.fetch_add(1, Ordering::AcqRel);
                self.acct.splits.fetch_add(1, Ordering::AcqRel);
            }
        } else if st.split.remove(&h) {
            self.acct.split.fetch_sub(1, Ordering::AcqRel);
            self.acct.merges.fetch_add(1, Ordering::AcqRel);
        }
        if !split {
            Self::set_waiting_locked(self, &mut st, h, false);
        }
    }

    /// Records whether split page `h` waits for its pieces before merging.
    pub fn set_waiting(&self, h: u64, waiting: bool) {
        let mut st = self.state();
        Self::set_waiting_locked(self, &mut st, h, waiting);
    }

    fn set_waiting_locked(&self, st: &mut State, h: u64, waiting: bool) {
        let changed = if waiting {
            st.waiting.insert(h)
        } else {
            st.waiting.remove(&h)
        };
        if changed {
            self.waiting_hint.store(st.waiting.len(), Ordering::Release);
            self.acct
                .waiting
                .store(st.waiting.len() as u64, Ordering::Release);
        }
    }

    /// True when some split page waits to merge (cheap; read on every reference drop).
    pub fn any_waiting(&self) -> bool {
        self.waiting_hint.load(Ordering::Acquire) != 0
    }

    /// Split huge pages inside `[first, end)` (huge page indices).
    pub fn split_in(&self, first: u64, end: u64) -> Vec<u64> {
        self.state().split.range(first..end).copied().collect()
    }

    /// Waiting huge pages inside `[first, end)`.
    pub fn waiting_in(&self, first: u64, end: u64) -> Vec<u64> {
        self.state().waiting.range(first..end).copied().collect()
    }
}

impl GuestMemfd {
    /// The restructuring counters of a HugeTLB file (`None` for other backings). The handle
    /// stays valid after the file is gone.
    pub fn hugetlb_accounting(&self) -> Option<Arc<Accounting>> {
        self.inner.restructure.as_ref().map(|r| r.acct.clone())
    }

    /// Merges every split huge page that is uniform and no longer held. Returns how many
    /// merged. Merges normally happen on their own (after conversions and when the last
    /// reference to a piece is dropped); this is for a caller that wants them now.
    pub fn merge_pending(&self) -> Result<u64, crate::ConvertError> {
        let Some(rs) = self.inner.restructure.as_ref() else {
            return Ok(0);
        };
        let mut ctl = self.inner.control();
        let all = rs.split_in(0, u64::MAX);
        let mut n = 0;
        for h in all {
            if step::try_merge(&self.inner, rs, &mut ctl, h)? {
                n += 1;
            }
        }
        Ok(n)
    }
}
