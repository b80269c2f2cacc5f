//! The KVM ABI values that kvm-bindings 0.14 lacks, in one place.
//!
//! Each value is the one in Linux's `include/uapi/linux/kvm.h` or
//! `include/uapi/linux/kvm_para.h`. Everything else (structures, `KVM_CAP_GUEST_MEMFD`,
//! `KVM_MEM_GUEST_MEMFD`, `KVM_EXIT_MEMORY_FAULT`, ...) comes from kvm-bindings.

/// `GUEST_MEMFD_FLAG_MMAP` (Linux 6.18): the host may `mmap` the guest_memfd, and a memslot
/// bound to it is *gmem-only* (KVM faults every guest page from the file).
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;

/// `GUEST_MEMFD_FLAG_INIT_SHARED` (Linux 6.18): pages start shared, so host faults on the
/// mapping succeed. Without it every host fault on the mapping is `SIGBUS`.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;

/// `KVM_CAP_GUEST_MEMFD_FLAGS` (Linux 6.18): `KVM_CHECK_EXTENSION` on a VM returns the
/// `KVM_CREATE_GUEST_MEMFD` flags that VM accepts.
///
/// During the 6.18 release candidates the same number was named `KVM_CAP_GUEST_MEMFD_MMAP`
/// and answered 1 when `GUEST_MEMFD_FLAG_MMAP` was supported; the answer is read as a flag
/// mask either way (1 = `MMAP`).
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;

/// `KVM_HC_MAP_GPA_RANGE` (`kvm_para.h`): the guest asks to map a guest-physical range
/// private (encrypted) or shared. With `KVM_CAP_EXIT_HYPERCALL` enabled for it, KVM exits to
/// userspace with `KVM_EXIT_HYPERCALL`, `args = [gpa, npages, attrs]`.
pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;

/// `KVM_MAP_GPA_RANGE_ENCRYPTED`: bit of `attrs` asking for private memory (clear: shared).
pub const KVM_MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;

/// `KVM_MAP_GPA_RANGE_PAGE_SZ_4K`/`_2M`/`_1G` occupy the low bits of `attrs`: the page size
/// the guest uses for the range (`0`, `1`, `2`).
pub const KVM_MAP_GPA_RANGE_PAGE_SZ_MASK: u64 = 0x3;

/// Bits of `KVM_HC_MAP_GPA_RANGE`'s `attrs` that have a meaning; the rest must be zero.
pub const KVM_MAP_GPA_RANGE_VALID: u64 =
    KVM_MAP_GPA_RANGE_ENCRYPTED | KVM_MAP_GPA_RANGE_PAGE_SZ_MASK;

/// Bit of `KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES)` for the default x86 VM type.
pub const VM_TYPE_DEFAULT_BIT: u32 = 1 << kvm_bindings::KVM_X86_DEFAULT_VM;

/// Bit of `KVM_CHECK_EXTENSION(KVM_CAP_VM_TYPES)` for `KVM_X86_SW_PROTECTED_VM`, the VM type
/// with private memory and no hardware encryption.
pub const VM_TYPE_SW_PROTECTED_BIT: u32 = 1 << kvm_bindings::KVM_X86_SW_PROTECTED_VM;
