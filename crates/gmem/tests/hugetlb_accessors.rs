//! The checked accessors never fault on HugeTLB, with the pool reserved exactly.
//!
//! A punch-hole through the kernel would hand a huge page and its reservation back to the
//! pool until gmem reserved the range again, and splits and merges restructure huge pages
//! under the accessors. With no spare huge page in the pool, any other user of the pool could
//! take a page in that gap: the reservation then fails (`ENOMEM` from the punch) and the next
//! accessor to touch the page dies of `SIGBUS` (gmem zeroes punched huge pages in place
//! instead, see `engine::punch`). Here one thread punches, allocates, converts (splitting and
//! merging) and poisons while others loop on `read_at`, `write_at`, the guest view and pins
//! over ranges that cross huge pages, and a *thief* keeps trying to create a HugeTLB file of
//! one huge page, which it must never get. The only errors allowed are those that name a
//! private page (`EFAULT`) or a poisoned one (`EHWPOISON`), and `EAGAIN` for a conversion to
//! private of a pinned page; every punch and allocation must succeed; at the end, and right
//! after each punch-hole of a file nothing touches, the file holds its whole reservation and
//! the pool has not a page more or less.
//!
//! The conformance probe's fault handler is installed first, so a `SIGBUS` anywhere in the
//! process names the faulting address and instruction before the process dies.
//! `GMEM_STRESS_SECS` sets the run time per page size (default 3 s).
#![allow(clippy::cast_possible_truncation)]

mod hugepool;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use gmem::{
    AccessError, Attr, BackingChoice, ConvertError, Errno, FallocMode, Flags, GuestMemfd,
    PoisonError, HUGE_1G, HUGE_2M,
};

const P: u64 = 4096;

fn secs() -> u64 {
    std::env::var("GMEM_STRESS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Run {
    stop: AtomicBool,
    failure: Mutex<Option<String>>,
}

impl Run {
    fn fail(&self, what: String) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(what);
        }
        self.stop.store(true, Ordering::SeqCst);
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// An accessor error is allowed only when it names a private or poisoned page.
fn allowed(e: &AccessError) -> bool {
    matches!(
        e,
        AccessError::Private { .. } | AccessError::Poisoned { .. }
    )
}

/// A range of up to three huge pages' worth of bytes anywhere in the file (any alignment).
fn range(r: &mut Rng, size: u64, max: u64) -> (u64, usize) {
    let off = r.below(size);
    let len = 1 + r.below(max.min(size - off));
    (off, len as usize)
}

fn accessor(mem: &GuestMemfd, run: &Run, seed: u64, done: &AtomicU64) {
    let mut r = Rng(seed);
    let size = mem.size();
    let max = (3 * mem.block_size()).min(8 << 20);
    let mut buf = vec![0u8; max as usize];
    let guest = mem.guest().expect("guest view");
    while !run.stopped() {
        let (off, len) = range(&mut r, size, max);
        let b = &mut buf[..len];
        let (what, res) = match r.below(4) {
            0 => ("read_at", mem.read_at(off, b)),
            1 => ("write_at", mem.write_at(off, b)),
            2 => ("guest read", guest.read(off, b)),
            _ => ("guest write", guest.write(off, b)),
        };
        match res {
            Ok(()) => {}
            Err(AccessError::Poisoned { .. }) => {}
            Err(e) if what.starts_with("guest") => run.fail(format!(
                "{what} {off:#x}+{len:#x}: {e} (errno {})",
                e.errno()
            )),
            Err(e) if allowed(&e) => {}
            Err(e) => run.fail(format!(
                "{what} {off:#x}+{len:#x}: {e} (errno {})",
                e.errno()
            )),
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
}

fn pinner(mem: &GuestMemfd, run: &Run, seed: u64, done: &AtomicU64) {
    let mut r = Rng(seed);
    let size = mem.size();
    let mut buf = vec![0u8; 64 << 10];
    while !run.stopped() {
        let (off, len) = range(&mut r, size, buf.len() as u64);
        match mem.pin(off, len as u64) {
            Ok(pin) => {
                // A pinned page stays shared, but memory failure may poison it meanwhile.
                let read = pin.read(0, &mut buf[..len]);
                let write = pin.write(0, &buf[..len]);
                for (what, res) in [("read", read), ("write", write)] {
                    match res {
                        Ok(()) | Err(AccessError::Poisoned { .. }) => {}
                        Err(e) => run.fail(format!("Pin::{what} {off:#x}+{len:#x}: {e}")),
                    }
                }
            }
            Err(e) if allowed(&e) => {}
            Err(e) => run.fail(format!("pin {off:#x}+{len:#x}: {e} (errno {})", e.errno())),
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the mutator did, by kind.
#[derive(Debug, Default)]
struct Done {
    punches: u64,
    allocations: u64,
    splits: u64,
    whole: u64,
    poisons: u64,
    busy: u64,
}

/// Tries to take a huge page from the pool, over and over; counts its successes.
fn thief(page: u64, run: &Run, stolen: &AtomicU64) {
    while !run.stopped() {
        let got = GuestMemfd::builder(page)
            .flags(Flags::MMAP)
            .backing(BackingChoice::HugeTlb(page))
            .create();
        match got {
            Ok(_file) => {
                stolen.fetch_add(1, Ordering::Relaxed);
                run.fail("another file got a huge page of the exactly reserved pool".into());
            }
            Err(e) if e.errno() == libc::ENOMEM => {}
            Err(e) => run.fail(format!("thief: {e}")),
        }
    }
}

/// How long the mutator may run past its time to have punched and split at least once.
const GRACE: Duration = Duration::from_secs(60);

fn mutator(mem: &GuestMemfd, run: &Run, seed: u64, until: Instant) -> Done {
    let mut r = Rng(seed);
    let hp = mem.block_size();
    let n = mem.size() / hp;
    let mut d = Done::default();
    let convert = |off: u64, len: u64, to: Attr, d: &mut Done| match mem.convert(off, len, to) {
        Ok(()) => {}
        Err(ConvertError::Busy { .. }) if to == Attr::Private => d.busy += 1,
        Err(e) => run.fail(format!("convert {off:#x}+{len:#x} to {to:?}: {e}")),
    };
    // Past `until`, it goes on until it has punched and split at least once (1 GiB pages
    // are slow to allocate and copy): the test checks that both happened, for at most
    // `GRACE` more.
    let grace = until + GRACE;
    let short = |d: &Done| d.punches == 0 || d.splits == 0;
    while !run.stopped() && (Instant::now() < until || (short(&d) && Instant::now() < grace)) {
        let h = r.below(n);
        let at = h * hp;
        match r.below(8) {
            0 | 1 => {
                let k = 1 + r.below(n - h).min(1);
                match mem.fallocate(FallocMode::PUNCH_HOLE, at, k * hp) {
                    Ok(()) => d.punches += 1,
                    Err(e) => run.fail(format!("punch {at:#x}+{:#x}: {e}", k * hp)),
                }
            }
            2 => match mem.fallocate(FallocMode::KEEP_SIZE, at, hp) {
                Ok(()) => d.allocations += 1,
                Err(e) => run.fail(format!("allocate {at:#x}: {e}")),
            },
            3 | 4 => {
                // One 4 KiB page private (a split), then shared again (a merge).
                let p = at + r.below(hp / P) * P;
                convert(p, P, Attr::Private, &mut d);
                convert(p, P, Attr::Shared, &mut d);
                d.splits += 1;
            }
            5 => {
                convert(at, hp, Attr::Private, &mut d);
                convert(at, hp, Attr::Shared, &mut d);
                d.whole += 1;
            }
            6 => {
                let p = at + r.below(hp / P) * P;
                match mem.inject_poison(p) {
                    Ok(()) => d.poisons += 1,
                    // The pinner holds a page of the huge page, which cannot split now.
                    Err(PoisonError::Busy { .. }) => d.busy += 1,
                    Err(e) => run.fail(format!("poison {p:#x}: {e}")),
                }
            }
            _ => {
                // Leave a page private for a while: accessors hit it and get EFAULT.
                let p = at + r.below(hp / P) * P;
                convert(p, P, Attr::Private, &mut d);
                thread::sleep(Duration::from_millis(1));
                convert(p, P, Attr::Shared, &mut d);
            }
        }
    }
    d
}

fn accessors_never_fault(page: u64, pages: u64) {
    // The probe's handler first: a SIGBUS anywhere now names its address and instruction.
    let mark = [0u8; 1];
    // SAFETY: `mark` is a live byte of this frame; the probe only reads it.
    let t = unsafe { gmem_conformance::probe::read(mark.as_ptr()) };
    assert_eq!(t, gmem_conformance::probe::Touch::Ok(0));
    let Some(_pool) = hugepool::pool(page, pages) else {
        return;
    };
    let mem = GuestMemfd::builder(pages * page)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(BackingChoice::HugeTlb(page))
        .create()
        .expect("create");
    // Whatever else the pool has free is reserved by a second file: not one spare page.
    let spare = hugepool::stats(page).available();
    let _filler = (spare > 0).then(|| {
        GuestMemfd::builder(spare * page)
            .flags(Flags::MMAP | Flags::INIT_SHARED)
            .backing(BackingChoice::HugeTlb(page))
            .create()
            .expect("reserve the spare pages")
    });
    let before = hugepool::stats(page);
    assert_eq!(before.available(), 0, "the pool is reserved exactly");
    let run = Run {
        stop: AtomicBool::new(false),
        failure: Mutex::new(None),
    };
    let counts: Vec<AtomicU64> = (0..4).map(|_| AtomicU64::new(0)).collect();
    let until = Instant::now() + Duration::from_secs(secs());
    let done = thread::scope(|s| {
        s.spawn(|| accessor(&mem, &run, 1, &counts[0]));
        s.spawn(|| accessor(&mem, &run, 2, &counts[1]));
        s.spawn(|| pinner(&mem, &run, 3, &counts[2]));
        s.spawn(|| thief(page, &run, &counts[3]));
        let d = mutator(&mem, &run, 4, until);
        run.stop.store(true, Ordering::SeqCst);
        d
    });
    if let Some(f) = run.failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
        panic!("{f} (after {done:?})");
    }
    let iterations: Vec<u64> = counts[..3]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    assert_eq!(counts[3].load(Ordering::Relaxed), 0, "pages stolen");
    eprintln!(
        "{} KiB pages: {done:?}, accessor iterations {iterations:?}",
        page >> 10
    );
    assert!(
        done.punches > 0 && done.splits > 0,
        "the mutator ran: {done:?}"
    );
    assert!(iterations.iter().all(|&n| n > 0), "{iterations:?}");
    let after = hugepool::stats(page);
    assert_eq!(
        (after.total, after.available()),
        (before.total, 0),
        "the file holds its whole reservation"
    );
    // A punch-hole, with nothing touching the file, leaves the reservation whole at once.
    for h in 0..pages {
        mem.fallocate(FallocMode::PUNCH_HOLE, h * page, page)
            .expect("punch");
        assert_eq!(
            hugepool::stats(page).available(),
            0,
            "huge page {h} punched"
        );
    }
    // Every page still converts and reads (no reference left, nothing lost).
    mem.convert(0, mem.size(), Attr::Private)
        .expect("to private");
    mem.convert(0, mem.size(), Attr::Shared).expect("to shared");
    mem.fallocate(FallocMode::PUNCH_HOLE, 0, mem.size())
        .expect("punch all");
    let mut b = [1u8; 4096];
    mem.read_at(mem.size() - 4096, &mut b).expect("read");
    assert_eq!(b, [0u8; 4096]);
}

#[test]
fn hugetlb_2m_accessors_never_fault_with_the_pool_reserved_exactly() {
    accessors_never_fault(HUGE_2M, 4);
}

#[test]
fn hugetlb_1g_accessors_never_fault_with_the_pool_reserved_exactly() {
    accessors_never_fault(HUGE_1G, 1);
}
