//! KVM benchmarks, each against its baseline measured in the same run.
//!
//! - `p9_create_bind_1g`: create a 1 GiB guest_memfd and bind it to a memslot, through gmem
//!   (`Vm::create_guest_memfd` + `Vm::bind`) versus the raw ioctls a VMM makes for the same
//!   result on this machine kind (`KVM_CREATE_GUEST_MEMFD`, `mmap` of the file for the slot's
//!   `userspace_addr`, `KVM_SET_USER_MEMORY_REGION2`); teardown is outside the timing.
//! - `guest_conversion_round_trip`: one guest request through a vCPU exit (the doorbell),
//!   served and resumed, versus a bare `KVM_RUN` exit round trip (an I/O write the runner
//!   returns at once), and a doorbell request with nothing to convert.
//!
//! Run: `cargo bench -p gmem-kvm --bench kvm`. Prints `skipped: <reason>` without /dev/kvm.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use gmem::{Attr, Flags};
use gmem_kvm::kvm_bindings::{
    kvm_create_guest_memfd, kvm_userspace_memory_region2, KVM_MEM_GUEST_MEMFD,
};
use gmem_kvm::payload::{
    doorbell_loop, doorbell_noop_loop, report_loop, report_loop_like_doorbell,
};
use gmem_kvm::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem_kvm::{Exit, Status, Vm};

const GIB: u64 = 1 << 30;
const GIB_LEN: usize = 1 << 30;
const GPA: u64 = 1 << 32;

fn vm() -> Option<Vm> {
    match Vm::new() {
        Ok(vm) => Some(vm),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// A raw 1 GiB guest_memfd bound the way a VMM without gmem does it.
struct Raw {
    fd: OwnedFd,
    map: *mut libc::c_void,
}

fn raw_create_bind(vm: &Vm, slot: u32) -> Raw {
    let arg = kvm_create_guest_memfd {
        size: GIB,
        flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        ..Default::default()
    };
    let raw = vm
        .fd()
        .create_guest_memfd(arg)
        .expect("KVM_CREATE_GUEST_MEMFD");
    // SAFETY: a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: a fresh shared mapping of the file at an address of the kernel's choice.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            GIB_LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            fd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    let region = kvm_userspace_memory_region2 {
        slot,
        flags: KVM_MEM_GUEST_MEMFD,
        guest_phys_addr: GPA,
        memory_size: GIB,
        userspace_addr: map as u64,
        guest_memfd_offset: 0,
        guest_memfd: u32::try_from(fd.as_raw_fd()).expect("fd"),
        ..Default::default()
    };
    // SAFETY: `map` maps the whole file and outlives the slot (deleted in `raw_teardown`).
    unsafe { vm.fd().set_user_memory_region2(region) }.expect("KVM_SET_USER_MEMORY_REGION2");
    Raw { fd, map }
}

fn raw_teardown(vm: &Vm, slot: u32, raw: Raw) {
    let region = kvm_userspace_memory_region2 {
        slot,
        ..Default::default()
    };
    // SAFETY: deleting a slot hands KVM no memory.
    unsafe { vm.fd().set_user_memory_region2(region) }.expect("delete slot");
    // SAFETY: the mapping made in `raw_create_bind`, no longer used by the deleted slot.
    unsafe { libc::munmap(raw.map, GIB_LEN) };
    drop(raw.fd);
}

fn p9(c: &mut Criterion) {
    let Some(vm) = vm() else { return };
    let mut g = c.benchmark_group("p9_create_bind_1g");
    g.sample_size(50).measurement_time(Duration::from_secs(10));
    g.bench_function("raw_ioctls", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let raw = raw_create_bind(&vm, 7);
                total += t.elapsed();
                raw_teardown(&vm, 7, raw);
            }
            total
        })
    });
    g.bench_function("gmem", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let mem = vm
                    .create_guest_memfd(GIB, Flags::MMAP | Flags::INIT_SHARED)
                    .expect("create");
                let binding = vm.bind(&mem, GPA, 0, GIB).expect("bind");
                total += t.elapsed();
                vm.unbind(binding).expect("unbind");
                drop(mem);
            }
            total
        })
    });
    g.finish();
}

fn round_trip(c: &mut Criterion) {
    let Some(vm) = vm() else { return };
    let size = 2 << 20;
    let mem = vm
        .create_guest_memfd(size, Flags::MMAP | Flags::INIT_SHARED)
        .expect("create");
    vm.bind(&mem, 0, 0, size).expect("bind");
    let page = 0x2_0000;
    let mut g = c.benchmark_group("guest_conversion_round_trip");
    g.sample_size(50).measurement_time(Duration::from_secs(10));

    let vcpu_at = |id: u64, code: Vec<u8>, at: u64| {
        mem.guest().write(at, &code).expect("load");
        let vcpu = vm.create_vcpu(id).expect("vcpu");
        vcpu.set_real_mode_entry(at).expect("entry");
        vcpu
    };
    let mut bare = vcpu_at(0, report_loop().expect("asm"), 0x1000);
    g.bench_function("bare_kvm_run_exit", |b| {
        b.iter(|| match bare.run().expect("run") {
            Exit::IoOut { .. } => {}
            e => panic!("{e:?}"),
        })
    });
    let mut same = vcpu_at(3, report_loop_like_doorbell(page).expect("asm"), 0x7000);
    g.bench_function("bare_exit_after_doorbell_register_loads", |b| {
        b.iter(|| match same.run().expect("run") {
            Exit::IoOut { .. } => {}
            e => panic!("{e:?}"),
        })
    });
    let mut noop = vcpu_at(1, doorbell_noop_loop(page).expect("asm"), 0x3000);
    g.bench_function("doorbell_nothing_to_convert", |b| {
        b.iter(|| match noop.run().expect("run") {
            Exit::Converted(r) if r.status == Status::Done => {}
            e => panic!("{e:?}"),
        })
    });
    let mut convert = vcpu_at(2, doorbell_loop(page).expect("asm"), 0x5000);
    g.bench_function("doorbell_convert_4k", |b| {
        b.iter(|| match convert.run().expect("run") {
            Exit::Converted(r) if r.status == Status::Done => {}
            e => panic!("{e:?}"),
        })
    });
    // The conversion alone, from the host, for the split of the round trip's cost.
    let mut to = Attr::Private;
    g.bench_function("host_convert_4k_no_exit", |b| {
        b.iter(|| {
            mem.convert(page, 4096, to).expect("convert");
            to = to.flip();
        })
    });
    g.finish();
}

criterion_group!(benches, p9, round_trip);
criterion_main!(benches);
