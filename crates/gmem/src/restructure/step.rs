//! Conversion, punch-hole and view set-up on a HugeTLB file, one huge page at a time.

use std::io;

use super::split::{huge_range, merge, remap_view_pieces, split};
use super::Restructure;
use crate::attr::{Attr, RunMap};
use crate::convert::ConvertError;
use crate::file::{Control, Inner};
use crate::range::ByteRange;
use crate::sys::PAGE_SIZE;
use crate::view::host::ViewSlot;

/// Base pages `[first, end)` of a byte range.
fn pages(r: ByteRange) -> (u64, u64) {
    (r.start / PAGE_SIZE, r.end / PAGE_SIZE)
}

/// True when huge page `[hf, he)` (base pages) can be one huge page in every view: all
/// private, or all shared with no poisoned page.
fn whole(inner: &Inner, attrs: &RunMap, hf: u64, he: u64) -> bool {
    attrs.all(hf, he, Attr::Private)
        || (attrs.all(hf, he, Attr::Shared) && !inner.poison.any_in(hf, he))
}

/// True when `[s, e)` is empty or all `attr`.
fn all_or_empty(attrs: &RunMap, s: u64, e: u64, attr: Attr) -> bool {
    s >= e || attrs.all(s, e, attr)
}

/// Converts `r` to `to` on a HugeTLB file: one huge page at a time, splitting a huge page
/// before it becomes mixed and merging it once it is whole again. A failure after the first
/// huge page is [`ConvertError::Partial`], naming the first byte not converted.
pub(crate) fn convert(
    inner: &Inner,
    rs: &Restructure,
    ctl: &mut Control,
    r: ByteRange,
    to: Attr,
) -> Result<(), ConvertError> {
    let mut at = r.start;
    while at < r.end {
        let h = at / rs.page;
        let c = ByteRange {
            start: at,
            end: r.end.min(huge_range(rs, h).end),
        };
        if let Err(e) = one(inner, rs, ctl, h, c, to) {
            return Err(if at == r.start {
                e
            } else {
                ConvertError::Partial {
                    reached: at,
                    source: Box::new(e),
                }
            });
        }
        at = c.end;
    }
    Ok(())
}

/// Converts `c`, which lies inside huge page `h`.
fn one(
    inner: &Inner,
    rs: &Restructure,
    ctl: &mut Control,
    h: u64,
    c: ByteRange,
    to: Attr,
) -> Result<(), ConvertError> {
    let (hf, he) = pages(huge_range(rs, h));
    let (cf, ce) = pages(c);
    let needs_split = {
        let attrs = inner.attrs_read();
        if attrs.all(cf, ce, to) {
            return Ok(());
        }
        let uniform_after = all_or_empty(&attrs, hf, cf, to) && all_or_empty(&attrs, ce, he, to);
        !(uniform_after && (to == Attr::Private || !inner.poison.any_in(hf, he)))
    };
    if needs_split && !rs.is_split(h) {
        split(inner, rs, ctl, h)?;
    }
    let res = match to {
        Attr::Private => crate::convert::to_private(inner, ctl, c),
        Attr::Shared => crate::convert::to_shared(inner, ctl, c),
    };
    let res = res.and_then(|()| {
        if to == Attr::Shared {
            crate::poison::reapply(inner, &mut ctl.views, c).map_err(|source| ConvertError::Os {
                offset: c.start,
                source,
            })
        } else {
            Ok(())
        }
    });
    // Merge when whole again; this also undoes a split made for a conversion that failed.
    let merged = if rs.is_split(h) {
        try_merge(inner, rs, ctl, h).map(drop)
    } else {
        Ok(())
    };
    res.and(merged)
}

/// Merges split huge page `h` if it is whole and unreferenced; records it as waiting when
/// only references keep it split. Returns whether it merged.
pub(crate) fn try_merge(
    inner: &Inner,
    rs: &Restructure,
    ctl: &mut Control,
    h: u64,
) -> Result<bool, ConvertError> {
    // Frozen for a live-update hand-over, or handed over: the pieces are part of the state
    // sent to the new owner (or are the new owner's), so nothing merges here.
    if inner.freeze.phase() != crate::preserve::Phase::Live {
        return Ok(false);
    }
    let (hf, he) = pages(huge_range(rs, h));
    {
        let attrs = inner.attrs_read();
        if !whole(inner, &attrs, hf, he) {
            rs.set_waiting(h, false);
            return Ok(false);
        }
    }
    if inner.refs.first_busy(hf, he).is_some() {
        rs.set_waiting(h, true);
        return Ok(false);
    }
    match merge(inner, rs, ctl, h, true) {
        Ok(()) => Ok(true),
        Err(ConvertError::Busy { .. }) => {
            rs.set_waiting(h, true);
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Called after host references on base pages `[first, end)` were dropped: merges waiting
/// huge pages among them that are now free. Skipped (left for later) when a conversion holds
/// the control lock.
pub(crate) fn after_put(inner: &Inner, first: u64, end: u64) {
    let Some(rs) = inner.restructure.as_ref() else {
        return;
    };
    if !rs.any_waiting() {
        return;
    }
    let per = rs.page / PAGE_SIZE;
    let hs = rs.waiting_in(first / per, end.div_ceil(per));
    if hs.is_empty() {
        return;
    }
    let mut ctl = match inner.control.try_lock() {
        Ok(g) => g,
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    for h in hs {
        if let Err(e) = try_merge(inner, rs, &mut ctl, h) {
            tracing::error!(offset = h * rs.page, "merging a huge page: {e}");
        }
    }
}

/// Punch-hole of `r` (block aligned, inside the file) on any backing: discards the contents,
/// clears poison records in the range, and on HugeTLB drops split pieces, merges what is whole
/// and reserves the range again, so the huge pages go back to the pool whole while the file
/// keeps its guarantee.
pub(crate) fn punch_hole(inner: &Inner, mode: libc::c_int, r: ByteRange) -> io::Result<()> {
    let mut ctl = inner.control();
    let poisoned = inner
        .poison
        .any_in(r.start / PAGE_SIZE, r.end.div_ceil(PAGE_SIZE));
    let Some(rs) = inner.restructure.as_ref() else {
        inner.backing.fallocate(mode, r.start, r.len())?;
        crate::poison::clear(inner, &mut ctl.views, r)?;
        if poisoned {
            ctl.peers.poison(r, false);
        }
        return Ok(());
    };
    let hs = rs.split_in(r.start / rs.page, r.end / rs.page);
    for h in r.start / rs.page..r.end / rs.page {
        if rs.take_cached(h) || hs.contains(&h) {
            let hr = huge_range(rs, h);
            crate::sys::fd::fallocate(rs.companion(), mode, hr.start, hr.len())?;
        }
    }
    inner.backing.fallocate(mode, r.start, r.len())?;
    crate::poison::clear(inner, &mut ctl.views, r)?;
    if poisoned {
        ctl.peers.poison(r, false);
    }
    for h in hs {
        let (hf, he) = pages(huge_range(rs, h));
        let free =
            whole(inner, &inner.attrs_read(), hf, he) && inner.refs.first_busy(hf, he).is_none();
        if free {
            merge(inner, rs, &mut ctl, h, false).map_err(into_io)?;
        } else {
            try_merge(inner, rs, &mut ctl, h).map_err(into_io)?;
        }
    }
    match inner.backing.as_hugetlb() {
        Some(huge) => huge.reserve(r.start, r.len()),
        None => Ok(()),
    }
}

fn into_io(e: ConvertError) -> io::Error {
    match e {
        ConvertError::Os { source, .. } => source,
        other => io::Error::from_raw_os_error(other.errno()),
    }
}

/// Sets up a new host view: split huge pages map their pieces, poisoned shared pages fault,
/// and the NUMA policy applies. Called with the control lock held, before the view is handed
/// out.
pub(crate) fn prepare_view(inner: &Inner, v: &mut ViewSlot) -> io::Result<()> {
    if let Some(rs) = inner.restructure.as_ref() {
        let len = u64::try_from(v.map.len()).unwrap_or(u64::MAX);
        let first = v.offset / rs.page;
        let end = v.offset.saturating_add(len).div_ceil(rs.page);
        for h in rs.split_in(first, end) {
            remap_view_pieces(inner, rs, v, h).map_err(into_io)?;
        }
    }
    let len = u64::try_from(v.map.len()).unwrap_or(u64::MAX);
    let r = ByteRange {
        start: v.offset,
        end: v.offset.saturating_add(len).min(inner.size),
    };
    if r.start < r.end {
        let shared_poisoned = {
            let attrs = inner.attrs_read();
            inner
                .poison
                .shared_poisoned(&attrs, r.start / PAGE_SIZE, r.end.div_ceil(PAGE_SIZE))
        };
        for p in shared_poisoned {
            v.revoke(p)?;
        }
    }
    let map = v.map.clone();
    crate::numa::reapply(inner, &map, 0, map.len())
}
