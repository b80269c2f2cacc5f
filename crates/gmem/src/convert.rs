//! In-place conversion between shared and private.
//!
//! `convert(offset, len, to)` follows the kernel's guest_memfd conversion:
//!
//! 1. the range is page aligned, non-empty, does not wrap and lies inside the file (`EINVAL`);
//! 2. a range already entirely in the target state succeeds at once, touching nothing;
//! 3. listeners are asked and may veto (`EAGAIN` naming their offset);
//! 4. to private: every host view of this process is zapped first, then, under the attribute
//!    lock, host references are checked; any page still referenced fails the whole call with
//!    `EAGAIN` and `error_offset` = that page, changing nothing. Then peer processes revoke
//!    theirs (each may refuse the same way), and finally the range is poisoned in every view;
//! 5. to shared: attributes change, poison markers are removed, peers follow; no reference
//!    check.
//!
//! The call is atomic: on any failure the attributes, the views and the peers are put back as
//! they were. Contents are never touched, so they survive in both directions.

use std::io;

use crate::attr::{Attr, Run};
use crate::file::{Control, GuestMemfd, Inner};
use crate::listener::Conversion;
use crate::range::{ByteRange, RangeError};
use crate::sys::PAGE_SIZE;
use crate::view::host::ViewSlot;

/// Why a conversion failed. The file is unchanged after every error.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// Bad range (`EINVAL`).
    #[error(transparent)]
    Range(#[from] RangeError),
    /// A page still has a host user: a pin, a borrow, an accessor in flight, in this process
    /// or a peer (`EAGAIN`). `offset` is the first such page.
    #[error("page at offset {offset:#x} is in use by the host")]
    Busy {
        /// First page in the range with a host user.
        offset: u64,
    },
    /// A listener refused (`EAGAIN`).
    #[error("listener vetoed at offset {offset:#x}: {reason}")]
    Vetoed {
        /// Offset the listener named.
        offset: u64,
        /// The listener's reason.
        reason: String,
    },
    /// This handle follows another process's file; conversions are made by the owner
    /// (`EPERM`).
    #[error("conversions are made by the owning process")]
    NotOwner,
    /// Revoking or restoring host mappings failed (the OS error's errno).
    #[error("revoking host access at offset {offset:#x}: {source}")]
    Os {
        /// Start of the range being changed.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A peer process did not answer in time or answered with an error.
    #[error("peer process failed at offset {offset:#x}: errno {errno}")]
    Peer {
        /// Start of the range being changed.
        offset: u64,
        /// The errno the peer reported (`ETIMEDOUT` when it did not answer).
        errno: i32,
    },
    /// A HugeTLB conversion, which proceeds one huge page at a time, stopped part way:
    /// `[offset, reached)` was converted, nothing from `reached` on. `errno()` and
    /// `error_offset()` are those of `source`, the error that stopped it.
    #[error("conversion stopped at {reached:#x}: {source}")]
    Partial {
        /// First byte not converted (a huge page boundary).
        reached: u64,
        /// Why it stopped.
        #[source]
        source: Box<ConvertError>,
    },
}

impl ConvertError {
    /// The errno the kernel returns for the same case.
    pub fn errno(&self) -> i32 {
        match self {
            ConvertError::Range(_) => libc::EINVAL,
            ConvertError::Busy { .. } | ConvertError::Vetoed { .. } => libc::EAGAIN,
            ConvertError::NotOwner => libc::EPERM,
            ConvertError::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            ConvertError::Peer { errno, .. } => *errno,
            ConvertError::Partial { source, .. } => source.errno(),
        }
    }

    /// For a conversion that stopped part way ([`ConvertError::Partial`]), the first byte not
    /// converted.
    pub fn reached(&self) -> Option<u64> {
        match self {
            ConvertError::Partial { reached, .. } => Some(*reached),
            _ => None,
        }
    }

    /// The offending offset (`error_offset`), where there is one.
    pub fn error_offset(&self) -> Option<u64> {
        match self {
            ConvertError::Range(e) => Some(e.offset()),
            ConvertError::Busy { offset }
            | ConvertError::Vetoed { offset, .. }
            | ConvertError::Os { offset, .. }
            | ConvertError::Peer { offset, .. } => Some(*offset),
            ConvertError::NotOwner => None,
            ConvertError::Partial { source, .. } => source.error_offset(),
        }
    }
}

impl GuestMemfd {
    /// Converts `[offset, offset + len)` to `to`, in place. See the [module docs](crate::convert).
    pub fn convert(&self, offset: u64, len: u64, to: Attr) -> Result<(), ConvertError> {
        let inner = &self.inner;
        let r = inner.page_range(offset, len)?;
        if inner.follower {
            return Err(ConvertError::NotOwner);
        }
        // A live-update hand-over freezes the file: wait for it to end; once the file is
        // handed over, this process no longer owns it (`EPERM`).
        let mut ctl = inner.freeze.lock_control(inner)?;
        if inner
            .attrs_read()
            .all(r.start / PAGE_SIZE, r.end / PAGE_SIZE, to)
        {
            return Ok(());
        }
        let conv = Conversion { offset, len, to };
        ctl.listeners
            .prepare(&conv)
            .map_err(|v| ConvertError::Vetoed {
                offset: v.offset,
                reason: v.reason,
            })?;
        let res = match (&inner.restructure, to) {
            (Some(rs), _) => crate::restructure::step::convert(inner, rs, &mut ctl, r, to),
            (None, Attr::Private) => to_private(inner, &mut ctl, r),
            (None, Attr::Shared) => to_shared(inner, &mut ctl, r).and_then(|()| {
                crate::poison::reapply(inner, &mut ctl.views, r)
                    .map_err(|source| ConvertError::Os { offset, source })
            }),
        };
        match &res {
            Ok(()) => ctl.listeners.commit(&conv),
            Err(e) => {
                ctl.listeners.abort(&conv);
                if let Some(reached) = e.reached() {
                    ctl.listeners.commit(&Conversion {
                        offset,
                        len: reached - offset,
                        to,
                    });
                }
            }
        }
        res
    }
}

/// Sets `r` to `to` under the write lock, returning the runs it replaced.
fn set_attrs(
    inner: &Inner,
    r: ByteRange,
    to: Attr,
    check_refs: bool,
) -> Result<Vec<Run>, ConvertError> {
    let (first, end) = (r.start / PAGE_SIZE, r.end / PAGE_SIZE);
    let mut attrs = inner.attrs_write();
    if check_refs {
        if let Some(p) = inner.refs.first_busy(first, end) {
            return Err(ConvertError::Busy {
                offset: p * PAGE_SIZE,
            });
        }
    }
    let old = attrs.runs(first, end).collect();
    attrs.set(first, end, to);
    Ok(old)
}

/// Makes `r` private in this process: checks host references and marks the range under the
/// write lock, then revokes what was shared in every view. Returns the runs it replaced; on
/// failure nothing has changed.
///
/// The kernel unmaps before it checks references because a mapped page holds one; a gmem
/// view holds none (pins and accessors do), so checking first is equivalent, zaps each page
/// once, and leaves the views untouched when the call fails with `EAGAIN`.
pub(crate) fn revoke_local(
    inner: &Inner,
    views: &mut [ViewSlot],
    r: ByteRange,
) -> Result<Vec<Run>, ConvertError> {
    let os = |source| ConvertError::Os {
        offset: r.start,
        source,
    };
    let old = set_attrs(inner, r, Attr::Private, true)?;
    // Only what was shared is revoked: the private runs already fault, and re-revoking a
    // private page zaps its marker before placing it again, a window in which a host touch
    // would map the private page.
    for i in 0..views.len() {
        for part in shared_parts(&old) {
            if let Err(e) = views[i].revoke(part) {
                undo_revoke(inner, views, &old);
                return Err(os(e));
            }
        }
    }
    Ok(old)
}

/// The byte ranges of the runs in `old` that were shared.
fn shared_parts(old: &[Run]) -> impl Iterator<Item = ByteRange> + '_ {
    old.iter()
        .filter(|run| run.attr == Attr::Shared)
        .map(Run::bytes)
}

/// Puts `old` runs back into the attribute map.
fn put_back(inner: &Inner, old: &[Run]) {
    let mut attrs = inner.attrs_write();
    for run in old {
        attrs.set(run.start, run.end, run.attr);
    }
}

/// Undoes [`revoke_local`]: puts the old runs back and lets the host reach what was shared.
pub(crate) fn undo_revoke(inner: &Inner, views: &mut [ViewSlot], old: &[Run]) {
    put_back(inner, old);
    let fd = inner.backing.fd();
    for run in old.iter().filter(|r| r.attr == Attr::Shared) {
        for v in views.iter_mut() {
            if let Err(e) = v.restore(fd, run.bytes()) {
                tracing::error!(offset = run.bytes().start, "restoring a host view: {e}");
            }
        }
    }
}

/// Makes `r` shared in this process: marks it and lets every view reach it. On failure the
/// old runs are back and every view is revoked where they were private.
pub(crate) fn restore_local(
    inner: &Inner,
    views: &mut [ViewSlot],
    r: ByteRange,
) -> Result<(), ConvertError> {
    let old = set_attrs(inner, r, Attr::Shared, false)?;
    let fd = inner.backing.fd();
    for i in 0..views.len() {
        if let Err(source) = views[i].restore(fd, r) {
            put_back(inner, &old);
            for run in old.iter().filter(|r| r.attr == Attr::Private) {
                for v in views.iter_mut() {
                    if let Err(e) = v.revoke(run.bytes()) {
                        tracing::error!(offset = run.bytes().start, "re-revoking a host view: {e}");
                    }
                }
            }
            return Err(ConvertError::Os {
                offset: r.start,
                source,
            });
        }
    }
    Ok(())
}

pub(crate) fn to_private(
    inner: &Inner,
    ctl: &mut Control,
    r: ByteRange,
) -> Result<(), ConvertError> {
    let old = revoke_local(inner, &mut ctl.views, r)?;
    if let Err(e) = ctl.peers.revoke(r) {
        undo_revoke(inner, &mut ctl.views, &old);
        return Err(e);
    }
    Ok(())
}

pub(crate) fn to_shared(
    inner: &Inner,
    ctl: &mut Control,
    r: ByteRange,
) -> Result<(), ConvertError> {
    restore_local(inner, &mut ctl.views, r)?;
    ctl.peers.restore(r);
    Ok(())
}
