//! Checked host access: the reference protocol and the copies.
//!
//! Two kinds of host use, as the kernel counts them:
//!
//! - a *transient* access (an accessor call: `read_at`, `write_at`, a pin's `read`/`write`)
//!   checks the pages and copies while holding the page-state lock for reading, so a
//!   conversion to private (which takes it for writing) waits for it to finish, and a
//!   punch-hole cannot free a page under it;
//! - a *held* access (a pin, a device slice) takes one host reference on every page under
//!   the same lock, after checking that the pages are shared and not poisoned; conversion to
//!   private of a referenced page fails with `EAGAIN` naming it.
//!
//! Copies go through gmem's own mapping of the file, which maps every page: the check under
//! the lock is what keeps host code from private pages there, so that mapping is never
//! handed out. Pointers handed to host code ([`super::Engine::device_ptr`]) point into the
//! device view, an enforced host view in which private pages fault.

use super::gate::GateError;
use super::shard_lock::ShardReadGuard;

use super::{Engine, PageState};
use crate::model::attr::Attr;
use crate::model::error::Errno;
use crate::model::units::{ByteRange, RangeError};
use crate::sys::mapping::Mapping;
use crate::sys::to_usize;

/// Why a checked host access was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// The page at `offset` is private (`EFAULT`, as a kernel copy from the page would give).
    #[error("page at offset {offset:#x} is private")]
    Private {
        /// First private byte in the range.
        offset: u64,
    },
    /// The range is empty, wraps, or ends past the end of the file (`EINVAL`).
    #[error(transparent)]
    Range(#[from] RangeError),
    /// The file cannot be reached by the host at all: the kernel guest_memfd without `MMAP`
    /// (`ENODEV`).
    #[error("the file has no host mapping")]
    NoMapping,
    /// The page at `offset` is poisoned (memory failure): `EHWPOISON`, as the kernel reports
    /// an access to a hardware-poisoned page.
    #[error("page at offset {offset:#x} is poisoned")]
    Poisoned {
        /// First poisoned byte in the range.
        offset: u64,
    },
    /// A page already holds the maximum number of references (`ENOMEM`, like GUP).
    #[error("page at offset {offset:#x} holds too many references")]
    TooManyRefs {
        /// The saturated page.
        offset: u64,
    },
    /// This process may not reach the file (`EPERM`): it was handed over, or this is a
    /// forked child.
    #[error(transparent)]
    Gate(#[from] GateError),
    /// The guest view is not available here (`EPERM`): a follower is host code.
    #[error("no guest view: this handle is host code")]
    NoGuestView,
    /// A syscall failed setting up the device view.
    #[error("setting up the device view: errno {errno}")]
    Os {
        /// The errno.
        errno: i32,
    },
}

impl Errno for AccessError {
    fn errno(&self) -> i32 {
        match self {
            AccessError::Private { .. } => libc::EFAULT,
            AccessError::Range(_) => libc::EINVAL,
            AccessError::NoMapping => libc::ENODEV,
            AccessError::TooManyRefs { .. } => libc::ENOMEM,
            AccessError::Poisoned { .. } => libc::EHWPOISON,
            AccessError::Gate(e) => e.errno(),
            AccessError::NoGuestView => libc::EPERM,
            AccessError::Os { errno } => *errno,
        }
    }

    fn error_offset(&self) -> Option<u64> {
        match self {
            AccessError::Private { offset }
            | AccessError::TooManyRefs { offset }
            | AccessError::Poisoned { offset } => Some(*offset),
            AccessError::Range(e) => Some(e.offset()),
            _ => None,
        }
    }
}

/// Fails when a page of `r` is poisoned or private in `st`.
fn check(st: &PageState, r: ByteRange) -> Result<(), AccessError> {
    let p = r.pages();
    if let Some(bad) = st.poison.first_in(p) {
        return Err(AccessError::Poisoned {
            offset: crate::model::units::page_offset(bad).max(r.start),
        });
    }
    if let Some(bad) = st.attrs.first(p.start, p.end, Attr::Private) {
        return Err(AccessError::Private {
            offset: crate::model::units::page_offset(bad).max(r.start),
        });
    }
    Ok(())
}

impl Engine {
    /// gmem's mapping, for copies.
    pub(crate) fn mapping(&self) -> Result<&Mapping, AccessError> {
        self.guest_map().ok_or(AccessError::NoMapping)
    }

    /// Copies `r` out of the file into `buf` if every page is shared and unpoisoned
    /// (`guest`: any attribute, poison still refused).
    pub(crate) fn read(
        &self,
        r: ByteRange,
        buf: &mut [u8],
        guest: bool,
    ) -> Result<(), AccessError> {
        let (map, _st) = self.checked(r, guest)?;
        copy_out(map, r, buf);
        Ok(())
    }

    /// Copies `buf` into the file at `r` if every page is shared and unpoisoned (`guest`:
    /// any attribute, poison still refused).
    pub(crate) fn write(&self, r: ByteRange, buf: &[u8], guest: bool) -> Result<(), AccessError> {
        let (map, _st) = self.checked(r, guest)?;
        copy_in(map, r, buf);
        Ok(())
    }

    /// gmem's mapping and the page state held for reading, once every page of `r` is shared
    /// and unpoisoned (`guest`: any attribute, poison still refused). A copy made while the
    /// guard lives cannot meet a conversion to private of `r`.
    fn checked(
        &self,
        r: ByteRange,
        guest: bool,
    ) -> Result<(&Mapping, ShardReadGuard<'_, PageState>), AccessError> {
        let map = self.mapping()?;
        let st = self.read_pages_unless_forked()?;
        // Checked under the lock: a hand-over's release takes it for writing before it
        // revokes the mapping copies go through.
        self.gate().access()?;
        if guest {
            check_poison(&st, r)?;
        } else {
            check(&st, r)?;
        }
        Ok((map, st))
    }

    /// Takes a host reference on every page of `r` if all are shared and unpoisoned.
    pub(crate) fn take_refs(&self, r: ByteRange) -> Result<(), AccessError> {
        self.mapping()?;
        let st = self.read_pages_unless_forked()?;
        self.gate().access()?;
        check(&st, r)?;
        self.refs()
            .get(r.pages())
            .map_err(|p| AccessError::TooManyRefs {
                offset: crate::model::units::page_offset(p),
            })
    }

    /// Drops the references [`Engine::take_refs`] took.
    pub(crate) fn drop_refs(&self, r: ByteRange) {
        self.refs().put(r.pages());
        self.after_release(r.pages());
    }

    /// The address of byte `offset` in the device view (an enforced host view of the whole
    /// file, created on first use).
    pub(crate) fn device_ptr(&self, offset: u64) -> Result<*mut u8, AccessError> {
        let off = to_usize(offset).map_err(|_| RangeError::Overflow { offset, len: 1 })?;
        let cached = self.device_base.load(std::sync::atomic::Ordering::Acquire);
        if cached != 0 {
            return Ok(cached.wrapping_add(off) as *mut u8);
        }
        let mut ctl = self.control()?;
        let base = match ctl.views.device_base() {
            Some(b) => b,
            None => {
                let numa = self.numa_policy_set();
                let st = self.read_pages();
                let hs = self.huge().map(|h| h.state());
                let shown = self.shown(&st, hs.as_deref());
                let base = ctl
                    .views
                    .device(&self.view_ctx(numa.as_ref()), shown)
                    .map_err(|e| AccessError::Os {
                        errno: crate::model::error::os_errno(&e),
                    })?;
                drop(st);
                self.ensure_tracker(&mut ctl).map_err(|e| AccessError::Os {
                    errno: crate::model::error::os_errno(&e),
                })?;
                base
            }
        };
        self.device_base
            .store(base, std::sync::atomic::Ordering::Release);
        Ok(base.wrapping_add(off) as *mut u8)
    }
}

fn check_poison(st: &PageState, r: ByteRange) -> Result<(), AccessError> {
    match st.poison.first_in(r.pages()) {
        Some(bad) => Err(AccessError::Poisoned {
            offset: crate::model::units::page_offset(bad).max(r.start),
        }),
        None => Ok(()),
    }
}

/// Copies between gmem's mapping and a buffer. `r` lies inside the mapping.
pub(crate) fn copy_out(map: &Mapping, r: ByteRange, buf: &mut [u8]) {
    let Ok(off) = to_usize(r.start) else { return };
    if off.checked_add(buf.len()).is_none_or(|e| e > map.len()) {
        return;
    }
    let src = map.as_ptr().wrapping_add(off);
    // SAFETY: `[off, off + len)` is inside the live mapping (checked above) and does not
    // overlap `buf`. The memory may change under the copy (the guest runs concurrently); it
    // is copied as plain bytes.
    unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
}

/// Copies `buf` into gmem's mapping at `r`.
pub(crate) fn copy_in(map: &Mapping, r: ByteRange, buf: &[u8]) {
    let Ok(off) = to_usize(r.start) else { return };
    if off.checked_add(buf.len()).is_none_or(|e| e > map.len()) {
        return;
    }
    let dst = map.as_ptr().wrapping_add(off);
    // SAFETY: as in `copy_out`, with the copy going the other way.
    unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), dst, buf.len()) };
}
