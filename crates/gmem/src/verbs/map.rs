//! Host views: mappings of the file in which private (and poisoned) pages fault.
//!
//! # Mechanism, per backing
//!
//! | backing | a private page in a view | the view itself |
//! |---|---|---|
//! | shmem | guard marker: `SIGSEGV` (`SEGV_MAPERR`), `EFAULT` for a kernel access | one mapping; its moves and unmaps by the VMM are seen (userfaultfd events) and neutralised |
//! | kernel guest_memfd | guard marker: `SIGSEGV` (`SEGV_MAPERR`), `EFAULT` | one mapping, `mseal`ed: it cannot be moved, unmapped, remapped over or re-protected by anyone |
//! | HugeTLB | a wholly private huge page is a hole: `SIGBUS` (`BUS_ADRERR`); a private 4 KiB page of a split huge page a guard marker: `SIGSEGV` | one mapping per huge-page window that is not plain; moves and unmaps seen and neutralised |
//!
//! Guard markers (Linux 6.13, file mappings 6.15) survive `MADV_DONTNEED` (what a balloon
//! device does), `MADV_PAGEOUT`, `mprotect` and gmem's punch-hole, need no mapping of their own (a
//! guest that shares every other page of 1 GiB costs no extra VMA) and make `write(2)`,
//! `vmsplice(2)`, io_uring and O_DIRECT through the address fail with `EFAULT`. They raise
//! `SIGSEGV`, not the `SIGBUS` the kernel's guest_memfd raises: that is the documented
//! difference on these backings, reported by `gmem probe`.
//!
//! A view is followed by a `PROT_NONE` fence page, so it can never grow in place. What
//! remains (each pinned by a test):
//!
//! - `MADV_GUARD_REMOVE` on a view removes gmem's markers: it is the one operation that exists
//!   to do that, and no kernel facility refuses it;
//! - a kernel guest_memfd view's address range and file stay referenced until the process
//!   exits (a sealed mapping cannot be unmapped); dropping the view makes every page fault,
//!   and the file's memory is punched when its last gmem handle goes (unless shared with
//!   another process through gmem);
//! - an `mremap` of a shmem or HugeTLB view by the VMM that happens while the same file
//!   converts, splits or merges is neutralised when that operation ends (before it returns);
//!   until then the moved range shows what the view showed when it moved, and the VMM's
//!   thread may already be back from `mremap`. The address range the move left empty may be
//!   taken by another mapping of the process's in the meantime, which gmem's replacement of
//!   the window, or the markers of a hand-over's release running then, would then map over
//!   or mark (a new owner received in the same process can lose its guest mapping that
//!   way; one in another process, as a VMM upgrade is, cannot).
//!
//! Views are `MADV_DONTFORK`: a forked child inherits no view. Another process reaches the
//! memory through [`crate::peer`].

pub use crate::model::fault::HostFault;
use std::io;
use std::sync::Arc;

use crate::engine::gate::GateError;
use crate::engine::Engine;
use crate::model::error::Errno;
use crate::model::flags::Flags;
use crate::model::units::{ByteRange, RangeError};
use crate::sys::to_usize;

use super::GuestMemfd;

/// Why a host view could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The file was created without [`Flags::MMAP`] (`ENODEV`).
    #[error("the file was created without MMAP")]
    NotMappable,
    /// A private (copy-on-write) mapping was requested (`EINVAL`).
    #[error("copy-on-write mappings of guest memory are refused")]
    CopyOnWrite,
    /// Offset not aligned to the block size, zero length, or wrapping range (`EINVAL`).
    #[error(transparent)]
    Range(#[from] RangeError),
    /// This process may not map the file (`EPERM`): handed over, or a forked child.
    #[error(transparent)]
    Gate(#[from] GateError),
    /// A syscall failed (`ENOMEM` when the process is too close to `vm.max_map_count`).
    #[error("{op} at offset {offset:#x}: {source}")]
    Os {
        /// The operation.
        op: &'static str,
        /// File offset of the view.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Errno for MapError {
    fn errno(&self) -> i32 {
        match self {
            MapError::NotMappable => libc::ENODEV,
            MapError::CopyOnWrite | MapError::Range(_) => libc::EINVAL,
            MapError::Gate(e) => e.errno(),
            MapError::Os { source, .. } => crate::model::error::os_errno(source),
        }
    }

    fn error_offset(&self) -> Option<u64> {
        match self {
            MapError::Range(e) => Some(e.offset()),
            MapError::Os { offset, .. } => Some(*offset),
            _ => None,
        }
    }
}

/// How a view is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sharing {
    /// `MAP_SHARED`: writes reach the file. The only kind guest memory allows.
    #[default]
    Shared,
    /// `MAP_PRIVATE` (copy-on-write): refused with `EINVAL`.
    CopyOnWrite,
}

/// A host mapping of guest memory. Private pages in it fault.
///
/// The view hands out raw pointers only: memory behind them can become private (and fault) at
/// any time the guest converts it, and the guest may write shared pages concurrently. For
/// checked access use [`GuestMemfd::read_at`], [`GuestMemfd::write_at`] or a
/// [`crate::Pin`].
#[derive(Debug)]
pub struct HostView {
    inner: Arc<Engine>,
    id: u64,
    addr: usize,
    len: usize,
    offset: u64,
}

impl HostView {
    /// Start of the view.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// Length of the view in bytes (may extend past the end of the file).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: views are at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// File offset the view starts at.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

impl Drop for HostView {
    fn drop(&mut self) {
        self.inner.drop_view(self.id);
    }
}

impl GuestMemfd {
    /// Maps `len` bytes of the file from `offset` for the host (`MAP_SHARED`).
    ///
    /// Needs [`Flags::MMAP`] (`ENODEV` otherwise). The view may extend past the end of the
    /// file; touching there is `SIGBUS`, as is touching a hole; a private page is guarded
    /// (see [`HostFault`] for each backing's signal).
    pub fn map(&self, offset: u64, len: u64) -> Result<HostView, MapError> {
        self.map_with(offset, len, Sharing::Shared)
    }

    /// [`GuestMemfd::map`] with an explicit sharing mode; [`Sharing::CopyOnWrite`] is refused.
    pub fn map_with(&self, offset: u64, len: u64, sharing: Sharing) -> Result<HostView, MapError> {
        let inner = &self.inner;
        if !inner.flags().contains(Flags::MMAP) {
            return Err(MapError::NotMappable);
        }
        if sharing == Sharing::CopyOnWrite {
            return Err(MapError::CopyOnWrite);
        }
        inner.gate().access()?;
        let block = inner.block_size();
        let r = ByteRange::checked(offset, len, 1, u64::MAX)?;
        if offset % block != 0 {
            return Err(RangeError::Unaligned {
                offset,
                len,
                align: block,
            }
            .into());
        }
        let os = |op, source| MapError::Os { op, offset, source };
        let len = r
            .len()
            .checked_next_multiple_of(block)
            .ok_or(RangeError::Overflow { offset, len })?;
        let len = to_usize(len).map_err(|e| os("mmap", e))?;
        let (id, addr) = inner.map_view(offset, len).map_err(|(op, e)| os(op, e))?;
        Ok(HostView {
            inner: inner.clone(),
            id,
            addr,
            len,
            offset,
        })
    }
}

impl GuestMemfd {
    /// How a host view's touch of the page at `offset` faults, by the mechanism that enforces
    /// it (`None` when the page is reachable): [`HostFault::Segv`] for a guard marker,
    /// [`HostFault::Bus`] for a hole or past the end of the file. In a forked child, where
    /// no view is mapped (they are `MADV_DONTFORK`), [`HostFault::Segv`] everywhere; once
    /// handed over, the fault of a revoked view everywhere ([`HostView::fault_at`]).
    pub fn host_fault(&self, offset: u64) -> Option<HostFault> {
        self.inner.host_fault(offset)
    }
}

impl HostView {
    /// How a touch at byte `at` of the view faults, or `None` when the page is reachable
    /// (shared, not poisoned, inside the file). This is gmem's own account of its markers;
    /// the conformance suite checks it against real touches. In a forked child, where the
    /// view is not mapped, [`HostFault::Segv`] at every byte. Once the file is handed over
    /// the view is revoked: [`HostFault::Segv`] at every byte (guard markers), or
    /// [`HostFault::Bus`] on HugeTLB (a hole over the view).
    pub fn fault_at(&self, at: usize) -> Option<HostFault> {
        self.inner.fault_at(self.id, at)
    }
}
