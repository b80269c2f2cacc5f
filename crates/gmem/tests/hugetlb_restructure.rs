//! Restructuring HugeTLB memory: split of mixed huge pages, merge when whole and free,
//! punch-hole while split, pins, and pieces that outlive the file.
// Sizes here are small multiples of pages on a 64-bit host: casts to usize and u8 are exact.
#![allow(clippy::cast_possible_truncation)]

mod hugepool;

use gmem::Errno;
use gmem::{Attr, BackingChoice, ConvertError, FallocMode, Flags, GuestMemfd, HUGE_2M};
use hugepool::{pattern, pool, stats, touch, Touch};

const M2: u64 = HUGE_2M;
const P: u64 = 4096;

fn huge(pages: u64) -> GuestMemfd {
    let mem = GuestMemfd::builder(pages * M2)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(BackingChoice::HugeTlb(M2))
        .create()
        .expect("create");
    mem.write_at(0, &pattern(0, (pages * M2) as usize))
        .expect("fill");
    mem
}

fn guest_bytes(mem: &GuestMemfd, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    mem.guest()
        .expect("guest view")
        .read(off, &mut b)
        .expect("guest read");
    b
}

/// Checks, page by page over `[0, len)`, that the view faults exactly on private pages and
/// shows the pattern on shared ones.
fn check_view(mem: &GuestMemfd, view: &gmem::HostView, len: u64) {
    for page in 0..len / P {
        let off = page * P + 17;
        let t = touch(view.as_ptr().wrapping_add(off as usize));
        match mem.attr(off).expect("attr") {
            Attr::Private => assert!(
                gmem_conformance::touch::faults_as_documented(view, off, t),
                "private page {page} readable: {t:?}"
            ),
            Attr::Shared => assert_eq!(t, Touch::Ok(pattern(off, 1)[0]), "shared page {page}"),
        }
    }
}

#[test]
fn conformance_hugetlb_one_private_page_inside_a_huge_page() {
    let Some(_pool) = pool(M2, 2) else { return };
    let mem = huge(2);
    let view = mem.map(0, 2 * M2).expect("map");
    let acct = mem.hugetlb_accounting().expect("accounting");
    mem.convert(5 * P, P, Attr::Private).expect("convert");
    assert_eq!((acct.split_pages(), acct.splits()), (1, 1));
    assert_eq!(acct.piece_bytes(), M2);
    check_view(&mem, &view, 2 * M2);
    assert_eq!(
        mem.read_at(5 * P, &mut [0u8; 1])
            .expect_err("private")
            .errno(),
        libc::EFAULT
    );
    assert_eq!(
        guest_bytes(&mem, 0, M2 as usize),
        pattern(0, M2 as usize),
        "guest sees all"
    );
    mem.convert(5 * P, P, Attr::Shared).expect("back");
    assert_eq!((acct.split_pages(), acct.merges()), (0, 1));
    check_view(&mem, &view, 2 * M2);
    assert_eq!(
        guest_bytes(&mem, 0, (2 * M2) as usize),
        pattern(0, (2 * M2) as usize)
    );
}

#[test]
fn conformance_hugetlb_every_other_page_private() {
    let Some(_pool) = pool(M2, 2) else { return };
    let mem = huge(2);
    let view = mem.map(0, 2 * M2).expect("map");
    let acct = mem.hugetlb_accounting().expect("accounting");
    for page in (0..M2 / P).step_by(2) {
        mem.convert(page * P, P, Attr::Private).expect("convert");
    }
    assert_eq!(
        mem.run_count().expect("run count"),
        512,
        "256 private runs, the shared ones between"
    );
    assert_eq!(acct.split_pages(), 1);
    check_view(&mem, &view, 2 * M2);
    // A view made while split shows the same.
    let late = mem.map(0, 2 * M2).expect("map while split");
    check_view(&mem, &late, 2 * M2);
    for page in (0..M2 / P).step_by(2) {
        mem.convert(page * P, P, Attr::Shared).expect("back");
    }
    assert_eq!((acct.split_pages(), acct.merges()), (0, 1));
    check_view(&mem, &view, 2 * M2);
    check_view(&mem, &late, 2 * M2);
    assert_eq!(
        guest_bytes(&mem, 0, (2 * M2) as usize),
        pattern(0, (2 * M2) as usize)
    );
}

#[test]
fn conformance_hugetlb_whole_huge_page_converts_without_split() {
    let Some(_pool) = pool(M2, 2) else { return };
    let mem = huge(2);
    let view = mem.map(0, 2 * M2).expect("map");
    let acct = mem.hugetlb_accounting().expect("accounting");
    mem.convert(M2, M2, Attr::Private).expect("whole page");
    assert_eq!(acct.splits(), 0);
    check_view(&mem, &view, 2 * M2);
    // Part of it back, then the rest: split, then merged.
    mem.convert(M2, 64 * P, Attr::Shared).expect("part back");
    assert_eq!(acct.split_pages(), 1);
    check_view(&mem, &view, 2 * M2);
    mem.convert(M2 + 64 * P, M2 - 64 * P, Attr::Shared)
        .expect("rest back");
    assert_eq!(
        (acct.split_pages(), acct.splits(), acct.merges()),
        (0, 1, 1)
    );
    check_view(&mem, &view, 2 * M2);
    assert_eq!(guest_bytes(&mem, M2, M2 as usize), pattern(M2, M2 as usize));
}

#[test]
fn conformance_hugetlb_pin_holds_off_a_split_and_a_merge() {
    let Some(_pool) = pool(M2, 1) else { return };
    let mem = huge(1);
    let view = mem.map(0, M2).expect("map");
    let acct = mem.hugetlb_accounting().expect("accounting");
    let pin = mem.pin(3 * P, P).expect("pin");
    let addr = pin.as_ptr();
    // A pin's pointer may have been handed to the kernel, which would go on reaching the
    // huge page after a split: a conversion that must split the huge page is refused, as
    // the kernel refuses to split a folio with unexpected references, naming the pinned
    // page, and nothing changes.
    for (off, len) in [(7 * P, P), (0, 8 * P), (M2 - P, P)] {
        let err = mem
            .convert(off, len, Attr::Private)
            .expect_err("a split under a pin");
        assert!(
            matches!(err, ConvertError::Busy { offset } if offset == 3 * P),
            "{err:?}"
        );
        assert_eq!(err.errno(), libc::EAGAIN);
    }
    assert_eq!((acct.split_pages(), acct.splits()), (0, 0));
    assert!(!mem.any_private(0, M2).expect("any private"));
    // The whole huge page, pinned page included, stays shared too.
    let err = mem.convert(0, M2, Attr::Private).expect_err("pinned page");
    assert!(
        matches!(err, ConvertError::Busy { offset } if offset == 3 * P),
        "{err:?}"
    );
    let err = mem.inject_poison(9 * P).expect_err("poison needs a split");
    assert_eq!(err.errno(), libc::EBUSY);
    assert_eq!(
        mem.poisoned_pages().expect("poisoned pages"),
        Vec::<u64>::new()
    );
    check_view(&mem, &view, M2);
    drop(pin);
    mem.convert(7 * P, P, Attr::Private)
        .expect("split once unpinned");
    assert_eq!((acct.split_pages(), acct.splits()), (1, 1));
    // A split page can be pinned: its pieces stay where they are while it is held, so a
    // conversion that needs no restructuring goes on, and the merge waits for the pin.
    let pin = mem.pin(3 * P, P).expect("pin a piece");
    assert_eq!(pin.as_ptr(), addr);
    mem.convert(9 * P, P, Attr::Private)
        .expect("no restructuring needed");
    let mut b = [0u8; 16];
    pin.read(0, &mut b).expect("pin read");
    assert_eq!(b.to_vec(), pattern(3 * P, 16));
    pin.write(0, b"after split").expect("pin write");
    assert_eq!(
        touch(view.as_ptr().wrapping_add(3 * P as usize)),
        Touch::Ok(b'a')
    );
    check_view(&mem, &view, 16 * P);
    let err = mem
        .convert(3 * P, P, Attr::Private)
        .expect_err("pinned page");
    assert!(
        matches!(err, ConvertError::Busy { offset } if offset == 3 * P),
        "{err:?}"
    );
    mem.convert(7 * P, P, Attr::Shared).expect("back");
    mem.convert(9 * P, P, Attr::Shared).expect("back");
    assert_eq!((acct.split_pages(), acct.waiting_to_merge()), (1, 1));
    drop(pin);
    assert_eq!(
        (acct.split_pages(), acct.waiting_to_merge(), acct.merges()),
        (0, 0, 1)
    );
    let got = guest_bytes(&mem, 0, M2 as usize);
    assert_eq!(&got[3 * P as usize..3 * P as usize + 11], b"after split");
    assert_eq!(got[..3 * P as usize], pattern(0, 3 * P as usize)[..]);
    assert_eq!(
        got[4 * P as usize..],
        pattern(4 * P, (M2 - 4 * P) as usize)[..]
    );
}

#[test]
fn writers_lose_nothing_while_their_huge_page_splits_and_merges() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let Some(_pool) = pool(M2, 1) else { return };
    let mem = huge(1);
    let view = mem.map(0, M2).expect("map");
    let acct = mem.hugetlb_accounting().expect("accounting");
    let stop = Arc::new(AtomicBool::new(false));
    // Two writers on shared pages of the huge page, one through the guest view and one through
    // the host view, each checking that it reads back what it just wrote.
    let guest_writer = {
        let guest = mem.guest().expect("guest view");
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                guest.write(10 * P, &i.to_le_bytes()).expect("guest write");
                let mut b = [0u8; 8];
                guest.read(10 * P, &mut b).expect("guest read");
                assert_eq!(u64::from_le_bytes(b), i, "a guest write was lost");
                i += 1;
            }
            i
        })
    };
    let base = view.as_ptr() as usize;
    let host_writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let p = (base + 20 * P as usize) as *mut u64;
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                // SAFETY: page 20 of the view stays shared and mapped for the whole test.
                unsafe { std::ptr::write_volatile(p, i) };
                // SAFETY: as above.
                let got = unsafe { std::ptr::read_volatile(p) };
                assert_eq!(got, i, "a host-view write was lost");
                i += 1;
            }
            i
        })
    };
    for round in 0..200u64 {
        let page = 100 + round % 50;
        mem.convert(page * P, P, Attr::Private).expect("split");
        mem.convert(page * P, P, Attr::Shared).expect("merge");
    }
    stop.store(true, Ordering::Release);
    let g = guest_writer.join().expect("guest writer");
    let h = host_writer.join().expect("host writer");
    assert_eq!(
        (acct.splits(), acct.merges(), acct.split_pages()),
        (200, 200, 0)
    );
    let mut b = [0u8; 8];
    mem.read_at(10 * P, &mut b).expect("read");
    assert_eq!(u64::from_le_bytes(b), g - 1);
    mem.read_at(20 * P, &mut b).expect("read");
    assert_eq!(u64::from_le_bytes(b), h - 1);
    eprintln!("{g} guest writes and {h} host writes across 200 splits and merges");
}

#[test]
fn conformance_hugetlb_punch_hole_while_split() {
    let Some(_pool) = pool(M2, 2) else { return };
    let base = stats(M2);
    let mem = huge(2);
    let view = mem.map(0, 2 * M2).expect("map");
    let acct = mem.hugetlb_accounting().expect("accounting");
    mem.convert(9 * P, P, Attr::Private).expect("split");
    assert_eq!(stats(M2).free, base.free - 2);
    mem.fallocate(FallocMode::PUNCH_HOLE, 0, M2).expect("punch");
    assert_eq!(
        (stats(M2).free, stats(M2).available()),
        (base.free - 2, base.available() - 2),
        "the huge page is zeroed in place, still the file's"
    );
    assert_eq!(acct.split_pages(), 1, "still mixed, still split");
    assert!(guest_bytes(&mem, 0, M2 as usize).iter().all(|&b| b == 0));
    assert!(gmem_conformance::touch::faults_as_documented(
        &view,
        9 * P,
        touch(view.as_ptr().wrapping_add(9 * P as usize))
    ));
    assert_eq!(touch(view.as_ptr()), Touch::Ok(0));
    mem.write_at(0, b"fresh").expect("write");
    mem.convert(9 * P, P, Attr::Shared).expect("merge");
    assert_eq!(acct.split_pages(), 0);
    let got = guest_bytes(&mem, 0, M2 as usize);
    assert_eq!(&got[..5], b"fresh");
    assert!(got[5..].iter().all(|&b| b == 0));
    assert_eq!(guest_bytes(&mem, M2, M2 as usize), pattern(M2, M2 as usize));
    // Punching a whole split page that is whole again merges it without copying.
    mem.convert(M2 + 9 * P, P, Attr::Private)
        .expect("split second");
    let pin = mem.pin(M2, P).expect("pin");
    mem.convert(M2 + 9 * P, P, Attr::Shared)
        .expect("whole, waiting");
    assert_eq!(acct.waiting_to_merge(), 1);
    drop(pin);
    assert_eq!(acct.split_pages(), 0);
    mem.fallocate(FallocMode::PUNCH_HOLE, 0, 2 * M2)
        .expect("punch all");
    let s = stats(M2);
    assert_eq!(
        (s.free, s.reserved),
        (base.free - 2, base.reserved),
        "both pages zeroed in place, still the file's"
    );
    assert_eq!(s.available(), base.available() - 2);
    assert!(guest_bytes(&mem, 0, 2 * M2 as usize)
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn conformance_hugetlb_pieces_outlive_the_file() {
    let Some(_pool) = pool(M2, 1) else { return };
    let base = stats(M2);
    let mem = huge(1);
    let view = mem.map(0, M2).expect("map");
    let acct = mem.hugetlb_accounting().expect("accounting");
    mem.convert(100 * P, P, Attr::Private).expect("split");
    let pin = mem.pin(3 * P, 2 * P).expect("pin a piece");
    mem.convert(100 * P, P, Attr::Shared).expect("whole again");
    drop(view);
    drop(mem);
    // The file is closed; its pieces are held by the pin and wait to merge.
    assert_eq!((acct.split_pages(), acct.waiting_to_merge()), (1, 1));
    assert_eq!(stats(M2).free, base.free - 1);
    let mut b = vec![0u8; 2 * P as usize];
    pin.read(0, &mut b).expect("read through the pin");
    assert_eq!(b, pattern(3 * P, 2 * P as usize));
    pin.write(0, b"late").expect("write through the pin");
    drop(pin);
    assert_eq!(
        (acct.split_pages(), acct.waiting_to_merge(), acct.merges()),
        (0, 0, 1)
    );
    let s = stats(M2);
    assert_eq!(
        (s.free, s.reserved),
        (base.free, base.reserved),
        "all back in the pool"
    );
}

#[test]
fn conformance_hugetlb_multi_page_conversion_reports_how_far_it_got() {
    let Some(_pool) = pool(M2, 3) else { return };
    let mem = huge(3);
    let pin = mem.pin(M2 + 5 * P, P).expect("pin");
    let err = mem
        .convert(0, 3 * M2, Attr::Private)
        .expect_err("stops at the pin");
    assert_eq!(err.errno(), libc::EAGAIN);
    assert_eq!(err.reached(), Some(M2));
    assert_eq!(err.error_offset(), Some(M2 + 5 * P));
    assert!(
        matches!(&err, ConvertError::Partial { source, .. } if matches!(**source, ConvertError::Busy { .. }))
    );
    assert_eq!(mem.attr(0).expect("attr"), Attr::Private);
    assert_eq!(mem.attr(M2 - 1).expect("attr"), Attr::Private);
    assert_eq!(mem.attr(M2).expect("attr"), Attr::Shared);
    assert_eq!(mem.attr(2 * M2).expect("attr"), Attr::Shared);
    // The first huge page failing is an ordinary error, not a partial one.
    let err = mem
        .convert(M2, 2 * M2, Attr::Private)
        .expect_err("busy at once");
    assert!(matches!(err, ConvertError::Busy { offset } if offset == M2 + 5 * P));
    drop(pin);
    mem.convert(0, 3 * M2, Attr::Private).expect("all");
    mem.convert(0, 3 * M2, Attr::Shared).expect("all back");
    assert_eq!(
        guest_bytes(&mem, 0, (3 * M2) as usize),
        pattern(0, (3 * M2) as usize)
    );
    assert_eq!(mem.hugetlb_accounting().expect("acct").splits(), 0);
}

/// A guest that puts one private 4 KiB page in every huge page cannot double the host's
/// memory: splits past the file's piece limit fail with `ENOMEM` naming the page, change
/// nothing, and are counted; the accounting reports the pieces held; merging gives the
/// budget back. The default limit is a quarter of the file (at least 16 MiB).
#[test]
fn splits_past_the_piece_limit_fail_with_enomem_and_are_accounted() {
    let Some(_pool) = pool(M2, 12) else { return };
    let mem = GuestMemfd::builder(8 * M2)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(BackingChoice::HugeTlb(M2))
        .max_piece_bytes(2 * M2)
        .create()
        .expect("create");
    mem.write_at(0, &pattern(0, (8 * M2) as usize))
        .expect("fill");
    let view = mem.map(0, 8 * M2).expect("map");
    let acct = mem.hugetlb_accounting().expect("HugeTLB accounting");
    assert_eq!((acct.piece_limit(), acct.piece_bytes()), (2 * M2, 0));
    for h in 0..2 {
        mem.convert(h * M2, P, Attr::Private)
            .expect("split within the limit");
    }
    assert_eq!((acct.split_pages(), acct.piece_bytes()), (2, 2 * M2));
    let e = mem.convert(2 * M2, P, Attr::Private).unwrap_err();
    assert_eq!(
        (e.errno(), e.error_offset()),
        (libc::ENOMEM, Some(2 * M2)),
        "{e}"
    );
    assert_eq!(acct.refused_splits(), 1);
    assert_eq!(mem.attr(2 * M2).unwrap(), Attr::Shared, "nothing changed");
    assert_eq!(acct.split_pages(), 2);
    // Whole huge pages still convert: no pieces needed.
    mem.convert(3 * M2, M2, Attr::Private)
        .expect("a whole huge page");
    check_view(&mem, &view, 8 * M2);
    // A merge gives the budget back.
    mem.convert(0, P, Attr::Shared).expect("uniform again");
    assert_eq!(acct.split_pages(), 1);
    mem.convert(2 * M2, P, Attr::Private)
        .expect("split once budget is back");
    assert_eq!(acct.piece_bytes(), 2 * M2);
    check_view(&mem, &view, 8 * M2);
    // The default limit.
    let dflt = huge(4);
    let a = dflt.hugetlb_accounting().expect("accounting");
    assert_eq!(a.piece_limit(), 16 << 20);
}

/// A preallocation running while pages move never opens a view. HugeTLB preallocation faults
/// the guest mapping without the page-state lock, and the kernel's truncation drops the
/// views' markers of a page something maps at its punch. Each round splits the huge page by
/// converting one page, which the view showed, to private (its piece moves while the
/// preallocation faults the new pieces in), checks it faults through the view and merges
/// again; at the end every page shows its bytes.
#[test]
fn preallocation_racing_page_moves_never_opens_a_view() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const ROUNDS: u64 = 1200;
    const PAGES: u64 = 16;
    let Some(_pool) = pool(M2, 2) else { return };
    let mem = huge(2);
    let view = mem.map(0, 2 * M2).expect("map");
    let stop = AtomicBool::new(false);
    let fills = std::thread::scope(|s| {
        let filler = s.spawn(|| {
            let mut fills = 0u64;
            while !stop.load(Ordering::Acquire) {
                mem.preallocate(&gmem::Prealloc::new().threads(1))
                    .expect("preallocate");
                fills += 1;
            }
            fills
        });
        let guard = gmem_conformance::stop::StopOnDrop(&stop);
        for round in 0..ROUNDS {
            for page in 0..M2 / P {
                // Shown by the view again, so that a conversion moves it.
                let t = touch(view.as_ptr().wrapping_add((page * P) as usize));
                assert_eq!(
                    t,
                    Touch::Ok(pattern(page * P, 1)[0]),
                    "round {round}: page {page}"
                );
            }
            for page in 0..PAGES {
                let off = page * P;
                mem.convert(off, P, Attr::Private)
                    .unwrap_or_else(|e| panic!("round {round}: page {page} to private: {e}"));
                let t = touch(view.as_ptr().wrapping_add(off as usize + 17));
                assert!(
                    gmem_conformance::touch::faults_as_documented(&view, off + 17, t),
                    "round {round}: page {page}, moved during a preallocation, readable: {t:?}"
                );
            }
            mem.convert(0, M2, Attr::Shared)
                .unwrap_or_else(|e| panic!("round {round}: back to shared: {e}"));
        }
        drop(guard);
        filler.join().expect("the preallocating thread")
    });
    assert!(fills > 0, "no preallocation ran");
    check_view(&mem, &view, 2 * M2);
}

/// A participant that refuses every other split (`EIO`), after the file froze its writers
/// and copied the huge page.
struct RefuseEveryOtherSplit(u64);

impl gmem::Participant for RefuseEveryOtherSplit {
    fn name(&self) -> &str {
        "refuse-every-other-split"
    }

    fn apply(&mut self, step: &gmem::Step) -> Result<(), gmem::StepError> {
        match step {
            gmem::Step::Split(r) => {
                self.0 += 1;
                if self.0 % 2 == 0 {
                    return Err(gmem::StepError {
                        errno: libc::EIO,
                        offset: r.start,
                    });
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn undo(&mut self, _: &gmem::Step) {}
}

/// Splits refused after the writers were frozen thaw the huge page in place, over and over,
/// while two threads write into it through `write_at`. Every other split goes through and
/// merges back, which maps the guest mapping's window afresh, so the next freeze finds pages
/// not mapped there yet. Every writer the freeze held must go on, however it raced the thaw.
/// An accessor's copy holds the page-state lock while its write waits, so a writer left
/// asleep would stall the next punch-hole (which takes that lock for writing) for good: the
/// punch-holes here must keep completing.
#[test]
fn writers_go_on_after_a_refused_split() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let Some(_pool) = pool(M2, 2) else { return };
    let mem = huge(2);
    mem.add_participant(Box::new(RefuseEveryOtherSplit(0)));
    let stop = AtomicBool::new(false);
    let stalled = std::thread::scope(|s| {
        for t in 0..2u64 {
            let (mem, stop) = (&mem, &stop);
            s.spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let at = (64 + i % 400) * P + t * 64;
                    mem.write_at(at, &[0x5a; 64]).expect("write");
                    i += 1;
                }
            });
        }
        let converter = s.spawn(|| {
            for i in 0..2_000u64 {
                let at = (5 + i % 50) * P;
                match mem.convert(at, P, Attr::Private) {
                    Ok(()) => mem.convert(at, P, Attr::Shared).expect("merge"),
                    Err(e) => assert_eq!(e.errno(), libc::EIO, "{e:?}"),
                }
                if i % 50 == 0 {
                    mem.fallocate(FallocMode::PUNCH_HOLE, M2, M2)
                        .expect("punch the other huge page");
                }
            }
        });
        let until = Instant::now() + Duration::from_secs(120);
        while !converter.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        let stalled = !converter.is_finished();
        if stalled {
            // The writers and the converter never return: report and end the process, which
            // fails this test binary.
            eprintln!("stalled: a writer held by a refused split never went on");
            std::process::exit(101);
        }
        stop.store(true, Ordering::Relaxed);
        stalled
    });
    assert!(!stalled);
    let acct = mem.hugetlb_accounting().expect("accounting");
    assert_eq!(
        (acct.split_pages(), acct.splits(), acct.merges()),
        (0, 1_000, 1_000)
    );
    assert!(!mem.any_private(0, 2 * M2).expect("any private"));
}
