//! The split and merge of one huge page (mechanism in the [module docs](super)).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::Restructure;
use crate::attr::Attr;
use crate::convert::ConvertError;
use crate::file::Inner;
use crate::range::ByteRange;
use crate::sys::mapping::Mapping;
use crate::sys::{to_off, to_usize, PAGE_SIZE};
use crate::view::host::ViewSlot;

/// Which direction a copy goes between the huge mapping and the companion file.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToPieces,
    FromPieces,
}

/// Copies `r` between gmem's huge-page mapping and the companion file at the same offset.
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
/// checked that `h` is not split). Fails with `EAGAIN` naming the first referenced page.
pub(crate) fn split(
    inner: &Inner,
    rs: &Restructure,
    views: &mut [ViewSlot],
    h: u64,
) -> Result<(), ConvertError> {
    let hr = huge_range(rs, h);
    let os = |source| ConvertError::Os {
        offset: hr.start,
        source,
    };
    let (huge, guest) = parts(inner).map_err(os)?;
    let (first, end) = (hr.start / PAGE_SIZE, hr.end / PAGE_SIZE);
    {
        let _attrs = inner.attrs_write();
        if let Some(p) = inner.refs.first_busy(first, end) {
            return Err(ConvertError::Busy {
                offset: p * PAGE_SIZE,
            });
        }
        copy(huge, rs.companion(), hr, Dir::ToPieces).map_err(os)?;
        remap_guest(inner, guest, rs.companion(), hr).map_err(os)?;
        rs.set_split(h, true);
    }
    for v in views.iter_mut() {
        remap_view_pieces(inner, rs, v, h)?;
    }
    Ok(())
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
/// again here under the attribute lock). With `keep` the pieces' contents are copied back;
/// without (a punch-hole) they are dropped.
pub(crate) fn merge(
    inner: &Inner,
    rs: &Restructure,
    views: &mut [ViewSlot],
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
    let private = {
        let attrs = inner.attrs_write();
        if let Some(p) = inner.refs.first_busy(first, end) {
            return Err(ConvertError::Busy {
                offset: p * PAGE_SIZE,
            });
        }
        if keep {
            copy(huge, rs.companion(), hr, Dir::FromPieces).map_err(os)?;
        }
        remap_guest(inner, guest, inner.backing.fd(), hr).map_err(os)?;
        attrs.all(first, end, Attr::Private)
    };
    rs.set_split(h, false);
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
    crate::sys::fd::fallocate(
        rs.companion(),
        libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
        hr.start,
        hr.len(),
    )
    .map_err(os)
}
