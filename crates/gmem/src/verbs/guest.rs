//! The guest view: how a guest reaches every page, shared or private.
//!
//! A software hypervisor's vCPU emulation, or KVM through an hva memslot, reaches guest memory
//! through this view. It is not enforced, so private pages are readable through it: it is a
//! capability that the owning VMM gives to its vCPU path only, never to device emulation or
//! other host code. A follower (a process attached with [`GuestMemfd::attach`]) is host code
//! and has no guest view unless it was attached with
//! [`GuestMemfd::attach_with_guest_view`].

use std::sync::Arc;

use crate::engine::access::AccessError;
use crate::engine::Engine;
use crate::model::units::{ByteRange, RangeError};

use super::GuestMemfd;

/// Access to every page of a file, as the guest sees it.
#[derive(Debug, Clone)]
pub struct GuestView {
    inner: Arc<Engine>,
}

impl GuestView {
    fn range(&self, offset: u64, len: usize) -> Result<ByteRange, AccessError> {
        let len = u64::try_from(len).map_err(|_| RangeError::Overflow {
            offset,
            len: u64::MAX,
        })?;
        Ok(ByteRange::checked(offset, len, 1, self.inner.size())?)
    }

    /// Reads guest memory at `offset` (any attribute; a poisoned page is `EHWPOISON`).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let r = self.range(offset, buf.len())?;
        self.inner.read(r, buf, true)
    }

    /// Writes guest memory at `offset` (any attribute; a poisoned page is `EHWPOISON`).
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), AccessError> {
        let r = self.range(offset, buf.len())?;
        self.inner.write(r, buf, true)
    }

    /// Start of the guest mapping (for an hva memslot), or null when the file cannot be
    /// mapped.
    ///
    /// Once a file's guest mapping address was asked for, its conversions to private re-guard
    /// every view after each page they move (the pointer's user may fault the page between
    /// gmem unmapping and punching it, and the kernel's truncation then drops the views'
    /// markers), which costs one `madvise` per moved range.
    pub fn as_ptr(&self) -> *mut u8 {
        self.inner.hand_out_guest_map()
    }

    /// Size of the guest mapping in bytes.
    pub fn len(&self) -> u64 {
        self.inner.size()
    }

    /// Never true.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl GuestMemfd {
    /// The guest view of this file. Give it to the vCPU path only.
    ///
    /// `EPERM` on a follower attached without the guest-view capability, once the file was
    /// handed over, and in a forked child.
    pub fn guest(&self) -> Result<GuestView, AccessError> {
        self.inner.gate().access()?;
        if !self.guest_view {
            return Err(AccessError::NoGuestView);
        }
        Ok(GuestView {
            inner: self.inner.clone(),
        })
    }
}
