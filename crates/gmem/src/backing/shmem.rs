//! memfd (shmem) backing with 4 KiB pages.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::{Backing, BackingKind};
use crate::model::units::PAGE_SIZE;
use crate::sys::fd;

/// A sealed memfd of fixed size.
///
/// The size is sealed (`F_SEAL_GROW | F_SEAL_SHRINK`), so no holder of the descriptor can
/// resize it, matching guest_memfd's fixed size.
#[derive(Debug)]
pub struct Shmem {
    fd: OwnedFd,
}

impl Shmem {
    /// Creates a memfd of `size` bytes (validated by the caller).
    pub fn create(size: u64) -> io::Result<Self> {
        let fd = fd::memfd_create(c"gmem", 0)?;
        fd::ftruncate(fd.as_fd(), size)?;
        fd::add_seals(
            fd.as_fd(),
            libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
        )?;
        Ok(Shmem { fd })
    }

    /// Adopts an existing memfd (for example one received from another process).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Shmem { fd }
    }
}

impl AsFd for Shmem {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Backing for Shmem {
    fn kind(&self) -> BackingKind {
        BackingKind::Shmem
    }

    fn block_size(&self) -> u64 {
        PAGE_SIZE
    }

    fn punch_unmaps_mappings(&self) -> bool {
        true
    }
}
