//! The kernel's guest_memfd as a gmem backing.
//!
//! [`Vm::create_guest_memfd`] makes the file with `KVM_CREATE_GUEST_MEMFD` and wraps it in a
//! [`GuestMemfd`], so that:
//!
//! - the kernel answers creation (flags, sizes: its `EINVAL`s are returned as they are),
//!   `fstat`, `mmap` (`ENODEV` without `MMAP`, `EINVAL` for copy-on-write), `fallocate`
//!   (gmem checks the arguments with the kernel's rules first; a test compares both answers
//!   case by case) and `read`/`write`/`pread`/`pwrite`, which the kernel refuses itself;
//! - gmem adds what Linux 6.18 lacks: per-page shared/private attributes, conversion with
//!   host-reference checks, listeners, and enforcement of host access. userfaultfd cannot
//!   register a guest_memfd mapping, so host views of this backing are enforced by hole
//!   mappings alone (guard markers, in one sealed mapping: see `gmem::HostView`).
//!
//! # Kernel flags
//!
//! On 6.18 a guest_memfd mapping is all or nothing: without `GUEST_MEMFD_FLAG_INIT_SHARED`
//! every host fault on it is `SIGBUS`, with it every fault succeeds; the kernel has no
//! per-page shared state yet. gmem needs to reach shared pages (and the guest view all
//! pages), so a file asked for with `MMAP` is created in the kernel with
//! `MMAP | INIT_SHARED` whenever the VM accepts `INIT_SHARED`; gmem's attributes then start
//! private or shared as the caller's flags say, and gmem enforces them.
//! [`KernelGuestMemfd::kernel_flags`] tells what the kernel object got. A file without
//! `MMAP` is created with exactly the caller's flags; it cannot be mapped at all, and only
//! KVM reaches it (through a gmem-only memslot).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use gmem::{Backing, BackingKind, CreateError, Flags, GuestMemfd, PAGE_SIZE};
use kvm_bindings::kvm_create_guest_memfd;

use crate::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use crate::vm::Vm;

/// A guest_memfd made by `KVM_CREATE_GUEST_MEMFD`, owned by the VM that created it.
#[derive(Debug)]
pub struct KernelGuestMemfd {
    fd: OwnedFd,
    vm: u64,
    kernel_flags: u64,
}

impl KernelGuestMemfd {
    /// The flags the kernel object was created with (see the [module docs](self)).
    pub fn kernel_flags(&self) -> u64 {
        self.kernel_flags
    }

    /// [`Vm::id`] of the VM that created the file.
    pub fn vm_id(&self) -> u64 {
        self.vm
    }
}

impl AsFd for KernelGuestMemfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Backing for KernelGuestMemfd {
    fn kind(&self) -> BackingKind {
        BackingKind::KernelGuestMemfd
    }

    fn block_size(&self) -> u64 {
        PAGE_SIZE
    }

    fn kernel_refuses_io(&self) -> bool {
        true
    }

    fn mappable(&self, flags: Flags) -> bool {
        flags.contains(Flags::MMAP)
    }

    fn userfaultfd_capable(&self) -> bool {
        false
    }

    /// The kernel guest_memfd's punch truncates its pages at once, without unmapping them
    /// first: gmem unmaps them from its own mappings before it punches.
    fn punch_unmaps_mappings(&self) -> bool {
        false
    }
}

impl Vm {
    /// The flags the kernel object gets for a file asked for with `flags`.
    pub fn kernel_flags_for(&self, flags: Flags) -> u64 {
        let accepted = self.capabilities().guest_memfd_flags.bits();
        let mut bits = flags.bits();
        if bits & GUEST_MEMFD_FLAG_MMAP != 0 && accepted & GUEST_MEMFD_FLAG_INIT_SHARED != 0 {
            bits |= GUEST_MEMFD_FLAG_INIT_SHARED;
        }
        bits
    }

    /// Creates a guest memory file of `size` bytes backed by the kernel's guest_memfd.
    ///
    /// The kernel validates `size` and `flags` (`EINVAL` for a size of zero or not page
    /// aligned, and for any flag this VM does not accept); its errno is the error's.
    ///
    /// ```no_run
    /// use gmem::{Attr, Errno, Flags};
    /// let vm = gmem_kvm::Vm::new()?;
    /// let mem = vm.create_guest_memfd(1 << 20, Flags::MMAP | Flags::INIT_SHARED)?;
    /// mem.write_at(0, b"shared")?;
    /// mem.convert(0, 4096, Attr::Private)?;
    /// assert_eq!(mem.read_at(0, &mut [0u8; 6]).unwrap_err().errno(), libc::EFAULT);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn create_guest_memfd(&self, size: u64, flags: Flags) -> Result<GuestMemfd, CreateError> {
        let kernel_flags = self.kernel_flags_for(flags);
        let arg = kvm_create_guest_memfd {
            size,
            flags: kernel_flags,
            ..Default::default()
        };
        let raw = self
            .shared
            .fd
            .create_guest_memfd(arg)
            .map_err(|e| CreateError::Backing {
                op: "KVM_CREATE_GUEST_MEMFD",
                source: io::Error::from_raw_os_error(e.errno()),
            })?;
        // SAFETY: `raw` was just returned by KVM_CREATE_GUEST_MEMFD; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let backing = KernelGuestMemfd {
            fd,
            vm: self.shared.id,
            kernel_flags,
        };
        GuestMemfd::from_backing(Box::new(backing), size, flags)
    }
}
