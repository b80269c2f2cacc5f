//! Checked host access: copies and pins that refuse private pages instead of faulting.
//!
//! Every access takes one host reference on each page it touches for as long as it uses it,
//! after checking, under the attribute lock, that the pages are shared. A conversion to private
//! of a page that holds a reference fails with `EAGAIN`. Copies go through gmem's own mapping
//! of the file, so they never fault on a page that was private when checked.

use std::sync::Arc;

use crate::attr::Attr;
use crate::file::{Anchor, GuestMemfd, Inner};
use crate::range::{ByteRange, RangeError};
use crate::sys::mapping::Mapping;
use crate::sys::{to_usize, PAGE_SIZE};

/// Why a checked host access was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// The page at `offset` is private (`EFAULT`, as a kernel copy from the page would give).
    #[error("page at offset {offset:#x} is private")]
    Private {
        /// First private page in the range.
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
        /// First poisoned page in the range.
        offset: u64,
    },
    /// A page already holds the maximum number of references (`ENOMEM`, like GUP).
    #[error("page at offset {offset:#x} holds too many references")]
    TooManyRefs {
        /// The saturated page.
        offset: u64,
    },
}

impl AccessError {
    /// The errno the kernel returns for the same case.
    pub fn errno(&self) -> i32 {
        match self {
            AccessError::Private { .. } => libc::EFAULT,
            AccessError::Range(_) => libc::EINVAL,
            AccessError::NoMapping => libc::ENODEV,
            AccessError::TooManyRefs { .. } => libc::ENOMEM,
            AccessError::Poisoned { .. } => libc::EHWPOISON,
        }
    }

    /// The offending offset, where there is one.
    pub fn offset(&self) -> Option<u64> {
        match self {
            AccessError::Private { offset }
            | AccessError::TooManyRefs { offset }
            | AccessError::Poisoned { offset } => Some(*offset),
            AccessError::Range(e) => Some(e.offset()),
            AccessError::NoMapping => None,
        }
    }
}

/// Pages `[first, last]` touched by a byte range.
fn pages_of(r: ByteRange) -> (u64, u64) {
    (r.start / PAGE_SIZE, r.end.div_ceil(PAGE_SIZE))
}

impl Inner {
    /// Takes a host reference on every page of `r` if all are shared.
    pub(crate) fn take_refs(&self, r: ByteRange) -> Result<(), AccessError> {
        let (first, end) = pages_of(r);
        let attrs = self.attrs_read();
        self.check_poison(r)?;
        if let Some(p) = attrs.first(first, end, Attr::Private) {
            return Err(AccessError::Private {
                offset: (p * PAGE_SIZE).max(r.start),
            });
        }
        self.refs
            .get(first, end)
            .map_err(|p| AccessError::TooManyRefs {
                offset: p * PAGE_SIZE,
            })
    }

    pub(crate) fn drop_refs(&self, r: ByteRange) {
        let (first, end) = pages_of(r);
        self.refs.put(first, end);
        crate::restructure::step::after_put(self, first, end);
    }

    /// Fails with [`AccessError::Poisoned`] when a page of `r` is poisoned.
    pub(crate) fn check_poison(&self, r: ByteRange) -> Result<(), AccessError> {
        let (first, end) = pages_of(r);
        match self.poison.first_in(first, end) {
            Some(p) => Err(AccessError::Poisoned {
                offset: (p * PAGE_SIZE).max(r.start),
            }),
            None => Ok(()),
        }
    }

    pub(crate) fn mapping(&self) -> Result<&Mapping, AccessError> {
        self.guest.as_ref().ok_or(AccessError::NoMapping)
    }
}

/// Copies between gmem's mapping and a buffer. `r` lies inside the mapping.
pub(crate) fn copy_out(map: &Mapping, r: ByteRange, buf: &mut [u8]) {
    let Ok(off) = to_usize(r.start) else { return };
    debug_assert!(off + buf.len() <= map.len());
    let src = map.as_ptr().wrapping_add(off);
    // SAFETY: `[off, off + len)` is inside the live mapping (the range was checked against the
    // file size, which the mapping covers) and does not overlap `buf`. The memory may change
    // under the copy (the guest runs concurrently); it is copied as plain bytes.
    unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
}

/// Copies `buf` into gmem's mapping at `r`.
pub(crate) fn copy_in(map: &Mapping, r: ByteRange, buf: &[u8]) {
    let Ok(off) = to_usize(r.start) else { return };
    debug_assert!(off + buf.len() <= map.len());
    let dst = map.as_ptr().wrapping_add(off);
    // SAFETY: as in `copy_out`, with the copy going the other way.
    unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), dst, buf.len()) };
}

impl GuestMemfd {
    fn byte_range(&self, offset: u64, len: usize) -> Result<ByteRange, AccessError> {
        let len = u64::try_from(len).map_err(|_| RangeError::Overflow {
            offset,
            len: u64::MAX,
        })?;
        Ok(ByteRange::checked(offset, len, 1, self.inner.size)?)
    }

    /// Copies `buf.len()` bytes from `offset` into `buf`, refusing private pages.
    ///
    /// Fails with [`AccessError::Private`] naming the first private page, having copied
    /// nothing.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let r = self.byte_range(offset, buf.len())?;
        let map = self.inner.mapping()?;
        self.inner.take_refs(r)?;
        copy_out(map, r, buf);
        self.inner.drop_refs(r);
        Ok(())
    }

    /// Copies `buf` to `offset`, refusing private pages.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), AccessError> {
        let r = self.byte_range(offset, buf.len())?;
        let map = self.inner.mapping()?;
        self.inner.take_refs(r)?;
        copy_in(map, r, buf);
        self.inner.drop_refs(r);
        Ok(())
    }

    /// Pins `[offset, offset + len)`: while the pin lives, the pages cannot convert to private
    /// (conversion fails with `EAGAIN` naming the first pinned page).
    ///
    /// This is the long-term pin a DMA user takes (like VFIO's GUP pin) and also the guard for
    /// borrowing a range for a while. It keeps the file alive.
    pub fn pin(&self, offset: u64, len: u64) -> Result<Pin, AccessError> {
        let r = ByteRange::checked(offset, len, 1, self.inner.size)?;
        self.inner.mapping()?;
        self.inner.take_refs(r)?;
        Ok(Pin {
            anchor: self.anchor(),
            range: r,
        })
    }
}

/// A pinned range of shared pages. Dropping it releases the pages.
#[derive(Debug)]
pub struct Pin {
    anchor: Arc<Anchor>,
    range: ByteRange,
}

impl Pin {
    fn inner(&self) -> &Inner {
        &self.anchor.inner
    }

    /// File offset of the pinned range.
    pub fn offset(&self) -> u64 {
        self.range.start
    }

    /// Length of the pinned range in bytes.
    pub fn len(&self) -> u64 {
        self.range.len()
    }

    /// Never true: pins cover at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn sub(&self, at: u64, len: usize) -> Result<ByteRange, AccessError> {
        let len = u64::try_from(len).map_err(|_| RangeError::Overflow {
            offset: at,
            len: u64::MAX,
        })?;
        let r = ByteRange::checked(at, len, 1, self.range.len())?;
        Ok(ByteRange {
            start: self.range.start + r.start,
            end: self.range.start + r.end,
        })
    }

    /// Copies from `at` (relative to the pin) into `buf`.
    pub fn read(&self, at: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let r = self.sub(at, buf.len())?;
        copy_out(self.inner().mapping()?, r, buf);
        Ok(())
    }

    /// Copies `buf` to `at` (relative to the pin).
    pub fn write(&self, at: u64, buf: &[u8]) -> Result<(), AccessError> {
        let r = self.sub(at, buf.len())?;
        copy_in(self.inner().mapping()?, r, buf);
        Ok(())
    }

    /// Address of the pinned bytes in gmem's mapping, for DMA-like users. Valid while the pin
    /// lives; the pages stay shared and mapped until it is dropped.
    pub fn as_ptr(&self) -> *mut u8 {
        match (self.inner().mapping(), to_usize(self.range.start)) {
            // Inside the mapping: the pin was checked against the file size.
            (Ok(m), Ok(off)) => m.as_ptr().wrapping_add(off),
            _ => std::ptr::null_mut(),
        }
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.anchor.inner.drop_refs(self.range);
    }
}
