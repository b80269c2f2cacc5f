//! `gmem probe`: what this host offers gmem, how each backing enforces private pages here, and
//! the documented exceptions, measured where this machine can.
//!
//! Every backing line comes from a real file: a page is converted to private and touched
//! through a host view with a signal-safe probe, so the signal and `si_code` printed are the
//! ones this kernel raises. Each exception names the test that pins it; those this machine
//! can show are shown (`measured`), the others are stated. The probe changes nothing on the
//! host: it uses only free huge pages and a VM of its own.

use std::fs;
use std::os::fd::AsRawFd;

use gmem::{Attr, BackingChoice, Errno, Flags, GuestMemfd, HostView, HUGE_2M};
use gmem_conformance::touch;
use serde::Serialize;

const P: u64 = 4096;

/// How one backing enforces private pages on this host.
#[derive(Debug, Serialize)]
pub struct BackingReport {
    /// The backing.
    pub backing: String,
    /// Why it could not be measured here, if it could not.
    pub unavailable: Option<String>,
    /// What enforces a private page in a host view.
    pub mechanism: String,
    /// Measured: the signal and `si_code` of a host touch of a private 4 KiB page.
    pub private_page: Option<(i32, i32)>,
    /// Measured (HugeTLB): the signal and `si_code` of a touch of a wholly private huge page.
    pub private_huge_page: Option<(i32, i32)>,
}

/// A documented exception: where a backing cannot keep a promise on this kernel.
#[derive(Debug, Serialize)]
pub struct Exception {
    /// What happens.
    pub what: &'static str,
    /// `Some(true)`: shown on this machine; `Some(false)`: tried and not seen (the kernel may
    /// have changed; the pinning test would fail); `None`: stated, not measurable here.
    pub measured: Option<bool>,
    /// The test that pins it.
    pub test: &'static str,
}

/// What the host offers.
#[derive(Debug, Serialize)]
pub struct HostReport {
    /// Kernel release.
    pub kernel: String,
    /// `/dev/kvm` can be opened.
    pub kvm: Result<(), String>,
    /// HugeTLB pools: (page size in KiB, total pages, free pages).
    pub hugetlb: Vec<(u64, u64, u64)>,
    /// Online NUMA nodes.
    pub numa_nodes: String,
    /// `vm.max_map_count`.
    pub max_map_count: u64,
    /// Mappings gmem keeps free below it ([`gmem::MAP_HEADROOM`]).
    pub map_headroom: usize,
    /// Per backing: the mechanism and the measured signals.
    pub backings: Vec<BackingReport>,
    /// The documented exceptions.
    pub exceptions: Vec<Exception>,
}

fn read(p: &str) -> String {
    fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn hugetlb() -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/sys/kernel/mm/hugepages") else {
        return out;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let kb = name
            .trim_start_matches("hugepages-")
            .trim_end_matches("kB")
            .parse()
            .unwrap_or(0);
        let base = e.path();
        let num = |f: &str| read(&base.join(f).to_string_lossy()).parse().unwrap_or(0);
        out.push((kb, num("nr_hugepages"), num("free_hugepages")));
    }
    out.sort_unstable();
    out
}

/// The signal and code of a host read at `at` of `view`, if it faults.
fn fault(view: &HostView, at: u64) -> Option<(i32, i32)> {
    touch::read_byte(view, at).err().map(|f| (f.signo, f.code))
}

/// A shared file of `size` bytes with a view, page 1 private (and, for a file of more than
/// one block, the last block private).
fn layout(mem: &GuestMemfd, block: u64) -> Result<HostView, String> {
    let size = mem.size();
    let view = mem.map(0, size).map_err(|e| e.to_string())?;
    mem.convert(P, P, Attr::Private)
        .map_err(|e| e.to_string())?;
    if size > block {
        mem.convert(size - block, block, Attr::Private)
            .map_err(|e| e.to_string())?;
    }
    Ok(view)
}

fn measure(backing: &str, mechanism: &str, mem: Result<GuestMemfd, String>) -> BackingReport {
    let mut r = BackingReport {
        backing: backing.to_string(),
        unavailable: None,
        mechanism: mechanism.to_string(),
        private_page: None,
        private_huge_page: None,
    };
    let block = mem
        .as_ref()
        .ok()
        .and_then(|m| m.stat().ok())
        .map_or(P, |s| s.1);
    match mem.and_then(|m| layout(&m, block).map(|v| (m, v))) {
        Ok((m, view)) => {
            r.private_page = fault(&view, P);
            if block > P {
                r.private_huge_page = fault(&view, m.size() - block);
            }
        }
        Err(e) => r.unavailable = Some(e),
    }
    r
}

fn shmem_file(size: u64) -> Result<GuestMemfd, String> {
    GuestMemfd::create(size, Flags::MMAP | Flags::INIT_SHARED).map_err(|e| e.to_string())
}

/// A HugeTLB file of two 2 MiB pages, from free pages only.
fn huge_file() -> Result<GuestMemfd, String> {
    GuestMemfd::builder(2 * HUGE_2M)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(BackingChoice::HugeTlb(HUGE_2M))
        .create()
        .map_err(|e| format!("{e} (the probe uses free huge pages only)"))
}

fn kernel_file(vm: &Result<gmem_kvm::Vm, String>) -> Result<GuestMemfd, String> {
    let vm = vm.as_ref().map_err(Clone::clone)?;
    vm.create_guest_memfd(16 * P, Flags::MMAP | Flags::INIT_SHARED)
        .map_err(|e| e.to_string())
}

fn advise(view: &HostView, advice: i32) -> bool {
    // SAFETY: the range is the view's own; the advice changes no Rust object.
    unsafe { libc::madvise(view.as_ptr().cast(), view.len(), advice) == 0 }
}

/// `MADV_GUARD_REMOVE` on a shmem view: does the private page become readable?
fn guard_remove_lifts_markers() -> Option<bool> {
    let mem = shmem_file(4 * P).ok()?;
    let view = layout(&mem, P).ok()?;
    advise(&view, 103).then(|| touch::read_byte(&view, P).is_ok())
}

/// `MADV_REMOVE` on a kernel guest_memfd view after the guest touched a private page: does
/// the page become readable?
fn kernel_remove_drops_markers(vm: &Result<gmem_kvm::Vm, String>) -> Option<bool> {
    let mem = kernel_file(vm).ok()?;
    let view = layout(&mem, P).ok()?;
    mem.guest().ok()?.write(P, b"guest").ok()?;
    advise(&view, libc::MADV_REMOVE).then(|| touch::read_byte(&view, P).is_ok())
}

/// A pipe: (read end, write end).
fn pipe() -> Option<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return None;
    }
    // SAFETY: the read end is fresh and owned by nobody else.
    let rd = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    // SAFETY: as above, the write end.
    let wr = unsafe { std::fs::File::from_raw_fd(fds[1]) };
    Some((rd, wr))
}

/// A page of a HugeTLB view vmspliced into a pipe, then its whole huge page converted to
/// private and written by the guest: does the pipe show the guest's bytes?
fn huge_reference_sees_guest_bytes() -> Option<bool> {
    let mem = huge_file().ok()?;
    let view = mem.map(0, mem.size()).ok()?;
    mem.write_at(0, b"shared").ok()?;
    let (rd, wr) = pipe()?;
    let iov = libc::iovec {
        iov_base: view.as_ptr().cast(),
        iov_len: 6,
    };
    // SAFETY: one iovec inside the live view; the pipe takes a reference to the page.
    if unsafe { libc::vmsplice(wr.as_raw_fd(), &iov, 1, 0) } != 6 {
        return None;
    }
    mem.convert(0, HUGE_2M, Attr::Private).ok()?;
    mem.guest().ok()?.write(0, b"secret").ok()?;
    let mut got = [0u8; 6];
    std::io::Read::read_exact(&mut &rd, &mut got).ok()?;
    Some(&got == b"secret")
}

/// HugeTLB: a pin on one page of a whole huge page, then a conversion of another: is it
/// refused (`EAGAIN` naming the pinned page), the huge page left whole?
fn pin_holds_off_a_split() -> Option<bool> {
    let mem = huge_file().ok()?;
    let pin = mem.pin(2 * P, P).ok()?;
    let refused = match mem.convert(5 * P, P, Attr::Private) {
        Err(e) => e.errno() == libc::EAGAIN && e.error_offset() == Some(2 * P),
        Ok(()) => false,
    };
    drop(pin);
    Some(refused && mem.hugetlb_accounting()?.splits() == 0)
}

fn exceptions(vm: &Result<gmem_kvm::Vm, String>, backings: &[BackingReport]) -> Vec<Exception> {
    let segv = backings
        .iter()
        .any(|b| b.private_page.is_some_and(|(s, _)| s == libc::SIGSEGV));
    vec![
        Exception {
            what: "host views raise SIGSEGV (SEGV_MAPERR, a guard marker) on a private 4 KiB \
                   page, where the kernel's guest_memfd raises SIGBUS",
            measured: Some(segv),
            test: "every backing's conformance_mmap_private_sigbus (touch::expect_fault)",
        },
        Exception {
            what: "MADV_GUARD_REMOVE on a view lifts the guard markers of its private pages \
                   (deliberate raw access; the next conversion of a page guards it again)",
            measured: guard_remove_lifts_markers(),
            test: "hardening_madvise_guard_remove_exception",
        },
        Exception {
            what: "kernel guest_memfd: a punch-hole made outside gmem (MADV_REMOVE on a view, \
                   fallocate on the descriptor) drops the markers of pages mapped elsewhere; \
                   punch through GuestMemfd::fallocate",
            measured: kernel_remove_drops_markers(vm),
            test: "kernel_guest_memfd_hardening::hardening_madvise_remove",
        },
        Exception {
            what: "HugeTLB: a kernel reference (pipe, io_uring, O_DIRECT) taken through a view \
                   into a huge page later converted to private as a whole sees the guest's \
                   bytes (a whole huge page is not moved)",
            measured: huge_reference_sees_guest_bytes(),
            test: "hugetlb_hardening::hardening_refs_vmsplice_whole_huge_page_exception",
        },
        Exception {
            what: "HugeTLB: while a pin (a device slice) holds a page of a whole huge page, \
                   converting another page of it, which would split it, fails with EAGAIN \
                   naming the pinned page (the kernel's base pages convert alone; a pin's \
                   kernel references hold the whole huge page, which a split would leave \
                   behind)",
            measured: pin_holds_off_a_split(),
            test: "hugetlb::conformance_convert_pinned_page, \
                   conformance_hugetlb_restructure_kernel_reference_through_a_pin",
        },
        Exception {
            what: "a child made by a raw clone(2) that bypasses libc's fork handlers may \
                   inherit views gmem set MADV_DONTFORK on after the VMM undid it",
            measured: None,
            test: "hardening_forked_child (covers fork(3))",
        },
        Exception {
            what: "a vCPU or guest-view follower that faults a page through the guest mapping \
                   while gmem punches it can make the kernel drop view markers until gmem \
                   re-guards them at the end of that punch",
            measured: None,
            test: "hardening_refs_o_direct_race (the gmem-side ordering)",
        },
    ]
}

/// Collects the report.
pub fn report() -> HostReport {
    let vm = gmem_kvm::Vm::new().map_err(|e| e.to_string());
    let backings = vec![
        measure(
            "shmem",
            "guard markers in one tracked mapping",
            shmem_file(16 * P),
        ),
        measure(
            "hugetlb-2048k",
            "a wholly private huge page maps nothing; pieces of a split one carry guard markers",
            huge_file(),
        ),
        measure(
            "kernel-guest-memfd",
            "guard markers in one sealed mapping",
            kernel_file(&vm),
        ),
    ];
    HostReport {
        kernel: read("/proc/sys/kernel/osrelease"),
        kvm: vm.as_ref().map(drop).map_err(Clone::clone),
        hugetlb: hugetlb(),
        numa_nodes: read("/sys/devices/system/node/online"),
        max_map_count: read("/proc/sys/vm/max_map_count").parse().unwrap_or(0),
        map_headroom: gmem::MAP_HEADROOM,
        exceptions: exceptions(&vm, &backings),
        backings,
    }
}

fn signal((signo, code): (i32, i32)) -> String {
    let name = match signo {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        _ => "signal",
    };
    let code = match (signo, code) {
        (libc::SIGSEGV, 1) => "SEGV_MAPERR".to_string(),
        (libc::SIGSEGV, 2) => "SEGV_ACCERR".to_string(),
        (libc::SIGBUS, 2) => "BUS_ADRERR".to_string(),
        (_, c) => format!("si_code {c}"),
    };
    format!("{name} ({code})")
}

fn print_backing(b: &BackingReport) {
    if let Some(why) = &b.unavailable {
        println!("  {:<20} not measured: {why}", b.backing);
        return;
    }
    let page = b.private_page.map_or("no fault (!)".to_string(), signal);
    print!("  {:<20} private page: {page}", b.backing);
    if let Some(h) = b.private_huge_page {
        print!("; private huge page: {}", signal(h));
    }
    println!(" [{}]", b.mechanism);
}

/// Prints the report.
pub fn run(json: bool) -> Result<(), Box<dyn std::error::Error>> {
    let r = report();
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("kernel                 {}", r.kernel);
    match &r.kvm {
        Ok(()) => println!("/dev/kvm               yes"),
        Err(e) => println!("/dev/kvm               no ({e})"),
    }
    for (kb, total, free) in &r.hugetlb {
        println!("hugetlb {kb:>8} KiB   {total} pages, {free} free");
    }
    println!("NUMA nodes online      {}", r.numa_nodes);
    println!(
        "vm.max_map_count       {} (gmem keeps {} free)",
        r.max_map_count, r.map_headroom
    );
    println!("host-view enforcement, measured:");
    r.backings.iter().for_each(print_backing);
    println!("documented exceptions:");
    for e in &r.exceptions {
        let how = match e.measured {
            Some(true) => "measured here",
            Some(false) => "NOT seen here",
            None => "stated",
        };
        println!("  - {} [{how}; test: {}]", e.what, e.test);
    }
    Ok(())
}
