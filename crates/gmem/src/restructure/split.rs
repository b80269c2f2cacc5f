//! The split and merge of one huge page (mechanism in the [module docs](super)).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use super::Restructure;
use crate::attr::Attr;
use crate::convert::ConvertError;
use crate::file::{Control, Inner};
use crate::range::ByteRange;
use crate::sys::mapping::Mapping;
use crate::sys::uffd::Uffd;
use crate::sys::{to_off, to_usize, PAGE_SIZE};
use crate::view::host::ViewSlot;

/// Which direction a copy goes between the huge mapping and the companion file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToPieces,
    FromPieces,
}

/// Copies `r` between gmem's huge-page mapping and gmem's mapping of the companion file
/// (pieces already allocated: a plain memory copy).
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

/// Copies `r` between gmem's huge-page mapping and the companion file at the same offset,
/// through `pwrite`/`pread` (allocating pieces without faulting a mapping: about half the
/// cost of a first touch through a mapping).
fn copy(huge: &Mapping, pieces: BorrowedFd<'_>, r: ByteRange, dir: Dir) -> io::Result<()> {
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
        let n = match dir {
            // SAFETY: `[p, p + len - done)` lies inside the live huge mapping (checked above);
            // the kernel reads it as plain bytes.
            Dir::ToPieces => unsafe { libc::pwrite(pieces.as_raw_fd(), p, len - done, off) },
            // SAFETY: as above; the kernel writes the bytes, no Rust reference covers them.
            Dir::FromPieces => unsafe { libc::pread(pieces.as_raw_fd(), p, len - done, off) },
        };
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

/// The part of view `v` that shows `r`, as (offset in view, length, file offset).
fn window(v: &ViewSlot, r: ByteRange) -> Option<(usize, usize, u64)> {
    let len = u64::try_from(v.map.len()).ok()?;
    let mine = ByteRange {
        start: v.offset,
        end: v.offset.checked_add(len)?,
    };
    let hit = mine.intersect(&r)?;
    Some((
        usize::try_from(hit.start - v.offset).ok()?,
        usize::try_from(hit.len()).ok()?,
        hit.start,
    ))
}

/// Maps `fd` over the window of `r` in view `v`: a fresh VMA, `MADV_DONTFORK`ed and
/// registered with the view's userfaultfd, so markers work on it.
fn remap_view(inner: &Inner, v: &mut ViewSlot, fd: BorrowedFd<'_>, r: ByteRange) -> io::Result<()> {
    let Some((off, len, at)) = window(v, r) else {
        return Ok(());
    };
    v.holes.remove(&r.start);
    v.map.map_fixed(off, len, fd, at)?;
    v.map.advise(off, len, libc::MADV_DONTFORK)?;
    if let Some(uffd) = &v.uffd {
        uffd.register(v.map.addr() + off, len)?;
    }
    crate::numa::reapply(inner, &v.map, off, len)
}

/// Maps `fd` over `r` in gmem's guest mapping.
fn remap_guest(inner: &Inner, guest: &Mapping, fd: BorrowedFd<'_>, r: ByteRange) -> io::Result<()> {
    let (off, len) = (to_usize(r.start)?, to_usize(r.len())?);
    guest.map_fixed(off, len, fd, r.start)?;
    guest.advise(off, len, libc::MADV_DONTFORK)?;
    crate::numa::reapply(inner, guest, off, len)
}

fn parts(inner: &Inner) -> io::Result<(&Mapping, &Mapping)> {
    let huge = inner
        .backing
        .as_hugetlb()
        .map(|h| h.huge_mapping())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let guest = inner
        .guest
        .as_ref()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))?;
    Ok((huge, guest))
}

/// The byte range of huge page `h`.
pub(crate) fn huge_range(rs: &Restructure, h: u64) -> ByteRange {
    ByteRange {
        start: h * rs.page,
        end: (h + 1) * rs.page,
    }
}

/// Splits huge page `h` into companion pieces (the caller holds the control lock and has
/// checked that `h` is not split). Writers to the huge page are held off (write-protected)
/// while its contents move, so nothing written through a pin, the guest view or a host view
/// is lost. Fails with `EAGAIN` when a peer process holds a page of it, changing nothing.
pub(crate) fn split(
    inner: &Inner,
    rs: &Restructure,
    ctl: &mut Control,
    h: u64,
) -> Result<(), ConvertError> {
    let hr = huge_range(rs, h);
    let os = |source| ConvertError::Os {
        offset: hr.start,
        source,
    };
    let (huge, guest) = parts(inner).map_err(os)?;
    let frozen = freeze(ctl, guest, hr).map_err(os)?;
    let res = (|| {
        if rs.take_cached(h) {
            copy_mapped(huge, rs.pieces(), hr, Dir::ToPieces).map_err(os)?;
        } else {
            copy(huge, rs.companion(), hr, Dir::ToPieces).map_err(os)?;
        }
        if let Err(e) = ctl.peers.split(hr) {
            punch_pieces(rs, hr).map_err(os)?;
            return Err(e);
        }
        remap_guest(inner, guest, rs.companion(), hr).map_err(os)?;
        register_guest(&frozen, guest, hr).map_err(os)?;
        rs.set_split(h, true);
        for v in ctl.views.iter_mut() {
            remap_view_pieces(inner, rs, v, h)?;
        }
        Ok(())
    })();
    thaw(&frozen);
    res
}

/// Write-protected windows of one huge page: gmem's guest mapping first, then the views.
struct Frozen {
    uffd: Arc<Uffd>,
    windows: Vec<(usize, usize)>,
}

/// Write-protects the window of `hr` in gmem's guest mapping and in every host view that maps
/// it, so that writers wait while the contents move.
fn freeze(ctl: &mut Control, guest: &Mapping, hr: ByteRange) -> io::Result<Frozen> {
    let uffd = match &ctl.uffd {
        Some(u) => u.clone(),
        None => {
            let u = Arc::new(Uffd::new()?);
            ctl.uffd = Some(u.clone());
            u
        }
    };
    let mut frozen = Frozen {
        uffd,
        windows: Vec::new(),
    };
    let g = (guest.addr() + to_usize(hr.start)?, to_usize(hr.len())?);
    frozen.uffd.register(g.0, g.1)?;
    let mut windows = vec![g];
    for v in &ctl.views {
        if v.holes.contains(&hr.start) || v.uffd.is_none() {
            continue;
        }
        if let Some((off, len, _)) = window(v, hr) {
            windows.push((v.map.addr() + off, len));
        }
    }
    for w in windows {
        if let Err(e) = frozen.uffd.write_protect(w.0, w.1, true) {
            thaw(&frozen);
            return Err(e);
        }
        frozen.windows.push(w);
    }
    Ok(frozen)
}

/// Registers the guest window of `hr` (just remapped) with the userfaultfd, so the next split
/// or merge can write-protect it.
fn register_guest(frozen: &Frozen, guest: &Mapping, hr: ByteRange) -> io::Result<()> {
    frozen
        .uffd
        .register(guest.addr() + to_usize(hr.start)?, to_usize(hr.len())?)
}

/// Lifts the protection (a no-op on windows remapped since) and wakes the waiting writers,
/// which retry on whatever is mapped now.
fn thaw(frozen: &Frozen) {
    for &(addr, len) in &frozen.windows {
        if let Err(e) = frozen.uffd.write_protect(addr, len, false) {
            tracing::debug!(addr, "write-unprotect after a remap: {e}");
        }
        if let Err(e) = frozen.uffd.wake(addr, len) {
            tracing::error!(addr, "waking writers: {e}");
        }
    }
}

/// Drops the pieces of `hr` from the companion file.
fn punch_pieces(rs: &Restructure, hr: ByteRange) -> io::Result<()> {
    crate::sys::fd::fallocate(
        rs.companion(),
        libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
        hr.start,
        hr.len(),
    )
}

/// A peer process follows its owner's split (`split`) or merge of the huge page at `r`: the
/// owner has already moved the contents; the follower checks its own host references
/// (`EAGAIN`) and remaps its guest mapping and views.
pub(crate) fn follow(
    inner: &Inner,
    views: &mut [ViewSlot],
    split: bool,
    r: ByteRange,
) -> Result<(), ConvertError> {
    let einval = || ConvertError::Os {
        offset: r.start,
        source: io::Error::from_raw_os_error(libc::EINVAL),
    };
    let rs = inner.restructure.as_ref().ok_or_else(einval)?;
    let h = r.start / rs.page;
    if huge_range(rs, h) != r {
        return Err(einval());
    }
    let os = |source| ConvertError::Os {
        offset: r.start,
        source,
    };
    let (first, end) = (r.start / PAGE_SIZE, r.end / PAGE_SIZE);
    let private = {
        let attrs = inner.attrs_write();
        if let Some(p) = inner.refs.first_busy(first, end) {
            return Err(ConvertError::Busy {
                offset: p * PAGE_SIZE,
            });
        }
        if let Some(guest) = inner.guest.as_ref() {
            let fd = if split {
                rs.companion()
            } else {
                inner.backing.fd()
            };
            remap_guest(inner, guest, fd, r).map_err(os)?;
        }
        rs.set_split(h, split);
        attrs.all(first, end, Attr::Private)
    };
    if split {
        for v in views.iter_mut() {
            remap_view_pieces(inner, rs, v, h)?;
        }
        Ok(())
    } else {
        views_to_huge(inner, views, r, private)
    }
}

/// Maps the pieces of split huge page `h` over its window in view `v` and marks the pages that
/// must fault there: private pages and poisoned shared pages.
pub(crate) fn remap_view_pieces(
    inner: &Inner,
    rs: &Restructure,
    v: &mut ViewSlot,
    h: u64,
) -> Result<(), ConvertError> {
    let hr = huge_range(rs, h);
    let os = |source| ConvertError::Os {
        offset: hr.start,
        source,
    };
    if window(v, hr).is_none() {
        return Ok(());
    }
    let (first, end) = (hr.start / PAGE_SIZE, hr.end / PAGE_SIZE);
    let revoke: Vec<ByteRange> = {
        let attrs = inner.attrs_read();
        let mut out: Vec<ByteRange> = attrs
            .runs(first, end)
            .filter(|run| run.attr == Attr::Private)
            .map(|run| run.bytes())
            .collect();
        out.extend(inner.poison.shared_poisoned(&attrs, first, end));
        out
    };
    remap_view(inner, v, rs.companion(), hr).map_err(os)?;
    for r in revoke {
        // A view turns a wholly private huge page into a hole over the window, which would
        // hide the pieces; a split page is marked page by page instead, in two calls.
        if r.len() == rs.page {
            let mid = r.end - PAGE_SIZE;
            v.revoke(ByteRange {
                start: r.start,
                end: mid,
            })
            .map_err(os)?;
            v.revoke(ByteRange {
                start: mid,
                end: r.end,
            })
            .map_err(os)?;
        } else {
            v.revoke(r).map_err(os)?;
        }
    }
    Ok(())
}

/// Merges split huge page `h` (uniform, unpoisoned, unreferenced: checked by the caller and
/// again here under the attribute lock, and by every peer process). With `keep` the pieces'
/// contents are copied back; without (a punch-hole) they are dropped.
pub(crate) fn merge(
    inner: &Inner,
    rs: &Restructure,
    ctl: &mut Control,
    h: u64,
    keep: bool,
) -> Result<(), ConvertError> {
    let hr = huge_range(rs, h);
    let os = |source| ConvertError::Os {
        offset: hr.start,
        source,
    };
    let (huge, guest) = parts(inner).map_err(os)?;
    let (first, end) = (hr.start / PAGE_SIZE, hr.end / PAGE_SIZE);
    if let Some(p) = inner.refs.first_busy(first, end) {
        return Err(ConvertError::Busy {
            offset: p * PAGE_SIZE,
        });
    }
    let frozen = freeze(ctl, guest, hr).map_err(os)?;
    let res = (|| {
        if keep {
            copy_mapped(huge, rs.pieces(), hr, Dir::FromPieces).map_err(os)?;
        }
        ctl.peers.merge(hr)?;
        remap_guest(inner, guest, inner.backing.fd(), hr).map_err(os)?;
        register_guest(&frozen, guest, hr).map_err(os)?;
        let private = inner.attrs_read().all(first, end, Attr::Private);
        rs.set_split(h, false);
        views_to_huge(inner, &mut ctl.views, hr, private)
    })();
    thaw(&frozen);
    res?;
    // The pieces stay for a quick split of the same page; the oldest cached ones go.
    if !keep {
        return punch_pieces(rs, hr).map_err(os);
    }
    match rs.cache(h) {
        Some(old) => punch_pieces(rs, huge_range(rs, old)).map_err(os),
        None => Ok(()),
    }
}

/// Maps the huge page back over its window `hr` in every view, whole-page marked when private.
fn views_to_huge(
    inner: &Inner,
    views: &mut [ViewSlot],
    hr: ByteRange,
    private: bool,
) -> Result<(), ConvertError> {
    let os = |source| ConvertError::Os {
        offset: hr.start,
        source,
    };
    for v in views.iter_mut() {
        if v.holes.contains(&hr.start) {
            // A hole already makes the whole (private) page fault; it stays.
            continue;
        }
        remap_view(inner, v, inner.backing.fd(), hr).map_err(os)?;
        if private {
            v.revoke(hr).map_err(os)?;
        }
    }
    Ok(())
}
