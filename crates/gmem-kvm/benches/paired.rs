//! The KVM bars as paired measurements: gmem and its baseline alternate, sample by sample, so
//! that load from other processes on this machine hits both alike. Prints the median of each
//! and their ratio.
//!
//! Run: `cargo bench -p gmem-kvm --bench paired`. Prints `skipped: <reason>` without /dev/kvm.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use gmem::Flags;
use gmem_kvm::kvm_bindings::{
    kvm_create_guest_memfd, kvm_userspace_memory_region2, KVM_MEM_GUEST_MEMFD,
};
use gmem_kvm::payload::{
    doorbell_loop, doorbell_noop_loop, report_loop, report_loop_like_doorbell,
};
use gmem_kvm::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use gmem_kvm::{Exit, Gpa, Vcpu, Vm};

const GIB: u64 = 1 << 30;
const GIB_LEN: usize = 1 << 30;
const GPA: Gpa = Gpa::new(1 << 32);
const SLOT: u32 = 7;

fn median(v: &mut [Duration]) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Creates and binds a 1 GiB guest_memfd with the raw ioctls; returns the time and tears down.
fn raw_once(vm: &Vm) -> Duration {
    let t = Instant::now();
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
        slot: SLOT,
        flags: KVM_MEM_GUEST_MEMFD,
        guest_phys_addr: GPA.raw(),
        memory_size: GIB,
        userspace_addr: map as u64,
        guest_memfd: u32::try_from(fd.as_raw_fd()).expect("fd"),
        ..Default::default()
    };
    // SAFETY: `map` maps the whole file and outlives the slot, deleted below.
    unsafe { vm.fd().set_user_memory_region2(region) }.expect("KVM_SET_USER_MEMORY_REGION2");
    let elapsed = t.elapsed();
    let delete = kvm_userspace_memory_region2 {
        slot: SLOT,
        ..Default::default()
    };
    // SAFETY: deleting a slot hands KVM no memory.
    unsafe { vm.fd().set_user_memory_region2(delete) }.expect("delete");
    // SAFETY: the mapping made above, no longer used by the deleted slot.
    unsafe { libc::munmap(map, GIB_LEN) };
    elapsed
}

/// The same through gmem.
fn gmem_once(vm: &Vm) -> Duration {
    let t = Instant::now();
    let mem = vm
        .create_guest_memfd(GIB, Flags::MMAP | Flags::INIT_SHARED)
        .expect("create");
    let binding = vm.bind(&mem, GPA, 0, GIB).expect("bind");
    let elapsed = t.elapsed();
    vm.unbind(binding).expect("unbind");
    elapsed
}

fn p9(vm: &Vm, samples: usize) {
    for _ in 0..20 {
        raw_once(vm);
        gmem_once(vm);
    }
    let (mut raw, mut gmem) = (Vec::new(), Vec::new());
    for i in 0..samples {
        if i % 2 == 0 {
            raw.push(raw_once(vm));
            gmem.push(gmem_once(vm));
        } else {
            gmem.push(gmem_once(vm));
            raw.push(raw_once(vm));
        }
    }
    let (r, g) = (median(&mut raw), median(&mut gmem));
    println!(
        "p9 create+bind 1 GiB guest_memfd: raw ioctls median {:.1} us, gmem median {:.1} us, \
         ratio {:.3} ({samples} paired samples)",
        us(r),
        us(g),
        us(g) / us(r)
    );
}

fn run_one(vcpu: &mut Vcpu) -> Duration {
    let t = Instant::now();
    let exit = vcpu.run().expect("KVM_RUN");
    let elapsed = t.elapsed();
    assert!(
        matches!(exit, Exit::IoOut { .. } | Exit::Converted(_)),
        "{exit:?}"
    );
    elapsed
}

fn round_trip(vm: &Vm, samples: usize) {
    let size = 2 << 20;
    let mem = vm
        .create_guest_memfd(size, Flags::MMAP | Flags::INIT_SHARED)
        .expect("create");
    vm.bind(&mem, Gpa::new(0), 0, size).expect("bind");
    let page = Gpa::new(0x2_0000);
    let vcpu_at = |id: u64, code: Vec<u8>, at: u64| {
        mem.guest()
            .expect("guest view")
            .write(at, &code)
            .expect("load");
        let vcpu = vm.create_vcpu(id).expect("vcpu");
        vcpu.set_real_mode_entry(Gpa::new(at)).expect("entry");
        vcpu
    };
    let mut bare = vcpu_at(0, report_loop().expect("asm"), 0x1000);
    let mut noop = vcpu_at(
        1,
        doorbell_noop_loop(Gpa::new(0x3_0000)).expect("asm"),
        0x3000,
    );
    let mut conv = vcpu_at(2, doorbell_loop(page).expect("asm"), 0x5000);
    let mut same = vcpu_at(
        3,
        report_loop_like_doorbell(Gpa::new(0x3_0000)).expect("asm"),
        0x7000,
    );
    for _ in 0..1000 {
        run_one(&mut bare);
        run_one(&mut same);
        run_one(&mut noop);
        run_one(&mut conv);
    }
    let (mut b, mut s, mut n, mut c) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..samples {
        b.push(run_one(&mut bare));
        s.push(run_one(&mut same));
        n.push(run_one(&mut noop));
        c.push(run_one(&mut conv));
    }
    let (b, s, n, c) = (
        median(&mut b),
        median(&mut s),
        median(&mut n),
        median(&mut c),
    );
    println!(
        "guest conversion round trip ({samples} samples each, interleaved), medians:\n  \
         bare KVM_RUN exit (out; jmp) {:.2} us\n  \
         bare exit after the doorbell's register loads {:.2} us\n  \
         doorbell, nothing to convert {:.2} us ({:.2}x bare, {:.2}x same instructions)\n  \
         doorbell converting 4 KiB {:.2} us ({:.2}x bare, {:.2}x same instructions)",
        us(b),
        us(s),
        us(n),
        us(n) / us(b),
        us(n) / us(s),
        us(c),
        us(c) / us(b),
        us(c) / us(s)
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let vm = match Vm::new() {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("skipped: {e}");
            return;
        }
    };
    p9(&vm, 400);
    round_trip(&vm, 20_000);
}
