//! `cargo bench -p gmem --bench hugetlb`: HugeTLB bars with their baselines, in one run.
//!
//! - P6: preallocating 1 GiB through gmem (4 KiB shmem, 2 MiB and, when the pool can provide
//!   one, 1 GiB HugeTLB pages) against the raw kernel work on a bare memfd of the same kind:
//!   `MADV_POPULATE_WRITE` on a fresh mapping and `fallocate`, whichever is faster.
//! - P8: one split plus one merge of a 2 MiB huge page (a 4 KiB conversion to private and
//!   back, with one host view) against one 2 MiB `memcpy`.
//! - TLB: random 8-byte reads over 1 GiB of guest memory, HugeTLB (2 MiB) against shmem
//!   (4 KiB).
//! - MAPS: P8's split + merge in a process with 10,000 more mappings, against the same
//!   without them (each split counts the process's mappings to keep `vm.max_map_count`
//!   headroom). Recorded, no bar.
//! - FOLLOWER: P8's split + merge of a file a follower process maps, against the same of a
//!   file no other process maps (the follower's freeze, split and merge steps, each a round
//!   trip over the peer socket). Recorded, no bar.
//!
//! Grows the HugeTLB pool for the run (root) and gives the pages back at the end. Prints a
//! markdown table. An optional argument scales the preallocation size in MiB (default 1024).
// Sizes here are small multiples of pages on a 64-bit host: casts to usize and u8 are exact.
#![allow(clippy::cast_possible_truncation)]

use std::hint::black_box;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use gmem::{Attr, BackingChoice, Flags, GuestMemfd, PoolGuard, Prealloc, HUGE_1G, HUGE_2M};
use gmem_conformance::child::{child_side, ChildProcess, ChildSide};
use gmem_conformance::mappings::ManyMappings;

const P: u64 = 4096;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn memfd(huge: Option<u64>, size: u64) -> OwnedFd {
    let flags = match huge {
        Some(page) => libc::MFD_HUGETLB | (page.trailing_zeros() << libc::MFD_HUGE_SHIFT),
        None => 0,
    };
    // SAFETY: a NUL-terminated name and integer flags.
    let fd = unsafe { libc::memfd_create(c"bench".as_ptr(), libc::MFD_CLOEXEC | flags) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain syscall on a valid descriptor.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
    assert_eq!(r, 0, "ftruncate: {}", std::io::Error::last_os_error());
    fd
}

/// Raw baseline: a bare memfd of the same kind, mapped and populated with one
/// `MADV_POPULATE_WRITE` (what a VMM does by hand), timed from creation to populated.
fn raw_populate(huge: Option<u64>, size: u64) -> Duration {
    let t = Instant::now();
    let fd = memfd(huge, size);
    let len = size as usize;
    // SAFETY: a fresh shared mapping of our own descriptor.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    assert_ne!(
        p,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the range is the mapping just made.
    let r = unsafe { libc::madvise(p, len, libc::MADV_POPULATE_WRITE) };
    assert_eq!(r, 0, "populate: {}", std::io::Error::last_os_error());
    let d = t.elapsed();
    // SAFETY: unmapping our own mapping.
    unsafe { libc::munmap(p, len) };
    d
}

/// Raw baseline: a bare memfd allocated with one `fallocate`.
fn raw_fallocate(huge: Option<u64>, size: u64) -> Duration {
    let t = Instant::now();
    let fd = memfd(huge, size);
    // SAFETY: plain syscall on a valid descriptor.
    let r = unsafe { libc::fallocate(fd.as_raw_fd(), 0, 0, size as libc::off_t) };
    assert_eq!(r, 0, "fallocate: {}", std::io::Error::last_os_error());
    let d = t.elapsed();
    drop(fd);
    d
}

/// gmem: create with preallocation on (default threads: every core).
fn gmem_prealloc(backing: BackingChoice, size: u64) -> Duration {
    let t = Instant::now();
    let mem = GuestMemfd::builder(size)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(backing)
        .prealloc(Some(Prealloc::new()))
        .create()
        .expect("gmem create + prealloc");
    let d = t.elapsed();
    drop(mem);
    d
}

struct Row {
    bar: &'static str,
    what: String,
    gmem: Duration,
    base: Duration,
    base_what: &'static str,
    ratio: f64,
    target: &'static str,
}

fn p6(rows: &mut Vec<Row>, label: &str, huge: Option<u64>, backing: BackingChoice, size: u64) {
    const REPS: usize = 5;
    let mut pop = Vec::new();
    let mut fal = Vec::new();
    let mut gm = Vec::new();
    for _ in 0..REPS {
        pop.push(raw_populate(huge, size));
        fal.push(raw_fallocate(huge, size));
        gm.push(gmem_prealloc(backing, size));
    }
    let (pop, fal, gm) = (median(pop), median(fal), median(gm));
    let (base, base_what) = if pop <= fal {
        (pop, "raw MADV_POPULATE_WRITE")
    } else {
        (fal, "raw fallocate")
    };
    rows.push(Row {
        bar: "P6",
        what: format!(
            "prealloc {} MiB, {label} (populate {:.1} ms, fallocate {:.1} ms)",
            size >> 20,
            ms(pop),
            ms(fal)
        ),
        gmem: gm,
        base,
        base_what,
        ratio: base.as_secs_f64() / gm.as_secs_f64(),
        target: "≥ 0.90 (throughput vs raw)",
    });
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// P8's file: two preallocated 2 MiB huge pages with one host view over both.
fn p8_file() -> (GuestMemfd, gmem::HostView) {
    let mem = GuestMemfd::builder(2 * HUGE_2M)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(BackingChoice::HugeTlb(HUGE_2M))
        .prealloc(Some(Prealloc::new()))
        .create()
        .expect("create");
    let view = mem.map(0, 2 * HUGE_2M).expect("map");
    (mem, view)
}

/// P8's timed step, the `i`-th: a 4 KiB page of the first 2 MiB to private and back (on a
/// HugeTLB file a split and a merge).
fn to_private_and_back(mem: &GuestMemfd, i: u32) -> Duration {
    let page = u64::from(5 + i % 400);
    let t = Instant::now();
    mem.convert(page * P, P, Attr::Private).expect("to private");
    mem.convert(page * P, P, Attr::Shared).expect("to shared");
    t.elapsed()
}

/// P8: split + merge of one 2 MiB huge page against one 2 MiB memcpy.
fn p8(rows: &mut Vec<Row>) {
    const N: u32 = 300;
    let (mem, view) = p8_file();
    let acct = mem.hugetlb_accounting().expect("accounting");
    let len = HUGE_2M as usize;
    let src = vec![0x5au8; len];
    let mut dst = vec![0u8; len];
    let mut memcpy = Vec::new();
    let mut restructure = Vec::new();
    let mut shmem_pair = Vec::new();
    let plain = GuestMemfd::builder(2 * HUGE_2M)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .prealloc(Some(Prealloc::new()))
        .create()
        .expect("shmem");
    let _pview = plain.map(0, 2 * HUGE_2M).expect("map");
    for i in 0..N {
        restructure.push(to_private_and_back(&mem, i));
        shmem_pair.push(to_private_and_back(&plain, i));
        let t = Instant::now();
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
        memcpy.push(t.elapsed());
    }
    assert_eq!(acct.splits(), u64::from(N));
    assert_eq!(acct.merges(), u64::from(N));
    drop(view);
    let (r, m, s) = (median(restructure), median(memcpy), median(shmem_pair));
    rows.push(Row {
        bar: "P8",
        what: format!(
            "split + merge of one 2 MiB page (4 KiB to private and back, 1 view); \
             same conversions on 4 KiB shmem take {:.1} µs",
            s.as_secs_f64() * 1e6
        ),
        gmem: r,
        base: m,
        base_what: "one 2 MiB memcpy",
        ratio: r.as_secs_f64() / m.as_secs_f64(),
        target: "≤ 2.0 (time vs memcpy)",
    });
}

/// MAPS: P8's split + merge with 10,000 more mappings ([`ManyMappings`]), against the same
/// split + merge without them, interleaved. Recorded, no bar.
fn many_mappings(rows: &mut Vec<Row>) {
    const N: u32 = 101;
    const MORE: usize = 10_000;
    let (mem, view) = p8_file();
    // What one count of the process's mappings costs with them: a whole read of the file.
    let read_maps = || {
        let t = Instant::now();
        black_box(std::fs::read("/proc/self/maps").expect("maps"));
        t.elapsed()
    };
    let lines = || {
        let maps = std::fs::read("/proc/self/maps").expect("maps");
        maps.iter().filter(|&&b| b == b'\n').count()
    };
    // The mappings added, as the kernel counts them.
    let added = {
        let before = lines();
        let more = ManyMappings::new(MORE).expect("more mappings");
        let with = lines();
        drop(more);
        with.saturating_sub(before)
    };
    let (mut few, mut many, mut reads) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..N {
        few.push(to_private_and_back(&mem, i));
        let more = ManyMappings::new(MORE).expect("more mappings");
        many.push(to_private_and_back(&mem, i));
        reads.push(read_maps());
        drop(more);
    }
    drop(view);
    let (m, f) = (median(many), median(few));
    rows.push(Row {
        bar: "MAPS",
        what: format!(
            "split + merge of one 2 MiB page (as P8) with {added} more mappings in the process; \
             one read of /proc/self/maps with them takes {:.2} ms",
            median(reads).as_secs_f64() * 1e3
        ),
        gmem: m,
        base: f,
        base_what: "the same without them",
        ratio: m.as_secs_f64() / f.as_secs_f64(),
        target: "recorded",
    });
}

/// FOLLOWER: P8's split + merge of a file a follower process maps (a view of the whole file),
/// against the same of a file nobody else maps, interleaved. Recorded, no bar.
fn with_follower(rows: &mut Vec<Row>) {
    const N: u32 = 101;
    let (alone, _alone_view) = p8_file();
    let (shared, _shared_view) = p8_file();
    let mut child = ChildProcess::spawn(
        "follower",
        "follower",
        shared.share_with_process().expect("share"),
    );
    assert_eq!(child.recv(), "mapped");
    let (mut base, mut followed) = (Vec::new(), Vec::new());
    for i in 0..N {
        base.push(to_private_and_back(&alone, i));
        followed.push(to_private_and_back(&shared, i));
    }
    child.send("bye");
    child.finish();
    let (f, b) = (median(followed), median(base));
    rows.push(Row {
        bar: "FOLLOWER",
        what: "split + merge of one 2 MiB page (as P8) of a file a follower process maps"
            .to_string(),
        gmem: f,
        base: b,
        base_what: "the same, no follower",
        ratio: f.as_secs_f64() / b.as_secs_f64(),
        target: "recorded",
    });
}

/// The follower process of [`with_follower`]: attaches, maps the whole file, waits.
fn follower(mut side: ChildSide) {
    let mem = GuestMemfd::attach(side.peer).expect("attach");
    let _view = mem.map(0, mem.size()).expect("map");
    side.ctl.send("mapped");
    let _ = side.ctl.try_recv();
}

/// Whole huge pages converting outside a split (64 MiB to private and back in one call each):
/// with one host view, whose 32 windows are each replaced by a hole and back, against the
/// same conversions of a file with no view. Recorded, no bar.
fn whole(rows: &mut Vec<Row>) {
    const N: u32 = 21;
    const SIZE: u64 = 64 << 20;
    let create = || {
        GuestMemfd::builder(SIZE)
            .flags(Flags::MMAP | Flags::INIT_SHARED)
            .backing(BackingChoice::HugeTlb(HUGE_2M))
            .prealloc(Some(Prealloc::new()))
            .create()
            .expect("create")
    };
    let (viewed, bare) = (create(), create());
    let _view = viewed.map(0, SIZE).expect("map");
    let pair = |mem: &GuestMemfd| {
        let t = Instant::now();
        mem.convert(0, SIZE, Attr::Private).expect("to private");
        mem.convert(0, SIZE, Attr::Shared).expect("to shared");
        t.elapsed()
    };
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..N {
        with.push(pair(&viewed));
        without.push(pair(&bare));
    }
    let (w, b) = (median(with), median(without));
    rows.push(Row {
        bar: "WHOLE",
        what: format!(
            "64 MiB of whole 2 MiB pages to private and back, 1 view ({:.1} µs per window \
             replacement)",
            (w.as_secs_f64() - b.as_secs_f64()) * 1e6 / 64.0
        ),
        gmem: w,
        base: b,
        base_what: "the same conversions, no view",
        ratio: w.as_secs_f64() / b.as_secs_f64(),
        target: "recorded",
    });
}

/// Random 8-byte reads over the guest view of a preallocated file.
fn random_reads(mem: &GuestMemfd, reads: u64) -> Duration {
    let base = mem.guest().expect("guest view").as_ptr() as usize;
    let words = mem.size() / 8;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut sum = 0u64;
    let t = Instant::now();
    for _ in 0..reads {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let at = base + ((x % words) * 8) as usize;
        // SAFETY: `at` is an aligned word inside the populated, shared guest mapping.
        sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(at as *const u64) });
    }
    let d = t.elapsed();
    black_box(sum);
    d
}

fn tlb(rows: &mut Vec<Row>, size: u64) {
    const READS: u64 = 20_000_000;
    let make = |backing| {
        GuestMemfd::builder(size)
            .flags(Flags::MMAP | Flags::INIT_SHARED)
            .backing(backing)
            .prealloc(Some(Prealloc::new()))
            .create()
            .expect("create")
    };
    let huge = make(BackingChoice::HugeTlb(HUGE_2M));
    let small = make(BackingChoice::Shmem);
    random_reads(&huge, READS / 10);
    random_reads(&small, READS / 10);
    let mut h = Vec::new();
    let mut s = Vec::new();
    for _ in 0..3 {
        h.push(random_reads(&huge, READS));
        s.push(random_reads(&small, READS));
    }
    let (h, s) = (median(h), median(s));
    rows.push(Row {
        bar: "TLB",
        what: format!(
            "{}M random 8-byte reads over {} MiB: {:.2} ns/read on 2 MiB pages, {:.2} ns/read on 4 KiB",
            READS / 1_000_000,
            size >> 20,
            h.as_nanos() as f64 / READS as f64,
            s.as_nanos() as f64 / READS as f64
        ),
        gmem: h,
        base: s,
        base_what: "same reads on 4 KiB shmem",
        ratio: s.as_secs_f64() / h.as_secs_f64(),
        target: "speed-up of HugeTLB (> 1)",
    });
}

fn main() {
    if let Some(side) = child_side() {
        follower(side);
        return;
    }
    let mib: u64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024);
    let size = mib << 20;
    // `GMEM_BENCH_ONLY=P8` (or `P6`, `WHOLE`, `TLB`, `MAPS`, `FOLLOWER`, comma-separated) runs only those
    // rows.
    let only = std::env::var("GMEM_BENCH_ONLY").ok();
    let on = |bar: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|b| b.trim().eq_ignore_ascii_case(bar)))
    };
    let mut rows = Vec::new();
    if on("P6") {
        p6(&mut rows, "4 KiB shmem", None, BackingChoice::Shmem, size);
    }
    {
        let pages = 2 * size / HUGE_2M + 4;
        match PoolGuard::grow(HUGE_2M, pages) {
            Ok(_pool) => {
                if on("P6") {
                    p6(
                        &mut rows,
                        "2 MiB HugeTLB",
                        Some(HUGE_2M),
                        BackingChoice::HugeTlb(HUGE_2M),
                        size,
                    );
                }
                if on("P8") {
                    p8(&mut rows);
                }
                if on("WHOLE") {
                    whole(&mut rows);
                }
                if on("MAPS") {
                    many_mappings(&mut rows);
                }
                if on("FOLLOWER") {
                    with_follower(&mut rows);
                }
                if on("TLB") {
                    tlb(&mut rows, size);
                }
            }
            Err(e) => eprintln!("skipped 2 MiB rows: {e}"),
        }
    }
    if size >= HUGE_1G && on("P6") {
        let pages = 2 * size / HUGE_1G;
        match PoolGuard::grow(HUGE_1G, pages) {
            Ok(_pool) => p6(
                &mut rows,
                "1 GiB HugeTLB",
                Some(HUGE_1G),
                BackingChoice::HugeTlb(HUGE_1G),
                size,
            ),
            Err(e) => println!("\n1 GiB pages skipped: {e}\n"),
        }
    }
    println!("| bar | what | gmem | baseline | ratio | target |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.3} ms | {:.3} ms ({}) | {:.2} | {} |",
            r.bar,
            r.what,
            ms(r.gmem),
            ms(r.base),
            r.base_what,
            r.ratio,
            r.target
        );
    }
    let _ = std::io::Write::flush(&mut std::io::stdout());
}
