//! A follower (another process mapping the file) moving its view with `mremap` while the
//! owner converts: once the conversion in flight has ended, the moved range shows nothing.
//!
//! The follower's views are tracked by its own view userfaultfd, and its agent thread remaps
//! HugeTLB windows when the owner splits and merges: a move may race the follower's own
//! remap of the same window. The moves happen in a child process only, the one mapping
//! views there, so no other test's mapping can take a range a move left empty.
// Sizes here are small multiples of pages on a 64-bit host: casts to usize and u8 are exact.
#![allow(clippy::cast_possible_truncation)]

use std::sync::Arc;

use gmem::{BackingChoice, Flags, GuestMemfd, PoolGuard, HUGE_2M};
use gmem_conformance::child::{child_side, ChildProcess};
use gmem_conformance::converter::Converter;
use gmem_conformance::probe::{read, Touch};
use gmem_conformance::remap::{move_view, Target};

const P: u64 = 4096;
/// Two huge pages: a whole-file conversion turns both windows into holes and back, a
/// one-page one splits and merges the first.
const SIZE: u64 = 2 * HUGE_2M;
/// The one page of the one-page conversions (inside the first huge page).
const PAGE: u64 = 7 * P;
const ROUNDS: u32 = if cfg!(debug_assertions) { 60 } else { 200 };
const TEST: &str = "a_followers_view_moved_while_the_owner_converts_leaves_no_alias";

/// The byte every page of the file is filled with.
fn fill_byte(page: u64) -> u8 {
    (page % 251 + 1) as u8
}

/// The owner's side on one backing: a follower child, moves at random moments while the file
/// converts whole and then one page at a time.
fn owner(mem: GuestMemfd, backing: &str) {
    let fill: Vec<u8> = (0..SIZE / P)
        .flat_map(|p| std::iter::repeat_n(fill_byte(p), P as usize))
        .collect();
    mem.write_at(0, &fill).expect("fill");
    let mem = Arc::new(mem);
    let mut child = ChildProcess::spawn(TEST, "follower", mem.share_with_process().expect("share"));
    assert_eq!(child.recv(), "attached", "{backing}");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for whole in [true, false] {
        let conv = if whole {
            Converter::spawn(&mem, 0, SIZE)
        } else {
            Converter::spawn(&mem, PAGE, P)
        };
        let (mut moved, mut refused) = (0u32, 0u32);
        for round in 0..ROUNDS {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            child.send(&format!("move {}", seed % 40_000));
            let reply = child.recv();
            let what = format!("{backing}, whole: {whole}, round {round}");
            conv.hold(&what);
            child.send("check");
            let verdict = child.recv();
            assert_eq!(verdict, "ok", "{what}: {reply}");
            match reply.as_str() {
                "moved" => moved += 1,
                // A view of several mappings (a window mid-change) cannot move as a whole.
                r if r == format!("refused {}", libc::EFAULT) => refused += 1,
                r => panic!("{what}: {r}"),
            }
            conv.resume();
        }
        let pairs = conv.stop();
        eprintln!("{backing}, whole: {whole}: {moved} moved, {refused} refused, {pairs} pairs");
        assert!(moved > 0, "{backing}, whole: {whole}: no view ever moved");
    }
    child.send("end");
    assert_eq!(child.recv(), "intact", "{backing}");
    child.finish();
}

/// The first page of the moved range at `at` that does not raise `SIGBUS`, described.
fn alias(at: *mut u8) -> Option<String> {
    (0..SIZE / P).find_map(|page| {
        // SAFETY: inside the moved range, which this process maps (a touch there faults or
        // reads; the probe turns a fault into a value).
        let t = unsafe { read(at.wrapping_add((page * P) as usize)) };
        (!t.is_sigbus()).then(|| format!("alias: page {page} of the moved view: {t:?}"))
    })
}

/// The follower's side: attach, then serve `move`, `check` and `end` until the end.
fn follower(mut side: gmem_conformance::child::ChildSide) {
    let mem = GuestMemfd::attach(side.peer).expect("attach");
    side.ctl.send("attached");
    loop {
        let line = side.ctl.recv();
        if line == "end" {
            let fresh = mem.map(0, SIZE).expect("map");
            for page in 0..SIZE / P {
                // SAFETY: inside the fresh view.
                let t = unsafe { read(fresh.as_ptr().wrapping_add((page * P) as usize)) };
                assert_eq!(t, Touch::Ok(fill_byte(page)), "page {page} at the end");
            }
            side.ctl.send("intact");
            return;
        }
        let spins: u64 = line
            .strip_prefix("move ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        let view = mem.map(0, SIZE).expect("map");
        let to = Target::new(SIZE as usize);
        for _ in 0..spins {
            std::hint::spin_loop();
        }
        let moved = move_view(&view, &to);
        side.ctl.send(&match moved {
            Ok(_) => "moved".to_string(),
            Err(e) => format!("refused {e}"),
        });
        assert_eq!(side.ctl.recv(), "check");
        let verdict = moved.ok().and_then(alias);
        side.ctl.send(verdict.as_deref().unwrap_or("ok"));
        drop(to);
        drop(view);
    }
}

/// The follower moves a view of the 4 MiB file at a random moment of each round while the
/// owner converts it (whole, then one page: split and merge on HugeTLB); once the conversion
/// in flight has ended, every page of the moved range raises `SIGBUS`, and the file is intact
/// at the end. On HugeTLB (2 MiB pages; skipped with a reason when the pool cannot grow) and
/// shmem.
#[test]
fn a_followers_view_moved_while_the_owner_converts_leaves_no_alias() {
    if let Some(side) = child_side() {
        follower(side);
        return;
    }
    match PoolGuard::grow(HUGE_2M, 2) {
        Ok(_pool) => {
            let mem = GuestMemfd::builder(SIZE)
                .flags(Flags::MMAP | Flags::INIT_SHARED)
                .backing(BackingChoice::HugeTlb(HUGE_2M))
                .create()
                .expect("create");
            owner(mem, "hugetlb");
        }
        Err(e) => eprintln!("skipped: hugetlb: {e}"),
    }
    let mem = GuestMemfd::create(SIZE, Flags::MMAP | Flags::INIT_SHARED).expect("create");
    owner(mem, "shmem");
}
