//! The guest view: how a guest reaches every page, shared or private.
//!
//! A software hypervisor's vCPU emulation, or KVM through an hva memslot, reaches guest memory
//! through this view. It is never registered for enforcement, so private pages are readable
//! through it: it is a capability that the VMM gives to its vCPU path only, never to device
//! emulation or other host code.

use std::sync::Arc;

use crate::access::{copy_in, copy_out, AccessError};
use crate::file::{GuestMemfd, Inner};
use crate::range::{ByteRange, RangeError};

/// Access to every page of a file, as the guest sees it.
#[derive(Debug, Clone)]
pub struct GuestView {
    inner: Arc<Inner>,
}

impl GuestView {
    fn range(&self, offset: u64, len: usize) -> Result<ByteRange, AccessError> {
        let len = u64::try_from(len).map_err(|_| RangeError::Overflow {
            offset,
            len: u64::MAX,
        })?;
        Ok(ByteRange::checked(offset, len, 1, self.inner.size)?)
    }

    /// Reads guest memory at `offset` (any attribute).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let r = self.range(offset, buf.len())?;
        self.inner.check_poison(r)?;
        copy_out(self.inner.mapping()?, r, buf);
        Ok(())
    }

    /// Writes guest memory at `offset` (any attribute).
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), AccessError> {
        let r = self.range(offset, buf.len())?;
        self.inner.check_poison(r)?;
        copy_in(self.inner.mapping()?, r, buf);
        Ok(())
    }

    /// Start of the guest mapping (for an hva memslot), or null when the file cannot be mapped.
    pub fn as_ptr(&self) -> *mut u8 {
        self.inner
            .guest
            .as_ref()
            .map_or(std::ptr::null_mut(), |m| m.as_ptr())
    }

    /// Size of the guest mapping in bytes.
    pub fn len(&self) -> u64 {
        self.inner.size
    }

    /// Never true.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl GuestMemfd {
    /// The guest view of this file. Give it to the vCPU path only.
    pub fn guest(&self) -> GuestView {
        GuestView {
            inner: self.inner.clone(),
        }
    }
}
