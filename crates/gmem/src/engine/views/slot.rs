//! One host view: its mapping, and the page-table changes that enforce private pages in it.
//!
//! A view is one reservation of address space: the file's range over the view's bytes, and
//! one `PROT_NONE` *fence* page after them, so that the view can never grow in place (an
//! `mremap` that grows it must move it, which gmem sees). Pages that must fault are:
//!
//! - [`Mech::Guards`] (shmem) and [`Mech::Sealed`] (kernel guest_memfd): guard markers on the
//!   4 KiB pages (`SIGSEGV`); a sealed view is also `mseal`ed, so nobody can move, unmap,
//!   remap or re-protect it;
//! - [`Mech::Huge`] (HugeTLB): per huge page a *window*: the huge page itself (all shared), a
//!   *hole* (all private: a mapping of an empty memfd, `SIGBUS`), or the 4 KiB pieces of a
//!   split page (a mapping of the companion file, with guard markers on its private pieces).
//!
//! Every change that makes something reachable is ordered after everything that stays
//! private is unreachable: a window is built aside (its own mapping, with its markers) and
//! moved over the old one with one `mremap`, so no intermediate state exists.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;

use crate::model::units::{ByteRange, HugeGeometry, PageRange, PAGE_SIZE};
use crate::sys::mapping::Mapping;
use crate::sys::{fd, to_usize};

/// How a view enforces private pages (chosen per backing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mech {
    /// Guard markers; events tell gmem when the VMM moves or unmaps the view.
    Guards,
    /// Guard markers on an `mseal`ed view (backings userfaultfd cannot register).
    Sealed,
    /// HugeTLB windows.
    Huge,
}

/// What a HugeTLB view shows over one huge page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Window {
    /// The huge page (every 4 KiB page shared).
    Whole,
    /// An empty memfd (every page private): `SIGBUS`.
    Hole,
    /// The 4 KiB pieces of the split page, private ones guarded.
    Pieces,
}

/// The empty, sealed memfd that holes map: every touch is past its end.
pub(crate) fn hole_fd() -> io::Result<BorrowedFd<'static>> {
    static HOLE: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = HOLE.get() {
        return Ok(fd.as_fd());
    }
    // Size sealed at zero: writable shared mappings of it are allowed, yet hold no page.
    let fd = fd::memfd_create(c"gmem-hole", 0)?;
    fd::add_seals(
        fd.as_fd(),
        libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
    )?;
    Ok(HOLE.get_or_init(|| fd).as_fd())
}

fn page_len() -> usize {
    to_usize(PAGE_SIZE).unwrap_or(4096)
}

/// One host view.
#[derive(Debug)]
pub(crate) struct Slot {
    pub id: u64,
    /// The reservation: view bytes then the fence page.
    pub map: Mapping,
    /// File offset of the view's first byte.
    pub offset: u64,
    /// Bytes of the view (what the caller asked, rounded up to the block).
    pub len: usize,
    /// Bytes of the view that lie inside the file.
    pub in_file: usize,
    pub mech: Mech,
    /// HugeTLB: windows that are not [`Window::Whole`], by huge page index.
    pub windows: BTreeMap<u64, Window>,
    /// Registered with the view userfaultfd.
    pub registered: bool,
}

impl Slot {
    /// The file pages the view shows.
    pub fn file_pages(&self) -> PageRange {
        let end = self.offset + self.in_file as u64;
        ByteRange {
            start: self.offset,
            end,
        }
        .pages()
    }

    /// The part of the view that shows file pages `r`: (offset in view, length).
    pub fn span(&self, r: PageRange) -> Option<(usize, usize)> {
        let hit = self.file_pages().intersect(&r)?.bytes();
        Some((
            usize::try_from(hit.start - self.offset).ok()?,
            usize::try_from(hit.len()).ok()?,
        ))
    }

    /// Address of the view's first byte.
    pub fn base(&self) -> usize {
        self.map.addr()
    }

    /// Guard markers on the pages of `r` this view shows (guard-based views, or the pieces of
    /// a split HugeTLB window).
    pub fn guard(&self, r: PageRange) -> io::Result<()> {
        match self.span(r) {
            Some((off, len)) => self.map.guard(off, len),
            None => Ok(()),
        }
    }

    /// True when part of the pages of `r` this view shows is no longer mapped at all (the
    /// VMM moved or unmapped the view under gmem): `mincore` answers `ENOMEM` there.
    pub fn vacated(&self, r: PageRange) -> bool {
        match self.span(r) {
            Some((off, len)) => crate::sys::mapping::vacant(self.base() + off, len),
            None => false,
        }
    }

    /// Removes guard markers from the pages of `r` this view shows.
    pub fn unguard(&self, r: PageRange) -> io::Result<()> {
        match self.span(r) {
            Some((off, len)) => self.map.unguard(off, len),
            None => Ok(()),
        }
    }

    /// The window of huge page `h`.
    pub fn window(&self, h: u64) -> Window {
        self.windows.get(&h).copied().unwrap_or(Window::Whole)
    }

    /// `(offset in view, len)` of huge page `h`, when the view shows it.
    pub fn huge_span(&self, geo: HugeGeometry, h: u64) -> Option<(usize, usize)> {
        let (off, len) = self.span(geo.pages(h))?;
        (len == to_usize(geo.size).ok()?).then_some((off, len))
    }
}

/// A window built aside: the mapping of one huge page's pieces, with its markers, ready to
/// be moved over the view's window.
pub(crate) struct Aside {
    pub map: Mapping,
}

impl Aside {
    /// Maps the pieces of huge page `h` from `companion` read-write, marks `guarded` (file
    /// pages) and applies the view's flags, at an address nobody else knows yet.
    pub fn pieces(
        companion: BorrowedFd<'_>,
        geo: HugeGeometry,
        h: u64,
        guarded: &[PageRange],
    ) -> io::Result<Aside> {
        let hr = geo.bytes(h);
        let len = to_usize(hr.len())?;
        let map = Mapping::shared(companion, hr.start, len, 0)?;
        map.advise(0, len, libc::MADV_DONTFORK)?;
        let first = geo.pages(h).start;
        for r in guarded {
            let Some(r) = r.intersect(&geo.pages(h)) else {
                continue;
            };
            let off = to_usize((r.start - first) * PAGE_SIZE)?;
            map.guard(off, to_usize(r.len() * PAGE_SIZE)?)?;
        }
        Ok(Aside { map })
    }
}

/// Reserves the address space of a view of `len` bytes (aligned to `align`) plus the fence.
pub(crate) fn reserve(len: usize, align: usize) -> io::Result<Mapping> {
    let total = len
        .checked_add(page_len())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
    Mapping::reserve_aligned(total, align)
}
