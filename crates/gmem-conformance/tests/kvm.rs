//! The conformance catalogue, the hardening cases and the engine rollback cases on the kernel's
//! guest_memfd, and DESIGN §7 items 7 (bindings) and
//! 8 (guest and host see the same bytes) on `/dev/kvm`.
//!
//! Every test prints `skipped: <reason>` and passes when `/dev/kvm` cannot be opened.

use gmem::{CreateError, Flags, GuestMemfd, PAGE_SIZE};
use gmem_conformance::Backend;
use gmem_kvm::{Vm, VmError};

/// The kernel guest_memfd, created by a fresh VM per test.
struct KernelGuestMemfd {
    vm: Result<Vm, String>,
}

/// A VM, `Err(reason)` when `/dev/kvm` does not open; any other failure fails the test.
fn open_vm() -> Result<Vm, String> {
    match Vm::new() {
        Ok(vm) => Ok(vm),
        Err(VmError::Open { errno }) => Err(format!("/dev/kvm cannot be opened (errno {errno})")),
        Err(e) => panic!("KVM is there but the VM cannot be set up: {e}"),
    }
}

impl KernelGuestMemfd {
    fn new() -> Self {
        KernelGuestMemfd { vm: open_vm() }
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

gmem_conformance::conformance_suite!(kernel_guest_memfd, KernelGuestMemfd::new());
gmem_conformance::hardening_suite!(kernel_guest_memfd_hardening, KernelGuestMemfd::new());
// The engine's rollback (a participant refusing each kind of step, or its Nth call; a
// listener vetoing) on files whose host views are sealed and guarded.
gmem_conformance::rollback_suite!(kernel_guest_memfd_rollback, KernelGuestMemfd::new());

/// DESIGN §7 items 7 and 8 on `/dev/kvm`, for a kernel guest_memfd (gmem-only memslot) and a
/// shmem file (hva memslot over gmem's guest view).
mod kvm_bindings_and_guest {
    use std::os::fd::{AsFd, AsRawFd};
    use std::time::Duration;

    use gmem::{Attr, Errno, Flags, GuestMemfd, PAGE_SIZE};
    use gmem_conformance::touch;
    use gmem_kvm::kvm_bindings::{kvm_userspace_memory_region2, KVM_MEM_GUEST_MEMFD};
    use gmem_kvm::payload::{check_and_fill, REPORT_OK, REPORT_PORT};
    use gmem_kvm::{BindError, Exit, Gpa, SlotKind, Vm, Watchdog};

    const PAGE: u64 = PAGE_SIZE;
    const SIZE: u64 = 1 << 20;

    #[derive(Debug, Clone, Copy)]
    enum Kind {
        Kernel,
        Shmem,
    }

    fn vm() -> Option<Vm> {
        match super::open_vm() {
            Ok(vm) => Some(vm),
            Err(reason) => {
                eprintln!("skipped: {reason}");
                None
            }
        }
    }

    fn file(vm: &Vm, kind: Kind, size: u64) -> GuestMemfd {
        let flags = Flags::MMAP | Flags::INIT_SHARED;
        match kind {
            Kind::Kernel => vm
                .create_guest_memfd(size, flags)
                .expect("KVM_CREATE_GUEST_MEMFD"),
            Kind::Shmem => GuestMemfd::create(size, flags).expect("memfd"),
        }
    }

    #[track_caller]
    fn expect_bind_errno(res: Result<gmem_kvm::Binding, BindError>, errno: i32, what: &str) {
        match res {
            Err(e) => assert_eq!(e.errno(), errno, "{what}: {e}"),
            Ok(b) => panic!("{what}: expected errno {errno}, bound {b:?}"),
        }
    }

    /// `KVM_SET_USER_MEMORY_REGION2` straight to the kernel; the errno on failure.
    fn raw_region(vm: &Vm, region: kvm_userspace_memory_region2) -> Result<(), i32> {
        // SAFETY: the regions used here hand KVM no userspace memory (`userspace_addr` 0).
        unsafe { vm.fd().set_user_memory_region2(region) }.map_err(|e| e.errno())
    }

    fn gmem_region(slot: u32, gpa: u64, fd: u32) -> kvm_userspace_memory_region2 {
        kvm_userspace_memory_region2 {
            slot,
            flags: KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: gpa,
            memory_size: 4 * PAGE,
            guest_memfd: fd,
            ..Default::default()
        }
    }

    #[test]
    fn conformance_kvm_bind_bad_fd_and_kind() {
        let Some(vm) = vm() else { return };
        // Another kind of descriptor in a guest_memfd slot: EINVAL.
        let shmem = file(&vm, Kind::Shmem, SIZE);
        let memfd = u32::try_from(shmem.as_fd().as_raw_fd()).unwrap();
        assert_eq!(
            raw_region(&vm, gmem_region(100, 0x100_0000, memfd)),
            Err(libc::EINVAL)
        );
        // The VM's own file in the same slot works, proving the slot itself was fine.
        let mem = file(&vm, Kind::Kernel, SIZE);
        let fd = u32::try_from(mem.as_fd().as_raw_fd()).unwrap();
        assert_eq!(raw_region(&vm, gmem_region(100, 0x100_0000, fd)), Ok(()));
        // A descriptor that is not open: the kernel answers EBADF (not EINVAL).
        assert_eq!(
            raw_region(&vm, gmem_region(101, 0x200_0000, 0x7fff_fff0)),
            Err(libc::EBADF)
        );
        // Another VM's guest_memfd: EINVAL.
        let other = Vm::new().expect("second VM");
        let theirs = other
            .create_guest_memfd(SIZE, Flags::MMAP)
            .expect("their file");
        let fd = u32::try_from(theirs.as_fd().as_raw_fd()).unwrap();
        assert_eq!(
            raw_region(&vm, gmem_region(102, 0x300_0000, fd)),
            Err(libc::EINVAL)
        );
    }

    fn unaligned(kind: Kind) {
        let Some(vm) = vm() else { return };
        let mem = file(&vm, kind, SIZE);
        for off in 1..PAGE {
            expect_bind_errno(
                vm.bind(&mem, Gpa::new(0), off, PAGE),
                libc::EINVAL,
                &format!("offset {off:#x}"),
            );
        }
        expect_bind_errno(
            vm.bind(&mem, Gpa::new(0x800), 0, PAGE),
            libc::EINVAL,
            "unaligned gpa",
        );
        expect_bind_errno(
            vm.bind(&mem, Gpa::new(0), 0, PAGE + 1),
            libc::EINVAL,
            "unaligned length",
        );
        expect_bind_errno(vm.bind(&mem, Gpa::new(0), 0, 0), libc::EINVAL, "empty");
        expect_bind_errno(
            vm.bind(&mem, Gpa::new(0), SIZE, PAGE),
            libc::EINVAL,
            "offset at the end",
        );
        expect_bind_errno(
            vm.bind(&mem, Gpa::new(0), SIZE - PAGE, 2 * PAGE),
            libc::EINVAL,
            "past the end",
        );
        expect_bind_errno(
            vm.bind(&mem, Gpa::new(0), u64::MAX - PAGE + 1, PAGE),
            libc::EINVAL,
            "wrapping offset",
        );
        assert!(vm.bindings().is_empty(), "no slot was made");
        let b = vm
            .bind(&mem, Gpa::new(0), SIZE - PAGE, PAGE)
            .expect("last page");
        assert_eq!(
            (b.gpa(), b.offset(), b.len()),
            (Gpa::new(0), SIZE - PAGE, PAGE)
        );
    }

    #[test]
    fn conformance_kvm_bind_unaligned_or_outside_einval_kernel() {
        unaligned(Kind::Kernel);
    }

    #[test]
    fn conformance_kvm_bind_unaligned_or_outside_einval_shmem() {
        unaligned(Kind::Shmem);
    }

    fn overlaps(kind: Kind) {
        let Some(vm) = vm() else { return };
        let mem = file(&vm, kind, SIZE);
        let other = file(&vm, kind, SIZE);
        let b = vm
            .bind(&mem, Gpa::new(0x10_0000), 4 * PAGE, 4 * PAGE)
            .expect("first binding");
        assert_eq!(
            b.kind(),
            match kind {
                Kind::Kernel => SlotKind::GmemOnly,
                Kind::Shmem => SlotKind::Hva,
            }
        );
        for (off, len) in [
            (4 * PAGE, PAGE),
            (0, 5 * PAGE),
            (7 * PAGE, 2 * PAGE),
            (0, SIZE),
        ] {
            expect_bind_errno(
                vm.bind(&mem, Gpa::new(0x80_0000), off, len),
                libc::EINVAL,
                &format!("file range {off:#x}+{len:#x} overlaps"),
            );
        }
        for (gpa, f) in [
            (0x10_0000, &mem),
            (0x10_3000, &mem),
            (0xf_f000, &other),
            (0x10_0000, &other),
        ] {
            expect_bind_errno(
                vm.bind(f, Gpa::new(gpa), 12 * PAGE, 2 * PAGE),
                libc::EEXIST,
                &format!("gpa {gpa:#x} overlaps"),
            );
        }
        // Guest-physical overlap is checked before the file, as the kernel does.
        expect_bind_errno(
            vm.bind(&mem, Gpa::new(0x10_0000), 4 * PAGE, PAGE),
            libc::EEXIST,
            "both overlap",
        );
        vm.bind(&mem, Gpa::new(0x20_0000), 8 * PAGE, 4 * PAGE)
            .expect("adjacent file range");
        vm.bind(&mem, Gpa::new(0x10_4000), 0, 4 * PAGE)
            .expect("adjacent gpa range");
        vm.bind(&other, Gpa::new(0x30_0000), 4 * PAGE, 4 * PAGE)
            .expect("same range of another file");
        assert_eq!(vm.bindings().len(), 4);
    }

    #[test]
    fn conformance_kvm_bind_overlap_file_einval_gpa_eexist_kernel() {
        overlaps(Kind::Kernel);
    }

    #[test]
    fn conformance_kvm_bind_overlap_file_einval_gpa_eexist_shmem() {
        overlaps(Kind::Shmem);
    }

    fn other_vm(kind: Kind) {
        let Some(vm) = vm() else { return };
        let mem = file(&vm, kind, SIZE);
        vm.bind(&mem, Gpa::new(0), 0, PAGE)
            .expect("bind in the first VM");
        let second = Vm::new().expect("second VM");
        expect_bind_errno(
            second.bind(&mem, Gpa::new(0), PAGE, PAGE),
            libc::EINVAL,
            "second VM",
        );
        drop(vm);
        match kind {
            // The kernel ties the file to the VM that created it, for good.
            Kind::Kernel => expect_bind_errno(
                second.bind(&mem, Gpa::new(0), PAGE, PAGE),
                libc::EINVAL,
                "second VM after the first is gone",
            ),
            // A shmem file belongs to a VM while that VM lives.
            Kind::Shmem => {
                second
                    .bind(&mem, Gpa::new(0), PAGE, PAGE)
                    .expect("second VM after the first is gone");
                let third = Vm::new().expect("third VM");
                expect_bind_errno(
                    third.bind(&mem, Gpa::new(0), 2 * PAGE, PAGE),
                    libc::EINVAL,
                    "third VM",
                );
            }
        }
    }

    #[test]
    fn conformance_kvm_bind_other_vm_einval_kernel() {
        other_vm(Kind::Kernel);
    }

    #[test]
    fn conformance_kvm_bind_other_vm_einval_shmem() {
        other_vm(Kind::Shmem);
    }

    #[test]
    fn conformance_kvm_bind_create_delete_only() {
        let Some(vm) = vm() else { return };
        let mem = file(&vm, Kind::Kernel, SIZE);
        let b = vm
            .bind(&mem, Gpa::new(0x10_0000), 0, 4 * PAGE)
            .expect("bind");
        let fd = u32::try_from(mem.as_fd().as_raw_fd()).unwrap();
        // Moving or re-flagging a guest_memfd slot is refused by the kernel.
        let moved = kvm_userspace_memory_region2 {
            guest_phys_addr: 0x40_0000,
            ..gmem_region(b.slot(), 0, fd)
        };
        assert_eq!(raw_region(&vm, moved), Err(libc::EINVAL));
        let reflagged = kvm_userspace_memory_region2 {
            flags: KVM_MEM_GUEST_MEMFD | 1,
            guest_phys_addr: 0x10_0000,
            ..gmem_region(b.slot(), 0, fd)
        };
        assert_eq!(raw_region(&vm, reflagged), Err(libc::EINVAL));
        // Delete then create elsewhere; contents are the file's and survive.
        mem.write_at(0, b"kept").expect("write");
        let other_vm = Vm::new().expect("another VM");
        let foreign = other_vm
            .bind(&file(&other_vm, Kind::Shmem, SIZE), Gpa::new(0), 0, PAGE)
            .expect("bind");
        assert_eq!(vm.unbind(foreign).map_err(|e| e.errno()), Err(libc::EINVAL));
        vm.unbind(b).expect("delete");
        assert!(vm.bindings().is_empty());
        vm.bind(&mem, Gpa::new(0x40_0000), 0, 4 * PAGE)
            .expect("create again elsewhere");
        let mut buf = [0u8; 4];
        mem.read_at(0, &mut buf).expect("read");
        assert_eq!(&buf, b"kept");
    }

    #[test]
    fn conformance_kvm_file_outlives_its_vm() {
        let Some(vm) = vm() else { return };
        let mem = file(&vm, Kind::Kernel, SIZE);
        vm.bind(&mem, Gpa::new(0), 0, SIZE).expect("bind");
        let vcpu = vm.create_vcpu(0).expect("vcpu");
        mem.write_at(PAGE, b"survives").expect("write");
        drop(vcpu);
        drop(vm);
        let mut buf = [0u8; 8];
        mem.read_at(PAGE, &mut buf)
            .expect("read after the VM is gone");
        assert_eq!(&buf, b"survives");
        mem.convert(PAGE, PAGE, Attr::Private)
            .expect("convert after the VM is gone");
        let view = mem.map(0, 2 * PAGE).expect("map after the VM is gone");
        assert!(touch::read_byte(&view, PAGE).is_err());
        mem.convert(PAGE, PAGE, Attr::Shared).expect("convert back");
        assert_eq!(touch::read(&view, PAGE, 8).expect("host view"), b"survives");
    }

    /// Host 0xaa, the guest checks every byte and writes 0xff, the host sees 0xff.
    fn same_bytes(kind: Kind, gpa: Gpa, offset: u64) {
        let Some(vm) = vm() else { return };
        let mem = file(&vm, kind, SIZE);
        let code_at = 0x1000;
        let data_gpa = gpa.checked_add(0x2000).expect("data gpa");
        let data = offset + 0x2000;
        // The code lives in its own binding at gpa 0 (file offset 0); the data binding shows
        // file offset `offset` at guest-physical `gpa`.
        vm.bind(&mem, Gpa::new(0), 0, 0x2_0000)
            .expect("bind the code");
        vm.bind(&mem, gpa, offset, 0x4_0000).expect("bind the data");
        let view = mem.map(data, PAGE).expect("host view");
        touch::fill(&view, 0, PAGE, 0xaa).expect("host writes 0xaa through its view");
        let code = check_and_fill(data_gpa, 4096, 0xaa, 0xff).expect("assemble");
        mem.guest()
            .expect("guest view")
            .write(code_at, &code)
            .expect("load");
        let mut vcpu = vm.create_vcpu(0).expect("vcpu");
        vcpu.set_real_mode_entry(Gpa::new(code_at)).expect("entry");
        let _wd = Watchdog::arm(Duration::from_secs(20)).expect("watchdog");
        match vcpu.run().expect("KVM_RUN") {
            Exit::IoOut {
                port: REPORT_PORT,
                value,
                ..
            } => {
                assert_eq!(value, REPORT_OK, "the guest found a byte other than 0xaa")
            }
            e => panic!("expected a report, got {e:?}"),
        }
        assert_eq!(vcpu.run().expect("KVM_RUN"), Exit::Halt);
        touch::expect_bytes(&view, 0, PAGE, 0xff, "host view after the guest wrote");
        let mut page = vec![0u8; 4096];
        mem.read_at(data, &mut page).expect("read_at");
        assert!(
            page.iter().all(|b| *b == 0xff),
            "read_at after the guest wrote"
        );
        mem.read_at(data + PAGE, &mut page).expect("read_at");
        assert!(page.iter().all(|b| *b == 0), "the next page is untouched");
    }

    #[test]
    fn conformance_kvm_guest_host_same_bytes_kernel_gmem_only_slot() {
        same_bytes(Kind::Kernel, Gpa::new(0x4_0000), 0x8_0000);
    }

    #[test]
    fn conformance_kvm_guest_host_same_bytes_shmem_hva_slot() {
        same_bytes(Kind::Shmem, Gpa::new(0x4_0000), 0x8_0000);
    }
}
