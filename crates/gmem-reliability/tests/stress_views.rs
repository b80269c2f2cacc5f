//! R2 extended: every host view, the owner's and a follower's in another process, touched
//! through the probe while the file converts, splits, merges, is punched and poisoned, never
//! reads a private byte.
//!
//! The witness: a converter writes the marker byte [`PRIVATE`] over its pages through the
//! guest view only once they are private, and writes the shared pattern back before it
//! converts them to shared; nobody else ever writes [`PRIVATE`]. So any successful host read
//! that returns [`PRIVATE`] read a page while it was private (or a page's private bytes after
//! it became shared, which the pattern rules out).
//!
//! In the owner, while two converters convert, each over its half of the file (on HugeTLB a
//! huge page each: every partial conversion splits it, every return to uniform merges it;
//! now and then a converter makes its whole half private, a hole, which its conversions back
//! to shared then split with the rest of its pieces private), a puncher punches, a poisoner
//! poisons, and a writer writes shared pages:
//!
//! - probers read random bytes through a view of the whole file and a view of its second
//!   half;
//! - a view churner maps a new view (of a random block-aligned range), probes every page of
//!   it at once and drops it (view creation under conversions);
//! - a device prober pins a page and probes the device view around it ([`gmem::Pin::as_ptr`]);
//! - a reader and a pinner use the checked accessors.
//!
//! In a follower, a real child process attached with [`GuestMemfd::attach`] over
//! [`GuestMemfd::share_with_process`], the same probers, view churner and accessors run on
//! its own views; it reports what it saw when the owner says stop. A watchdog aborts a run
//! that does not finish in time (a deadlock). Run on shmem, HugeTLB (2 MiB, when a page can
//! be reserved) and the kernel guest_memfd (when `/dev/kvm` opens).
//!
//! `GMEM_STRESS_SECS` sets the run time per backing (default 6 s).
#![allow(clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use gmem::{AccessError, Attr, Errno, Flags, GuestMemfd, HostView};
use gmem_conformance::child::{child_side, ChildProcess, ChildSide};
use gmem_conformance::probe::{self, Touch};
use gmem_conformance::stop::watchdog;
use gmem_reliability::board::{puncher, Board};
use gmem_reliability::rng::Rng;

const PAGE: u64 = 4096;
/// Two 2 MiB huge pages on HugeTLB, one per converter.
const PAGES: u64 = 1024;
const SIZE: u64 = PAGES * PAGE;
/// Written only into private pages.
const PRIVATE: u8 = 0xEE;

fn secs() -> u64 {
    std::env::var("GMEM_STRESS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
}

/// A shared-pattern byte: never [`PRIVATE`].
fn shared_byte(r: &mut Rng) -> u8 {
    match r.byte() {
        PRIVATE => 0x11,
        b => b,
    }
}

/// Reads byte `at` of `view` with the probe; a [`PRIVATE`] read is a violation.
fn probe_at(view: &HostView, at: u64, b: &Board, who: &str) -> Touch {
    // SAFETY: the callers pass offsets inside the live view.
    let t = unsafe { probe::read(view.as_ptr().wrapping_add(at as usize)) };
    if t == Touch::Ok(PRIVATE) {
        b.violate(format!(
            "{who}: host view (file offset {:#x}) read a private byte",
            view.offset() + at
        ));
    }
    t
}

fn prober(view: &HostView, b: &Board, me: usize, seed: u64) {
    let mut r = Rng::new(seed);
    let len = view.len() as u64;
    while !b.stopped() {
        b.tick(me);
        // Page boundaries and random bytes.
        let at = if r.chance(1, 2) {
            r.below(len / PAGE) * PAGE + [0, PAGE - 1][r.index(2)]
        } else {
            r.below(len)
        };
        probe_at(view, at, b, b.name(me));
    }
}

/// Maps a new view of a random block-aligned range, probes every page of it, drops it.
/// `limit` bounds how many views it makes (sealed views are never unmapped).
fn churner(mem: &GuestMemfd, b: &Board, me: usize, seed: u64, limit: u64) {
    let mut r = Rng::new(seed);
    let block = mem.block_size();
    let blocks = SIZE / block;
    let mut made = 0;
    while !b.stopped() {
        b.tick(me);
        if made >= limit {
            thread::sleep(Duration::from_millis(1));
            continue;
        }
        let first = r.below(blocks);
        let n = r.range(1, blocks - first);
        let view = match mem.map(first * block, n * block) {
            Ok(v) => v,
            Err(e) => {
                b.violate(format!("{}: map failed: {e}", b.name(me)));
                return;
            }
        };
        made += 1;
        for p in 0..n * block / PAGE {
            probe_at(&view, p * PAGE + r.below(PAGE), b, b.name(me));
        }
    }
}

/// Pins a shared page and probes the device view around it.
fn device_prober(mem: &GuestMemfd, b: &Board, me: usize, seed: u64) {
    let mut r = Rng::new(seed);
    while !b.stopped() {
        b.tick(me);
        let page = r.below(PAGES);
        let Ok(pin) = mem.pin(page * PAGE, PAGE) else {
            continue;
        };
        let Ok(base) = pin.as_ptr() else {
            b.violate(format!("{}: no device pointer", b.name(me)));
            return;
        };
        for _ in 0..16 {
            let at = r.below(SIZE) as i64 - (page * PAGE) as i64;
            let p = base.wrapping_offset(at as isize);
            // SAFETY: `p` lies inside the device view, which maps the whole file.
            let t = unsafe { probe::read(p) };
            if t == Touch::Ok(PRIVATE) {
                b.violate(format!(
                    "{}: the device view read a private byte at file offset {:#x}",
                    b.name(me),
                    (page * PAGE) as i64 + at
                ));
            }
        }
        drop(pin);
    }
}

fn reader(mem: &GuestMemfd, b: &Board, me: usize, seed: u64) {
    let mut r = Rng::new(seed);
    let mut buf = vec![0u8; 3 * PAGE as usize];
    while !b.stopped() {
        b.tick(me);
        let off = r.below(SIZE);
        let len = r.range(1, (3 * PAGE).min(SIZE - off)) as usize;
        match mem.read_at(off, &mut buf[..len]) {
            Ok(()) => {
                if let Some(i) = buf[..len].iter().position(|&x| x == PRIVATE) {
                    b.violate(format!(
                        "{}: read_at returned a private byte at {:#x}",
                        b.name(me),
                        off + i as u64
                    ));
                }
            }
            Err(AccessError::Private { .. } | AccessError::Poisoned { .. }) => {}
            Err(e) => b.violate(format!("{}: read_at: {e}", b.name(me))),
        }
    }
}

fn pinner(mem: &GuestMemfd, b: &Board, me: usize, seed: u64) {
    let mut r = Rng::new(seed);
    let mut buf = vec![0u8; 3 * PAGE as usize];
    while !b.stopped() {
        b.tick(me);
        let off = r.below(SIZE);
        let len = r.range(1, (3 * PAGE).min(SIZE - off)) as usize;
        let Ok(pin) = mem.pin(off, len as u64) else {
            continue;
        };
        match pin.read(0, &mut buf[..len]) {
            Ok(()) => {
                if let Some(i) = buf[..len].iter().position(|&x| x == PRIVATE) {
                    b.violate(format!(
                        "{}: a pinned read saw a private byte at {:#x}",
                        b.name(me),
                        off + i as u64
                    ));
                }
            }
            Err(AccessError::Poisoned { .. }) => {}
            Err(e) => b.violate(format!("{}: Pin::read: {e}", b.name(me))),
        }
        thread::yield_now();
    }
}

fn writer(mem: &GuestMemfd, b: &Board, me: usize, seed: u64) {
    let mut r = Rng::new(seed);
    while !b.stopped() {
        b.tick(me);
        let off = r.below(SIZE);
        let len = r.range(1, (3 * PAGE).min(SIZE - off)) as usize;
        let data = vec![shared_byte(&mut r); len];
        let _ = mem.write_at(off, &data);
    }
}

/// Writes `byte` over pages `[first, first + n)` through the guest view, page by page (a
/// poisoned page refuses and keeps what it had: no host path reaches it).
fn guest_fill(mem: &GuestMemfd, first: u64, n: u64, byte: u8, b: &Board) {
    let guest = mem.guest().expect("guest view");
    let page = vec![byte; PAGE as usize];
    for p in first..first + n {
        match guest.write(p * PAGE, &page) {
            Ok(()) | Err(AccessError::Poisoned { .. }) => {}
            Err(e) => b.violate(format!("guest write of page {p}: {e}")),
        }
    }
}

/// Converts pages of `[lo, hi)` back and forth (module docs); returns what it set.
fn converter(mem: &GuestMemfd, b: &Board, me: usize, lo: u64, hi: u64, seed: u64) -> Vec<Attr> {
    let mut r = Rng::new(seed);
    let mut attrs = vec![Attr::Shared; (hi - lo) as usize];
    while !b.stopped() {
        b.tick(me);
        let privates: Vec<u64> = (lo..hi)
            .filter(|&p| attrs[(p - lo) as usize] == Attr::Private)
            .collect();
        if privates.len() < 48 && r.chance(1, 24) {
            // All of its pages (on HugeTLB a whole huge page: a hole in every view, which
            // the conversions back to shared then split with every other piece private).
            match mem.convert(lo * PAGE, (hi - lo) * PAGE, Attr::Private) {
                Ok(()) => {
                    guest_fill(mem, lo, hi - lo, PRIVATE, b);
                    attrs.fill(Attr::Private);
                }
                Err(gmem::ConvertError::Busy { .. }) => {}
                Err(e) => b.violate(format!("convert to private failed: {e}")),
            }
        } else if privates.is_empty() || (privates.len() < 48 && r.chance(1, 2)) {
            let start = r.range(lo, hi - 1);
            let n = r.range(1, (hi - start).min(12));
            match mem.convert(start * PAGE, n * PAGE, Attr::Private) {
                Ok(()) => {
                    guest_fill(mem, start, n, PRIVATE, b);
                    let span = (start - lo) as usize..(start - lo + n) as usize;
                    attrs[span].fill(Attr::Private);
                }
                Err(gmem::ConvertError::Busy { .. }) => {}
                Err(e) => b.violate(format!("convert to private failed: {e}")),
            }
        } else {
            let first = privates[r.index(privates.len())];
            let mut end = first + 1;
            while end < hi && end - first < 12 && attrs[(end - lo) as usize] == Attr::Private {
                end += 1;
            }
            let n = r.range(1, end - first);
            guest_fill(mem, first, n, shared_byte(&mut r), b);
            if let Err(e) = mem.convert(first * PAGE, n * PAGE, Attr::Shared) {
                b.violate(format!("convert to shared failed: {e}"));
            }
            attrs[(first - lo) as usize..(first - lo + n) as usize].fill(Attr::Shared);
        }
    }
    attrs
}

fn poisoner(mem: &GuestMemfd, b: &Board, me: usize, seed: u64) {
    let mut r = Rng::new(seed);
    while !b.stopped() {
        b.tick(me);
        let p = r.below(PAGES);
        match mem.inject_poison(p * PAGE) {
            Ok(()) => {}
            // HugeTLB: the split the poison needs is refused while a follower holds a page
            // of the huge page, or the piece limit is reached.
            Err(e) if e.errno() == libc::EBUSY => {}
            Err(e) => b.violate(format!("poison of page {p} failed: {e}")),
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// How many views a churner makes: unbounded unless the views are sealed (kernel
/// guest_memfd: a sealed view stays mapped until the process exits).
fn churn_limit(mem: &GuestMemfd) -> u64 {
    match mem.backing_kind() {
        gmem::BackingKind::KernelGuestMemfd => 64,
        _ => u64::MAX,
    }
}

/// A second view: of the second half of the file, or of all of it again where a half is not
/// a whole number of blocks (HugeTLB).
fn second_view(mem: &GuestMemfd) -> HostView {
    let at = if mem.block_size() > SIZE / 2 {
        0
    } else {
        SIZE / 2
    };
    mem.map(at, SIZE - at).expect("second view")
}

/// The follower's side, in the child process.
fn follower(mut side: ChildSide) {
    let mem = GuestMemfd::attach(side.peer).expect("attach");
    let whole = mem.map(0, SIZE).expect("follower view");
    let half = second_view(&mem);
    let names = [
        "follower prober",
        "follower half prober",
        "follower churner",
        "follower device prober",
        "follower reader",
        "follower pinner",
    ];
    let b = Board::new(&names);
    let limit = churn_limit(&mem);
    side.ctl.send("ready");
    thread::scope(|s| {
        s.spawn(|| prober(&whole, &b, 0, 101));
        s.spawn(|| prober(&half, &b, 1, 102));
        s.spawn(|| churner(&mem, &b, 2, 103, limit));
        s.spawn(|| device_prober(&mem, &b, 3, 104));
        s.spawn(|| reader(&mem, &b, 4, 105));
        s.spawn(|| pinner(&mem, &b, 5, 106));
        // Until the owner says stop (a violation stops this side's threads at once; the
        // owner hears of it then).
        loop {
            match side.ctl.try_recv() {
                Ok(l) if l == "stop" => break,
                Ok(_) => {}
                Err(e) => {
                    b.violate(format!("control channel: {e}"));
                    break;
                }
            }
        }
        b.stop();
    });
    let counts: Vec<String> = b.counts().iter().map(|c| c.to_string()).collect();
    let verdict = b.take_violation().unwrap_or_else(|| "clean".to_string());
    side.ctl
        .send(&format!("done {} {}", counts.join(","), verdict));
}

/// The owner's side: the whole run, with a follower in `test` (a child process).
fn stress(mem: GuestMemfd, test: &str) {
    let secs = secs();
    let done = Arc::new(AtomicBool::new(false));
    let dog = watchdog(Duration::from_secs(secs + 90), done.clone());
    let mut child = ChildProcess::spawn(test, "follower", mem.share_with_process().expect("share"));
    assert_eq!(child.recv(), "ready");
    let whole = mem.map(0, SIZE).expect("map");
    let half = second_view(&mem);
    let names = [
        "converter 0",
        "converter 1",
        "puncher",
        "poisoner",
        "writer",
        "prober",
        "half prober",
        "churner",
        "device prober",
        "reader",
        "pinner",
    ];
    let b = Board::new(&names);
    let limit = churn_limit(&mem);
    let t0 = Instant::now();
    let (a0, a1) = thread::scope(|s| {
        let c0 = s.spawn(|| converter(&mem, &b, 0, 0, PAGES / 2, 1));
        let c1 = s.spawn(|| converter(&mem, &b, 1, PAGES / 2, PAGES, 2));
        s.spawn(|| puncher(&mem, &b, 2, 3, PAGES, Duration::from_micros(500)));
        s.spawn(|| poisoner(&mem, &b, 3, 4));
        s.spawn(|| writer(&mem, &b, 4, 5));
        s.spawn(|| prober(&whole, &b, 5, 6));
        s.spawn(|| prober(&half, &b, 6, 7));
        s.spawn(|| churner(&mem, &b, 7, 8, limit));
        s.spawn(|| device_prober(&mem, &b, 8, 9));
        s.spawn(|| reader(&mem, &b, 9, 10));
        s.spawn(|| pinner(&mem, &b, 10, 11));
        while t0.elapsed() < Duration::from_secs(secs) && !b.stopped() {
            thread::sleep(Duration::from_millis(100));
            child.send("tick");
        }
        b.stop();
        (
            c0.join().expect("converter 0"),
            c1.join().expect("converter 1"),
        )
    });
    child.send("stop");
    let report = child.recv();
    done.store(true, Ordering::SeqCst);
    dog.join().expect("watchdog");
    let out = child.finish();
    let counts = b.counts();
    for (n, c) in names.iter().zip(&counts) {
        eprintln!("{n}: {c} iterations");
    }
    eprintln!("follower: {report}");
    if let Some(v) = b.take_violation() {
        panic!("violation in the owner: {v}");
    }
    let rest = report
        .strip_prefix("done ")
        .unwrap_or_else(|| panic!("bad report {report:?}: {out}"));
    let (fcounts, verdict) = rest.split_once(' ').expect("counts and verdict");
    assert_eq!(verdict, "clean", "violation in the follower; {out}");
    for (n, c) in names.iter().zip(&counts) {
        assert!(*c > 0, "{n} never ran");
    }
    for c in fcounts.split(',') {
        assert!(
            c.parse::<u64>().expect("count") > 0,
            "a follower thread never ran: {report}"
        );
    }
    // Final state: attributes are the converters', private pages fault in both views of
    // the owner, shared pages hold no private byte.
    let model: Vec<Attr> = a0.into_iter().chain(a1).collect();
    let guest = mem.guest().expect("guest view");
    let mut page = vec![0u8; PAGE as usize];
    for (p, want) in model.iter().enumerate() {
        let off = p as u64 * PAGE;
        assert_eq!(mem.attr(off).expect("attr"), *want, "page {p}");
        let t = probe_at(&whole, off, &b, "final");
        match want {
            Attr::Private => assert!(t.is_fault(), "private page {p} reachable: {t:?}"),
            Attr::Shared if !mem.is_poisoned(off).expect("poison record") => {
                guest.read(off, &mut page).expect("guest read");
                assert!(
                    !page.contains(&PRIVATE),
                    "shared page {p} holds a private byte"
                );
                assert_eq!(t, Touch::Ok(page[0]), "shared page {p}");
            }
            Attr::Shared => assert!(t.is_fault(), "poisoned page {p} reachable: {t:?}"),
        }
    }
    assert!(b.take_violation().is_none());
    // No reference is left.
    mem.convert(0, SIZE, Attr::Private)
        .expect("no reference left");
    mem.convert(0, SIZE, Attr::Shared).expect("back to shared");
}

/// Runs the child's side when this process is the follower; false otherwise.
fn as_child() -> bool {
    match child_side() {
        Some(side) => {
            follower(side);
            true
        }
        None => false,
    }
}

#[test]
fn stress_views_never_show_private_bytes_shmem() {
    if as_child() {
        return;
    }
    let mem = GuestMemfd::create(SIZE, Flags::MMAP | Flags::INIT_SHARED).expect("create");
    stress(mem, "stress_views_never_show_private_bytes_shmem");
}

#[test]
fn stress_views_never_show_private_bytes_hugetlb() {
    if as_child() {
        return;
    }
    let _pool = match gmem::PoolGuard::grow(gmem::HUGE_2M, SIZE / gmem::HUGE_2M) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("skipped: cannot reserve two 2 MiB huge pages: {e}");
            return;
        }
    };
    let mem = GuestMemfd::builder(SIZE)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(gmem::BackingChoice::HugeTlb(gmem::HUGE_2M))
        .create()
        .expect("create on HugeTLB");
    stress(mem, "stress_views_never_show_private_bytes_hugetlb");
}

#[test]
fn stress_views_never_show_private_bytes_kernel_guest_memfd() {
    if as_child() {
        return;
    }
    let vm = match gmem_kvm::Vm::new() {
        Ok(vm) => vm,
        Err(gmem_kvm::VmError::Open { errno }) => {
            eprintln!("skipped: /dev/kvm cannot be opened (errno {errno})");
            return;
        }
        Err(e) => panic!("KVM is there but the VM cannot be set up: {e}"),
    };
    let mem = vm
        .create_guest_memfd(SIZE, Flags::MMAP | Flags::INIT_SHARED)
        .expect("KVM_CREATE_GUEST_MEMFD");
    stress(
        mem,
        "stress_views_never_show_private_bytes_kernel_guest_memfd",
    );
}
