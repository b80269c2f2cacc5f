//! The core performance bars (P1–P5, P12) and the small-access path, each measured against its baseline in the same run.
//!
//! Every figure is the median of several repetitions; ratios compare gmem with the bare
//! kernel work (or plain memory operation) done on the same mapping in the same process.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use gmem::{Attr, AttrMap, Flags, GuestMemfd, PAGE_SIZE};

/// One measured bar.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// Bar identifier (P1..P5).
    pub bar: &'static str,
    /// What was measured.
    pub what: String,
    /// gmem's figure.
    pub value: f64,
    /// The baseline's figure, in the same unit.
    pub baseline: f64,
    /// Unit of both figures.
    pub unit: &'static str,
    /// `value / baseline` (for throughput: `baseline / value`, so lower is always better).
    pub ratio: f64,
    /// The bar, as a human-readable limit.
    pub limit: &'static str,
    /// Whether the bar is met.
    pub pass: bool,
}

/// Counts live heap bytes; install as the global allocator to measure memory per run.
#[derive(Debug)]
pub struct CountingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Counting is on only while a memory figure is measured ([`counting`]): a shared atomic
/// add per allocation would otherwise slow down the timed code the other bars measure.
static COUNTING: AtomicBool = AtomicBool::new(false);

/// Turns allocation counting on or off.
fn counting(on: bool) {
    COUNTING.store(on, Ordering::SeqCst);
}

// SAFETY: forwards to the system allocator unchanged, only counting sizes.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_add(l.size(), Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: std::alloc::Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_add(l.size(), Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, n: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
            LIVE.fetch_add(n, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.realloc(p, l, n) }
    }
}

fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

fn madvise(ptr: *mut u8, len: usize, advice: libc::c_int) -> std::io::Result<()> {
    // SAFETY: callers pass a range inside a live mapping they own.
    let ret = unsafe { libc::madvise(ptr.cast(), len, advice) };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn row(
    bar: &'static str,
    what: String,
    value: f64,
    baseline: f64,
    unit: &'static str,
    limit: &'static str,
    max_ratio: f64,
) -> Row {
    let ratio = value / baseline;
    Row {
        bar,
        what,
        value,
        baseline,
        unit,
        ratio,
        limit,
        pass: ratio <= max_ratio,
    }
}

/// Which mapping the host populates, and so whether a host view showed the pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exposure {
    /// A host view populated the pages: kernel references may hold them, so a conversion to
    /// private moves them to fresh memory.
    View,
    /// Only the guest mapping (the guest's own accesses) populated them; the file has no
    /// host view: no page is moved.
    GuestOnly,
}

impl Exposure {
    fn label(self) -> &'static str {
        match self {
            Exposure::View => "populated through a host view",
            Exposure::GuestOnly => "populated by the guest only, no host view",
        }
    }
}

/// The mapping a bar populates and its baseline zaps: a host view of the whole file, or the
/// guest mapping. The view (if any) lives as long as the returned value.
fn target(mem: &GuestMemfd, size: u64, e: Exposure) -> R<(Option<gmem::HostView>, *mut u8, usize)> {
    Ok(match e {
        Exposure::View => {
            let v = mem.map(0, size)?;
            let (p, l) = (v.as_ptr(), v.len());
            (Some(v), p, l)
        }
        Exposure::GuestOnly => {
            let g = mem.guest()?;
            (None, g.as_ptr(), usize::try_from(g.len())?)
        }
    })
}

/// P1: 1 GiB uniform, populated: shared → private → shared and re-populated, against
/// `MADV_DONTNEED` + `MADV_POPULATE_WRITE` on the same mapping.
pub fn p1(size: u64, reps: usize) -> R<Vec<Row>> {
    let mut rows = Vec::new();
    for e in [Exposure::View, Exposure::GuestOnly] {
        rows.push(p1_one(size, reps, e)?);
    }
    Ok(rows)
}

fn p1_one(size: u64, reps: usize, e: Exposure) -> R<Row> {
    let mem = GuestMemfd::create(size, Flags::MMAP | Flags::INIT_SHARED)?;
    let (_view, ptr, len) = target(&mem, size, e)?;
    madvise(ptr, len, libc::MADV_POPULATE_WRITE)?;
    let (mut g, mut b, mut gc) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        madvise(ptr, len, libc::MADV_DONTNEED)?;
        madvise(ptr, len, libc::MADV_POPULATE_WRITE)?;
        b.push(t.elapsed());
        let t = Instant::now();
        mem.convert(0, size, Attr::Private)?;
        mem.convert(0, size, Attr::Shared)?;
        let conv = t.elapsed();
        madvise(ptr, len, libc::MADV_POPULATE_WRITE)?;
        g.push(t.elapsed());
        gc.push(conv);
    }
    let (g, b, gc) = (median(g), median(b), median(gc));
    Ok(row(
        "P1",
        format!(
            "convert {} MiB shared→private→shared + re-map, {} (conversion alone {:.1} ms) vs zap + re-map",
            size >> 20,
            e.label(),
            ms(gc)
        ),
        ms(g),
        ms(b),
        "ms",
        "≤ 1.5×",
        1.5,
    ))
}

/// P2: every other 4 KiB page to private with one call per page, and the whole pattern back
/// to shared with one call, against a bare per-page `MADV_DONTNEED` loop on the same pages.
pub fn p2(size: u64) -> R<Vec<Row>> {
    let mut rows = Vec::new();
    for e in [Exposure::View, Exposure::GuestOnly] {
        rows.extend(p2_one(size, e)?);
    }
    Ok(rows)
}

fn p2_one(size: u64, e: Exposure) -> R<Vec<Row>> {
    let mem = GuestMemfd::create(size, Flags::MMAP | Flags::INIT_SHARED)?;
    let (_view, ptr, len) = target(&mem, size, e)?;
    madvise(ptr, len, libc::MADV_POPULATE_WRITE)?;
    let pages = size / PAGE_SIZE;
    let base = dontneed_every_other_page(ptr, len)?;
    madvise(ptr, len, libc::MADV_POPULATE_WRITE)?;
    let t = Instant::now();
    for p in (0..pages).step_by(2) {
        mem.convert(p * PAGE_SIZE, PAGE_SIZE, Attr::Private)?;
    }
    let per_page = t.elapsed();
    let runs = mem.run_count()?;
    let t = Instant::now();
    mem.convert(0, size, Attr::Shared)?;
    let bulk = t.elapsed();
    let n = f64::from(u32::try_from(pages / 2)?);
    Ok(vec![
        row(
            "P2",
            format!(
                "{} per-page to-private calls ({} runs), {}, vs per-page madvise loop",
                pages / 2,
                runs,
                e.label()
            ),
            ns(per_page) / n,
            ns(base) / n,
            "ns/page",
            "≤ 1.5×",
            1.5,
        ),
        row(
            "P2",
            format!(
                "one bulk call over the {runs}-run pattern back to shared, {}, vs per-page madvise loop",
                e.label()
            ),
            ms(bulk),
            ms(base),
            "ms",
            "≤ 1.5×",
            1.5,
        ),
    ])
}

/// P3: attribute lookup at 1M runs, memory per run, and memory of a uniform file.
pub fn p3() -> R<Vec<Row>> {
    let runs: u64 = 1 << 20;
    counting(true);
    let before = live_bytes();
    let mut map = AttrMap::new(runs, Attr::Shared);
    for p in (1..runs).step_by(2) {
        map.set(p, p + 1, Attr::Private);
    }
    let bytes = live_bytes().wrapping_sub(before);
    counting(false);
    let per_run = bytes as f64 / map.len() as f64;
    // Baseline: binary search over a plain sorted array of the same run starts.
    let starts: Vec<u64> = (0..runs).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut keys = Vec::with_capacity(1 << 16);
    for _ in 0..(1 << 16) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        keys.push(x % runs);
    }
    let mut sink = 0u64;
    let (mut g, mut b) = (Vec::new(), Vec::new());
    for _ in 0..9 {
        let t = Instant::now();
        for &k in &keys {
            sink += u64::from(map.get(k) == Attr::Private);
        }
        g.push(t.elapsed());
        let t = Instant::now();
        for &k in &keys {
            let i = starts.partition_point(|&s| s <= k);
            sink += u64::try_from(i & 1).unwrap_or(0);
        }
        b.push(t.elapsed());
    }
    std::hint::black_box(sink);
    let n = keys.len() as f64;
    let (g, b) = (ns(median(g)) / n, ns(median(b)) / n);
    let uniform = |pages: u64| {
        counting(true);
        let before = live_bytes();
        let m = AttrMap::new(pages, Attr::Private);
        let used = live_bytes().wrapping_sub(before);
        counting(false);
        drop(m);
        used
    };
    let (u1, u16) = (uniform(1 << 18), uniform(1 << 22));
    let lookup = Row {
        bar: "P3",
        what: format!(
            "random attribute lookup at {} runs vs binary search of a sorted array of the run starts",
            map.len()
        ),
        value: g,
        baseline: b,
        unit: "ns",
        ratio: g / b,
        limit: "≤ 10 ns",
        pass: g <= 10.0,
    };
    // The map covers `runs` pages of 4 KiB: bytes per GiB of file at the worst pattern.
    let per_gib = bytes as f64 * f64::from(1u32 << 18) / runs as f64;
    let mem_row = Row {
        bar: "P3",
        what: format!(
            "heap bytes per GiB at the worst pattern ({per_run:.2} B per run) vs QEMU's 32 KiB/GiB bitmap"
        ),
        value: per_gib,
        baseline: 32768.0,
        unit: "B/GiB",
        ratio: per_gib / 32768.0,
        limit: "≤ 32 KiB/GiB",
        pass: per_gib <= 32768.0,
    };
    let uni = Row {
        bar: "P3",
        what: "heap bytes of a uniform 16 GiB file's attributes vs a uniform 1 GiB file's".into(),
        value: u16 as f64,
        baseline: u1 as f64,
        unit: "B",
        ratio: u16 as f64 / u1.max(1) as f64,
        limit: "≤ 64 B",
        pass: u16 <= 64 && u1 <= 64,
    };
    Ok(vec![lookup, mem_row, uni])
}

/// P4: `read_at` throughput against `memcpy` from the same mapping.
pub fn p4(size: u64) -> R<Vec<Row>> {
    let mem = GuestMemfd::create(size, Flags::MMAP | Flags::INIT_SHARED)?;
    let chunk = 1usize << 20;
    let mut buf = vec![0u8; chunk];
    let src = mem.guest()?;
    for off in (0..size).step_by(chunk) {
        mem.write_at(off, &buf)?;
    }
    let step = u64::try_from(chunk)?;
    let (mut g, mut b) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        let t = Instant::now();
        for off in (0..size).step_by(chunk) {
            mem.read_at(off, &mut buf)?;
        }
        g.push(t.elapsed());
        let t = Instant::now();
        let base = src.as_ptr();
        for off in (0..size).step_by(chunk) {
            let src = base.wrapping_add(usize::try_from(off)?);
            // SAFETY: `[at, at + chunk)` lies inside the guest mapping of `size` bytes, which
            // does not overlap `buf`.
            unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), chunk) };
        }
        std::hint::black_box(&buf);
        b.push(t.elapsed());
    }
    let gbps = |d: Duration| size as f64 / d.as_secs_f64() / 1e9;
    let (g, b) = (gbps(median(g)), gbps(median(b)));
    let _ = step;
    Ok(vec![Row {
        bar: "P4",
        what: format!(
            "read_at 1 MiB chunks over {} MiB vs memcpy from the same mapping",
            size >> 20
        ),
        value: g,
        baseline: b,
        unit: "GB/s",
        ratio: g / b,
        limit: "≥ 90% of memcpy",
        pass: g / b >= 0.9,
    }])
}

/// CPU time of the calling thread: unlike wall time, it does not count time the thread
/// waited for a core, so two threads on a busy machine are compared by the work they did.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

fn pin_loop(mem: &GuestMemfd, base: u64, iters: u32) -> R<Duration> {
    let t = thread_cpu();
    for i in 0..iters {
        let off = base + u64::from(i % 64) * PAGE_SIZE;
        let p = mem.pin(off, PAGE_SIZE)?;
        drop(std::hint::black_box(p));
    }
    Ok(thread_cpu().saturating_sub(t))
}

/// P5: pin + unpin of one page, uncontended and with two threads pinning at once.
pub fn p5() -> R<Vec<Row>> {
    let mem = GuestMemfd::create(64 << 20, Flags::MMAP | Flags::INIT_SHARED)?;
    let iters = 2_000_000u32;
    let mut single = Vec::new();
    for _ in 0..5 {
        single.push(pin_loop(&mem, 0, iters)?);
    }
    let one = ns(median(single)) / f64::from(iters);
    let mut two = Vec::new();
    for _ in 0..5 {
        let results: Vec<Result<Duration, String>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2u64)
                .map(|t| {
                    let mem = &mem;
                    s.spawn(move || pin_loop(mem, t * (32 << 20), iters).map_err(|e| e.to_string()))
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("thread panicked".to_string()))
                })
                .collect()
        });
        let mut worst = Duration::ZERO;
        for r in results {
            worst = worst.max(r?);
        }
        two.push(worst);
    }
    let both = ns(median(two)) / f64::from(iters);
    Ok(vec![
        Row {
            bar: "P5",
            what: "pin + unpin of one page, one thread, thread CPU time (baseline: the 100 ns bar)"
                .into(),
            value: one,
            baseline: 100.0,
            unit: "ns",
            ratio: one / 100.0,
            limit: "≤ 100 ns",
            pass: one <= 100.0,
        },
        row(
            "P5",
            "pin + unpin per op, two threads at once vs one thread (thread CPU time)".into(),
            both,
            one,
            "ns",
            "≤ 2×",
            2.0,
        ),
    ])
}

/// `MADV_GUARD_INSTALL` (Linux 6.13).
const MADV_GUARD_INSTALL: libc::c_int = 102;

/// A bare shared mapping of a file, the baseline's own (unmapped on drop).
struct RawMap {
    ptr: *mut u8,
    len: usize,
}

impl RawMap {
    fn new(fd: std::os::fd::BorrowedFd<'_>, len: usize) -> std::io::Result<RawMap> {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared mapping chosen by the kernel; nothing else is at that address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RawMap {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for RawMap {
    fn drop(&mut self) {
        // SAFETY: `[ptr, ptr + len)` is this value's own mapping, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A VM for a part that needs the kernel guest_memfd, or `None` with a `skipped:` line on
/// stderr naming `part` where `/dev/kvm` does not open.
fn kvm_vm(part: &str) -> Option<gmem_kvm::Vm> {
    match gmem_kvm::Vm::new() {
        Ok(vm) => Some(vm),
        Err(e) => {
            eprintln!("{part} skipped: /dev/kvm: {e}");
            None
        }
    }
}

/// P12: a kernel guest_memfd with one host view, every other page to private with one call
/// per page (the 131,072-run pattern at 1 GiB), against a bare per-page `MADV_GUARD_INSTALL`
/// loop on a plain mapping of another kernel guest_memfd of the same size; the medians of 7
/// interleaved rounds (a round is about a third of a second here, and one slow round in
/// three moved the ratio by a fifth). Empty (with a `skipped:` line on stderr) where
/// `/dev/kvm` does not open.
pub fn p12(size: u64) -> R<Vec<Row>> {
    let Some(vm) = kvm_vm("P12") else {
        return Ok(Vec::new());
    };
    let flags = Flags::MMAP | Flags::INIT_SHARED;
    let len = usize::try_from(size)?;
    let step = usize::try_from(PAGE_SIZE)?;
    let pages = size / PAGE_SIZE;
    let n = f64::from(u32::try_from(pages / 2)?);
    let (mut g, mut b, mut runs) = (Vec::new(), Vec::new(), 0);
    for _ in 0..7 {
        let bare = vm.create_guest_memfd(size, flags)?;
        let raw = RawMap::new(std::os::fd::AsFd::as_fd(&bare), len)?;
        let t = Instant::now();
        for p in (0..pages).step_by(2) {
            let off = usize::try_from(p * PAGE_SIZE)?;
            madvise(raw.ptr.wrapping_add(off), step, MADV_GUARD_INSTALL)?;
        }
        b.push(t.elapsed());
        drop(raw);
        drop(bare);
        let mem = vm.create_guest_memfd(size, flags)?;
        let view = mem.map(0, size)?;
        let t = Instant::now();
        for p in (0..pages).step_by(2) {
            mem.convert(p * PAGE_SIZE, PAGE_SIZE, Attr::Private)?;
        }
        g.push(t.elapsed());
        runs = mem.run_count()?;
        drop(view);
    }
    Ok(vec![row(
        "P12",
        format!(
            "kernel guest_memfd, one host view: {} per-page to-private calls ({runs} runs) vs per-page MADV_GUARD_INSTALL loop",
            pages / 2
        ),
        ns(median(g)) / n,
        ns(median(b)) / n,
        "ns/page",
        "≤ 2×",
        2.0,
    )])
}

/// The two ways a conversion to private can learn whether a page a view showed is resident,
/// as raw syscalls on a kernel guest_memfd of `size` bytes with a quarter of its pages
/// written, one page per call over every other page: `cachestat(2)` on the file (what gmem
/// asks first) against `mincore(2)` on a mapping of it (what it asked before, and still asks
/// for a range resident only in part). Recorded, no bar. Empty where `/dev/kvm` does not
/// open.
pub fn residency(size: u64) -> R<Vec<Row>> {
    let Some(vm) = kvm_vm("residency") else {
        return Ok(Vec::new());
    };
    let file = vm.create_guest_memfd(size, Flags::MMAP | Flags::INIT_SHARED)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(&file));
    let len = usize::try_from(size)?;
    let map = RawMap::new(std::os::fd::AsFd::as_fd(&file), len)?;
    let page = usize::try_from(PAGE_SIZE)?;
    for off in (0..len).step_by(4 * page) {
        // SAFETY: inside the shared mapping of the file, which is this function's.
        unsafe { map.ptr.wrapping_add(off).write_volatile(1) };
    }
    let calls = u32::try_from(size / PAGE_SIZE / 2)?;
    let offset = |i: u32| u64::from(i) * 2 * PAGE_SIZE;
    let cachestat = per_call(calls, |i| {
        std::hint::black_box(cachestat(fd, offset(i), PAGE_SIZE)?);
        Ok(())
    })?;
    let mincore = per_call(calls, |i| {
        let mut v = 0u8;
        let at = map.ptr.wrapping_add(usize::try_from(offset(i))?);
        // SAFETY: one page inside the live mapping; `v` has room for its one byte.
        let r = unsafe { libc::mincore(at.cast(), page, &mut v) };
        if r != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        std::hint::black_box(v);
        Ok(())
    })?;
    Ok(vec![Row {
        bar: "residency",
        what: format!(
            "cachestat of one page vs mincore of one page, kernel guest_memfd, {calls} pages, a quarter of the file written"
        ),
        value: cachestat,
        baseline: mincore,
        unit: "ns",
        ratio: cachestat / mincore,
        limit: "recorded",
        pass: true,
    }])
}

/// `cachestat(2)` of `[off, off + len)` of `fd`: the kernel's `struct cachestat`, as an array
/// of its u64 fields.
fn cachestat(fd: libc::c_int, off: u64, len: u64) -> std::io::Result<[u64; 5]> {
    // `struct cachestat_range`, as an array of its u64 fields.
    let range = [off, len];
    let mut st = [0u64; 5];
    // SAFETY: `range` and `st` have the kernel's layouts and outlive the call.
    let r = unsafe { libc::syscall(451, fd, range.as_ptr(), st.as_mut_ptr(), 0) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// P2's baseline: `MADV_DONTNEED` of every other page of `[ptr, ptr + len)`, one call per
/// page, timed.
fn dontneed_every_other_page(ptr: *mut u8, len: usize) -> R<Duration> {
    let page = usize::try_from(PAGE_SIZE)?;
    let t = Instant::now();
    for off in (0..len).step_by(2 * page) {
        madvise(ptr.wrapping_add(off), page, libc::MADV_DONTNEED)?;
    }
    Ok(t.elapsed())
}

/// The floor of P2 with a host view: the syscalls a one-page conversion of a page a view
/// populated makes, issued bare on a memfd of `size` bytes, every other page once (the
/// view's guard marker, `cachestat` of the page, `pread` of its contents, the punch and the
/// re-allocation; a shmem punch unmaps the page from every mapping itself), against
/// P2's baseline, a per-page `MADV_DONTNEED` of populated pages. Recorded, no bar: it says
/// how much of P2's ratio the move's syscalls are by themselves.
pub fn p2_floor(size: u64) -> R<Vec<Row>> {
    use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: a plain syscall; the name is a valid C string.
    let raw = unsafe { libc::memfd_create(c"gmem-bench-floor".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `raw` is a fresh descriptor owned by nobody else.
    let file = unsafe { OwnedFd::from_raw_fd(raw) };
    let fd = file.as_raw_fd();
    let check = |r: libc::c_long| -> R<()> {
        if r < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    };
    // SAFETY: plain syscall on the descriptor above.
    check(unsafe { libc::ftruncate(fd, libc::off_t::try_from(size)?) }.into())?;
    let len = usize::try_from(size)?;
    let (view, base) = (
        RawMap::new(file.as_fd(), len)?,
        RawMap::new(file.as_fd(), len)?,
    );
    madvise(view.ptr, len, libc::MADV_POPULATE_WRITE)?;
    let page = usize::try_from(PAGE_SIZE)?;
    let mut buf = vec![0u8; page];
    let t = Instant::now();
    for off in (0..len).step_by(2 * page) {
        let at = libc::off_t::try_from(off)?;
        madvise(view.ptr.wrapping_add(off), page, MADV_GUARD_INSTALL)?;
        std::hint::black_box(cachestat(fd, u64::try_from(off)?, PAGE_SIZE)?);
        // SAFETY: `buf` has room for the page's bytes.
        let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), page, at) };
        check(n.try_into()?)?;
        let one = libc::off_t::try_from(page)?;
        for mode in [
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
            libc::FALLOC_FL_KEEP_SIZE,
        ] {
            // SAFETY: a plain syscall on the descriptor above: the punch, then the
            // re-allocation.
            check(unsafe { libc::fallocate(fd, mode, at, one) }.into())?;
        }
    }
    let floor = t.elapsed();
    std::hint::black_box(&buf);
    madvise(base.ptr, len, libc::MADV_POPULATE_WRITE)?;
    let baseline = dontneed_every_other_page(base.ptr, len)?;
    let n = f64::from(u32::try_from(size / PAGE_SIZE / 2)?);
    Ok(vec![Row {
        bar: "floor",
        what: format!(
            "P2's floor: the move's syscalls issued bare, {} pages a view populated, vs per-page madvise loop",
            size / PAGE_SIZE / 2
        ),
        value: ns(floor) / n,
        baseline: ns(baseline) / n,
        unit: "ns/page",
        ratio: floor.as_secs_f64() / baseline.as_secs_f64(),
        limit: "recorded",
        pass: true,
    }])
}

/// One small-access figure: `f` run `iters` times, median of 7, in ns per call.
fn per_call(iters: u32, mut f: impl FnMut(u32) -> R<()>) -> R<f64> {
    let mut v = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        for i in 0..iters {
            f(i)?;
        }
        v.push(t.elapsed());
    }
    Ok(ns(median(v)) / f64::from(iters))
}

/// The small-access path: `read_at` of 8 and 64 bytes and pin + unpin of one page, at 1 run
/// and at 1M runs (a 4 GiB file with every odd page private, accesses on even pages), each
/// against a plain `memcpy` of the same bytes from the same mapping. 4096 offsets spread
/// over the file, one per page, so the accesses are those of a device touching its rings.
pub fn small_access() -> R<Vec<Row>> {
    let size: u64 = 4 << 30;
    let pages = size / PAGE_SIZE;
    let mut rows = Vec::new();
    for mixed in [false, true] {
        let mem = GuestMemfd::create(size, Flags::MMAP | Flags::INIT_SHARED)?;
        if mixed {
            for p in (1..pages).step_by(2) {
                mem.convert(p * PAGE_SIZE, PAGE_SIZE, Attr::Private)?;
            }
        }
        let runs = mem.run_count()?;
        let spread = pages / 4096;
        let offs: Vec<u64> = (0..4096u64)
            .map(|i| ((i * spread) & !1) * PAGE_SIZE + (i % 8) * 64)
            .collect();
        for &o in &offs {
            mem.write_at(o, &[1u8; 64])?;
        }
        let guest = mem.guest()?;
        let base = guest.as_ptr();
        let iters = 1u32 << 20;
        let at = |i: u32| offs[usize::try_from(i).unwrap_or(0) % offs.len()];
        for size in [8usize, 64] {
            let mut buf = [0u8; 64];
            let gm = per_call(iters, |i| {
                mem.read_at(at(i), &mut buf[..size])?;
                std::hint::black_box(&buf);
                Ok(())
            })?;
            let bm = per_call(iters, |i| {
                let src = base.wrapping_add(usize::try_from(at(i))?);
                // SAFETY: every offset is inside the guest mapping, on a shared page, and
                // `buf` is a separate buffer.
                unsafe {
                    std::ptr::copy_nonoverlapping(std::hint::black_box(src), buf.as_mut_ptr(), size)
                };
                std::hint::black_box(&buf);
                Ok(())
            })?;
            rows.push(Row {
                bar: "small",
                what: format!("read_at of {size} B, {runs} runs, vs memcpy of the same bytes"),
                value: gm,
                baseline: bm,
                unit: "ns",
                ratio: gm / bm,
                limit: "recorded",
                pass: true,
            });
        }
        let gp = per_call(iters, |i| {
            let p = mem.pin(at(i) & !(PAGE_SIZE - 1), PAGE_SIZE)?;
            drop(std::hint::black_box(p));
            Ok(())
        })?;
        let mut buf = [0u8; 8];
        let bp = per_call(iters, |i| {
            let src = base.wrapping_add(usize::try_from(at(i))?);
            // SAFETY: as above.
            unsafe {
                std::ptr::copy_nonoverlapping(std::hint::black_box(src), buf.as_mut_ptr(), 8)
            };
            std::hint::black_box(&buf);
            Ok(())
        })?;
        rows.push(Row {
            bar: "small",
            what: format!("pin + unpin of one page, {runs} runs, vs memcpy of 8 B"),
            value: gp,
            baseline: bp,
            unit: "ns",
            ratio: gp / bp,
            limit: "recorded",
            pass: true,
        });
    }
    Ok(rows)
}

/// Runs P1–P5 and P12 at the given file size (the bars are defined at 1 GiB), P2's floor,
/// then the residency syscalls' costs and the small-access figures.
pub fn run_core(size: u64) -> R<Vec<Row>> {
    // `GMEM_BENCH_ONLY=P1,P12,floor,residency,small` runs only those parts.
    let only = std::env::var("GMEM_BENCH_ONLY").ok();
    let on = |bar: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|b| b.trim().eq_ignore_ascii_case(bar)))
    };
    let mut rows = Vec::new();
    if on("P1") {
        rows.extend(p1(size, 5)?);
    }
    if on("P2") {
        rows.extend(p2(size)?);
    }
    if on("floor") {
        rows.extend(p2_floor(size)?);
    }
    if on("P3") {
        rows.extend(p3()?);
    }
    if on("P4") {
        rows.extend(p4(size.min(256 << 20))?);
    }
    if on("P5") {
        rows.extend(p5()?);
    }
    if on("P12") {
        rows.extend(p12(size)?);
    }
    if on("residency") {
        rows.extend(residency(size)?);
    }
    if on("small") {
        rows.extend(small_access()?);
    }
    Ok(rows)
}

/// Formats rows as a Markdown table.
pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from("| bar | what | gmem | baseline | ratio | bar limit | met |\n|---|---|---|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.2} {} | {:.2} {} | {:.2}× | {} | {} |\n",
            r.bar,
            r.what,
            r.value,
            r.unit,
            r.baseline,
            r.unit,
            r.ratio,
            r.limit,
            if r.pass { "yes" } else { "**no**" }
        ));
    }
    s
}
