//! Capability probe: what the running KVM offers for guest memory, and the mode gmem runs in.
//!
//! [`Capabilities::probe`] asks `KVM_CHECK_EXTENSION` for `KVM_CAP_GUEST_MEMFD`,
//! `KVM_CAP_GUEST_MEMFD_FLAGS`, `KVM_CAP_MEMORY_ATTRIBUTES`, `KVM_CAP_VM_TYPES`,
//! `KVM_CAP_EXIT_HYPERCALL`, `KVM_CAP_USER_MEMORY2` and `KVM_CAP_MEMORY_FAULT_INFO`, on the
//! VM where the answer depends on the VM type. [`Capabilities::mode`] turns the answers into
//! a [`Mode`]: which part of the guest_memfd model the kernel provides and which part gmem
//! adds. On Linux 6.18 with the default VM type (the machine this crate is tested on) that is:
//! the file (create, flags, sizes, `mmap`, `fallocate`, `read`/`write`) from the kernel;
//! per-page attributes, conversion with reference checks and host-access enforcement from
//! gmem; conversion requests from the guest through gmem's doorbell.

use std::fmt;

use gmem::Flags;
use kvm_bindings::{
    KVM_CAP_EXIT_HYPERCALL, KVM_CAP_GUEST_MEMFD, KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_MEMORY_FAULT_INFO, KVM_CAP_USER_MEMORY2, KVM_CAP_VM_TYPES,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
};
use kvm_ioctls::{Kvm, VmFd};

use crate::doorbell::DOORBELL_PORT;
use crate::uapi::{
    KVM_CAP_GUEST_MEMFD_FLAGS, KVM_HC_MAP_GPA_RANGE, VM_TYPE_DEFAULT_BIT, VM_TYPE_SW_PROTECTED_BIT,
};

/// The answers of `KVM_CHECK_EXTENSION` that matter for guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `KVM_GET_API_VERSION` (12 on every released kernel).
    pub api_version: i32,
    /// `KVM_CAP_GUEST_MEMFD`: `KVM_CREATE_GUEST_MEMFD` exists.
    pub guest_memfd: bool,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS` on the VM: the creation flags it accepts.
    pub guest_memfd_flags: Flags,
    /// `KVM_CAP_MEMORY_ATTRIBUTES` on the VM: attributes `KVM_SET_MEMORY_ATTRIBUTES` accepts
    /// (0: the ioctl is absent, as it is without `CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES`).
    pub memory_attributes: u64,
    /// `KVM_CAP_VM_TYPES`: bit *n* set when `KVM_CREATE_VM` accepts type *n*.
    pub vm_types: u32,
    /// `KVM_CAP_EXIT_HYPERCALL`: bit *n* set when hypercall *n* can exit to userspace.
    pub exit_hypercall: u64,
    /// `KVM_CAP_USER_MEMORY2`: `KVM_SET_USER_MEMORY_REGION2` exists.
    pub user_memory2: bool,
    /// `KVM_CAP_MEMORY_FAULT_INFO`: KVM reports `KVM_EXIT_MEMORY_FAULT`.
    pub memory_fault_info: bool,
    /// `KVM_CAP_NR_MEMSLOTS`: memslots per address space.
    pub nr_memslots: usize,
}

fn positive(v: i32) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Capabilities {
    /// Asks `kvm` (system-wide answers) and `vm` (answers that depend on the VM type).
    pub fn probe(kvm: &Kvm, vm: &VmFd) -> Self {
        let sys = |cap: u32| kvm.check_extension_raw(libc::c_ulong::from(cap));
        let on_vm = |cap: u32| vm.check_extension_raw(libc::c_ulong::from(cap));
        Capabilities {
            api_version: kvm.get_api_version(),
            guest_memfd: on_vm(KVM_CAP_GUEST_MEMFD) > 0,
            guest_memfd_flags: Flags::from_bits_retain(positive(on_vm(KVM_CAP_GUEST_MEMFD_FLAGS))),
            memory_attributes: positive(on_vm(KVM_CAP_MEMORY_ATTRIBUTES)),
            vm_types: u32::try_from(sys(KVM_CAP_VM_TYPES)).unwrap_or(0),
            exit_hypercall: positive(on_vm(KVM_CAP_EXIT_HYPERCALL)),
            user_memory2: on_vm(KVM_CAP_USER_MEMORY2) > 0,
            memory_fault_info: on_vm(KVM_CAP_MEMORY_FAULT_INFO) > 0,
            nr_memslots: kvm.get_nr_memslots(),
        }
    }

    /// True when `KVM_SET_MEMORY_ATTRIBUTES` accepts `KVM_MEMORY_ATTRIBUTE_PRIVATE`.
    pub fn kernel_private_attribute(&self) -> bool {
        self.memory_attributes & u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE) != 0
    }

    /// True when `KVM_HC_MAP_GPA_RANGE` can be made to exit to userspace.
    pub fn map_gpa_range_exit(&self) -> bool {
        self.exit_hypercall & (1 << KVM_HC_MAP_GPA_RANGE) != 0
    }

    /// True when a VM type with private memory (`KVM_X86_SW_PROTECTED_VM`) can be created, so
    /// that guest accesses to private memory arrive as `KVM_EXIT_MEMORY_FAULT`.
    pub fn private_vm_type(&self) -> bool {
        self.vm_types & VM_TYPE_SW_PROTECTED_BIT != 0 && self.memory_fault_info
    }

    /// The mode these capabilities give.
    pub fn mode(&self) -> Mode {
        let kernel_file = self.guest_memfd && self.user_memory2;
        Mode {
            file: if kernel_file {
                Provider::Kernel
            } else {
                Provider::Gmem
            },
            host_mmap: if kernel_file && self.guest_memfd_flags.contains(Flags::MMAP) {
                Provider::Kernel
            } else {
                Provider::Gmem
            },
            attributes: if self.kernel_private_attribute() {
                Provider::KernelAndGmem
            } else {
                Provider::Gmem
            },
            conversion: Provider::Gmem,
            enforcement: Provider::Gmem,
            host_fault: gmem::HostFault::Segv,
            memslots: if kernel_file && self.guest_memfd_flags.contains(Flags::MMAP) {
                SlotKind::GmemOnly
            } else {
                SlotKind::Hva
            },
            hypercall_exit: self.map_gpa_range_exit(),
            memory_fault_exit: self.private_vm_type(),
        }
    }
}

/// Who provides one part of the guest_memfd model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// The kernel's guest_memfd / KVM.
    Kernel,
    /// gmem, in userspace.
    Gmem,
    /// Both: gmem keeps its own record and mirrors it into the kernel.
    KernelAndGmem,
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Provider::Kernel => "kernel",
            Provider::Gmem => "gmem",
            Provider::KernelAndGmem => "kernel + gmem",
        })
    }
}

/// How files are bound to guest-physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    /// `KVM_MEM_GUEST_MEMFD` slots of a file created with `MMAP`: KVM faults guest pages from
    /// the file itself.
    GmemOnly,
    /// `KVM_MEM_GUEST_MEMFD` slots of a kernel file without `MMAP`: KVM takes private pages
    /// from the file and shared ones through `userspace_addr`, which is 0 (nothing) because
    /// such a file cannot be mapped. Only VM types with private memory can use it.
    GuestMemfd,
    /// Slots whose `userspace_addr` is gmem's guest view of the file.
    Hva,
}

/// Which semantics the kernel provides and which gmem adds, as probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// The file: create, flags, sizes, `fallocate`, `read`/`write` answers.
    pub file: Provider,
    /// Host mappings of the file (`mmap`).
    pub host_mmap: Provider,
    /// Per-page shared/private attributes.
    pub attributes: Provider,
    /// Conversion with host-reference checks (`EAGAIN` + offset).
    pub conversion: Provider,
    /// Enforcement of host access to private pages through host mappings.
    pub enforcement: Provider,
    /// How a host touch of a private page of a kernel file faults: gmem's views carry guard
    /// markers, so [`gmem::HostFault::Segv`] (`SIGSEGV`, `SEGV_MAPERR`) where the kernel's own
    /// guest_memfd (with `KVM_SET_MEMORY_ATTRIBUTES`) would raise `SIGBUS`. The documented
    /// difference of this backing; `gmem probe` reports it.
    pub host_fault: gmem::HostFault,
    /// Memslots for files of the kernel backing.
    pub memslots: SlotKind,
    /// Guest requests can arrive as `KVM_EXIT_HYPERCALL` (`KVM_HC_MAP_GPA_RANGE`).
    pub hypercall_exit: bool,
    /// Guest accesses can arrive as `KVM_EXIT_MEMORY_FAULT` (a VM type with private memory).
    pub memory_fault_exit: bool,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = match self.file {
            Provider::Kernel => "kernel guest_memfd (KVM_CREATE_GUEST_MEMFD)",
            _ => "gmem over memfd (no kernel guest_memfd)",
        };
        writeln!(
            f,
            "file (create, flags, sizes, fallocate, read/write): {file}"
        )?;
        writeln!(f, "host mmap: {}", self.host_mmap)?;
        let attrs = match self.attributes {
            Provider::KernelAndGmem => "kernel + gmem (KVM_SET_MEMORY_ATTRIBUTES mirrors gmem)",
            _ => "gmem (the kernel has no KVM_SET_MEMORY_ATTRIBUTES)",
        };
        writeln!(f, "per-page attributes: {attrs}")?;
        writeln!(f, "conversion with reference checks: {}", self.conversion)?;
        let signal = match self.host_fault {
            gmem::HostFault::Segv => {
                "guard markers: SIGSEGV (SEGV_MAPERR) on private pages, where the kernel's own \
                 guest_memfd raises SIGBUS"
            }
            gmem::HostFault::Bus => "SIGBUS on private pages",
        };
        writeln!(
            f,
            "host access enforcement: {} ({signal})",
            self.enforcement
        )?;
        let slots = match self.memslots {
            SlotKind::GmemOnly => "gmem-only (KVM_MEM_GUEST_MEMFD) for kernel files, hva over the guest view otherwise",
            SlotKind::GuestMemfd => "KVM_MEM_GUEST_MEMFD (no MMAP) for kernel files, hva over the guest view otherwise",
            SlotKind::Hva => "hva over the guest view",
        };
        writeln!(f, "memslots: {slots}")?;
        let yes_no = |b: bool| if b { "available" } else { "unavailable" };
        write!(
            f,
            "guest conversion requests: doorbell port {DOORBELL_PORT:#x} (always); \
             KVM_EXIT_HYPERCALL/MAP_GPA_RANGE {}; KVM_EXIT_MEMORY_FAULT {}",
            yes_no(self.hypercall_exit),
            yes_no(self.memory_fault_exit)
        )
    }
}

impl fmt::Display for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut types = Vec::new();
        if self.vm_types & VM_TYPE_DEFAULT_BIT != 0 {
            types.push("default".to_string());
        }
        if self.vm_types & VM_TYPE_SW_PROTECTED_BIT != 0 {
            types.push("sw-protected".to_string());
        }
        let rest = self.vm_types & !(VM_TYPE_DEFAULT_BIT | VM_TYPE_SW_PROTECTED_BIT);
        if rest != 0 {
            types.push(format!("{rest:#x}"));
        }
        writeln!(f, "KVM api version {}", self.api_version)?;
        writeln!(f, "KVM_CAP_GUEST_MEMFD: {}", self.guest_memfd)?;
        writeln!(f, "KVM_CAP_GUEST_MEMFD_FLAGS: {:?}", self.guest_memfd_flags)?;
        writeln!(
            f,
            "KVM_CAP_MEMORY_ATTRIBUTES: {:#x}",
            self.memory_attributes
        )?;
        writeln!(f, "KVM_CAP_VM_TYPES: {}", types.join(", "))?;
        writeln!(
            f,
            "KVM_CAP_EXIT_HYPERCALL: {:#x}{}",
            self.exit_hypercall,
            if self.map_gpa_range_exit() {
                " (KVM_HC_MAP_GPA_RANGE)"
            } else {
                ""
            }
        )?;
        writeln!(f, "KVM_CAP_USER_MEMORY2: {}", self.user_memory2)?;
        writeln!(f, "KVM_CAP_MEMORY_FAULT_INFO: {}", self.memory_fault_info)?;
        writeln!(f, "KVM_CAP_NR_MEMSLOTS: {}", self.nr_memslots)?;
        write!(f, "{}", self.mode())
    }
}
