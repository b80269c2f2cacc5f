//! Bindings: file ranges bound to guest-physical ranges with `KVM_SET_USER_MEMORY_REGION2`.
//!
//! | file | memslot | `userspace_addr` |
//! |---|---|---|
//! | kernel guest_memfd with `MMAP` | gmem-only (`KVM_MEM_GUEST_MEMFD`, `guest_memfd` + offset) | gmem's guest view of the file |
//! | kernel guest_memfd without `MMAP` | `KVM_MEM_GUEST_MEMFD` | 0 (the file cannot be mapped) |
//! | any other backing (shmem, HugeTLB) | plain | gmem's guest view of the file |
//!
//! The rules of DESIGN §2 hold for every file: offsets aligned and inside the file (`EINVAL`),
//! a range overlapping another binding of the same file (`EINVAL`), a file of another VM
//! (`EINVAL`), a guest-physical range overlapping another memslot (`EEXIST`). For the kernel
//! guest_memfd the kernel checks them itself and its errno is returned. For other backings
//! gmem checks them in the kernel's order (range sanity `EINVAL`, guest-physical overlap
//! `EEXIST`, then the file rules `EINVAL`) before the kernel sees the slot. A non-kernel file
//! belongs to the first VM that binds it for as long as that VM lives (a kernel guest_memfd
//! belongs to the VM that created it, for good). Bindings are created and deleted, never
//! changed.
//!
//! # Why the guest view
//!
//! On this machine kind KVM runs real-mode guest code in its instruction emulator, whose
//! memory accesses go through the slot's `userspace_addr` even for a gmem-only slot. The
//! address must therefore reach every page, shared or private: gmem's guest view does, while
//! a host view would turn a guest access to a private page into `KVM_EXIT_MMIO`. gmem hands
//! the guest view to KVM and to nothing else.

use std::collections::HashMap;

use gmem::{BackingKind, Errno, FileId, Flags, GuestMemfd, PAGE_SIZE};
use kvm_bindings::{kvm_userspace_memory_region2, KVM_MEM_GUEST_MEMFD};

use crate::caps::SlotKind;
use crate::gpa::Gpa;
use crate::slots::{owners, SlotEntry, SlotTable};
use crate::vm::Vm;

/// Why a binding could not be created or deleted. State is unchanged after every error.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Zero or unaligned length, unaligned guest-physical address or file offset, or a range
    /// that wraps (`EINVAL`).
    #[error("invalid binding gpa {gpa:#x} offset {offset:#x} len {len:#x}")]
    InvalidRange {
        /// Guest-physical address given.
        gpa: Gpa,
        /// File offset given.
        offset: u64,
        /// Length given.
        len: u64,
    },
    /// The file range ends past the end of the file (`EINVAL`).
    #[error("file range {offset:#x}+{len:#x} ends past the file size {size:#x}")]
    OutsideFile {
        /// File offset given.
        offset: u64,
        /// Length given.
        len: u64,
        /// Size of the file.
        size: u64,
    },
    /// The file range overlaps another binding of the same file (`EINVAL`).
    #[error("file range at {offset:#x} overlaps the binding in slot {slot}")]
    FileOverlap {
        /// File offset given.
        offset: u64,
        /// The slot already binding part of the range.
        slot: u32,
    },
    /// The file belongs to another VM (`EINVAL`).
    #[error("the file belongs to VM {owner}")]
    OtherVm {
        /// [`Vm::id`] of the owner.
        owner: u64,
    },
    /// The guest-physical range overlaps another memslot (`EEXIST`).
    #[error("guest-physical range at {gpa:#x} overlaps slot {slot}")]
    GpaOverlap {
        /// Guest-physical address given.
        gpa: Gpa,
        /// The slot already there.
        slot: u32,
    },
    /// Every memslot of the VM is in use (`ENOSPC`).
    #[error("no free memslot")]
    NoFreeSlot,
    /// A file of a non-kernel backing without a guest view (`ENODEV`).
    #[error("the file has no guest view to bind")]
    NoGuestView,
    /// The binding is not one of this VM's (`EINVAL`).
    #[error("slot {slot} is not a binding of this VM")]
    NotBound {
        /// The slot named.
        slot: u32,
    },
    /// The kernel refused (its errno: `EINVAL`, `EEXIST`, `EBADF`, `ENOMEM`, ...).
    #[error("{op} at gpa {gpa:#x}: errno {errno}")]
    Kernel {
        /// The call.
        op: &'static str,
        /// Guest-physical address of the slot.
        gpa: Gpa,
        /// The kernel's errno.
        errno: i32,
    },
}

impl Errno for BindError {
    fn errno(&self) -> i32 {
        match self {
            BindError::InvalidRange { .. }
            | BindError::OutsideFile { .. }
            | BindError::FileOverlap { .. }
            | BindError::OtherVm { .. }
            | BindError::NotBound { .. } => libc::EINVAL,
            BindError::GpaOverlap { .. } => libc::EEXIST,
            BindError::NoFreeSlot => libc::ENOSPC,
            BindError::NoGuestView => libc::ENODEV,
            BindError::Kernel { errno, .. } => *errno,
        }
    }

    /// The offending file offset or guest-physical address, where there is one.
    fn error_offset(&self) -> Option<u64> {
        match self {
            BindError::InvalidRange { offset, .. }
            | BindError::OutsideFile { offset, .. }
            | BindError::FileOverlap { offset, .. } => Some(*offset),
            BindError::GpaOverlap { gpa, .. } | BindError::Kernel { gpa, .. } => Some(gpa.raw()),
            _ => None,
        }
    }
}

/// A file range bound to a guest-physical range. Delete it with [`Vm::unbind`]; a binding
/// left alone lasts as long as the VM.
#[derive(Debug, PartialEq, Eq)]
pub struct Binding {
    slot: u32,
    gpa: Gpa,
    len: u64,
    offset: u64,
    kind: SlotKind,
    vm: u64,
    file: FileId,
}

impl Binding {
    /// The memslot number.
    pub fn slot(&self) -> u32 {
        self.slot
    }
    /// First guest-physical address.
    pub fn gpa(&self) -> Gpa {
        self.gpa
    }
    /// The identity of the bound file (as [`GuestMemfd::id`] gives it), so that code given a
    /// binding and a file can check they belong together.
    pub fn file_id(&self) -> FileId {
        self.file
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Never true: bindings cover at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// File offset bound at [`Binding::gpa`].
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// Gmem-only (`KVM_MEM_GUEST_MEMFD`) or hva slot.
    pub fn kind(&self) -> SlotKind {
        self.kind
    }
}

impl Vm {
    /// Binds `len` bytes of `mem` from file offset `offset` at guest-physical `gpa`.
    ///
    /// Kernel guest_memfd files get a gmem-only slot, other files an hva slot over gmem's guest
    /// view (see the [module docs](self) for the rules and their errnos).
    pub fn bind(
        &self,
        mem: &GuestMemfd,
        gpa: Gpa,
        offset: u64,
        len: u64,
    ) -> Result<Binding, BindError> {
        let guest = mem.guest().map_or(std::ptr::null_mut(), |g| g.as_ptr());
        let hva = if guest.is_null() {
            if mem.backing_kind() != BackingKind::KernelGuestMemfd {
                return Err(BindError::NoGuestView);
            }
            0
        } else {
            // Only an address for KVM: an out-of-file offset is refused before it is used.
            guest.wrapping_add(usize::try_from(offset).unwrap_or(usize::MAX)) as u64
        };
        self.bind_inner(mem, gpa, offset, len, hva)
    }

    /// [`Vm::bind`] with an explicit `userspace_addr` for the slot instead of the guest view.
    ///
    /// For a kernel guest_memfd with `MMAP` the slot is still gmem-only, but on hosts where
    /// KVM emulates guest code, the emulator's accesses go through `hva`: an enforced host
    /// view there turns guest accesses to private pages into `KVM_EXIT_MMIO`.
    ///
    /// # Safety
    ///
    /// `[hva, hva + len)` must stay mapped (and be memory the guest may reach) for as long as
    /// the binding exists: KVM reads and writes it on the guest's behalf.
    pub unsafe fn bind_at(
        &self,
        mem: &GuestMemfd,
        gpa: Gpa,
        offset: u64,
        len: u64,
        hva: *mut u8,
    ) -> Result<Binding, BindError> {
        self.bind_inner(mem, gpa, offset, len, hva as u64)
    }

    fn bind_inner(
        &self,
        mem: &GuestMemfd,
        gpa: Gpa,
        offset: u64,
        len: u64,
        hva: u64,
    ) -> Result<Binding, BindError> {
        let kernel = mem.backing_kind() == BackingKind::KernelGuestMemfd;
        let file = mem.id().map_err(|e| BindError::Kernel {
            op: "fstat",
            gpa,
            errno: e.errno(),
        })?;
        let mut slots = self.shared.slots();
        let slot = slots.free_slot().ok_or(BindError::NoFreeSlot)?;
        let claimed = if kernel {
            false
        } else {
            self.check_hva_slot(&slots, mem, file, gpa, offset, len)?
        };
        let region = region(slot, kernel, mem, gpa, offset, len, hva);
        // SAFETY: `userspace_addr` is gmem's guest view of `mem` at `offset` (or 0), which
        // lives as long as the file; the slot table keeps a handle to the file until the slot
        // is deleted. Callers of `bind_at` promised the same for their address.
        let res = unsafe { self.shared.fd.set_user_memory_region2(region) };
        if let Err(e) = res {
            if claimed {
                if let Some(map) = owners().as_mut() {
                    map.remove(&file);
                }
            }
            return Err(BindError::Kernel {
                op: "KVM_SET_USER_MEMORY_REGION2",
                gpa,
                errno: e.errno(),
            });
        }
        let attrs = self.shared.caps.kernel_private_attribute().then(|| {
            mem.add_participant(Box::new(crate::attributes::KernelAttributes::new(
                self.shared.clone(),
                gpa,
                offset,
                len,
            )))
        });
        slots.entries.push(SlotEntry {
            slot,
            gpa,
            len,
            offset,
            file,
            mem: mem.clone(),
            attrs,
        });
        Ok(Binding {
            slot,
            gpa,
            len,
            offset,
            kind: slot_kind(kernel, mem),
            vm: self.shared.id,
            file,
        })
    }

    /// Checks a binding of `len` bytes of `file` (not a kernel guest_memfd) at `offset` to
    /// `gpa` against the page size, the file's size, the other slots of this VM and the VMs
    /// that bound the file before; claims the file for this VM when none did. Returns true
    /// when it claimed the file (the claim is dropped again if the memslot cannot be made).
    fn check_hva_slot(
        &self,
        slots: &SlotTable,
        mem: &GuestMemfd,
        file: FileId,
        gpa: Gpa,
        offset: u64,
        len: u64,
    ) -> Result<bool, BindError> {
        let mut claimed = false;
        let invalid = BindError::InvalidRange { gpa, offset, len };
        let page = |v: u64| v % PAGE_SIZE == 0;
        if len == 0 || !page(len) || !gpa.is_aligned(PAGE_SIZE) || !page(offset) {
            return Err(invalid);
        }
        let (Some(_), Some(file_end)) = (gpa.checked_add(len), offset.checked_add(len)) else {
            return Err(invalid);
        };
        if let Some(slot) = slots.gpa_overlap(gpa, len) {
            return Err(BindError::GpaOverlap { gpa, slot });
        }
        let mut owners = owners();
        let map = owners.get_or_insert_with(HashMap::new);
        match map.get(&file) {
            Some(&owner) if owner != self.shared.id => return Err(BindError::OtherVm { owner }),
            Some(_) => {}
            None => claimed = true,
        }
        if file_end > mem.size() {
            return Err(BindError::OutsideFile {
                offset,
                len,
                size: mem.size(),
            });
        }
        if let Some(slot) = slots.file_overlap(file, offset, file_end) {
            return Err(BindError::FileOverlap { offset, slot });
        }
        if claimed {
            map.insert(file, self.shared.id);
        }
        Ok(claimed)
    }

    /// Deletes a binding (the memslot goes; the file and its contents stay).
    pub fn unbind(&self, binding: Binding) -> Result<(), BindError> {
        let mut slots = self.shared.slots();
        let idx = slots
            .entries
            .iter()
            .position(|e| e.slot == binding.slot)
            .filter(|_| binding.vm == self.shared.id)
            .ok_or(BindError::NotBound { slot: binding.slot })?;
        let region = kvm_userspace_memory_region2 {
            slot: binding.slot,
            ..Default::default()
        };
        // SAFETY: a zero-sized region deletes the slot; no memory is handed to KVM.
        unsafe { self.shared.fd.set_user_memory_region2(region) }.map_err(|e| {
            BindError::Kernel {
                op: "KVM_SET_USER_MEMORY_REGION2 (delete)",
                gpa: binding.gpa,
                errno: e.errno(),
            }
        })?;
        let e = slots.entries.remove(idx);
        if let Some(id) = e.attrs {
            e.mem.remove_participant(id);
        }
        Ok(())
    }

    /// The bindings of this VM as `(slot, gpa, len, file offset)`, in creation order.
    pub fn bindings(&self) -> Vec<(u32, Gpa, u64, u64)> {
        self.shared
            .slots()
            .entries
            .iter()
            .map(|e| (e.slot, e.gpa, e.len, e.offset))
            .collect()
    }
}

/// The memslot `slot` for `len` bytes at `gpa`: of the kernel guest_memfd `mem` at `offset`
/// when `kernel`, else of the host address `hva`.
fn region(
    slot: u32,
    kernel: bool,
    mem: &GuestMemfd,
    gpa: Gpa,
    offset: u64,
    len: u64,
    hva: u64,
) -> kvm_userspace_memory_region2 {
    kvm_userspace_memory_region2 {
        slot,
        flags: if kernel { KVM_MEM_GUEST_MEMFD } else { 0 },
        guest_phys_addr: gpa.raw(),
        memory_size: len,
        userspace_addr: hva,
        guest_memfd_offset: if kernel { offset } else { 0 },
        guest_memfd: if kernel {
            u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(
                mem,
            )))
            .unwrap_or(u32::MAX)
        } else {
            0
        },
        ..Default::default()
    }
}

/// What a slot of `mem` is: gmem-only for a kernel guest_memfd with `MMAP`, a guest_memfd
/// slot for another kernel guest_memfd, a host address slot otherwise.
fn slot_kind(kernel: bool, mem: &GuestMemfd) -> SlotKind {
    if kernel && mem.flags().contains(Flags::MMAP) {
        SlotKind::GmemOnly
    } else if kernel {
        SlotKind::GuestMemfd
    } else {
        SlotKind::Hva
    }
}
