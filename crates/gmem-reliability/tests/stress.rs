//! R2: bounded-time concurrency stress.
//!
//! Threads read, write and pin through the checked accessors (in the owner and in a follower
//! attached in the same process) and probe host views, while converter threads convert and a
//! punch thread punches holes. The witness: a converter writes the byte [`PRIVATE`] over a
//! range through the guest view only after the range has become private, and writes the
//! shared pattern back before converting it to shared; no other thread ever writes
//! [`PRIVATE`]. So any host access that returns a [`PRIVATE`] byte read a page while it was
//! private. A watchdog aborts the process (failing the test) if the run does not finish in
//! time or any thread stops making progress. At the end the attributes must equal the
//! converters' model, no reference may be left, and no shared page may hold [`PRIVATE`].
//!
//! `GMEM_STRESS_SECS` sets the run time (default 6 s).
#![allow(clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use gmem::{Attr, Flags, GuestMemfd, HostView};
use gmem_conformance::probe;
use gmem_reliability::board::{puncher, Board};
use gmem_reliability::rng::Rng;

const PAGE: u64 = 4096;
/// One 2 MiB huge page on HugeTLB.
const PAGES: u64 = 512;
const SIZE: u64 = PAGES * PAGE;
/// Written only into private pages.
const PRIVATE: u8 = 0xEE;

/// A shared-pattern byte: never [`PRIVATE`].
fn shared_byte(r: &mut Rng) -> u8 {
    let b = r.byte();
    if b == PRIVATE {
        0x11
    } else {
        b
    }
}

fn random_range(r: &mut Rng) -> (u64, usize) {
    let off = r.below(SIZE);
    let len = r.range(1, (3 * PAGE).min(SIZE - off));
    (off, len as usize)
}

/// Converter over pages `[lo, hi)`: returns its final view of their attributes.
///
/// To private it takes any range of its pages, partly private or not (a refused conversion
/// over already-private pages must leave them faulting). To shared it takes a run of its
/// private pages and writes the shared pattern over it first.
fn converter(mem: &GuestMemfd, sh: &Board, me: usize, lo: u64, hi: u64, seed: u64) -> Vec<Attr> {
    let mut r = Rng::new(seed);
    let guest = mem.guest().expect("guest view");
    let mut attrs = vec![Attr::Shared; (hi - lo) as usize];
    let mut busy = 0u64;
    while !sh.stopped() {
        sh.tick(me);
        let privates: Vec<u64> = (lo..hi)
            .filter(|&p| attrs[(p - lo) as usize] == Attr::Private)
            .collect();
        if privates.is_empty() || (privates.len() < 48 && r.chance(1, 2)) {
            let start = r.range(lo, hi - 1);
            let n = r.range(1, (hi - start).min(12));
            let span = (start - lo) as usize..(start - lo + n) as usize;
            match mem.convert(start * PAGE, n * PAGE, Attr::Private) {
                Ok(()) => {
                    if let Some(p) =
                        (start..start + n).find(|&p| mem.attr(p * PAGE).ok() != Some(Attr::Private))
                    {
                        sh.violate(format!(
                            "page {p} reads back shared after converting {start}+{n} to private; runs {:?}",
                            mem.runs(lo * PAGE, (hi - lo) * PAGE)
                        ));
                    }
                    let fill = vec![PRIVATE; (n * PAGE) as usize];
                    if let Err(e) = guest.write(start * PAGE, &fill) {
                        sh.violate(format!("guest write failed: {e}"));
                    }
                    attrs[span].fill(Attr::Private);
                }
                Err(gmem::ConvertError::Busy { .. }) => busy += 1,
                Err(e) => sh.violate(format!("convert to private failed: {e}")),
            }
        } else {
            let first = privates[r.index(privates.len())];
            let mut end = first + 1;
            while end < hi && end - first < 12 && attrs[(end - lo) as usize] == Attr::Private {
                end += 1;
            }
            let n = r.range(1, end - first);
            let fill = vec![shared_byte(&mut r); (n * PAGE) as usize];
            if let Err(e) = guest.write(first * PAGE, &fill) {
                sh.violate(format!("guest write failed: {e}"));
            }
            if let Err(e) = mem.convert(first * PAGE, n * PAGE, Attr::Shared) {
                sh.violate(format!("convert to shared failed: {e}"));
            }
            attrs[(first - lo) as usize..(first - lo + n) as usize].fill(Attr::Shared);
        }
        // The converter's pages read back as it set them (nobody else converts them).
        if let Some(p) =
            (lo..hi).find(|&p| mem.attr(p * PAGE).ok() != Some(attrs[(p - lo) as usize]))
        {
            sh.violate(format!(
                "page {p} reads back {:?}, converter set {:?}; runs {:?}",
                mem.attr(p * PAGE),
                attrs[(p - lo) as usize],
                mem.runs(lo * PAGE, (hi - lo) * PAGE)
            ));
        }
    }
    eprintln!("converter {me}: {busy} conversions refused as busy");
    attrs
}

fn reader(mem: &GuestMemfd, sh: &Board, me: usize, seed: u64, name: &str) {
    let mut r = Rng::new(seed);
    let mut buf = vec![0u8; 3 * PAGE as usize];
    while !sh.stopped() {
        sh.tick(me);
        let (off, len) = random_range(&mut r);
        if mem.read_at(off, &mut buf[..len]).is_ok() {
            if let Some(i) = buf[..len].iter().position(|&b| b == PRIVATE) {
                sh.violate(format!(
                    "{name}: read_at returned a private byte at {:#x}",
                    off + i as u64
                ));
            }
        }
    }
}

fn writer(mem: &GuestMemfd, sh: &Board, me: usize, seed: u64) {
    let mut r = Rng::new(seed);
    while !sh.stopped() {
        sh.tick(me);
        let (off, len) = random_range(&mut r);
        let data = vec![shared_byte(&mut r); len];
        let _ = mem.write_at(off, &data);
    }
}

fn pinner(mem: &GuestMemfd, sh: &Board, me: usize, seed: u64, name: &str) {
    let mut r = Rng::new(seed);
    let mut buf = vec![0u8; 3 * PAGE as usize];
    while !sh.stopped() {
        sh.tick(me);
        let (off, len) = random_range(&mut r);
        let Ok(pin) = mem.pin(off, len as u64) else {
            continue;
        };
        for _ in 0..r.range(1, 4) {
            if pin.read(0, &mut buf[..len]).is_err() {
                sh.violate(format!("{name}: Pin::read failed"));
            }
            if let Some(i) = buf[..len].iter().position(|&b| b == PRIVATE) {
                sh.violate(format!(
                    "{name}: pinned read saw a private byte at {:#x}",
                    off + i as u64
                ));
            }
            let data = vec![shared_byte(&mut r); len];
            if pin.write(0, &data).is_err() {
                sh.violate(format!("{name}: Pin::write failed"));
            }
            thread::yield_now();
        }
    }
}

fn prober(view: &HostView, sh: &Board, me: usize, seed: u64, name: &str) {
    let mut r = Rng::new(seed);
    while !sh.stopped() {
        sh.tick(me);
        let at = r.below(SIZE);
        // SAFETY: `at` lies inside the view.
        let got = unsafe { probe::read(view.as_ptr().wrapping_add(at as usize)) };
        if got == probe::Touch::Ok(PRIVATE) {
            sh.violate(format!("{name}: host view read a private byte at {at:#x}"));
        }
    }
}

#[test]
fn stress_accessors_never_see_private_pages() {
    let mem = GuestMemfd::create(SIZE, Flags::MMAP | Flags::INIT_SHARED).expect("create");
    stress(mem);
}

/// The same on HugeTLB: every conversion of part of the huge page splits it, every return to
/// uniform merges it, while the accessors and pins run.
#[test]
fn stress_accessors_never_see_private_pages_hugetlb() {
    let _pool = match gmem::PoolGuard::grow(gmem::HUGE_2M, 1) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("skipped: cannot reserve a 2 MiB huge page: {e}");
            return;
        }
    };
    let mem = GuestMemfd::builder(SIZE)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(gmem::BackingChoice::HugeTlb(gmem::HUGE_2M))
        .create()
        .expect("create on HugeTLB");
    stress(mem);
}

fn stress(mem: GuestMemfd) {
    let secs = std::env::var("GMEM_STRESS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6u64);
    let follower = GuestMemfd::attach(mem.share_with_process().expect("share")).expect("attach");
    let view = mem.map(0, SIZE).expect("map");
    let fview = follower.map(0, SIZE).expect("follower map");
    let names = [
        "converter 0",
        "converter 1",
        "reader",
        "follower reader",
        "writer",
        "pinner",
        "follower pinner",
        "prober",
        "follower prober",
        "puncher",
    ];
    let sh = Board::new(&names);
    let done = Arc::new(AtomicBool::new(false));
    let limit = Duration::from_secs(secs + 60);
    let watchdog = {
        let (sh, done) = (sh.clone(), done.clone());
        thread::spawn(move || {
            let t0 = Instant::now();
            let mut last = sh.counts();
            let mut since = Instant::now();
            while !done.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(100));
                let now = sh.counts();
                let running = !sh.stopped();
                if now.iter().zip(&last).all(|(a, b)| a != b) || !running {
                    since = Instant::now();
                    last = now;
                } else if since.elapsed() > Duration::from_secs(20) {
                    let stuck: Vec<&str> = sh
                        .names()
                        .iter()
                        .zip(now.iter().zip(&last))
                        .filter(|(_, (a, b))| a == b)
                        .map(|(n, _)| *n)
                        .collect();
                    eprintln!("watchdog: no progress for 20 s in {stuck:?}: deadlock");
                    std::process::abort();
                }
                if t0.elapsed() > limit {
                    eprintln!("watchdog: the run did not finish within {limit:?}: deadlock");
                    std::process::abort();
                }
            }
        })
    };
    let t0 = Instant::now();
    let (attrs0, attrs1) = thread::scope(|s| {
        let c0 = s.spawn(|| converter(&mem, &sh, 0, 0, PAGES / 2, 1));
        let c1 = s.spawn(|| converter(&mem, &sh, 1, PAGES / 2, PAGES, 2));
        s.spawn(|| reader(&mem, &sh, 2, 3, "reader"));
        s.spawn(|| reader(&follower, &sh, 3, 4, "follower reader"));
        s.spawn(|| writer(&mem, &sh, 4, 5));
        s.spawn(|| pinner(&mem, &sh, 5, 6, "pinner"));
        s.spawn(|| pinner(&follower, &sh, 6, 7, "follower pinner"));
        s.spawn(|| prober(&view, &sh, 7, 8, "prober"));
        s.spawn(|| prober(&fview, &sh, 8, 9, "follower prober"));
        s.spawn(|| puncher(&mem, &sh, 9, 10, PAGES, Duration::from_micros(200)));
        while t0.elapsed() < Duration::from_secs(secs) && !sh.stopped() {
            thread::sleep(Duration::from_millis(50));
        }
        sh.stop();
        let a0 = c0.join().expect("converter 0 panicked");
        let a1 = c1.join().expect("converter 1 panicked");
        (a0, a1)
    });
    done.store(true, Ordering::SeqCst);
    watchdog.join().expect("watchdog");
    let counts = sh.counts();
    for (name, n) in sh.names().iter().zip(&counts) {
        eprintln!("{name}: {n} iterations");
    }
    if let Some(v) = sh.take_violation() {
        panic!("violation: {v}");
    }
    for (name, n) in sh.names().iter().zip(&counts) {
        assert!(*n > 0, "{name} never ran");
    }

    // Final state: attributes equal the converters' model, in the owner and the follower.
    let model: Vec<Attr> = attrs0.into_iter().chain(attrs1).collect();
    for (p, want) in model.iter().enumerate() {
        let off = p as u64 * PAGE;
        assert_eq!(mem.attr(off).expect("attr"), *want, "page {p}");
        assert_eq!(
            follower.attr(off).expect("attr"),
            *want,
            "follower page {p}"
        );
    }
    // No shared page holds the private witness; private pages fault in both views.
    let guest = mem.guest().expect("guest view");
    let mut page = vec![0u8; PAGE as usize];
    for (p, want) in model.iter().enumerate() {
        let off = p as u64 * PAGE;
        guest.read(off, &mut page).expect("guest read");
        // SAFETY: inside the owner's view.
        let a = unsafe { probe::read(view.as_ptr().wrapping_add(off as usize)) };
        // SAFETY: inside the follower's view.
        let b = unsafe { probe::read(fview.as_ptr().wrapping_add(off as usize)) };
        match want {
            Attr::Shared => {
                assert!(
                    !page.contains(&PRIVATE),
                    "shared page {p} holds the private witness"
                );
                assert_eq!(a, probe::Touch::Ok(page[0]), "page {p} in the owner's view");
                assert_eq!(
                    b,
                    probe::Touch::Ok(page[0]),
                    "page {p} in the follower's view"
                );
            }
            Attr::Private => {
                assert!(
                    a.is_fault() && b.is_fault(),
                    "private page {p} reachable: {a:?} {b:?}"
                );
            }
        }
    }
    // No reference is left: the whole file converts to private and back.
    mem.convert(0, SIZE, Attr::Private)
        .expect("no reference left");
    mem.convert(0, SIZE, Attr::Shared).expect("back to shared");
    assert_eq!(mem.run_count().expect("run count"), 1);
}
