//! Memory failure: poisoned pages.
//!
//! [`GuestMemfd::inject_poison`] marks a base page as failed, as the kernel's memory-failure
//! handling does for a page with an uncorrectable error. Kernels without
//! `CONFIG_MEMORY_FAILURE` (and userspace in general) cannot retire a physical page, so the
//! record is gmem's own, kept per file offset:
//!
//! - host views: a touch of the page is a real `SIGBUS`, by the same poison marker that
//!   enforces private pages (so it holds for shared pages too, and survives conversions:
//!   markers are put back after every conversion to shared);
//! - checked accessors ([`GuestMemfd::read_at`], [`GuestMemfd::write_at`],
//!   [`GuestMemfd::pin`]) and the guest view fail with [`AccessError::Poisoned`]
//!   (`EHWPOISON`) naming the page; no new pin or borrow is ever handed out for it;
//! - conversions of the page and of its neighbours work as before;
//! - punch-hole of the page replaces it with a fresh zero page and clears the record, as the
//!   kernel's truncation of a poisoned page does;
//! - peer processes ([`crate::peer`]) follow: they record the page (and clear it after a
//!   punch-hole), so their views and accessors refuse it too.
//!
//! The raw guest pointer ([`GuestView::as_ptr`](crate::GuestView::as_ptr), an hva memslot) is
//! not marked: a vCPU path that touches memory through it checks
//! [`GuestMemfd::is_poisoned`] or uses the guest view's checked calls.
//!
//! On HugeTLB a poisoned page inside a huge page that has shared pages splits the huge page
//! (only 4 KiB of it is lost, unlike the kernel, which loses the whole huge page); injection
//! serialises with restructuring on the control lock, so it never races a split or merge. It
//! fails with `EBUSY` only when a peer process refuses the split (it holds a page of the huge
//! page).
//!
//! [`AccessError::Poisoned`]: crate::AccessError::Poisoned

use std::collections::BTreeSet;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::attr::{Attr, RunMap};
use crate::convert::ConvertError;
use crate::file::{GuestMemfd, Inner};
use crate::range::{ByteRange, RangeError};
use crate::sys::PAGE_SIZE;
use crate::view::host::ViewSlot;

/// Why poison could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum PoisonError {
    /// The offset is past the end of the file (`EINVAL`).
    #[error(transparent)]
    Range(#[from] RangeError),
    /// The huge page holding the page must be split and a peer process holds a page of it
    /// (`EBUSY`).
    #[error("page at offset {offset:#x} is in use; the huge page cannot be split")]
    Busy {
        /// The referenced page.
        offset: u64,
    },
    /// Marking the host views failed.
    #[error("poisoning page {offset:#x}: {source}")]
    Os {
        /// The page being poisoned.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl PoisonError {
    /// The errno for this error.
    pub fn errno(&self) -> i32 {
        match self {
            PoisonError::Range(_) => libc::EINVAL,
            PoisonError::Busy { .. } => libc::EBUSY,
            PoisonError::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// The page the error is about.
    pub fn offset(&self) -> u64 {
        match self {
            PoisonError::Range(e) => e.offset(),
            PoisonError::Busy { offset } | PoisonError::Os { offset, .. } => *offset,
        }
    }
}

/// The poisoned base pages of one file.
#[derive(Debug, Default)]
pub(crate) struct PoisonSet {
    count: AtomicUsize,
    pages: Mutex<BTreeSet<u64>>,
}

impl PoisonSet {
    fn pages(&self) -> MutexGuard<'_, BTreeSet<u64>> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first poisoned page in `[first, end)`; one atomic load when nothing is poisoned.
    pub fn first_in(&self, first: u64, end: u64) -> Option<u64> {
        if self.count.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.pages().range(first..end).next().copied()
    }

    /// True when a page in `[first, end)` is poisoned.
    pub fn any_in(&self, first: u64, end: u64) -> bool {
        self.first_in(first, end).is_some()
    }

    /// The poisoned pages of `[first, end)` that are shared in `attrs`, as byte ranges.
    pub fn shared_poisoned(&self, attrs: &RunMap, first: u64, end: u64) -> Vec<ByteRange> {
        if self.count.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        self.pages()
            .range(first..end)
            .filter(|&&p| attrs.get(p) == Attr::Shared)
            .map(|&p| page_range(p))
            .collect()
    }

    fn insert(&self, page: u64) -> bool {
        let mut pages = self.pages();
        let new = pages.insert(page);
        self.count.store(pages.len(), Ordering::Release);
        new
    }

    fn remove_range(&self, first: u64, end: u64) -> Vec<u64> {
        let mut pages = self.pages();
        let gone: Vec<u64> = pages.range(first..end).copied().collect();
        for p in &gone {
            pages.remove(p);
        }
        self.count.store(pages.len(), Ordering::Release);
        gone
    }

    fn all(&self) -> Vec<u64> {
        self.pages().iter().copied().collect()
    }
}

fn page_range(p: u64) -> ByteRange {
    ByteRange {
        start: p * PAGE_SIZE,
        end: (p + 1) * PAGE_SIZE,
    }
}

/// Puts the markers of poisoned shared pages in `r` back in every view (after a conversion to
/// shared lifted them).
pub(crate) fn reapply(inner: &Inner, views: &mut [ViewSlot], r: ByteRange) -> io::Result<()> {
    let marks = {
        let attrs = inner.attrs_read();
        inner
            .poison
            .shared_poisoned(&attrs, r.start / PAGE_SIZE, r.end.div_ceil(PAGE_SIZE))
    };
    for p in marks {
        for v in views.iter_mut() {
            v.revoke(p)?;
        }
    }
    Ok(())
}

/// Clears the records in `r` (after a punch-hole gave the pages fresh memory) and lifts the
/// markers of those that are shared.
pub(crate) fn clear(inner: &Inner, views: &mut [ViewSlot], r: ByteRange) -> io::Result<()> {
    let gone = inner
        .poison
        .remove_range(r.start / PAGE_SIZE, r.end.div_ceil(PAGE_SIZE));
    let attrs = inner.attrs_read();
    let shared: Vec<u64> = gone
        .into_iter()
        .filter(|&p| attrs.get(p) == Attr::Shared)
        .collect();
    drop(attrs);
    for p in shared {
        for v in views.iter() {
            v.zap(page_range(p))?;
        }
    }
    Ok(())
}

/// A peer process follows its owner's poison record of the page at `r`.
pub(crate) fn follow(
    inner: &Inner,
    views: &mut [ViewSlot],
    r: ByteRange,
) -> Result<(), ConvertError> {
    let page = r.start / PAGE_SIZE;
    let shared = {
        let attrs = inner.attrs_write();
        inner.poison.insert(page);
        attrs.get(page) == Attr::Shared
    };
    if shared {
        for v in views.iter_mut() {
            v.revoke(page_range(page))
                .map_err(|source| ConvertError::Os {
                    offset: r.start,
                    source,
                })?;
        }
    }
    Ok(())
}

impl Inner {
    /// Byte offsets of the poisoned pages.
    pub(crate) fn poison_records(&self) -> Vec<u64> {
        self.poison
            .all()
            .into_iter()
            .map(|p| p * PAGE_SIZE)
            .collect()
    }
}

impl GuestMemfd {
    /// Marks the base page containing `offset` as poisoned (memory failure). See the
    /// [module docs](crate::poison). Injecting an already poisoned page succeeds.
    pub fn inject_poison(&self, offset: u64) -> Result<(), PoisonError> {
        let inner = &self.inner;
        if offset >= inner.size {
            return Err(RangeError::OutOfBounds {
                offset,
                len: 1,
                size: inner.size,
            }
            .into());
        }
        let page = offset / PAGE_SIZE;
        let at = page * PAGE_SIZE;
        let mut ctl = inner.control();
        // Handed over by a live update: the new owner records poison now (`EPERM`), and a
        // split here would write into pieces the new owner uses.
        if inner.freeze.phase() == crate::preserve::Phase::Released {
            return Err(PoisonError::Os {
                offset: at,
                source: io::Error::from_raw_os_error(libc::EPERM),
            });
        }
        if inner.poison.any_in(page, page + 1) {
            return Ok(());
        }
        if let Some(rs) = inner.restructure.as_ref() {
            let h = at / rs.page;
            let per = rs.page / PAGE_SIZE;
            let all_private = inner
                .attrs_read()
                .all(h * per, (h + 1) * per, Attr::Private);
            if !all_private && !rs.is_split(h) {
                crate::restructure::split(inner, rs, &mut ctl, h).map_err(|e| match e {
                    ConvertError::Busy { offset } => PoisonError::Busy { offset },
                    other => PoisonError::Os {
                        offset: at,
                        source: io::Error::from_raw_os_error(other.errno()),
                    },
                })?;
            }
        }
        let shared = {
            let attrs = inner.attrs_write();
            inner.poison.insert(page);
            attrs.get(page) == Attr::Shared
        };
        if shared {
            for v in ctl.views.iter_mut() {
                v.revoke(page_range(page))
                    .map_err(|source| PoisonError::Os { offset: at, source })?;
            }
        }
        if let Some(rs) = inner.restructure.as_ref() {
            // A page waiting to merge is not whole any more: it stays split.
            rs.set_waiting(at / rs.page, false);
        }
        ctl.peers.poison(page_range(page), true);
        Ok(())
    }

    /// True when the page containing `offset` is poisoned.
    pub fn is_poisoned(&self, offset: u64) -> bool {
        let p = offset / PAGE_SIZE;
        self.inner.poison.any_in(p, p + 1)
    }

    /// Byte offsets of every poisoned page, in order.
    pub fn poisoned_pages(&self) -> Vec<u64> {
        self.inner
            .poison
            .all()
            .into_iter()
            .map(|p| p * PAGE_SIZE)
            .collect()
    }
}
