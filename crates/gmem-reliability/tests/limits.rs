//! R6: resource limits. Each limit is real: an address-space rlimit or a seccomp filter set in
//! a child process before it runs, a HugeTLB pool sized by writing the kernel's pool size, a
//! 1 GiB file with 131,072 private runs. Each must give a clear, typed error at the call that
//! meets the limit (never a later `SIGBUS`), or succeed.
#![allow(clippy::cast_possible_truncation)]

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Instant;

use gmem::Errno;
use gmem::{Attr, BackingChoice, FallocMode, Flags, GuestMemfd, HUGE_2M};
use gmem_conformance::probe;

const PAGE: u64 = 4096;

/// Runs a scenario of the child binary with `setup` applied between fork and exec.
fn child(
    scenario: &[&str],
    setup: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gmem-limits-child"));
    cmd.args(scenario);
    // SAFETY: `setup` makes only async-signal-safe syscalls (setrlimit, prctl).
    unsafe { cmd.pre_exec(setup) };
    let out = cmd.output().expect("run the child");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "scenario {scenario:?} failed ({:?}):\n{text}",
        out.status
    );
    text
}

#[test]
fn limits_enomem_from_mmap_under_rlimit_as() {
    let out = child(&["address-space"], || {
        let lim = libc::rlimit {
            rlim_cur: 512 << 20,
            rlim_max: 512 << 20,
        };
        // SAFETY: plain syscall on a valid struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    });
    assert!(out.contains("ok 1 GiB file refused at creation"));
    assert!(out.contains("ok 1 GiB view refused"));
}

#[test]
fn limits_file_too_large_for_its_bookkeeping() {
    // No limit needed: 64 TiB of pages needs 64 GiB of reference counts on a 24 GiB machine.
    // A child, so that an abort would not take the test binary down.
    let out = child(&["huge-size"], || Ok(()));
    assert!(out.contains("ok 64 TiB file refused"));
}

/// Installs a seccomp filter that makes `userfaultfd(2)` fail with `errno`.
fn deny_userfaultfd(errno: u32) -> std::io::Result<()> {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let stmt = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let ld = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    let mut prog = [
        stmt(ld, 4), // seccomp_data.arch
        jeq(AUDIT_ARCH_X86_64, 1, 0),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
        stmt(ld, 0), // seccomp_data.nr
        jeq(libc::SYS_userfaultfd as u32, 0, 1),
        stmt(ret, libc::SECCOMP_RET_ERRNO | errno),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: plain prctl.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fprog` points at a valid filter for the duration of the call.
    if unsafe { libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &fprog) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[test]
fn limits_userfaultfd_unavailable() {
    for errno in [libc::ENOSYS, libc::EPERM] {
        let out = child(&["no-userfaultfd", &errno.to_string()], move || {
            deny_userfaultfd(errno as u32)
        });
        assert!(out.contains("ok view refused (round 1)"));
    }
}

/// Counts the VMAs of this process that overlap `[start, end)`.
fn vmas_in(start: usize, end: usize) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    maps.lines()
        .filter_map(|l| {
            let range = l.split_whitespace().next()?;
            let (a, b) = range.split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .filter(|&(a, b)| a < end && b > start)
        .count()
}

#[test]
fn limits_131072_private_runs_in_1_gib() {
    const SIZE: u64 = 1 << 30;
    let pages = SIZE / PAGE;
    let mem = GuestMemfd::create(SIZE, Flags::MMAP | Flags::INIT_SHARED).expect("create 1 GiB");
    let early = mem.map(0, SIZE).expect("view before the conversions");
    let t = Instant::now();
    for p in (1..pages).step_by(2) {
        mem.convert(p * PAGE, PAGE, Attr::Private)
            .unwrap_or_else(|e| panic!("page {p}: {e}"));
    }
    eprintln!(
        "131,072 per-page conversions with one view: {:?}",
        t.elapsed()
    );
    assert_eq!(mem.run_count().expect("run count"), pages as usize);
    // Queries.
    assert_eq!(mem.attr(PAGE).expect("attr"), Attr::Private);
    assert_eq!(mem.attr(SIZE - 2 * PAGE).expect("attr"), Attr::Shared);
    let runs = mem.runs(0, SIZE).expect("runs");
    assert_eq!(runs.len(), pages as usize);
    assert!(runs
        .iter()
        .enumerate()
        .all(|(i, r)| r.offset == i as u64 * PAGE
            && r.len == PAGE
            && r.attr
                == if i % 2 == 1 {
                    Attr::Private
                } else {
                    Attr::Shared
                }));
    // A new view at 131,072 private runs, each view still one VMA.
    let view = mem.map(0, SIZE).expect("new view at 131,072 private runs");
    for v in [&early, &view] {
        let start = v.as_ptr() as usize;
        assert_eq!(vmas_in(start, start + v.len()), 1, "view is one VMA");
    }
    for p in (0..pages).step_by(4099) {
        for v in [&early, &view] {
            // SAFETY: inside the view.
            let got = unsafe { probe::read(v.as_ptr().wrapping_add((p * PAGE) as usize)) };
            assert_eq!(got.is_fault(), p % 2 == 1, "page {p}: {got:?}");
            if p % 2 == 1 {
                assert!(gmem_conformance::touch::faults_as_documented(
                    v,
                    p * PAGE,
                    got
                ));
            }
        }
    }
    // Checked access and a peer at that many runs.
    let mut b = [0u8; 2];
    assert_eq!(
        mem.read_at(PAGE - 1, &mut b).map_err(|e| e.errno()),
        Err(libc::EFAULT)
    );
    mem.write_at(2 * PAGE, b"ok").expect("write a shared page");
    let follower = GuestMemfd::attach(mem.share_with_process().expect("share")).expect("attach");
    assert_eq!(follower.run_count().expect("run count"), pages as usize);
    // Conversions keep working: one more page each way, then the whole file back in one call.
    mem.convert(0, PAGE, Attr::Private)
        .expect("page 0 to private");
    assert_eq!(mem.run_count().expect("run count"), pages as usize - 1);
    assert_eq!(follower.attr(0).expect("attr"), Attr::Private);
    mem.convert(PAGE, PAGE, Attr::Shared)
        .expect("page 1 to shared");
    mem.convert(0, SIZE, Attr::Shared)
        .expect("whole file shared");
    assert_eq!(mem.run_count().expect("run count"), 1);
    assert_eq!(follower.run_count().expect("run count"), 1);
    mem.read_at(2 * PAGE, &mut b).expect("read");
    assert_eq!(&b, b"ok");
    // SAFETY: inside the view.
    assert!(!unsafe { probe::read(view.as_ptr().wrapping_add(PAGE as usize)) }.is_fault());
}

/// A guest that makes a HugeTLB file split page after page cannot bring the VMM to
/// `vm.max_map_count`: near it (within [`gmem::MAP_HEADROOM`]) the split and a new view fail
/// with `ENOMEM`, threads still start, and both work again once mappings are free.
#[test]
fn limits_map_count_headroom_for_hugetlb_splits() {
    let _pool = match gmem::PoolGuard::grow(HUGE_2M, 4) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("skipped: cannot reserve 4 HugeTLB pages: {e}");
            return;
        }
    };
    let out = child(&["map-count"], || Ok(()));
    for check in [
        "ok split refused near the limit",
        "ok nothing changed",
        "ok view refused near the limit",
        "ok a thread starts",
        "ok split once mappings are free",
        "ok view once mappings are free",
    ] {
        assert!(out.contains(check), "{check}:\n{out}");
    }
}

/// Reads a HugeTLB counter of the default (2 MiB) pool.
fn hugepages(name: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/kernel/mm/hugepages/hugepages-2048kB/{name}"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn limits_hugetlb_pool_short_is_refused_at_creation() {
    // Grow the pool by 4 pages for this test (restored on drop).
    let guard = match gmem::PoolGuard::grow(HUGE_2M, 4) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("skipped: cannot reserve 4 HugeTLB pages: {e}");
            return;
        }
    };
    let free = hugepages("free_hugepages") - hugepages("resv_hugepages");
    let hugetlb = |n: u64| {
        GuestMemfd::builder(n * HUGE_2M)
            .flags(Flags::MMAP | Flags::INIT_SHARED)
            .backing(BackingChoice::HugeTlb(HUGE_2M))
            .create()
    };
    // One page more than the pool has: refused at creation, typed, naming the shortfall.
    let e = hugetlb(free + 1).expect_err("a file larger than the pool was created");
    assert_eq!(e.errno(), libc::ENOMEM, "{e}");
    assert!(
        matches!(
            e,
            gmem::CreateError::HugeTlb(gmem::HugeTlbError::PoolShort { needed, shortfall: 1, .. })
                if needed == free + 1
        ),
        "{e:?}"
    );
    // Exactly the pool: created, and every page can be touched; punch-hole and touch again.
    let mem = hugetlb(free).expect("a file the pool can hold");
    assert_eq!(hugepages("free_hugepages") - hugepages("resv_hugepages"), 0);
    // While it holds the pool, another file is refused at creation.
    let e = hugetlb(1).expect_err("pool exhausted");
    assert_eq!(e.errno(), libc::ENOMEM);
    let guest = mem.guest().expect("guest view");
    for p in 0..free {
        guest.write(p * HUGE_2M + 5, &[0x5a]).expect("touch");
    }
    mem.fallocate(FallocMode::PUNCH_HOLE, 0, HUGE_2M)
        .expect("punch");
    let view = mem.map(0, free * HUGE_2M).expect("view");
    for p in 0..free {
        // SAFETY: inside the view; shared pages backed by reserved huge pages.
        let got = unsafe { probe::read(view.as_ptr().wrapping_add((p * HUGE_2M + 5) as usize)) };
        assert_eq!(
            got,
            probe::Touch::Ok(if p == 0 { 0 } else { 0x5a }),
            "huge page {p}"
        );
    }
    drop(view);
    drop(mem);
    drop(guard);
}
