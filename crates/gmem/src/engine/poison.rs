//! Memory failure: poisoned pages.
//!
//! [`crate::GuestMemfd::inject_poison`] marks a base page as failed, as the kernel's
//! memory-failure handling does for a page with an uncorrectable error. Kernels without
//! `CONFIG_MEMORY_FAILURE` (and userspace in general) cannot retire a physical page, so the
//! record is gmem's own, kept per file offset:
//!
//! - host views: a touch of the page faults, by the same marker that enforces private pages
//!   (so it holds for shared pages too, and survives conversions);
//! - checked accessors and the guest view fail with `EHWPOISON` naming the page; no new pin
//!   or borrow is ever handed out for it;
//! - conversions of the page and of its neighbours work as before;
//! - punch-hole of the page replaces it with a fresh zero page and clears the record, as the
//!   kernel's truncation of a poisoned page does;
//! - participants (peer processes) follow: they record the page (and clear it after a
//!   punch-hole), so their views and accessors refuse it too.
//!
//! The raw guest pointer (an hva memslot) is not marked: a vCPU path that touches memory
//! through it checks [`crate::GuestMemfd::is_poisoned`] or uses the guest view's checked
//! calls.
//!
//! On HugeTLB a poisoned page inside a huge page that has shared pages splits the huge page
//! (only 4 KiB of it is lost, unlike the kernel, which loses the whole huge page); injection
//! serialises with restructuring on the control lock, so it never races a split or merge.

use std::io;

use super::gate::GateError;
use super::huge::RestructureError;
use super::participant::Step;
use super::Engine;
use crate::model::attr::Attr;
use crate::model::error::Errno;
use crate::model::units::{page_offset, PageRange, RangeError};

/// Why poison could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum PoisonError {
    /// The offset is past the end of the file (`EINVAL`).
    #[error(transparent)]
    Range(#[from] RangeError),
    /// The huge page holding the page must be split and a pin of this or a peer process
    /// holds a page of it, or the file's piece limit is reached (`EBUSY`).
    #[error("page at offset {offset:#x}: the huge page cannot be split now")]
    Busy {
        /// The page.
        offset: u64,
    },
    /// This process may not change the file (`EPERM`).
    #[error(transparent)]
    Gate(#[from] GateError),
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

impl Errno for PoisonError {
    fn errno(&self) -> i32 {
        match self {
            PoisonError::Range(_) => libc::EINVAL,
            PoisonError::Busy { .. } => libc::EBUSY,
            PoisonError::Gate(e) => e.errno(),
            PoisonError::Os { source, .. } => crate::model::error::os_errno(source),
        }
    }

    fn error_offset(&self) -> Option<u64> {
        match self {
            PoisonError::Range(e) => Some(e.offset()),
            PoisonError::Busy { offset } | PoisonError::Os { offset, .. } => Some(*offset),
            PoisonError::Gate(_) => None,
        }
    }
}

impl Engine {
    /// Records base page `page` as poisoned (see the module docs). Idempotent.
    pub(crate) fn inject_poison(&self, page: u64) -> Result<(), PoisonError> {
        self.gate().owner()?;
        let at = page_offset(page);
        let mut ctl = self.control_unchecked();
        // As a conversion does: a view moved before this took the lock is given up first.
        self.settle(&mut ctl);
        if self.read_pages().poison.any_in(PageRange::one(page)) {
            return Ok(());
        }
        if let Some(huge) = self.huge() {
            let h = huge.geo.of_page(page);
            let hp = huge.geo.pages(h);
            let all_private = self.read_pages().attrs.all(hp.start, hp.end, Attr::Private);
            if !all_private {
                self.split(&mut ctl, h).map_err(|e| match e {
                    RestructureError::Os { source, .. } => PoisonError::Os { offset: at, source },
                    _ => PoisonError::Busy { offset: at },
                })?;
            }
            huge.state().set_waiting(h, false);
        }
        let shared = {
            let mut st = self.write_pages();
            st.poison.insert(page);
            st.attrs.get(page) == Attr::Shared
        };
        // The record is in; every participant hears of it even if a local view could not be
        // guarded (that view's failure is the error returned).
        let guarded = if shared {
            let numa = self.numa_policy_set();
            ctl.views
                .guard_pages(&self.view_ctx(numa.as_ref()), &[page])
                .map_err(|source| PoisonError::Os { offset: at, source })
        } else {
            Ok(())
        };
        ctl.participants
            .notify(&Step::Poison(PageRange::one(page).bytes()));
        self.after_own_remap(&mut ctl);
        guarded
    }
}
