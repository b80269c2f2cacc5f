//! A backing received from another process: a peer's follower or a hand-over's new owner.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::{Backing, BackingKind, HugeTlb};
use crate::model::flags::Flags;

/// A descriptor received from another process, with the kind and block size it announced
/// (checked against `fstat` and the seals by the receiver) and, for HugeTLB, the companion
/// file of split pieces.
#[derive(Debug)]
pub(crate) struct Received {
    file: File,
    kind: BackingKind,
    block: u64,
    pieces: Option<OwnedFd>,
}

#[derive(Debug)]
enum File {
    Plain(OwnedFd),
    /// HugeTLB files are adopted with gmem's mapping of their huge pages (already allocated
    /// and reserved by the owner, so mapping them takes nothing from the pool).
    Huge(HugeTlb),
}

impl Received {
    /// Wraps `fd` (of `size` bytes) received from another process.
    pub fn new(
        fd: OwnedFd,
        kind: BackingKind,
        block: u64,
        pieces: Option<OwnedFd>,
        size: u64,
    ) -> io::Result<Self> {
        let file = match kind {
            BackingKind::HugeTlb(page) => File::Huge(HugeTlb::adopt(fd, size, page)?),
            _ => File::Plain(fd),
        };
        Ok(Received {
            file,
            kind,
            block,
            pieces,
        })
    }
}

impl AsFd for Received {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.file {
            File::Plain(fd) => fd.as_fd(),
            File::Huge(h) => h.as_fd(),
        }
    }
}

impl Backing for Received {
    fn kind(&self) -> BackingKind {
        self.kind
    }
    fn block_size(&self) -> u64 {
        self.block
    }
    fn kernel_refuses_io(&self) -> bool {
        self.kind == BackingKind::KernelGuestMemfd
    }
    fn mappable(&self, flags: Flags) -> bool {
        self.kind != BackingKind::KernelGuestMemfd || flags.contains(Flags::MMAP)
    }
    fn userfaultfd_capable(&self) -> bool {
        self.kind != BackingKind::KernelGuestMemfd
    }
    fn punch_unmaps_mappings(&self) -> bool {
        self.kind == BackingKind::Shmem
    }
    fn as_hugetlb(&self) -> Option<&HugeTlb> {
        match &self.file {
            File::Huge(h) => Some(h),
            File::Plain(_) => None,
        }
    }
    fn companion(&self) -> Option<BorrowedFd<'_>> {
        self.pieces.as_ref().map(|f| f.as_fd())
    }
}
