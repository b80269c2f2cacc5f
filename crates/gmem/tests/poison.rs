//! Memory failure: injected poison on shmem and HugeTLB files.
// Sizes here are small multiples of pages on a 64-bit host: casts to usize and u8 are exact.
#![allow(clippy::cast_possible_truncation)]

mod hugepool;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use gmem::Errno;
use gmem::{AccessError, Attr, BackingChoice, FallocMode, Flags, GuestMemfd, HUGE_2M};
use hugepool::{pattern, pool, touch, Touch};

const P: u64 = 4096;
const M2: u64 = HUGE_2M;

fn shmem(size: u64) -> GuestMemfd {
    let mem = GuestMemfd::builder(size)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .create()
        .expect("create");
    mem.write_at(0, &pattern(0, size as usize)).expect("fill");
    mem
}

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

fn at(view: &gmem::HostView, off: u64) -> Touch {
    touch(view.as_ptr().wrapping_add(off as usize))
}

/// Every way of reaching a poisoned page refuses it, naming the page.
fn assert_poisoned(mem: &GuestMemfd, view: &gmem::HostView, page: u64) {
    let off = page * P;
    assert!(mem.is_poisoned(off + 1).expect("poison record"));
    let mut b = [0u8; 8];
    let e = mem.read_at(off + 8, &mut b).expect_err("read");
    assert_eq!(
        (e.errno(), e.error_offset()),
        (libc::EHWPOISON, Some(off + 8))
    );
    let e = mem.read_at(off - 4, &mut b).expect_err("read across");
    assert_eq!(e, AccessError::Poisoned { offset: off });
    let e = mem.write_at(off, &b).expect_err("write");
    assert_eq!(e.errno(), libc::EHWPOISON);
    let e = mem.pin(off - P, 3 * P).expect_err("pin");
    assert_eq!(e, AccessError::Poisoned { offset: off });
    let e = mem
        .guest()
        .expect("guest view")
        .read(off, &mut b)
        .expect_err("guest read");
    assert_eq!(e.errno(), libc::EHWPOISON);
    let e = mem
        .guest()
        .expect("guest view")
        .write(off, &b)
        .expect_err("guest write");
    assert_eq!(e.errno(), libc::EHWPOISON);
    assert!(
        gmem_conformance::touch::faults_as_documented(view, off + 100, at(view, off + 100)),
        "host view touch of page {page}"
    );
}

fn check_neighbours(mem: &GuestMemfd, view: &gmem::HostView, page: u64) {
    for p in [page - 1, page + 1] {
        let off = p * P;
        assert_eq!(at(view, off), Touch::Ok(pattern(off, 1)[0]), "page {p}");
        let mut b = [0u8; 16];
        mem.read_at(off, &mut b).expect("neighbour read");
        assert_eq!(b.to_vec(), pattern(off, 16));
    }
}

#[test]
fn poisoned_shmem_page_faults_for_host_and_guest_and_is_never_handed_out() {
    let mem = shmem(64 * P);
    let view = mem.map(0, 64 * P).expect("map");
    mem.inject_poison(5 * P + 123).expect("inject");
    assert_eq!(mem.poisoned_pages().expect("poisoned pages"), vec![5 * P]);
    assert_poisoned(&mem, &view, 5);
    check_neighbours(&mem, &view, 5);
    // A view made afterwards faults too.
    let late = mem.map(0, 64 * P).expect("map");
    assert!(gmem_conformance::touch::faults_as_documented(
        &late,
        5 * P,
        at(&late, 5 * P)
    ));
    // Conversions of the page and around it work; the page stays poisoned.
    mem.convert(4 * P, 3 * P, Attr::Private)
        .expect("to private");
    mem.convert(0, 64 * P, Attr::Shared).expect("to shared");
    assert_poisoned(&mem, &view, 5);
    assert_poisoned(&mem, &late, 5);
    check_neighbours(&mem, &view, 5);
    mem.convert(5 * P, P, Attr::Private).expect("page itself");
    mem.convert(5 * P, P, Attr::Shared)
        .expect("page itself back");
    assert_poisoned(&mem, &view, 5);
    // Injecting twice is harmless; past the end is EINVAL.
    mem.inject_poison(5 * P).expect("again");
    let e = mem.inject_poison(64 * P).expect_err("past the end");
    assert_eq!((e.errno(), e.error_offset()), (libc::EINVAL, Some(64 * P)));
    // Punch-hole gives the offset a fresh zero page.
    mem.fallocate(FallocMode::PUNCH_HOLE, 5 * P, P)
        .expect("punch");
    assert!(!mem.is_poisoned(5 * P).expect("poison record"));
    assert!(mem.poisoned_pages().expect("poisoned pages").is_empty());
    let mut b = [0xffu8; 16];
    mem.read_at(5 * P, &mut b).expect("fresh page");
    assert_eq!(b, [0; 16]);
    assert_eq!(at(&view, 5 * P), Touch::Ok(0));
}

#[test]
fn poisoned_private_page_stays_poisoned_when_shared_again() {
    let mem = shmem(16 * P);
    let view = mem.map(0, 16 * P).expect("map");
    mem.convert(8 * P, 4 * P, Attr::Private).expect("private");
    mem.inject_poison(9 * P).expect("inject");
    assert_eq!(
        mem.guest()
            .expect("guest view")
            .read(9 * P, &mut [0u8; 1])
            .expect_err("guest")
            .errno(),
        libc::EHWPOISON
    );
    mem.convert(8 * P, 4 * P, Attr::Shared).expect("shared");
    assert_poisoned(&mem, &view, 9);
    assert_eq!(at(&view, 8 * P), Touch::Ok(pattern(8 * P, 1)[0]));
    assert_eq!(at(&view, 10 * P), Touch::Ok(pattern(10 * P, 1)[0]));
}

#[test]
fn poison_in_a_huge_page_splits_it_and_punch_hole_merges_it() {
    let Some(_pool) = pool(M2, 2) else { return };
    let mem = huge(2);
    let view = mem.map(0, 2 * M2).expect("map");
    let acct = mem.hugetlb_accounting().expect("accounting");
    mem.inject_poison(M2 + 7 * P).expect("inject");
    assert_eq!(
        acct.split_pages(),
        1,
        "only the poisoned huge page is split"
    );
    assert_poisoned(&mem, &view, M2 / P + 7);
    check_neighbours(&mem, &view, M2 / P + 7);
    assert_eq!(at(&view, 0), Touch::Ok(pattern(0, 1)[0]));
    // A poisoned page keeps its huge page split through conversions.
    mem.convert(M2, M2, Attr::Private).expect("whole private");
    assert_eq!(
        acct.split_pages(),
        0,
        "uniformly private: merged, poison is only a record"
    );
    mem.convert(M2, M2, Attr::Shared).expect("whole shared");
    assert_eq!(
        acct.split_pages(),
        1,
        "shared with a poisoned page: split again"
    );
    assert_poisoned(&mem, &view, M2 / P + 7);
    check_neighbours(&mem, &view, M2 / P + 7);
    // Poison inside a wholly private huge page needs no split.
    mem.convert(0, M2, Attr::Private).expect("first private");
    mem.inject_poison(3 * P).expect("inject private");
    assert_eq!(acct.split_pages(), 1);
    // Punch-hole clears the poison and the page merges back.
    mem.fallocate(FallocMode::PUNCH_HOLE, M2, M2)
        .expect("punch");
    assert_eq!(acct.split_pages(), 0);
    assert!(!mem.is_poisoned(M2 + 7 * P).expect("poison record"));
    assert_eq!(at(&view, M2 + 7 * P), Touch::Ok(0));
}

#[test]
fn poison_injection_next_to_a_pin_is_refused_until_the_unpin() {
    let Some(_pool) = pool(M2, 1) else { return };
    let mem = huge(1);
    let view = mem.map(0, M2).expect("map");
    let acct = mem.hugetlb_accounting().expect("accounting");
    let pin = mem.pin(0, P).expect("pin");
    // The poisoned page needs a split, which a pin holds off (its pointer may be in the
    // kernel's hands): `EBUSY` naming the page, nothing recorded.
    let e = mem.inject_poison(9 * P).expect_err("inject next to a pin");
    assert_eq!((e.errno(), e.error_offset()), (libc::EBUSY, Some(9 * P)));
    assert!(!mem.is_poisoned(9 * P).expect("poison record"));
    assert_eq!(acct.split_pages(), 0);
    let mut b = [0u8; 16];
    pin.read(0, &mut b).expect("pinned page still reachable");
    assert_eq!(b.to_vec(), pattern(0, 16));
    pin.write(0, b"pinned").expect("pin write");
    assert_eq!(at(&view, 0), Touch::Ok(b'p'));
    drop(pin);
    mem.inject_poison(9 * P).expect("inject once unpinned");
    assert_poisoned(&mem, &view, 9);
    assert_eq!(at(&view, 0), Touch::Ok(b'p'));
}

#[test]
fn concurrent_poison_injection_during_split_and_merge() {
    let Some(_pool) = pool(M2, 1) else { return };
    let mem = huge(1);
    let view = mem.map(0, M2).expect("map");
    let acct = mem.hugetlb_accounting().expect("accounting");
    let stop = Arc::new(AtomicBool::new(false));
    // One thread keeps splitting and merging the huge page by converting pages 256..264 back
    // and forth; the other injects poison, checks it, and punches the huge page (which clears
    // the poison and lets it merge again), over and over.
    let converter = {
        let mem = mem.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut rounds = 0u32;
            while !stop.load(Ordering::Acquire) {
                let page = 256 + u64::from(rounds % 8);
                for to in [Attr::Private, Attr::Shared] {
                    // The checker's accessors hold references for a moment: EAGAIN, retry.
                    while let Err(e) = mem.convert(page * P, P, to) {
                        assert_eq!(e.errno(), libc::EAGAIN, "{e:?}");
                    }
                }
                rounds += 1;
            }
            rounds
        })
    };
    for i in 0..40u64 {
        let q = (i * 37) % 256;
        mem.inject_poison(q * P).expect("inject");
        assert!(mem.is_poisoned(q * P).expect("poison record"));
        let e = mem.read_at(q * P, &mut [0u8; 1]).expect_err("poisoned");
        assert_eq!(e.errno(), libc::EHWPOISON);
        assert!(
            gmem_conformance::touch::faults_as_documented(&view, q * P, at(&view, q * P)),
            "round {i}: page {q} reachable"
        );
        let n = q + 1;
        assert_eq!(
            at(&view, n * P),
            Touch::Ok(if i == 0 { pattern(n * P, 1)[0] } else { 0 })
        );
        mem.fallocate(FallocMode::PUNCH_HOLE, 0, M2).expect("punch");
        assert!(!mem.is_poisoned(q * P).expect("poison record"));
        assert_eq!(at(&view, q * P), Touch::Ok(0));
        // Let the converter split and merge a few times before the next injection.
        let splits = acct.splits();
        while acct.splits() < splits + 2 && !converter.is_finished() {
            std::thread::yield_now();
        }
    }
    stop.store(true, Ordering::Release);
    let rounds = converter.join().expect("converter");
    assert!(
        acct.splits() >= 80,
        "injections interleaved with splits and merges"
    );
    // Quiet again: whole and unpoisoned, so merged; contents are the punched zeros.
    assert_eq!(acct.split_pages(), 0);
    assert!(mem.poisoned_pages().expect("poisoned pages").is_empty());
    let mut all = vec![0xffu8; M2 as usize];
    mem.read_at(0, &mut all).expect("read");
    assert!(all.iter().all(|&b| b == 0));
    eprintln!(
        "{rounds} split/merge rounds, {} splits, {} merges",
        acct.splits(),
        acct.merges()
    );
}

/// Asking about a page past the end of the file is `EINVAL` naming the offset, as injecting
/// poison there is, and changes nothing.
#[test]
fn is_poisoned_past_the_end_is_einval() {
    let mem = shmem(4 * P);
    mem.inject_poison(3 * P).expect("inject");
    for off in [4 * P, 4 * P + 1, u64::MAX] {
        let e = mem.is_poisoned(off).expect_err("past the end");
        assert_eq!((e.errno(), e.error_offset()), (libc::EINVAL, Some(off)));
    }
    assert!(mem.is_poisoned(4 * P - 1).expect("last byte"));
    assert_eq!(mem.poisoned_pages().expect("records"), vec![3 * P]);
}
