//! Helpers shared by the KVM tests: a VM or a printed skip, a loaded guest, expected exits.
#![allow(dead_code)]

use std::time::Duration;

use gmem::{Flags, GuestMemfd};
use gmem_kvm::payload::REPORT_PORT;
use gmem_kvm::{Exit, Gpa, Report, Vcpu, Vm, VmError, Watchdog};

/// Where test programs are loaded.
pub const CODE: u64 = 0x1000;

/// A VM, or `None` after printing why `/dev/kvm` cannot be used.
pub fn vm_or_skip() -> Option<Vm> {
    match Vm::new() {
        Ok(vm) => Some(vm),
        Err(VmError::Open { errno }) => {
            eprintln!("skipped: /dev/kvm cannot be opened (errno {errno})");
            None
        }
        Err(e) => panic!("KVM is there but the VM cannot be set up: {e}"),
    }
}

/// The two kinds of files the tests bind: the kernel guest_memfd and shmem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Kernel,
    Shmem,
}

/// Creates a file of `kind`.
pub fn create(vm: &Vm, kind: Kind, size: u64, flags: Flags) -> GuestMemfd {
    match kind {
        Kind::Kernel => vm
            .create_guest_memfd(size, flags)
            .expect("KVM_CREATE_GUEST_MEMFD"),
        Kind::Shmem => GuestMemfd::create(size, flags).expect("memfd"),
    }
}

/// A vCPU about to run `code`, loaded at [`CODE`] through `mem`'s guest view (bound so that
/// guest-physical = file offset).
pub fn load(vm: &Vm, mem: &GuestMemfd, code: &[u8]) -> Vcpu {
    mem.guest()
        .expect("guest view")
        .write(CODE, code)
        .expect("load the program");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    vcpu.set_real_mode_entry(Gpa::new(CODE))
        .expect("real-mode entry");
    vcpu
}

/// Runs to the next exit, failing the test if the guest takes longer than 20 s.
pub fn next(vcpu: &mut Vcpu) -> Exit {
    let _wd = Watchdog::arm(Duration::from_secs(20)).expect("watchdog");
    let exit = vcpu.run().expect("KVM_RUN");
    assert_ne!(
        exit,
        Exit::Interrupted,
        "the guest did not reach its next exit in 20 s"
    );
    exit
}

/// Runs to the next exit, which must be a report of `value`.
#[track_caller]
pub fn expect_report(vcpu: &mut Vcpu, value: u32, what: &str) {
    match next(vcpu) {
        Exit::IoOut {
            port: REPORT_PORT,
            value: v,
            size: 4,
        } => assert_eq!(
            v, value,
            "{what}: guest reported {v:#x}, expected {value:#x}"
        ),
        e => panic!("{what}: expected a report of {value:#x}, got {e:?}"),
    }
}

/// Runs to the next exit, which must be a served conversion request.
#[track_caller]
pub fn expect_converted(vcpu: &mut Vcpu, what: &str) -> Report {
    match next(vcpu) {
        Exit::Converted(r) => r,
        e => panic!("{what}: expected a conversion request, got {e:?}"),
    }
}

/// Runs to the next exit, which must be `hlt`.
#[track_caller]
pub fn expect_halt(vcpu: &mut Vcpu) {
    match next(vcpu) {
        Exit::Halt => {}
        e => panic!("expected hlt, got {e:?}"),
    }
}
