//! A backing received from another process: a peer's follower or a hand-over's new owner.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::{Backing, BackingKind};
use crate::flags::Flags;

/// A descriptor received from another process, with the kind and block size it announced
/// (checked against `fstat` by the receiver) and, for HugeTLB, the companion file of split
/// pieces.
#[derive(Debug)]
pub(crate) struct Received {
    pub fd: OwnedFd,
    pub kind: BackingKind,
    pub block: u64,
    pub pieces: Option<OwnedFd>,
}

impl AsFd for Received {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
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
    fn companion(&self) -> Option<BorrowedFd<'_>> {
        self.pieces.as_ref().map(|f| f.as_fd())
    }
}
