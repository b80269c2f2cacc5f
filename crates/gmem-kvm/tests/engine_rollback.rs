//! The engine's rollback on the kernel guest_memfd: the base-page cases of
//! `gmem_conformance::rollback` (a participant refusing each kind of step, or its Nth call; a
//! listener vetoing), on files made by `KVM_CREATE_GUEST_MEMFD`, whose host views are sealed
//! and guarded. Every test prints `skipped: <reason>` and passes when `/dev/kvm` cannot be
//! opened.

use gmem::{CreateError, Flags, GuestMemfd, PAGE_SIZE};
use gmem_conformance::Backend;
use gmem_kvm::{Vm, VmError};

/// The kernel guest_memfd, created by a fresh VM per test.
struct KernelGuestMemfd {
    vm: Result<Vm, String>,
}

impl KernelGuestMemfd {
    fn new() -> Self {
        let vm = match Vm::new() {
            Ok(vm) => Ok(vm),
            Err(VmError::Open { errno }) => {
                Err(format!("/dev/kvm cannot be opened (errno {errno})"))
            }
            Err(e) => panic!("KVM is there but the VM cannot be set up: {e}"),
        };
        KernelGuestMemfd { vm }
    }
}

impl Backend for KernelGuestMemfd {
    fn name(&self) -> String {
        "kernel-guest-memfd".to_string()
    }

    fn block_size(&self) -> u64 {
        PAGE_SIZE
    }

    fn supported_flags(&self) -> Flags {
        match &self.vm {
            Ok(vm) => vm.capabilities().guest_memfd_flags,
            Err(_) => Flags::NONE,
        }
    }

    fn create(&self, size: u64, flags: Flags) -> Result<GuestMemfd, CreateError> {
        match &self.vm {
            Ok(vm) => vm.create_guest_memfd(size, flags),
            Err(reason) => Err(CreateError::Backing {
                op: "KVM_CREATE_GUEST_MEMFD",
                source: std::io::Error::other(reason.clone()),
            }),
        }
    }

    fn unavailable(&self) -> Option<String> {
        self.vm.as_ref().err().cloned()
    }
}

gmem_conformance::rollback_suite!(kernel_guest_memfd, KernelGuestMemfd::new());
