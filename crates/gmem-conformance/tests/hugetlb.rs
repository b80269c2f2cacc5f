//! The conformance catalogue on the HugeTLB backing (2 MiB pages), and the restructuring cases:
//! a huge page split because its 4 KiB pages are mixed, merged back when whole and free.
//!
//! Each test grows the HugeTLB pool for its own run and gives the pages back when it ends
//! (root only; the tests print `skipped: <reason>` when the pool cannot be grown). Pool changes
//! are serialised within the process, so the tests of this binary take turns.
// Sizes here are small multiples of pages on a 64-bit host: casts to usize and u8 are exact.
#![allow(clippy::cast_possible_truncation)]

use gmem::Errno;
use gmem::{
    Attr, BackingChoice, CreateError, FallocMode, Flags, GuestMemfd, HostView, PoolGuard, HUGE_2M,
};
use gmem_conformance::{touch, Backend};

/// Huge pages each test may use: enough for every case's files at once.
const POOL_PAGES: u64 = 24;

/// HugeTLB with 2 MiB pages; holds the pool it grew until the test ends.
struct HugeTlb2M {
    pool: Result<PoolGuard, String>,
}

impl HugeTlb2M {
    fn new() -> Self {
        // A child process started by a case reaches the memory through its parent.
        let in_child = std::env::var_os(gmem_conformance::child::ROLE_ENV).is_some();
        let pool = if in_child {
            Err("child process".to_string())
        } else {
            PoolGuard::grow(HUGE_2M, POOL_PAGES).map_err(|e| e.to_string())
        };
        HugeTlb2M { pool }
    }
}

impl Backend for HugeTlb2M {
    fn name(&self) -> String {
        "hugetlb-2048k".to_string()
    }

    fn block_size(&self) -> u64 {
        HUGE_2M
    }

    fn supported_flags(&self) -> Flags {
        Flags::MMAP | Flags::INIT_SHARED
    }

    fn create(&self, size: u64, flags: Flags) -> Result<GuestMemfd, CreateError> {
        GuestMemfd::builder(size)
            .flags(flags)
            .backing(BackingChoice::HugeTlb(HUGE_2M))
            .create()
    }

    fn unavailable(&self) -> Option<String> {
        self.pool
            .as_ref()
            .err()
            .map(|e| format!("cannot reserve {POOL_PAGES} huge pages of 2 MiB: {e}"))
    }
}

gmem_conformance::conformance_suite!(hugetlb, super::HugeTlb2M::new());
gmem_conformance::hardening_suite!(hugetlb_hardening, super::HugeTlb2M::new());

const P: u64 = 4096;
const M2: u64 = HUGE_2M;

/// A HugeTLB file of `pages` huge pages, shared, filled with a per-page stamp; `None` (and a
/// printed reason) when the pool cannot be grown.
fn setup(pages: u64) -> Option<(PoolGuard, GuestMemfd)> {
    let pool = match PoolGuard::grow(M2, pages) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("skipped: cannot reserve {pages} huge pages of 2 MiB: {e}");
            return None;
        }
    };
    let mem = GuestMemfd::builder(pages * M2)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(BackingChoice::HugeTlb(M2))
        .create()
        .expect("create");
    for p in 0..pages * M2 / P {
        mem.write_at(p * P, &stamp(p)).expect("stamp");
    }
    Some((pool, mem))
}

fn stamp(page: u64) -> [u8; 8] {
    (page ^ 0x4855_4745_0000_0000).to_le_bytes()
}

/// Every 4 KiB page of `[0, len)`: private ones fault in the view (first and last byte) and
/// are refused by the accessor; shared ones read their stamp; the guest reads every stamp.
fn check(mem: &GuestMemfd, view: &HostView, len: u64) {
    for p in 0..len / P {
        let at = p * P;
        match mem.attr(at).expect("attr") {
            Attr::Private => {
                for byte in [at, at + P - 1] {
                    let f = touch::read_byte(view, byte).expect_err("private page readable");
                    assert!(f.is_access_error(), "page {p}: {f:?}");
                }
                let e = mem.read_at(at, &mut [0u8; 8]).expect_err("read_at private");
                assert_eq!((e.errno(), e.error_offset()), (libc::EFAULT, Some(at)));
            }
            Attr::Shared => {
                let got = touch::read(view, at, 8).unwrap_or_else(|f| panic!("page {p}: {f:?}"));
                assert_eq!(got, stamp(p), "shared page {p}");
            }
        }
        let mut g = [0u8; 8];
        mem.guest()
            .expect("guest view")
            .read(at, &mut g)
            .expect("guest read");
        assert_eq!(g, stamp(p), "guest view of page {p}");
    }
}

#[test]
fn conformance_hugetlb_restructure_one_private_page_inside_a_huge_page() {
    let Some((_pool, mem)) = setup(2) else { return };
    let view = mem.map(0, 2 * M2).expect("map");
    let acct = mem.hugetlb_accounting().expect("accounting");
    mem.convert(M2 + 77 * P, P, Attr::Private)
        .expect("one page private");
    assert_eq!((acct.split_pages(), acct.splits()), (1, 1));
    check(&mem, &view, 2 * M2);
    let late = mem.map(0, 2 * M2).expect("a view made while split");
    check(&mem, &late, 2 * M2);
    mem.convert(M2 + 77 * P, P, Attr::Shared).expect("back");
    assert_eq!((acct.split_pages(), acct.merges()), (0, 1));
    check(&mem, &view, 2 * M2);
    check(&mem, &late, 2 * M2);
}

#[test]
fn conformance_hugetlb_restructure_every_other_page() {
    let Some((_pool, mem)) = setup(2) else { return };
    let view = mem.map(0, 2 * M2).expect("map");
    let acct = mem.hugetlb_accounting().expect("accounting");
    for p in (1..2 * M2 / P).step_by(2) {
        mem.convert(p * P, P, Attr::Private)
            .expect("odd page private");
    }
    assert_eq!(
        mem.run_count().expect("run count") as u64,
        2 * M2 / P,
        "one run per page"
    );
    assert_eq!(acct.split_pages(), 2);
    check(&mem, &view, 2 * M2);
    mem.convert(0, 2 * M2, Attr::Shared).expect("bulk back");
    assert_eq!(
        (
            mem.run_count().expect("run count"),
            acct.split_pages(),
            acct.merges()
        ),
        (1, 0, 2)
    );
    check(&mem, &view, 2 * M2);
}

#[test]
fn conformance_hugetlb_restructure_whole_page_back() {
    let Some((_pool, mem)) = setup(2) else { return };
    let view = mem.map(0, 2 * M2).expect("map");
    let acct = mem.hugetlb_accounting().expect("accounting");
    mem.convert(0, M2, Attr::Private)
        .expect("whole page private");
    assert_eq!(
        acct.splits(),
        0,
        "a whole huge page converts without a split"
    );
    check(&mem, &view, 2 * M2);
    mem.convert(0, 8 * P, Attr::Shared).expect("part back");
    assert_eq!(acct.split_pages(), 1);
    check(&mem, &view, 2 * M2);
    mem.convert(0, M2, Attr::Shared).expect("whole page back");
    assert_eq!((acct.split_pages(), acct.merges()), (0, 1));
    check(&mem, &view, 2 * M2);
}

#[test]
fn conformance_hugetlb_restructure_pin_holds_off_a_split() {
    let Some((_pool, mem)) = setup(1) else { return };
    let view = mem.map(0, M2).expect("map");
    let acct = mem.hugetlb_accounting().expect("accounting");
    let pin = mem.pin(40 * P, P).expect("pin");
    let e = mem
        .convert(41 * P, P, Attr::Private)
        .expect_err("a split next to a pin");
    assert_eq!((e.errno(), e.error_offset()), (libc::EAGAIN, Some(40 * P)));
    assert_eq!((acct.split_pages(), acct.splits()), (0, 0));
    check(&mem, &view, M2);
    drop(pin);
    mem.convert(41 * P, P, Attr::Private)
        .expect("split once unpinned");
    assert_eq!(acct.split_pages(), 1);
    let pin = mem.pin(40 * P, P).expect("pin a piece");
    let mut b = [0u8; 8];
    pin.read(0, &mut b).expect("pinned page");
    assert_eq!(b, stamp(40));
    check(&mem, &view, M2);
    let e = mem
        .convert(40 * P, P, Attr::Private)
        .expect_err("the pinned page");
    assert_eq!((e.errno(), e.error_offset()), (libc::EAGAIN, Some(40 * P)));
    mem.convert(41 * P, P, Attr::Shared).expect("whole again");
    assert_eq!((acct.split_pages(), acct.waiting_to_merge()), (1, 1));
    check(&mem, &view, M2);
    drop(pin);
    assert_eq!((acct.split_pages(), acct.waiting_to_merge()), (0, 0));
    check(&mem, &view, M2);
}

/// A DMA user's pin: an io_uring fixed buffer registered over a pin's pointer (the kernel
/// holds the huge page). While it is pinned the huge page never splits, so what the kernel
/// writes there is what the guest reads, and what the host writes is what the kernel reads.
/// Once split, a page pinned anew is a piece, and the kernel reaches that piece.
#[test]
fn conformance_hugetlb_restructure_kernel_reference_through_a_pin() {
    use io_uring::{opcode, types, IoUring};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let Some((_pool, mem)) = setup(1) else { return };
    let acct = mem.hugetlb_accounting().expect("accounting");
    let len = u32::try_from(P).expect("fits");
    let sink = gmem_conformance::cases::hardening::sink();
    let guest = mem.guest().expect("guest view");
    // Through the fixed buffer: the kernel writes `dma` into it, reads it back into the
    // sink; the guest must see the kernel's bytes and the kernel the host's.
    let dma_round = |ring: &mut IoUring, buf: *mut u8, at: u64, dma: u8, host: u8| {
        let mut run = |sqe: io_uring::squeue::Entry| {
            // SAFETY: the entry names the registered buffer and a live descriptor.
            unsafe { ring.submission().push(&sqe).expect("push") };
            ring.submit_and_wait(1).expect("io_uring_enter");
            ring.completion().next().expect("a completion").result()
        };
        sink.write_all_at(&[dma; P as usize], 0).expect("fill");
        let r = opcode::ReadFixed::new(types::Fd(sink.as_raw_fd()), buf, len, 0)
            .offset(0)
            .build();
        assert_eq!(run(r), 4096, "READ_FIXED");
        let mut got = vec![0u8; P as usize];
        guest.read(at, &mut got).expect("guest read");
        assert_eq!(
            got,
            vec![dma; P as usize],
            "the guest sees the kernel's write"
        );
        mem.write_at(at, &[host; P as usize]).expect("host write");
        let w = opcode::WriteFixed::new(types::Fd(sink.as_raw_fd()), buf, len, 0)
            .offset(0)
            .build();
        assert_eq!(run(w), 4096, "WRITE_FIXED");
        sink.read_exact_at(&mut got, 0).expect("read back");
        assert_eq!(
            got,
            vec![host; P as usize],
            "the kernel sees the host's write"
        );
    };
    for round in 0..2u8 {
        let pin = mem.pin(3 * P, P).expect("pin");
        let buf = pin.as_ptr().expect("pin pointer");
        let mut ring = IoUring::new(4).expect("io_uring_setup");
        let iov = libc::iovec {
            iov_base: buf.cast(),
            iov_len: P as usize,
        };
        // SAFETY: the buffer is a pinned shared page of the device view; the kernel pins it.
        unsafe { ring.submitter().register_buffers(&[iov]) }.expect("register the buffer");
        if round == 0 {
            let e = mem
                .convert(7 * P, P, Attr::Private)
                .expect_err("a split under the kernel's reference");
            assert_eq!((e.errno(), e.error_offset()), (libc::EAGAIN, Some(3 * P)));
            assert_eq!(acct.split_pages(), 0);
        } else {
            assert_eq!(acct.split_pages(), 1, "pinned as a piece");
        }
        dma_round(&mut ring, buf, 3 * P, 0x90 + round, 0x20 + round);
        drop(ring);
        drop(pin);
        if round == 0 {
            mem.convert(7 * P, P, Attr::Private).expect("split");
        }
    }
    mem.convert(7 * P, P, Attr::Shared).expect("whole again");
    assert_eq!((acct.split_pages(), acct.merges()), (0, 1));
    let mut got = vec![0u8; P as usize];
    guest.read(3 * P, &mut got).expect("guest read");
    assert_eq!(got, vec![0x21; P as usize], "merged with the last write");
}

#[test]
fn conformance_hugetlb_restructure_punch_hole_while_split() {
    let Some((_pool, mem)) = setup(2) else { return };
    let view = mem.map(0, 2 * M2).expect("map");
    let acct = mem.hugetlb_accounting().expect("accounting");
    mem.convert(3 * P, 2 * P, Attr::Private).expect("split");
    let before = gmem::PoolStats::read(M2).expect("pool");
    mem.fallocate(FallocMode::PUNCH_HOLE, 0, M2).expect("punch");
    let after = gmem::PoolStats::read(M2).expect("pool");
    assert_eq!(
        (after.free, after.available()),
        (before.free, before.available()),
        "the punched huge page is zeroed in place and stays reserved"
    );
    assert_eq!(acct.split_pages(), 1);
    touch::expect_fault(&view, 3 * P, 2 * P, "punched private pages");
    touch::expect_bytes(&view, 0, 3 * P, 0, "punched shared pages");
    touch::expect_bytes(&view, 5 * P, M2 - 5 * P, 0, "punched shared pages");
    mem.convert(3 * P, 2 * P, Attr::Shared).expect("merge");
    assert_eq!(acct.split_pages(), 0);
    touch::expect_bytes(&view, 0, M2, 0, "merged punched page");
    let got = touch::read(&view, M2, 8).expect("second page");
    assert_eq!(got, stamp(M2 / P));
}

#[test]
fn conformance_hugetlb_restructure_pieces_outlive_the_file() {
    let Some((_pool, mem)) = setup(1) else { return };
    let acct = mem.hugetlb_accounting().expect("accounting");
    let base = gmem::PoolStats::read(M2).expect("pool");
    mem.convert(9 * P, P, Attr::Private).expect("split");
    let pin = mem.pin(8 * P, P).expect("pin a piece");
    mem.convert(9 * P, P, Attr::Shared).expect("whole again");
    drop(mem);
    assert_eq!((acct.split_pages(), acct.waiting_to_merge()), (1, 1));
    let mut b = [0u8; 8];
    pin.read(0, &mut b).expect("read through the pin");
    assert_eq!(b, stamp(8));
    drop(pin);
    assert_eq!(
        (acct.split_pages(), acct.waiting_to_merge(), acct.merges()),
        (0, 0, 1)
    );
    let now = gmem::PoolStats::read(M2).expect("pool");
    assert_eq!(
        now.free,
        base.free + 1,
        "the file's huge page went back to the pool"
    );
}

/// The child's report: the first byte of pages 6..=10 through a view mapped at attach time
/// and through one mapped now (`ok:XX` or `bus`).
fn peer_report(mem: &GuestMemfd, old: &HostView) -> String {
    let fresh = mem.map(0, M2).expect("map in the child");
    let mut out = Vec::new();
    for view in [old, &fresh] {
        for p in 6..=10 {
            out.push(match touch::read_byte(view, p * P) {
                Ok(b) => format!("ok:{b:02x}"),
                Err(f) if f.is_access_error() => "bus".to_string(),
                Err(f) => format!("bus:{}", f.code),
            });
        }
    }
    out.join(" ")
}

fn peer_child(side: gmem_conformance::child::ChildSide) {
    let mut ctl = side.ctl;
    let mem = GuestMemfd::attach(side.peer).expect("attach");
    let view = mem.map(0, M2).expect("map");
    ctl.send(&format!("mapped {}", peer_report(&mem, &view)));
    loop {
        match ctl.recv().as_str() {
            "probe" => ctl.send(&format!("probed {}", peer_report(&mem, &view))),
            "write" => {
                touch::write(&view, 10 * P, &[0xc1]).expect("child writes page 10");
                ctl.send("written");
            }
            "exit" => return,
            other => panic!("unknown command {other:?}"),
        }
    }
}

/// A second process that attaches while a huge page is split maps its pieces, and follows
/// every later merge and split: it faults exactly on private and poisoned pages, and both
/// processes see each other's writes before and after each restructuring.
#[test]
fn conformance_hugetlb_restructure_peer_follows_split_and_merge() {
    if let Some(side) = gmem_conformance::child::child_side() {
        return peer_child(side);
    }
    let Some((_pool, mem)) = setup(1) else { return };
    let acct = mem.hugetlb_accounting().expect("accounting");
    mem.convert(7 * P, P, Attr::Private)
        .expect("split before sharing");
    let sock = mem.share_with_process().expect("share");
    let test = "conformance_hugetlb_restructure_peer_follows_split_and_merge";
    let mut child = gmem_conformance::child::ChildProcess::spawn(test, "follow", sock);
    let both = |s: &str| format!("{s} {s}");
    assert_eq!(
        child.recv(),
        format!("mapped {}", both("ok:06 bus ok:08 ok:09 ok:0a"))
    );

    // Merge: the child maps the huge page again and sees the owner's new bytes.
    mem.convert(7 * P, P, Attr::Shared).expect("merge");
    assert_eq!(acct.split_pages(), 0);
    mem.write_at(7 * P, &[0x77]).expect("owner writes page 7");
    child.send("probe");
    assert_eq!(
        child.recv(),
        format!("probed {}", both("ok:06 ok:77 ok:08 ok:09 ok:0a"))
    );

    // Split again elsewhere: the child faults on page 9 only, and its write lands in the
    // pieces the owner reads.
    mem.convert(9 * P, P, Attr::Private).expect("split");
    child.send("probe");
    assert_eq!(
        child.recv(),
        format!("probed {}", both("ok:06 ok:77 ok:08 bus ok:0a"))
    );
    child.send("write");
    assert_eq!(child.recv(), "written");
    let mut b = [0u8];
    mem.read_at(10 * P, &mut b).expect("owner reads page 10");
    assert_eq!(b, [0xc1], "the child's write reached the owner's pieces");
    mem.convert(9 * P, P, Attr::Shared).expect("merge again");
    mem.read_at(10 * P, &mut b)
        .expect("owner reads page 10 after the merge");
    assert_eq!(b, [0xc1], "the child's write survived the merge");
    child.send("probe");
    assert_eq!(
        child.recv(),
        format!("probed {}", both("ok:06 ok:77 ok:08 ok:09 ok:c1"))
    );

    // Poison reaches the child too, and a punch-hole clears it there as well.
    mem.inject_poison(8 * P).expect("poison page 8");
    assert_eq!(acct.split_pages(), 1);
    child.send("probe");
    let poisoned = both("ok:06 ok:77 bus ok:09 ok:c1");
    assert_eq!(child.recv(), format!("probed {poisoned}"));
    mem.fallocate(FallocMode::PUNCH_HOLE, 0, M2).expect("punch");
    child.send("probe");
    let zero = both("ok:00 ok:00 ok:00 ok:00 ok:00");
    assert_eq!(child.recv(), format!("probed {zero}"));
    assert_eq!(acct.split_pages(), 0, "whole and unpoisoned again: merged");
    child.send("exit");
    child.finish();
}
