//! Live update of a kernel guest_memfd, on /dev/kvm, across a real process boundary.
//!
//! The old owner (this test) creates a VM, a kernel guest_memfd bound to it and a vCPU, and
//! hands the file over to a new process started with inherited descriptors. The new process
//! checks what the kernel allows: it maps and reads the old file (the bytes and gmem's
//! attributes are all there), but binding it to a new VM fails with `EINVAL` and running the
//! old VM's vCPU fails with `EIO`. It then takes the honest path, a new VM and a new file
//! with the contents copied and the attributes restored (`copy_into_new`), binds that, and
//! reports the copy's cost.
// Test patterns truncate page numbers to bytes on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use gmem::preserve::{
    copy_into_new, crc32c, receive_inherited, spawn_with_inherited, FileOffer, HandoverError,
    Options,
};
use gmem::{Attr, BackingKind, Flags, GuestMemfd};
use gmem_conformance::probe;
use gmem_kvm::{BindError, Gpa, Vm, VmError};

const P: u64 = 4096;
const SIZE: u64 = 2 << 20;

fn digest(mem: &GuestMemfd) -> String {
    let g = mem.guest().expect("guest view");
    let mut page = vec![0u8; P as usize];
    let mut crcs = Vec::new();
    for p in 0..mem.size() / P {
        g.read(p * P, &mut page).unwrap();
        crcs.extend_from_slice(&crc32c(&page).to_le_bytes());
    }
    let runs: Vec<String> = mem
        .runs(0, mem.size())
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{:x}+{:x}{}",
                r.offset,
                r.len,
                if r.attr == Attr::Private { "p" } else { "s" }
            )
        })
        .collect();
    format!("{:08x}/{}", crc32c(&crcs), runs.join(","))
}

fn open_vm() -> Option<Vm> {
    match Vm::new() {
        Ok(vm) => Some(vm),
        Err(VmError::Open { errno }) => {
            eprintln!("skipped: /dev/kvm does not open (errno {errno})");
            None
        }
        Err(e) => panic!("VM: {e}"),
    }
}

/// The new process.
#[test]
fn preserve_kvm_child() {
    let Ok(vcpu) = std::env::var("GMEM_KVM_OLD_VCPU") else {
        return;
    };
    let vcpu: i32 = vcpu.parse().unwrap();
    // SAFETY: the hand-over descriptors were inherited and nothing here owns them.
    let got = unsafe { receive_inherited(&Options::default()) }
        .unwrap()
        .unwrap();
    let old = &got.files[0].mem;
    assert_eq!(old.backing_kind(), BackingKind::KernelGuestMemfd);
    println!("OLD {}", digest(old));
    // The new owner maps the old file: private pages fault there too (page 3 is private,
    // page 2 shared).
    let view = old.map(0, SIZE).unwrap();
    let at = |p: u64| view.as_ptr().wrapping_add(usize::try_from(p * P).unwrap());
    // SAFETY: page 3 lies inside the view.
    let private = unsafe { probe::read(at(3)) };
    // SAFETY: page 2 lies inside the view.
    let shared = unsafe { probe::read(at(2)) };
    println!(
        "MAP-OLD private={} shared={}",
        private.is_fault(),
        shared == probe::Touch::Ok(2u8.wrapping_mul(7) | 1)
    );
    let vm = Vm::new().unwrap();
    // The kernel ties the file to the VM that created it.
    match vm.bind(old, Gpa::new(0), 0, SIZE) {
        Err(BindError::Kernel { errno, .. }) => println!("BIND-OLD errno={errno}"),
        other => panic!("binding the old file: {other:?}"),
    }
    // And the old VM cannot run from another process.
    // SAFETY: KVM_RUN on an inherited vCPU descriptor; the kernel refuses it before it touches
    // any memory of this process.
    let ret = unsafe { libc::ioctl(vcpu, 0xAE80, 0) };
    println!(
        "RUN-OLD ret={ret} errno={}",
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    );
    let (new, report) = copy_into_new(old, |size, flags| {
        vm.create_guest_memfd(size, flags)
            .map_err(HandoverError::from)
    })
    .unwrap();
    assert_eq!(new.backing_kind(), BackingKind::KernelGuestMemfd);
    assert_ne!(new.id().unwrap(), old.id().unwrap());
    vm.bind(&new, Gpa::new(0), 0, SIZE).unwrap();
    println!("NEW {}", digest(&new));
    println!(
        "COPY size={} copied={} runs={} elapsed_us={}",
        report.size,
        report.copied,
        report.runs,
        report.elapsed.as_micros()
    );
}

#[test]
fn kernel_guest_memfd_is_copied_into_a_new_vm() {
    let Some(vm) = open_vm() else { return };
    let mem = vm
        .create_guest_memfd(SIZE, Flags::MMAP | Flags::INIT_SHARED)
        .unwrap();
    vm.bind(&mem, Gpa::new(0), 0, SIZE).unwrap();
    let g = mem.guest().expect("guest view");
    for p in 0..SIZE / P {
        g.write(p * P, &[(p as u8).wrapping_mul(7) | 1; 512])
            .unwrap();
    }
    for p in (3..SIZE / P).step_by(9) {
        mem.convert(p * P, 2 * P, Attr::Private).unwrap();
    }
    let want = digest(&mem);
    let vcpu = vm.create_vcpu(0).unwrap();
    let vcpu_fd = vcpu.fd().as_raw_fd();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "preserve_kvm_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("GMEM_KVM_OLD_VCPU", vcpu_fd.to_string())
    .stdout(Stdio::piped());
    let hook = move || {
        // SAFETY: fcntl is async-signal-safe; the vCPU descriptor is open in the child.
        if unsafe { libc::fcntl(vcpu_fd, libc::F_SETFD, 0) } == -1 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook only calls fcntl.
    unsafe { cmd.pre_exec(hook) };
    let spawned =
        spawn_with_inherited(&[FileOffer::new(&mem)], &mut cmd, &Options::default()).unwrap();
    spawned.outcome.unwrap();
    let out = spawned.child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = |tag: &str| {
        text.split(&format!("{tag} "))
            .nth(1)
            .and_then(|t| t.lines().next())
            .unwrap_or_else(|| panic!("{tag}: {text}"))
            .to_string()
    };
    assert_eq!(line("OLD"), want);
    assert_eq!(line("NEW"), want);
    assert_eq!(line("MAP-OLD"), "private=true shared=true");
    assert_eq!(line("BIND-OLD"), format!("errno={}", libc::EINVAL));
    assert_eq!(line("RUN-OLD"), format!("ret=-1 errno={}", libc::EIO));
    println!("copy of a kernel guest_memfd: {}", line("COPY"));
}

/// Pages the KVM guest fills, from guest-physical 64 KiB on.
const FILLS: u64 = 200;
const FILL_BASE: u64 = 0x10000;

fn fill_value(i: u64) -> u8 {
    (i % 250) as u8 + 1
}

/// The new owner of `kvm_guest_writing_during_handover_loses_nothing`.
#[test]
fn preserve_kvm_writer_child() {
    if std::env::var("GMEM_KVM_WRITER").is_err() {
        return;
    }
    // SAFETY: the hand-over descriptors were inherited and nothing here owns them.
    let got = unsafe { receive_inherited(&Options::default()) }
        .unwrap()
        .unwrap();
    let mem = &got.files[0].mem;
    // Wait for the old owner's guest to halt, then check every byte it wrote.
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    // The guest fills its pages in order until it halts, or until the hand-over cut the old
    // owner off (its guest mapping stops reaching the file once the file is handed over): a
    // prefix of whole pages, at most one page in progress, then pages never written.
    let mut page = vec![0u8; P as usize];
    let mut filled = 0;
    while filled < FILLS {
        mem.guest()
            .expect("guest view")
            .read(FILL_BASE + filled * P, &mut page)
            .unwrap();
        if !page.iter().all(|&b| b == fill_value(filled)) {
            break;
        }
        filled += 1;
    }
    for i in filled + 1..FILLS {
        mem.guest()
            .expect("guest view")
            .read(FILL_BASE + i * P, &mut page)
            .unwrap();
        assert!(page.iter().all(|&b| b == 0), "page {i} written after a gap");
    }
    println!("KVM-GUEST-WRITES intact pages={filled}");
}

/// A KVM guest (real mode, run by KVM on a shmem file through an hva memslot) keeps filling
/// pages while the file is handed over to a new process; every byte it wrote is in the file
/// the new owner holds.
#[test]
fn kvm_guest_writing_during_handover_loses_nothing() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some(vm) = open_vm() else { return };
    let mem = GuestMemfd::create(SIZE, Flags::MMAP | Flags::INIT_SHARED).unwrap();
    vm.bind(&mem, Gpa::new(0), 0, SIZE).unwrap();
    let mut asm = gmem_kvm::payload::Asm::new();
    for i in 0..FILLS {
        asm.fill(Gpa::new(FILL_BASE + i * P), P as u16, fill_value(i));
    }
    asm.hlt();
    mem.guest()
        .expect("guest view")
        .write(0x1000, &asm.finish().unwrap())
        .unwrap();
    let halted = AtomicBool::new(false);
    let released = AtomicBool::new(false);
    std::thread::scope(|s| {
        let t0 = std::time::Instant::now();
        let vcpu_thread = s.spawn(|| {
            let mut vcpu = vm.create_vcpu(0).unwrap();
            vcpu.set_real_mode_entry(Gpa::new(0x1000)).unwrap();
            loop {
                match vcpu.run() {
                    Ok(gmem_kvm::Exit::Halt) => {
                        halted.store(true, Ordering::Release);
                        break;
                    }
                    Ok(gmem_kvm::Exit::Interrupted) => continue,
                    // Handed over: the old owner's guest mapping no longer reaches the file,
                    // so the old vCPU cannot go on.
                    other => {
                        // Only the hand-over's release may stop the guest (the old owner's
                        // mapping is revoked just before `hand_over` returns).
                        let t = std::time::Instant::now();
                        while !released.load(Ordering::Acquire)
                            && t.elapsed() < std::time::Duration::from_secs(10)
                        {
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                        assert!(
                            released.load(Ordering::Acquire),
                            "unexpected exit {other:?}"
                        );
                        eprintln!("old vCPU stopped after the hand-over: {other:?}");
                        break;
                    }
                }
            }
        });
        // Start the hand-over once the guest is writing.
        let mut b = [0u8; 1];
        while b[0] == 0 {
            mem.guest()
                .expect("guest view")
                .read(FILL_BASE, &mut b)
                .unwrap();
            std::thread::yield_now();
        }
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "preserve_kvm_writer_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("GMEM_KVM_WRITER", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
        let mut spawned =
            spawn_with_inherited(&[FileOffer::new(&mem)], &mut cmd, &Options::default()).unwrap();
        let done = spawned.outcome.unwrap();
        released.store(true, Ordering::Release);
        eprintln!(
            "hand-over done at {:?} (pause {:?})",
            t0.elapsed(),
            done.pause
        );
        let overlapped = !halted.load(Ordering::Acquire);
        vcpu_thread.join().unwrap();
        eprintln!("guest halted by {:?}", t0.elapsed());
        writeln!(spawned.child.stdin.take().unwrap(), "go").unwrap();
        let out = spawned.child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        let filled: u64 = text
            .lines()
            .find_map(|l| {
                l.split_once("KVM-GUEST-WRITES intact pages=")
                    .map(|(_, n)| n)
            })
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no report: {text}"));
        // Every page written before the release is there; the guest was still writing when
        // the hand-over began.
        assert!(filled > 0, "{text}");
        assert!(
            overlapped || filled == FILLS,
            "the guest finished before the hand-over did"
        );
    });
}
