//! Child process for the resource-limit tests: the parent starts it under a limit (an address
//! space rlimit, a seccomp filter that refuses `userfaultfd`) and it checks that gmem reports
//! a clear, typed error at the right call and keeps working otherwise. It prints one line per
//! check and exits 0 when every check held, 1 otherwise.

use std::process::ExitCode;

use gmem::Errno;
use gmem::{Attr, Flags, GuestMemfd};

const MIB: u64 = 1 << 20;

struct Checks {
    failed: bool,
}

impl Checks {
    fn check(&mut self, what: &str, ok: bool, detail: String) {
        println!("{} {what}: {detail}", if ok { "ok" } else { "FAILED" });
        self.failed |= !ok;
    }
}

/// Under `RLIMIT_AS`: creating a file larger than the limit and mapping a view larger than
/// the limit fail with `ENOMEM` naming `mmap`; a small file keeps working.
fn address_space(c: &mut Checks) {
    let small = GuestMemfd::create(4 * MIB, Flags::MMAP | Flags::INIT_SHARED);
    c.check(
        "small file",
        small.is_ok(),
        format!("{:?}", small.as_ref().err()),
    );
    let Ok(small) = small else { return };
    match GuestMemfd::create(1 << 30, Flags::MMAP | Flags::INIT_SHARED) {
        Err(e) => c.check(
            "1 GiB file refused at creation",
            e.errno() == libc::ENOMEM && e.to_string().contains("mmap"),
            format!("{e} (errno {})", e.errno()),
        ),
        Ok(_) => c.check("1 GiB file refused at creation", false, "created".into()),
    }
    match small.map(0, 1 << 30) {
        Err(e) => c.check(
            "1 GiB view refused",
            e.errno() == libc::ENOMEM && matches!(e, gmem::MapError::Os { op: "mmap", .. }),
            format!("{e} (errno {})", e.errno()),
        ),
        Ok(_) => c.check("1 GiB view refused", false, "mapped".into()),
    }
    // The file is unchanged and usable.
    let used = small
        .write_at(0, b"still here")
        .map_err(|e| e.to_string())
        .and_then(|()| {
            small
                .convert(0, 4096, Attr::Private)
                .map_err(|e| e.to_string())
        })
        .and_then(|()| small.map(0, 4 * MIB).map(drop).map_err(|e| e.to_string()))
        .and_then(|()| {
            small
                .convert(0, 4096, Attr::Shared)
                .map_err(|e| e.to_string())
        });
    c.check("small file still usable", used.is_ok(), format!("{used:?}"));
    let mut b = [0u8; 10];
    let read = small.read_at(0, &mut b);
    c.check(
        "contents intact",
        read.is_ok() && &b == b"still here",
        format!("{read:?} {b:?}"),
    );
}

/// A file whose bookkeeping cannot be allocated (64 TiB: the per-page reference table alone
/// is 64 GiB) is refused with a typed error, not an abort.
fn huge_size(c: &mut Checks) {
    match GuestMemfd::create(64 << 40, Flags::MMAP | Flags::INIT_SHARED) {
        Err(e) => c.check(
            "64 TiB file refused",
            e.errno() == libc::ENOMEM,
            format!("{e} (errno {})", e.errno()),
        ),
        Ok(f) => c.check(
            "64 TiB file refused",
            false,
            format!("created {} bytes", f.size()),
        ),
    }
}

/// Without `userfaultfd` (refused by seccomp, as container runtimes' default profiles do):
/// creating a file works; the first view is refused with the syscall's errno, naming
/// `userfaultfd`; accessors, the guest view and conversions keep working.
fn no_userfaultfd(c: &mut Checks, errno: i32) {
    let mem = match GuestMemfd::create(16 * 4096, Flags::MMAP | Flags::INIT_SHARED) {
        Ok(m) => m,
        Err(e) => return c.check("create without userfaultfd", false, e.to_string()),
    };
    c.check("create without userfaultfd", true, String::new());
    for round in 0..2 {
        match mem.map(0, 16 * 4096) {
            Err(e) => c.check(
                &format!("view refused (round {round})"),
                e.errno() == errno
                    && matches!(
                        e,
                        gmem::MapError::Os {
                            op: "userfaultfd",
                            ..
                        }
                    ),
                format!("{e} (errno {})", e.errno()),
            ),
            Ok(_) => c.check(
                &format!("view refused (round {round})"),
                false,
                "mapped".into(),
            ),
        }
    }
    let r = mem
        .write_at(4096, b"abc")
        .map_err(|e| e.to_string())
        .and_then(|()| {
            mem.convert(4096, 4096, Attr::Private)
                .map_err(|e| e.to_string())
        });
    c.check("convert without views", r.is_ok(), format!("{r:?}"));
    let mut b = [0u8; 3];
    let refused = mem.read_at(4096, &mut b).map_err(|e| e.errno());
    c.check(
        "private page refused",
        refused == Err(libc::EFAULT),
        format!("{refused:?}"),
    );
    let g = mem.guest().and_then(|v| v.read(4096, &mut b));
    c.check(
        "guest reads it",
        g.is_ok() && &b == b"abc",
        format!("{g:?} {b:?}"),
    );
}

/// Mappings of this process (`/proc/self/maps` lines).
fn map_count() -> usize {
    std::fs::read_to_string("/proc/self/maps").map_or(0, |m| m.lines().count())
}

/// One-page anonymous mappings that do not merge (alternating protections), until the
/// process is `short` mappings below gmem's headroom under `vm.max_map_count`.
fn fill_mappings(short: usize) -> Vec<usize> {
    let max: usize = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(65_530);
    let mut made = Vec::new();
    loop {
        let target = max - gmem::MAP_HEADROOM - short;
        let now = map_count();
        if now >= target {
            return made;
        }
        for _ in 0..target - now {
            let prot = if made.len() % 2 == 0 {
                libc::PROT_READ
            } else {
                libc::PROT_NONE
            };
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
            // SAFETY: a fresh anonymous page where the kernel chooses.
            let p = unsafe { libc::mmap(std::ptr::null_mut(), 4096, prot, flags, -1, 0) };
            if p == libc::MAP_FAILED {
                return made;
            }
            made.push(p as usize);
        }
    }
}

/// Near `vm.max_map_count`: the split of a HugeTLB page and a new HugeTLB view fail with
/// `ENOMEM` and change nothing, the process can still start threads, and both work once
/// mappings are free again.
fn map_count_headroom(c: &mut Checks) {
    let huge = gmem::HUGE_2M;
    let mem = match GuestMemfd::builder(4 * huge)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(gmem::BackingChoice::HugeTlb(huge))
        .create()
    {
        Ok(m) => m,
        Err(e) => return c.check("HugeTLB file", false, e.to_string()),
    };
    let view = match mem.map(0, 4 * huge) {
        Ok(v) => v,
        Err(e) => return c.check("HugeTLB view", false, e.to_string()),
    };
    let fill = fill_mappings(1);
    let r = mem
        .convert(4096, 4096, Attr::Private)
        .map_err(|e| e.errno());
    c.check(
        "split refused near the limit",
        r == Err(libc::ENOMEM),
        format!("{r:?}"),
    );
    let runs = mem.run_count().map_err(|e| e.errno());
    c.check("nothing changed", runs == Ok(1), format!("{runs:?} runs"));
    let r = mem.map(0, huge).map(drop).map_err(|e| e.errno());
    c.check(
        "view refused near the limit",
        r == Err(libc::ENOMEM),
        format!("{r:?}"),
    );
    let t = std::thread::spawn(|| 7).join();
    c.check("a thread starts", matches!(t, Ok(7)), format!("{t:?}"));
    for p in fill {
        // SAFETY: unmaps a page this function mapped.
        unsafe { libc::munmap(p as *mut libc::c_void, 4096) };
    }
    let r = mem
        .convert(4096, 4096, Attr::Private)
        .map_err(|e| e.to_string());
    c.check("split once mappings are free", r.is_ok(), format!("{r:?}"));
    let r = mem.map(0, huge).map(drop).map_err(|e| e.to_string());
    c.check("view once mappings are free", r.is_ok(), format!("{r:?}"));
    drop(view);
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let mut c = Checks { failed: false };
    match args.get(1).map(String::as_str) {
        Some("address-space") => address_space(&mut c),
        Some("huge-size") => huge_size(&mut c),
        Some("map-count") => map_count_headroom(&mut c),
        Some("no-userfaultfd") => {
            let errno = args
                .get(2)
                .and_then(|v| v.parse().ok())
                .unwrap_or(libc::ENOSYS);
            no_userfaultfd(&mut c, errno);
        }
        other => {
            eprintln!("unknown scenario {other:?}");
            return ExitCode::from(2);
        }
    }
    if c.failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
