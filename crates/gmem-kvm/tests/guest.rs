//! Guest-driven conversion end to end on /dev/kvm: the guest asks through the doorbell, the
//! VMM converts, the guest gets the status and resumes. Run for a kernel guest_memfd in a
//! gmem-only slot and for a shmem file in an hva slot.

mod common;

use std::sync::{Arc, Mutex};

use common::{
    create, expect_converted, expect_halt, expect_report, load, next, vm_or_skip, Kind, CODE,
};
use gmem::Errno;
use gmem::{AccessError, Attr, Conversion, ConversionListener, Flags, Veto};
use gmem_conformance::probe::{self, Touch};
use gmem_kvm::doorbell::DOORBELL_PORT;
use gmem_kvm::payload::{Asm, Reg32, REPORT_MISMATCH, REPORT_OK};
use gmem_kvm::{Exit, Gpa, Source, Status};

const SIZE: u64 = 2 << 20;
const SECRET: u64 = 0x2_0000;
/// Where the guest sees [`SECRET`]: files are bound at gpa 0, so guest-physical = file offset.
const SECRET_GPA: Gpa = Gpa::new(SECRET);
const SECRET_BYTES: &[u8] = b"guest-only secret";
const PAGE: u64 = 4096;

fn secret_round_trip(kind: Kind) {
    let Some(vm) = vm_or_skip() else { return };
    let mem = create(&vm, kind, SIZE, Flags::MMAP | Flags::INIT_SHARED);
    vm.bind(&mem, Gpa::new(0), 0, SIZE).expect("bind");
    let view = mem.map(SECRET, PAGE).expect("host view of the secret page");

    let mut asm = Asm::new();
    let bad = asm.label();
    asm.store_bytes(SECRET_GPA, SECRET_BYTES)
        .doorbell(SECRET_GPA, 4096, true)
        .report_eax();
    // The guest still reaches its page once it is private.
    for (i, b) in SECRET_BYTES.iter().enumerate() {
        asm.load_al(Gpa::new(SECRET + i as u64))
            .jump_if_al_ne(*b, bad);
    }
    asm.report(REPORT_OK)
        .doorbell(SECRET_GPA, 4096, false)
        .report_eax()
        .hlt();
    asm.place(bad).report(REPORT_MISMATCH).hlt();
    let mut vcpu = load(&vm, &mem, &asm.finish().expect("assemble"));

    let r = expect_converted(&mut vcpu, "guest asks private");
    assert_eq!(
        (r.source, r.gpa, r.size, r.to, r.status),
        (
            Source::Doorbell,
            SECRET_GPA,
            PAGE,
            Attr::Private,
            Status::Done
        )
    );
    expect_report(&mut vcpu, 0, "status of the request to private");
    assert_eq!(mem.attr(SECRET).expect("attr"), Attr::Private);
    // SAFETY: the view maps the secret page; the probe turns a SIGBUS into a value.
    let touch = unsafe { probe::read(view.as_ptr()) };
    assert!(
        gmem_conformance::touch::faults_as_documented(&view, 0, touch),
        "host view of the private page: {touch:?}"
    );
    let mut buf = vec![0u8; SECRET_BYTES.len()];
    assert_eq!(
        mem.read_at(SECRET, &mut buf),
        Err(AccessError::Private { offset: SECRET })
    );
    assert_eq!(
        mem.read_at(SECRET, &mut buf).unwrap_err().errno(),
        libc::EFAULT
    );
    assert!(
        mem.pin(SECRET, PAGE).is_err(),
        "a private page cannot be pinned"
    );

    expect_report(&mut vcpu, REPORT_OK, "guest reads its private secret");
    let r = expect_converted(&mut vcpu, "guest asks shared");
    assert_eq!((r.to, r.status), (Attr::Shared, Status::Done));
    expect_report(&mut vcpu, 0, "status of the request to shared");
    expect_halt(&mut vcpu);

    mem.read_at(SECRET, &mut buf).expect("read the shared page");
    assert_eq!(buf, SECRET_BYTES);
    // SAFETY: as above.
    let touch = unsafe { probe::read(view.as_ptr()) };
    assert_eq!(touch, Touch::Ok(SECRET_BYTES[0]));
}

#[test]
fn secret_private_then_shared_kernel_gmem_only_slot() {
    secret_round_trip(Kind::Kernel);
}

#[test]
fn secret_private_then_shared_shmem_hva_slot() {
    secret_round_trip(Kind::Shmem);
}

fn pinned_request(kind: Kind, sync_regs: bool) {
    let Some(vm) = vm_or_skip() else { return };
    let mem = create(&vm, kind, SIZE, Flags::MMAP | Flags::INIT_SHARED);
    vm.bind(&mem, Gpa::new(0), 0, SIZE).expect("bind");
    let first = 0x3_0000;
    let pinned_page = first + PAGE;

    let mut asm = Asm::new();
    asm.doorbell(Gpa::new(first), 3 * 4096, true)
        .report_eax()
        .report_error_gpa()
        .doorbell(Gpa::new(first), 3 * 4096, true)
        .report_eax()
        .report_error_gpa()
        .hlt();
    let mut vcpu = load(&vm, &mem, &asm.finish().expect("assemble"));
    if !sync_regs {
        assert!(
            !vcpu.use_sync_regs(false),
            "requests read with KVM_GET_REGS"
        );
    }

    let pin = mem.pin(pinned_page, 16).expect("pin");
    let r = expect_converted(&mut vcpu, "request over a pinned page");
    assert_eq!(
        r.status,
        Status::Busy {
            gpa: Gpa::new(pinned_page)
        }
    );
    expect_report(&mut vcpu, 11, "EAGAIN");
    expect_report(
        &mut vcpu,
        u32::try_from(pinned_page).unwrap(),
        "failing gpa, low half",
    );
    expect_report(&mut vcpu, 0, "failing gpa, high half");
    // Nothing converted.
    let runs = mem.runs(0, SIZE).expect("runs");
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].attr, Attr::Shared);

    drop(pin);
    let r = expect_converted(&mut vcpu, "request after unpin");
    assert_eq!(r.status, Status::Done);
    expect_report(&mut vcpu, 0, "status after unpin");
    expect_report(&mut vcpu, 0, "no failing gpa, low half");
    expect_report(&mut vcpu, 0, "no failing gpa, high half");
    expect_halt(&mut vcpu);
    for p in 0..3 {
        assert_eq!(mem.attr(first + p * PAGE).expect("attr"), Attr::Private);
    }
    assert_eq!(mem.attr(first + 3 * PAGE).expect("attr"), Attr::Shared);
}

#[test]
fn pinned_page_fails_request_with_eagain_then_succeeds_after_unpin_kernel() {
    pinned_request(Kind::Kernel, true);
}

#[test]
fn pinned_page_eagain_with_requests_read_by_get_regs() {
    pinned_request(Kind::Kernel, false);
}

#[test]
fn pinned_page_fails_request_with_eagain_then_succeeds_after_unpin_shmem() {
    pinned_request(Kind::Shmem, true);
}

/// A device that cannot give up one page, and records what it heard.
struct Device {
    busy: Mutex<Option<u64>>,
    heard: Mutex<Vec<String>>,
}

impl ConversionListener for Device {
    fn prepare(&self, conv: &Conversion) -> Result<(), Veto> {
        self.heard
            .lock()
            .unwrap()
            .push(format!("prepare {:#x}", conv.offset));
        match *self.busy.lock().unwrap() {
            Some(off)
                if conv.to == Attr::Private
                    && conv.offset <= off
                    && off < conv.offset + conv.len =>
            {
                Err(Veto {
                    offset: off,
                    reason: "DMA in flight".into(),
                })
            }
            _ => Ok(()),
        }
    }
    fn commit(&self, conv: &Conversion) {
        self.heard
            .lock()
            .unwrap()
            .push(format!("commit {:#x}", conv.offset));
    }
    fn abort(&self, conv: &Conversion) {
        self.heard
            .lock()
            .unwrap()
            .push(format!("abort {:#x}", conv.offset));
    }
}

#[test]
fn listener_veto_reaches_the_guest_as_eagain_with_its_page() {
    let Some(vm) = vm_or_skip() else { return };
    // The second binding shows file offset 0x100000 at gpa 0x80000: guest addresses and file
    // offsets differ, and the status names the guest address.
    let mem = create(&vm, Kind::Kernel, SIZE, Flags::MMAP | Flags::INIT_SHARED);
    vm.bind(&mem, Gpa::new(0), 0, 0x4_0000).expect("bind low");
    vm.bind(&mem, Gpa::new(0x8_0000), 0x10_0000, 0x4_0000)
        .expect("bind high");
    let device = Arc::new(Device {
        busy: Mutex::new(Some(0x10_2000)),
        heard: Mutex::new(Vec::new()),
    });
    mem.add_listener(device.clone());

    let mut asm = Asm::new();
    asm.doorbell(Gpa::new(0x8_0000), 4 * 4096, true)
        .report_eax()
        .report_error_gpa()
        .doorbell(Gpa::new(0x8_0000), 4 * 4096, true)
        .report_eax()
        .hlt();
    let mut vcpu = load(&vm, &mem, &asm.finish().expect("assemble"));
    let r = expect_converted(&mut vcpu, "vetoed request");
    assert_eq!(
        r.status,
        Status::Busy {
            gpa: Gpa::new(0x8_2000)
        }
    );
    assert_eq!(
        *device.heard.lock().unwrap(),
        vec!["prepare 0x100000".to_string()],
        "the device was asked, while the vCPU waited"
    );
    expect_report(&mut vcpu, 11, "EAGAIN");
    expect_report(&mut vcpu, 0x8_2000, "vetoed gpa");
    expect_report(&mut vcpu, 0, "vetoed gpa, high half");
    assert_eq!(mem.attr(0x10_0000).expect("attr"), Attr::Shared);

    *device.busy.lock().unwrap() = None;
    let r = expect_converted(&mut vcpu, "request once the device is quiet");
    assert_eq!(r.status, Status::Done);
    expect_report(&mut vcpu, 0, "status");
    expect_halt(&mut vcpu);
    assert_eq!(
        device.heard.lock().unwrap()[1..],
        [
            "prepare 0x100000".to_string(),
            "commit 0x100000".to_string()
        ]
    );
    assert_eq!(mem.attr(0x10_3000).expect("attr"), Attr::Private);
    assert_eq!(mem.attr(0x10_4000).expect("attr"), Attr::Shared);
}

#[test]
fn doorbell_refuses_malformed_and_unbound_requests_with_einval() {
    let Some(vm) = vm_or_skip() else { return };
    let mem = create(&vm, Kind::Kernel, SIZE, Flags::MMAP | Flags::INIT_SHARED);
    vm.bind(&mem, Gpa::new(0), 0, 0x4_0000).expect("bind low");
    vm.bind(&mem, Gpa::new(0x4_0000), 0x8_0000, 0x4_0000)
        .expect("bind next to it");
    // (gpa, size, flags): each is refused with EINVAL naming `gpa`.
    let bad: [(u64, u32, u32); 7] = [
        (0x1_0800, 4096, 1), // unaligned address
        (0x1_0000, 0, 1),    // empty
        (0x1_0000, 100, 1),  // unaligned size
        (0x1_0000, 4096, 2), // unknown flag bit
        (0x1_0000, 4096, 1 | (1 << 31)),
        (0x9_0000, 4096, 1),   // not bound
        (0x3_f000, 0x2000, 1), // across two bindings
    ];
    let mut asm = Asm::new();
    for (gpa, size, flags) in bad {
        asm.mov32(Reg32::Ebx, u32::try_from(gpa).unwrap())
            .mov32(Reg32::Edi, 0)
            .mov32(Reg32::Ecx, size)
            .mov32(Reg32::Esi, flags)
            .in32(DOORBELL_PORT)
            .report_eax()
            .report_error_gpa();
    }
    asm.hlt();
    let mut vcpu = load(&vm, &mem, &asm.finish().expect("assemble"));
    for (gpa, size, flags) in bad {
        let what = format!("request gpa {gpa:#x} size {size:#x} flags {flags:#x}");
        let r = expect_converted(&mut vcpu, &what);
        assert_eq!(r.status, Status::Invalid { gpa: Gpa::new(gpa) }, "{what}");
        expect_report(&mut vcpu, 22, &what);
        expect_report(&mut vcpu, u32::try_from(gpa).unwrap(), &what);
        expect_report(&mut vcpu, 0, &what);
    }
    expect_halt(&mut vcpu);
    assert_eq!(mem.run_count().expect("run count"), 1, "nothing converted");
}

fn starts_private(kind: Kind) {
    let Some(vm) = vm_or_skip() else { return };
    // Every page starts private: the guest runs from private memory, writes a page, shares it.
    let mem = create(&vm, kind, SIZE, Flags::MMAP);
    vm.bind(&mem, Gpa::new(0), 0, SIZE).expect("bind");
    let data = 0x5_0000;
    let mut asm = Asm::new();
    asm.fill(Gpa::new(data), 4096, 0x5a)
        .doorbell(Gpa::new(data), 4096, false)
        .report_eax()
        .hlt();
    let mut vcpu = load(&vm, &mem, &asm.finish().expect("assemble"));
    let mut buf = [0u8; 1];
    assert_eq!(
        mem.read_at(CODE, &mut buf),
        Err(AccessError::Private { offset: CODE })
    );
    let r = expect_converted(&mut vcpu, "guest shares its page");
    assert_eq!(r.status, Status::Done);
    expect_report(&mut vcpu, 0, "status");
    expect_halt(&mut vcpu);
    let mut page = vec![0u8; 4096];
    mem.read_at(data, &mut page).expect("shared page");
    assert!(page.iter().all(|b| *b == 0x5a));
    assert_eq!(
        mem.read_at(data + PAGE, &mut buf),
        Err(AccessError::Private {
            offset: data + PAGE
        })
    );
}

#[test]
fn guest_runs_from_private_memory_and_shares_a_page_kernel() {
    starts_private(Kind::Kernel);
}

#[test]
fn guest_runs_from_private_memory_and_shares_a_page_shmem() {
    starts_private(Kind::Shmem);
}

fn host_view_as_slot_address(kind: Kind) {
    let Some(vm) = vm_or_skip() else { return };
    let mem = create(&vm, kind, SIZE, Flags::MMAP | Flags::INIT_SHARED);
    let view = mem.map(0, SIZE).expect("host view");
    mem.write_at(0x6_0000, &[0x11]).expect("write");
    mem.write_at(0x6_1000, &[0x22]).expect("write");
    mem.convert(0x6_1000, PAGE, Attr::Private).expect("private");
    // SAFETY: the view lives until the end of the test, after the VM's last run.
    unsafe { vm.bind_at(&mem, Gpa::new(0), 0, SIZE, view.as_ptr()) }
        .expect("bind over the host view");
    let mut asm = Asm::new();
    asm.load_al(Gpa::new(0x6_0000))
        .report_eax()
        .load_al(Gpa::new(0x6_1000))
        .report_eax()
        .hlt();
    let mut vcpu = load(&vm, &mem, &asm.finish().expect("assemble"));
    match next(&mut vcpu) {
        Exit::IoOut { value, .. } => assert_eq!(value & 0xff, 0x11, "shared page through the view"),
        e => panic!("expected a report, got {e:?}"),
    }
    // The emulator's read of the private page goes through the enforced view: MMIO.
    assert_eq!(
        next(&mut vcpu),
        Exit::Mmio {
            gpa: Gpa::new(0x6_1000),
            len: 1,
            write: false
        }
    );
    match next(&mut vcpu) {
        Exit::IoOut { value, .. } => assert_eq!(value & 0xff, 0xff, "MMIO reads all ones"),
        e => panic!("expected a report, got {e:?}"),
    }
    expect_halt(&mut vcpu);
}

#[test]
fn emulated_guest_access_to_private_page_through_host_view_is_mmio_kernel() {
    host_view_as_slot_address(Kind::Kernel);
}

#[test]
fn emulated_guest_access_to_private_page_through_host_view_is_mmio_shmem() {
    host_view_as_slot_address(Kind::Shmem);
}

#[test]
fn emulated_guest_cannot_reach_a_kernel_file_without_mmap() {
    let Some(vm) = vm_or_skip() else { return };
    let code = create(&vm, Kind::Shmem, 0x4_0000, Flags::MMAP | Flags::INIT_SHARED);
    vm.bind(&code, Gpa::new(0), 0, 0x4_0000)
        .expect("bind the code");
    let sealed = create(&vm, Kind::Kernel, 0x4_0000, Flags::NONE);
    let b = vm
        .bind(&sealed, Gpa::new(0x8_0000), 0, 0x4_0000)
        .expect("bind the file without MMAP");
    assert_eq!(b.kind(), gmem_kvm::SlotKind::GuestMemfd);
    let mut asm = Asm::new();
    asm.load_al(Gpa::new(0x8_0000)).report_eax().hlt();
    let mut vcpu = load(&vm, &code, &asm.finish().expect("assemble"));
    assert_eq!(
        next(&mut vcpu),
        Exit::Mmio {
            gpa: Gpa::new(0x8_0000),
            len: 1,
            write: false
        }
    );
}

#[test]
fn hypercall_exit_is_enabled_where_the_kernel_offers_it() {
    let Some(vm) = vm_or_skip() else { return };
    assert_eq!(
        vm.hypercall_exit_enabled(),
        vm.capabilities().map_gpa_range_exit()
    );
}

#[test]
fn two_vcpus_convert_their_own_pages_at_once() {
    let Some(vm) = vm_or_skip() else { return };
    let mem = create(&vm, Kind::Kernel, SIZE, Flags::MMAP | Flags::INIT_SHARED);
    vm.bind(&mem, Gpa::new(0), 0, SIZE).expect("bind");
    std::thread::scope(|s| {
        for id in 0..2u64 {
            let (vm, mem) = (&vm, &mem);
            s.spawn(move || {
                let code_at = 0x1000 + id * 0x1000;
                let page = Gpa::new(0x7_0000 + id * 0x1_0000);
                let mut asm = Asm::new();
                for _ in 0..50 {
                    asm.doorbell(page, 0x4000, true)
                        .report_eax()
                        .doorbell(page, 0x4000, false)
                        .report_eax();
                }
                asm.hlt();
                let code = asm.finish().expect("assemble");
                mem.guest()
                    .expect("guest view")
                    .write(code_at, &code)
                    .expect("load");
                let mut vcpu = vm.create_vcpu(id).expect("vcpu");
                vcpu.set_real_mode_entry(Gpa::new(code_at)).expect("entry");
                for i in 0..100 {
                    let r = expect_converted(&mut vcpu, "request");
                    assert_eq!(r.status, Status::Done, "vcpu {id} request {i}");
                    assert_eq!(
                        r.to,
                        if i % 2 == 0 {
                            Attr::Private
                        } else {
                            Attr::Shared
                        }
                    );
                    expect_report(&mut vcpu, 0, "status");
                }
                expect_halt(&mut vcpu);
            });
        }
    });
    assert_eq!(mem.run_count().expect("run count"), 1);
}

#[test]
fn watchdog_interrupts_a_guest_that_never_exits() {
    let Some(vm) = vm_or_skip() else { return };
    let mem = create(&vm, Kind::Shmem, SIZE, Flags::MMAP | Flags::INIT_SHARED);
    vm.bind(&mem, Gpa::new(0), 0, SIZE).expect("bind");
    let mut asm = Asm::new();
    let spin = asm.label();
    asm.place(spin).jmp(spin);
    let mut vcpu = load(&vm, &mem, &asm.finish().expect("assemble"));
    let started = std::time::Instant::now();
    let wd = gmem_kvm::Watchdog::arm(std::time::Duration::from_millis(200)).expect("watchdog");
    assert_eq!(vcpu.run().expect("KVM_RUN"), Exit::Interrupted);
    drop(wd);
    let took = started.elapsed();
    assert!(took >= std::time::Duration::from_millis(200), "{took:?}");
    // The vCPU is still usable: point it at a halt and run it again.
    mem.guest()
        .expect("guest view")
        .write(0x8000, &[0xf4])
        .expect("hlt");
    vcpu.set_real_mode_entry(Gpa::new(0x8000)).expect("entry");
    expect_halt(&mut vcpu);
}
