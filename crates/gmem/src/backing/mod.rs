//! Where a guest memory file's pages come from.
//!
//! A backing owns the file descriptor and answers what only it knows: its kind, its
//! allocation unit, which creation flags the kernel object itself enforces, and the raw
//! `fallocate`. Everything else (attributes, conversion, host-view enforcement) is gmem's and
//! is the same for every backing.

pub mod hugetlb;
mod received;
mod shmem;

pub(crate) use received::Received;

pub use hugetlb::HugeTlb;
pub use shmem::Shmem;

use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use crate::model::flags::Flags;

/// Which kind of object holds the pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackingKind {
    /// A memfd (shmem) with 4 KiB pages.
    Shmem,
    /// A HugeTLB memfd with huge pages of the given size in bytes.
    HugeTlb(u64),
    /// The kernel's own guest_memfd, created through KVM.
    KernelGuestMemfd,
}

impl fmt::Display for BackingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackingKind::Shmem => write!(f, "shmem"),
            BackingKind::HugeTlb(sz) => write!(f, "hugetlb-{}k", sz / 1024),
            BackingKind::KernelGuestMemfd => write!(f, "kernel-guest-memfd"),
        }
    }
}

/// The object that holds a guest memory file's pages.
///
/// Implemented by [`Shmem`] here and by the KVM crate for the kernel's guest_memfd.
pub trait Backing: AsFd + fmt::Debug + Send + Sync + 'static {
    /// The kind of object.
    fn kind(&self) -> BackingKind;

    /// The allocation unit in bytes: sizes and fallocate ranges are multiples of it.
    fn block_size(&self) -> u64;

    /// True when `read(2)`/`write(2)` on the descriptor already fail in the kernel, as they do
    /// for the kernel guest_memfd. For other backings gmem refuses them itself.
    fn kernel_refuses_io(&self) -> bool {
        false
    }

    /// True when gmem may map the descriptor for its own guest view and accessors. The kernel
    /// guest_memfd without `MMAP` cannot be mapped at all.
    fn mappable(&self, flags: Flags) -> bool {
        let _ = flags;
        true
    }

    /// True when userfaultfd can register mappings of the descriptor (shmem, HugeTLB), so host
    /// views are enforced with poison markers. When false (the kernel guest_memfd, whose
    /// mappings userfaultfd refuses with `EINVAL`), every private page of a view is covered by
    /// a hole mapping instead; [`crate::HostView`] gives the cost of that.
    fn userfaultfd_capable(&self) -> bool {
        true
    }

    /// True when a punch-hole on the descriptor unmaps the range from every mapping of the
    /// file before it frees the pages, as shmem's does (`unmap_mapping_range`, which keeps
    /// guard markers), so a punched page is mapped nowhere when the kernel truncates it. False
    /// (the default, and the kernel guest_memfd's answer) makes gmem unmap the range from its
    /// own mappings before it punches: the truncation of a page still mapped somewhere drops
    /// the guard markers of every mapping of it.
    fn punch_unmaps_mappings(&self) -> bool {
        false
    }

    /// Raw `fallocate(2)` on the descriptor; gmem has validated mode and range already.
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        crate::sys::fd::fallocate(self.as_fd(), mode, offset, len)
    }

    /// The descriptor, for callers that need it raw (KVM memslots, hand-over).
    fn fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }

    /// The HugeTLB backing, when this is one (restructuring needs its huge-page mapping).
    fn as_hugetlb(&self) -> Option<&HugeTlb> {
        None
    }

    /// The companion file holding the split pieces of a HugeTLB file received from its owner
    /// (see [`crate::GuestMemfd::hugetlb_accounting`]); `None` otherwise.
    fn companion(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// Checks a descriptor received from another process (a peer's owner, a hand-over's old
/// owner) before anything maps it: it holds exactly `size` bytes and something keeps that
/// size — the seals of a memfd (`F_SEAL_GROW | F_SEAL_SHRINK`), or the kernel itself for a
/// guest_memfd, which cannot be resized. A file that could shrink under a mapping would turn
/// every access past its new end into a `SIGBUS` in this process.
pub(crate) fn check_received(
    fd: BorrowedFd<'_>,
    kind: BackingKind,
    size: u64,
) -> Result<(), &'static str> {
    use std::os::fd::AsRawFd;
    let st = crate::sys::fd::fstat(fd).map_err(|_| "fstat failed")?;
    if u64::try_from(st.st_size).ok() != Some(size) {
        return Err("size differs from the announced size");
    }
    match kind {
        BackingKind::KernelGuestMemfd => {
            let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .map_err(|_| "readlink failed")?;
            if link.as_os_str() != "anon_inode:[kvm-gmem]" {
                return Err("not a kernel guest_memfd");
            }
            Ok(())
        }
        BackingKind::Shmem | BackingKind::HugeTlb(_) => {
            let need = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK;
            match crate::sys::fd::seals(fd) {
                Ok(s) if s & need == need => Ok(()),
                _ => Err("its size is not sealed"),
            }
        }
    }
}
