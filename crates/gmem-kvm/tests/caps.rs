//! The capability probe tells the truth: each answer is checked against what the kernel does.

mod common;

use common::vm_or_skip;
use gmem::Flags;
use gmem_kvm::kvm_bindings::{kvm_memory_attributes, KVM_MEMORY_ATTRIBUTE_PRIVATE};
use gmem_kvm::kvm_ioctls::Kvm;
use gmem_kvm::{Provider, SlotKind};

#[test]
fn guest_memfd_flags_are_exactly_those_the_kernel_accepts() {
    let Some(vm) = vm_or_skip() else { return };
    let caps = vm.capabilities();
    assert!(caps.guest_memfd, "KVM_CAP_GUEST_MEMFD");
    for bit in 0..64 {
        let flags = Flags::from_bits_retain(1 << bit);
        // The raw kernel call with exactly this bit, not gmem's MMAP|INIT_SHARED widening.
        let arg = gmem_kvm::kvm_bindings::kvm_create_guest_memfd {
            size: 4096,
            flags: 1 << bit,
            ..Default::default()
        };
        let res = vm.fd().create_guest_memfd(arg);
        if let Ok(fd) = res {
            // SAFETY: the descriptor was just created and is closed once.
            unsafe { libc::close(fd) };
        }
        assert_eq!(
            res.is_ok(),
            caps.guest_memfd_flags.contains(flags),
            "bit {bit}: kernel {res:?}, probe {:?}",
            caps.guest_memfd_flags
        );
    }
}

#[test]
fn memory_attributes_probe_matches_the_ioctl() {
    let Some(vm) = vm_or_skip() else { return };
    let caps = vm.capabilities();
    let res = vm.fd().set_memory_attributes(kvm_memory_attributes {
        address: 0,
        size: 4096,
        attributes: u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE),
        flags: 0,
    });
    if caps.kernel_private_attribute() {
        assert!(res.is_ok(), "{res:?}");
        assert_eq!(vm.mode().attributes, Provider::KernelAndGmem);
    } else {
        // Without CONFIG_KVM_GENERIC_MEMORY_ATTRIBUTES the ioctl does not exist.
        let errno = res.expect_err("KVM_SET_MEMORY_ATTRIBUTES").errno();
        assert!(
            matches!(errno, libc::ENOTTY | libc::EINVAL),
            "errno {errno}"
        );
        assert_eq!(vm.mode().attributes, Provider::Gmem);
    }
}

#[test]
fn vm_types_probe_matches_vm_creation() {
    let Some(vm) = vm_or_skip() else { return };
    let types = vm.capabilities().vm_types;
    let kvm = Kvm::new().expect("/dev/kvm");
    for t in 0..8u32 {
        let res = kvm.create_vm_with_type(u64::from(t));
        assert_eq!(
            res.is_ok(),
            types & (1 << t) != 0,
            "VM type {t}: {:?}, probe {types:#x}",
            res.as_ref().err()
        );
    }
    assert_eq!(
        vm.mode().memory_fault_exit,
        vm.capabilities().private_vm_type()
    );
}

#[test]
fn mode_names_who_provides_each_part() {
    let Some(vm) = vm_or_skip() else { return };
    let caps = vm.capabilities();
    let mode = vm.mode();
    assert_eq!(mode.conversion, Provider::Gmem);
    assert_eq!(mode.enforcement, Provider::Gmem);
    assert_eq!(mode.host_fault, gmem::HostFault::Segv);
    assert_eq!(mode.file, Provider::Kernel);
    // What Mode says is what a real touch of a private page of a kernel file raises.
    let mem = vm
        .create_guest_memfd(4 * 4096, Flags::MMAP | Flags::INIT_SHARED)
        .expect("create");
    let view = mem.map(0, 4 * 4096).expect("map");
    mem.convert(4096, 4096, gmem::Attr::Private)
        .expect("to private");
    let f = gmem_conformance::touch::read_byte(&view, 4096).expect_err("a private page");
    assert_eq!(
        (f.signo, f.code),
        (mode.host_fault.signo(), mode.host_fault.si_code())
    );
    assert_eq!(
        mode.memslots,
        if caps.guest_memfd_flags.contains(Flags::MMAP) {
            SlotKind::GmemOnly
        } else {
            SlotKind::Hva
        }
    );
    let text = format!("{caps}");
    for needle in [
        "KVM_CAP_GUEST_MEMFD:",
        "KVM_CAP_GUEST_MEMFD_FLAGS:",
        "KVM_CAP_MEMORY_ATTRIBUTES:",
        "KVM_CAP_VM_TYPES:",
        "KVM_CAP_EXIT_HYPERCALL:",
        "KVM_CAP_USER_MEMORY2: true",
        "conversion with reference checks: gmem",
        "SIGSEGV (SEGV_MAPERR) on private pages",
        "doorbell port 0xe00",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
    println!("{text}");
}
