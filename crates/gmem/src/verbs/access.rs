//! Checked host access: copies and pins that refuse private pages instead of faulting
//! (protocol in the engine's access docs).

use std::sync::Arc;

use crate::engine::access::AccessError;
use crate::model::units::{ByteRange, RangeError};

use super::{Anchor, GuestMemfd};

/// `(offset, len)` as a byte range inside a file of `size` bytes.
fn byte_range(offset: u64, len: usize, size: u64) -> Result<ByteRange, AccessError> {
    let len = u64::try_from(len).map_err(|_| RangeError::Overflow {
        offset,
        len: u64::MAX,
    })?;
    Ok(ByteRange::checked(offset, len, 1, size)?)
}

impl GuestMemfd {
    /// Copies `buf.len()` bytes from `offset` into `buf`, refusing private pages.
    ///
    /// Fails with [`AccessError::Private`] (`EFAULT`) naming the first private byte, or
    /// [`AccessError::Poisoned`] (`EHWPOISON`), having copied nothing.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let r = byte_range(offset, buf.len(), self.size())?;
        self.inner.read(r, buf, false)
    }

    /// Copies `buf` to `offset`, refusing private pages.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), AccessError> {
        let r = byte_range(offset, buf.len(), self.size())?;
        self.inner.write(r, buf, false)
    }

    /// Pins `[offset, offset + len)`: while the pin lives, the pages cannot convert to private
    /// (conversion fails with `EAGAIN` naming the first pinned page). On HugeTLB the huge
    /// pages holding them are not restructured either: a conversion of another page of one
    /// of them that would split it fails with `EAGAIN` naming the pinned page, and a split
    /// page stays split until the pin is dropped.
    ///
    /// This is the long-term pin a DMA user takes (like VFIO's GUP pin) and also the guard for
    /// borrowing a range for a while. It keeps the file alive.
    pub fn pin(&self, offset: u64, len: u64) -> Result<Pin, AccessError> {
        let r = ByteRange::checked(offset, len, 1, self.size())?;
        self.inner.take_refs(r)?;
        Ok(Pin {
            anchor: self.anchor(),
            range: r,
        })
    }
}

/// A pinned range of shared pages. Dropping it releases the pages.
///
/// The pinned bytes are reached through [`Pin::read`] and [`Pin::write`] (bounded by the
/// pin), or through [`Pin::as_ptr`], which points into an *enforced* host mapping: the
/// neighbours of the pinned range fault there when they are private, and so does the range
/// itself once the pin is gone and the guest made it private.
#[derive(Debug)]
pub struct Pin {
    anchor: Arc<Anchor>,
    range: ByteRange,
}

impl Pin {
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
        let r = byte_range(at, len, self.range.len())?;
        Ok(ByteRange {
            start: self.range.start + r.start,
            end: self.range.start + r.end,
        })
    }

    /// Copies from `at` (relative to the pin) into `buf`.
    pub fn read(&self, at: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let r = self.sub(at, buf.len())?;
        self.anchor.inner.read(r, buf, false)
    }

    /// Copies `buf` to `at` (relative to the pin).
    pub fn write(&self, at: u64, buf: &[u8]) -> Result<(), AccessError> {
        let r = self.sub(at, buf.len())?;
        self.anchor.inner.write(r, buf, false)
    }

    /// Address of the pinned bytes in gmem's *device view*, an enforced host mapping of the
    /// whole file (created on first use), for DMA-like users. The pinned pages stay shared
    /// and mapped while the pin lives; past the pinned range, and after the pin is dropped,
    /// private pages fault there (`SIGSEGV`/`SIGBUS`, and `EFAULT` for a kernel access).
    pub fn as_ptr(&self) -> Result<*mut u8, AccessError> {
        self.anchor.inner.device_ptr(self.range.start)
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.anchor.inner.drop_refs(self.range);
    }
}
