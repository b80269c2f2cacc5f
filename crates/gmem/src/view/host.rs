//! Host views: mappings of the file in which private pages raise `SIGBUS`.
//!
//! # Mechanism
//!
//! Each view is one `MAP_SHARED` mapping, registered with a userfaultfd in write-protect mode
//! (which by itself intercepts nothing) so that gmem can place `UFFDIO_POISON` markers on the
//! page-table entries of private pages. A touch of a marked page is a real `SIGBUS`
//! (`BUS_ADRERR` on kernels without `CONFIG_MEMORY_FAILURE`), and a kernel access through the
//! address fails with `EFAULT`. Shared pages fault in normally, whichever mapping allocated
//! them. The whole view stays one VMA however many runs the file has, so the design is not
//! bounded by `vm.max_map_count`.
//!
//! - revoke (to private): `MADV_DONTNEED` on the range, then `UFFDIO_POISON`; a concurrent
//!   fault that re-maps a page in between makes the poison stop with `EEXIST` at that page,
//!   which is zapped again.
//! - restore (to shared): `MADV_DONTNEED` removes the markers; the pages fault in on use.
//! - punch-hole keeps the markers (the kernel does not drop them when it unmaps a file range).
//!
//! Poisoning costs about 0.2 µs per page, so a large private run would cost far more than the
//! zap the kernel does. Every [`HOLE_CHUNK`]-aligned chunk that lies wholly inside a private
//! range is therefore replaced, with one `MAP_FIXED` call, by a mapping of an empty sealed
//! memfd (a *hole*: every touch is past its end, a `SIGBUS` with `BUS_ADRERR`, exactly like a
//! marker). Only the edges get markers. A change to part of a hole chunk first maps the file
//! back over the whole chunk (re-registered, `MADV_DONTFORK` again) and poisons the pages that
//! stay private, so holes only ever cover whole private chunks. The number of VMAs per view is
//! thus bounded by `2 * size / HOLE_CHUNK + 1` (1,025 for 1 GiB), never by the number of runs.
//!
//! # Backings userfaultfd cannot register
//!
//! userfaultfd registers only anonymous, shmem and HugeTLB mappings; a mapping of the kernel
//! guest_memfd is refused (`EINVAL`). For such a backing
//! ([`crate::Backing::userfaultfd_capable`] false) the hole chunk is the block size, so every
//! private page of a view lies in a hole and no marker is needed. Holes map the empty memfd
//! at their own file offset, so adjacent holes merge into one mapping. The cost is one VMA per
//! private run in the view (two with the shared run after it), so the number of private runs a
//! view of such a backing can show is bounded by `vm.max_map_count / 2` (about 32,000 by
//! default); past that, a conversion fails with `ENOMEM` and is rolled back. The kernel lets
//! the splits of the last successful `MAP_FIXED` take the process a little over the limit,
//! and while it is over, every `mmap` fails, including the one that maps pages back to
//! shared: dropping the view (or raising the sysctl) gets the process under the limit again.
//!
//! Views are `MADV_DONTFORK`: a forked child inherits no view (userfaultfd state does not
//! follow a fork, so an inherited view would not be enforced). A second process reaches the
//! memory through [`crate::peer`].

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, OnceLock};

use crate::file::{GuestMemfd, Inner};
use crate::flags::Flags;
use crate::range::{ByteRange, RangeError};
use crate::sys::mapping::Mapping;
use crate::sys::to_usize;
use crate::sys::uffd::Uffd;

/// Why a host view could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The file was created without [`Flags::MMAP`] (`ENODEV`).
    #[error("the file was created without MMAP")]
    NotMappable,
    /// A private (copy-on-write) mapping was requested (`EINVAL`).
    #[error("copy-on-write mappings of guest memory are refused")]
    CopyOnWrite,
    /// Offset not aligned to the block size, zero length, or wrapping range (`EINVAL`).
    #[error(transparent)]
    Range(#[from] RangeError),
    /// A syscall failed.
    #[error("{op} at offset {offset:#x}: {source}")]
    Os {
        /// The operation.
        op: &'static str,
        /// File offset of the view.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl MapError {
    /// The errno the kernel returns for the same case.
    pub fn errno(&self) -> i32 {
        match self {
            MapError::NotMappable => libc::ENODEV,
            MapError::CopyOnWrite | MapError::Range(_) => libc::EINVAL,
            MapError::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// How a view is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sharing {
    /// `MAP_SHARED`: writes reach the file. The only kind guest memory allows.
    #[default]
    Shared,
    /// `MAP_PRIVATE` (copy-on-write): refused with `EINVAL`.
    CopyOnWrite,
}

/// Private chunks of this size (file-aligned) become holes instead of carrying markers.
pub const HOLE_CHUNK: u64 = 2 << 20;

/// The empty, sealed memfd that holes map: every touch is past its end.
fn hole_fd() -> io::Result<BorrowedFd<'static>> {
    static HOLE: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = HOLE.get() {
        return Ok(fd.as_fd());
    }
    // Size sealed at zero: writable shared mappings of it are allowed, yet hold no page.
    let fd = crate::sys::fd::memfd_create(c"gmem-hole", 0)?;
    crate::sys::fd::add_seals(
        fd.as_fd(),
        libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
    )?;
    Ok(HOLE.get_or_init(|| fd).as_fd())
}

/// Maps `len` bytes of the file from `offset` for a view. A writable mapping of a HugeTLB
/// file grows the file to cover it (hugetlbfs ignores `F_SEAL_GROW` there), so the part of a
/// HugeTLB view past the end is a hole instead: touching it is `SIGBUS`, as past the end of
/// any file, and the size stays.
fn map_file(inner: &Inner, offset: u64, len: usize) -> io::Result<Mapping> {
    let crate::BackingKind::HugeTlb(page) = inner.backing.kind() else {
        return Mapping::shared(inner.backing.fd(), offset, len, 0);
    };
    let in_file = to_usize(inner.size.saturating_sub(offset))?;
    if len <= in_file {
        return Mapping::shared(inner.backing.fd(), offset, len, 0);
    }
    let map = Mapping::reserve_aligned(len, to_usize(page)?)?;
    map.map_fixed(0, len, hole_fd()?, 0)?;
    if in_file > 0 {
        map.map_fixed(0, in_file, inner.backing.fd(), offset)?;
    }
    Ok(map)
}

/// A registered view, as conversion sees it.
#[derive(Debug)]
pub(crate) struct ViewSlot {
    pub id: u64,
    pub map: Arc<Mapping>,
    pub offset: u64,
    /// The userfaultfd placing markers; `None` for a backing it cannot register, whose
    /// chunk is then the block size (every private page is in a hole).
    pub uffd: Option<Arc<Uffd>>,
    /// Chunk size of holes for this view (a multiple of the backing's block size).
    pub chunk: u64,
    /// File offsets of the chunks currently mapped as holes.
    pub holes: BTreeSet<u64>,
}

/// Consecutive `EEXIST` retries allowed while a host thread keeps faulting the same range.
const REVOKE_RETRIES: u32 = 1000;

impl ViewSlot {
    fn view_range(&self) -> Option<ByteRange> {
        let len = u64::try_from(self.map.len()).ok()?;
        Some(ByteRange {
            start: self.offset,
            end: self.offset.checked_add(len)?,
        })
    }

    /// The part of this view that maps `r` (file bytes), as (offset in view, len).
    fn span(&self, r: ByteRange) -> Option<(usize, usize)> {
        let hit = self.view_range()?.intersect(&r)?;
        Some((
            usize::try_from(hit.start - self.offset).ok()?,
            usize::try_from(hit.len()).ok()?,
        ))
    }

    /// Zaps the entries mapping `r` (removing poison markers too).
    pub fn zap(&self, r: ByteRange) -> io::Result<()> {
        match self.span(r) {
            Some((off, len)) => self.map.advise(off, len, libc::MADV_DONTNEED),
            None => Ok(()),
        }
    }

    /// The hole chunks overlapping `r`.
    fn holes_in(&self, r: ByteRange) -> Vec<u64> {
        let first = r.start - r.start % self.chunk;
        self.holes.range(first..r.end).copied().collect()
    }

    /// `r` minus the hole chunks, as ranges in order.
    fn outside_holes(&self, r: ByteRange) -> Vec<ByteRange> {
        let mut out = Vec::new();
        let mut at = r.start;
        for h in self.holes_in(r) {
            if h > at {
                out.push(ByteRange { start: at, end: h });
            }
            at = at.max(h + self.chunk);
        }
        if at < r.end {
            out.push(ByteRange {
                start: at,
                end: r.end,
            });
        }
        out
    }

    /// Maps `fd` at file offset `r.start` over the part of the view that shows `r`.
    fn map_fixed(&self, fd: BorrowedFd<'_>, fd_offset: u64, r: ByteRange) -> io::Result<()> {
        let Some((off, len)) = self.span(r) else {
            return Ok(());
        };
        self.map.map_fixed(off, len, fd, fd_offset)?;
        self.map.advise(off, len, libc::MADV_DONTFORK)
    }

    /// Makes every page of `r` fault with `SIGBUS` in this view (`r` lies inside the file).
    pub fn revoke(&mut self, r: ByteRange) -> io::Result<()> {
        let Some(r) = self.view_range().and_then(|v| v.intersect(&r)) else {
            return Ok(());
        };
        for part in self.outside_holes(r) {
            let cs = part.start.next_multiple_of(self.chunk);
            let ce = part.end - part.end % self.chunk;
            if cs < ce {
                let whole = ByteRange { start: cs, end: ce };
                // The hole memfd is mapped at the chunk's own file offset, so adjacent holes
                // are contiguous and the kernel merges them into one mapping.
                self.map_fixed(hole_fd()?, whole.start, whole)?;
                self.holes.extend((cs..ce).step_by(self.chunk_step()));
                self.poison(ByteRange {
                    start: part.start,
                    end: cs,
                })?;
                self.poison(ByteRange {
                    start: ce,
                    end: part.end,
                })?;
            } else {
                self.poison(part)?;
            }
        }
        Ok(())
    }

    fn chunk_step(&self) -> usize {
        usize::try_from(self.chunk).unwrap_or(usize::MAX)
    }

    /// Zap + `UFFDIO_POISON` over `r`, retrying past pages a concurrent fault re-mapped.
    fn poison(&self, r: ByteRange) -> io::Result<()> {
        if r.start >= r.end {
            return Ok(());
        }
        let Some((mut off, mut len)) = self.span(r) else {
            return Ok(());
        };
        let mut retries = 0;
        loop {
            self.map.advise(off, len, libc::MADV_DONTNEED)?;
            let Some(uffd) = &self.uffd else {
                // Unreachable: without a userfaultfd every private range is whole chunks.
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            };
            match uffd.poison(self.map.addr() + off, len) {
                Ok(()) => return Ok(()),
                // A concurrent fault stops the poison at the page it mapped: `EEXIST` when
                // that is the first page, `EAGAIN` with the bytes done when it is a later one.
                Err((e, done))
                    if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::EAGAIN))
                        && retries < REVOKE_RETRIES =>
                {
                    retries += 1;
                    off += done;
                    len -= done;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Lets the host reach `r` again. Hole chunks touched by `r` are mapped back whole (each
    /// group of adjacent chunks with one call) and their pages outside `r`, which stay
    /// private, are poisoned.
    pub fn restore(&mut self, fd: BorrowedFd<'_>, r: ByteRange) -> io::Result<()> {
        let Some(r) = self.view_range().and_then(|v| v.intersect(&r)) else {
            return Ok(());
        };
        if self.uffd.is_none() {
            return self.restore_holes_only(fd, r);
        }
        let mut groups: Vec<ByteRange> = Vec::new();
        for h in self.holes_in(r) {
            match groups.last_mut() {
                Some(g) if g.end == h => g.end = h + self.chunk,
                _ => groups.push(ByteRange {
                    start: h,
                    end: h + self.chunk,
                }),
            }
        }
        for g in groups {
            self.map_fixed(fd, g.start, g)?;
            if let (Some(uffd), Some((off, len))) = (&self.uffd, self.span(g)) {
                uffd.register(self.map.addr() + off, len)?;
            }
            for h in (g.start..g.end).step_by(self.chunk_step()) {
                self.holes.remove(&h);
            }
            self.poison(ByteRange {
                start: g.start,
                end: r.start.max(g.start),
            })?;
            self.poison(ByteRange {
                start: r.end.min(g.end),
                end: g.end,
            })?;
        }
        self.zap(r)
    }

    /// [`ViewSlot::restore`] for a view without markers (every private page is a hole): one
    /// `MAP_FIXED` of the file from the first hole in `r` to the end of the last replaces the
    /// holes and the shared mappings between them, so the number of mappings only goes down
    /// (except where a hole reaches out of `r` and must be split), which matters when the
    /// process is at `vm.max_map_count`. Fresh mappings carry no entries, so nothing is zapped.
    fn restore_holes_only(&mut self, fd: BorrowedFd<'_>, r: ByteRange) -> io::Result<()> {
        let holes = self.holes_in(r);
        let (Some(&first), Some(&last)) = (holes.first(), holes.last()) else {
            return self.zap(r);
        };
        let span = ByteRange {
            start: first.max(r.start),
            end: (last + self.chunk).min(r.end),
        };
        self.map_fixed(fd, span.start, span)?;
        for h in holes {
            self.holes.remove(&h);
        }
        Ok(())
    }
}

/// A host mapping of guest memory. Private pages in it raise `SIGBUS`.
///
/// The view hands out raw pointers only: memory behind them can become private (and fault) at
/// any time the guest converts it, and the guest may write shared pages concurrently. For
/// checked access use [`GuestMemfd::read_at`], [`GuestMemfd::write_at`] or a
/// [`crate::Pin`].
#[derive(Debug)]
pub struct HostView {
    inner: Arc<Inner>,
    map: Arc<Mapping>,
    id: u64,
    offset: u64,
}

impl HostView {
    /// Start of the view.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    /// Length of the view in bytes (may extend past the end of the file).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Never true: views are at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// File offset the view starts at.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

impl Drop for HostView {
    fn drop(&mut self) {
        // Unregister before the mapping goes, so no conversion touches a freed address.
        self.inner.control().views.retain(|v| v.id != self.id);
    }
}

impl GuestMemfd {
    /// Maps `len` bytes of the file from `offset` for the host (`MAP_SHARED`).
    ///
    /// Needs [`Flags::MMAP`] (`ENODEV` otherwise). The view may extend past the end of the
    /// file; touching there is `SIGBUS`, as is touching a private page.
    pub fn map(&self, offset: u64, len: u64) -> Result<HostView, MapError> {
        self.map_with(offset, len, Sharing::Shared)
    }

    /// [`GuestMemfd::map`] with an explicit sharing mode; [`Sharing::CopyOnWrite`] is refused.
    pub fn map_with(&self, offset: u64, len: u64, sharing: Sharing) -> Result<HostView, MapError> {
        let inner = &self.inner;
        if !inner.flags.contains(Flags::MMAP) {
            return Err(MapError::NotMappable);
        }
        if sharing == Sharing::CopyOnWrite {
            return Err(MapError::CopyOnWrite);
        }
        let block = inner.backing.block_size();
        let r = ByteRange::checked(offset, len, 1, u64::MAX)?;
        if offset % block != 0 {
            return Err(RangeError::Unaligned {
                offset,
                len,
                align: block,
            }
            .into());
        }
        let os = |op, source| MapError::Os { op, offset, source };
        let map_len = to_usize(r.len().div_ceil(block) * block).map_err(|e| os("mmap", e))?;

        let mut ctl = inner.control();
        let uffd = match &ctl.uffd {
            _ if !inner.backing.userfaultfd_capable() => None,
            Some(u) => Some(u.clone()),
            None => {
                let u = Arc::new(Uffd::new().map_err(|e| os("userfaultfd", e))?);
                ctl.uffd = Some(u.clone());
                Some(u)
            }
        };
        let map = map_file(inner, offset, map_len).map_err(|e| os("mmap", e))?;
        map.advise(0, map_len, libc::MADV_DONTFORK)
            .map_err(|e| os("madvise(DONTFORK)", e))?;
        if let Some(u) = &uffd {
            u.register(map.addr(), map_len)
                .map_err(|e| os("userfaultfd register", e))?;
        }
        let chunk = if uffd.is_some() {
            HOLE_CHUNK.max(block)
        } else {
            block
        };
        let mut slot = ViewSlot {
            id: ctl.next_view,
            map: Arc::new(map),
            offset,
            uffd,
            chunk,
            holes: BTreeSet::new(),
        };
        // Split huge pages map their pieces, poisoned pages fault, the NUMA policy applies.
        crate::restructure::step::prepare_view(inner, &mut slot)
            .map_err(|e| os("restructure", e))?;
        // Private pages are poisoned before the view is handed out. The control lock keeps
        // conversions out until the view is registered.
        {
            let attrs = inner.attrs_read();
            let end = r.end.min(inner.size);
            if offset < end {
                let pages = (
                    offset / crate::sys::PAGE_SIZE,
                    end.div_ceil(crate::sys::PAGE_SIZE),
                );
                for run in attrs.runs(pages.0, pages.1) {
                    if run.attr == crate::Attr::Private {
                        slot.revoke(run.bytes()).map_err(|e| os("poison", e))?;
                    }
                }
            }
        }
        let view = HostView {
            inner: inner.clone(),
            map: slot.map.clone(),
            id: slot.id,
            offset,
        };
        ctl.next_view += 1;
        ctl.views.push(slot);
        Ok(view)
    }
}
