//! What the catalogue needs to know about a backing, and the shmem backing itself.

use gmem::{CreateError, Flags, GuestMemfd, PAGE_SIZE};

/// A backing the catalogue runs against.
///
/// The catalogue creates every file through [`Backend::create`] and sizes files and
/// `fallocate` ranges in multiples of [`Backend::block_size`], so a backing whose allocation
/// unit is a huge page, or one whose files are made by the kernel, plugs in by implementing
/// this trait and instantiating [`crate::conformance_suite!`].
pub trait Backend {
    /// Short name used in failure messages ("shmem", "hugetlb-2048k", "kernel-guest-memfd").
    fn name(&self) -> String;

    /// The allocation unit: file sizes and `fallocate` ranges must be multiples of it, and
    /// `fstat` reports it as `st_blksize`. 4 KiB for shmem and the kernel guest_memfd, the huge
    /// page size for HugeTLB.
    fn block_size(&self) -> u64;

    /// The creation flags this backing accepts; every other bit is refused with `EINVAL`.
    fn supported_flags(&self) -> Flags;

    /// Creates a file of `size` bytes with `flags`, validating them as the kernel does.
    fn create(&self, size: u64, flags: Flags) -> Result<GuestMemfd, CreateError>;

    /// Why this backing cannot run on this machine (no `/dev/kvm`, no huge pages can be
    /// reserved), or `None` when it can. A case whose backing is unavailable prints
    /// `skipped: <reason>` and passes.
    fn unavailable(&self) -> Option<String> {
        None
    }
}

impl<B: Backend + ?Sized> Backend for &B {
    fn name(&self) -> String {
        (**self).name()
    }
    fn block_size(&self) -> u64 {
        (**self).block_size()
    }
    fn supported_flags(&self) -> Flags {
        (**self).supported_flags()
    }
    fn create(&self, size: u64, flags: Flags) -> Result<GuestMemfd, CreateError> {
        (**self).create(size, flags)
    }
    fn unavailable(&self) -> Option<String> {
        (**self).unavailable()
    }
}

/// memfd (shmem) with 4 KiB pages, created by gmem.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shmem;

impl Backend for Shmem {
    fn name(&self) -> String {
        "shmem".to_string()
    }

    fn block_size(&self) -> u64 {
        PAGE_SIZE
    }

    fn supported_flags(&self) -> Flags {
        Flags::MMAP | Flags::INIT_SHARED
    }

    fn create(&self, size: u64, flags: Flags) -> Result<GuestMemfd, CreateError> {
        GuestMemfd::builder(size).flags(flags).create()
    }
}
