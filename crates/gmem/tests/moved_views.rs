//! The VMM moving a host view (`mremap`) while its pages convert or while the file is handed
//! over to a new owner: never an alias of the file that nothing tracks, on HugeTLB and shmem.
// Sizes here are small multiples of pages on a 64-bit host: casts to usize are exact.
#![allow(clippy::cast_possible_truncation)]

mod hugepool;

use std::sync::Arc;

use std::os::fd::AsFd;

use gmem::preserve::{hand_over, receive, FileOffer, Options};
use gmem::{Attr, BackingChoice, Errno, Flags, GuestMemfd, HostView, HUGE_2M};
use gmem_conformance::child::{child_side, ChildProcess, ChildSide};
use gmem_conformance::converter::Converter;
use gmem_conformance::remap::{move_view, seqpacket_pair, Target};
use hugepool::{pattern, pool, touch, Touch};

const M2: u64 = HUGE_2M;
/// Two huge pages: a whole-page conversion replaces both windows as one run.
const SIZE: u64 = 2 * M2;
const P: u64 = 4096;
const ROUNDS: u32 = if cfg!(debug_assertions) { 100 } else { 300 };
const TEST: &str = "a_view_moved_while_it_converts_leaves_no_alias";

/// The VMM moves a view (`mremap`) at a random moment while the view's huge page converts,
/// as a whole page (its window becomes a hole and back) and one 4 KiB page at a time (split
/// and merge): once the conversion in flight has ended, every page of the moved range faults.
/// A move that raced gmem's own remap of the window must not leave a mapping of the file
/// there that nothing tracks.
///
/// On HugeTLB (two 2 MiB pages: whole-page conversions replace both windows with one hole
/// and back, one-page ones split and merge the first; a view of a split and a whole window is
/// two mappings, which `mremap` refuses with `EFAULT`), then on shmem (guard markers); on
/// each, views are also moved back to back (see `moved_back_to_back`) and during a live
/// update, by the old owner (see `moved_during_a_handover`). One test, the only
/// one of this binary: a view the VMM moves leaves its address range empty until gmem
/// neutralises the move, and another test's mapping taking that range meanwhile would see
/// gmem's work on it (the documented exception of `gmem::HostView`).
#[test]
fn a_view_moved_while_it_converts_leaves_no_alias() {
    if let Some(side) = child_side() {
        new_owner(side);
        return;
    }
    if let Some(_pool) = pool(M2, 2) {
        let mem = GuestMemfd::builder(SIZE)
            .flags(Flags::MMAP | Flags::INIT_SHARED)
            .backing(BackingChoice::HugeTlb(M2))
            .create()
            .expect("create");
        mem.write_at(0, &pattern(0, SIZE as usize)).expect("fill");
        let mem = Arc::new(mem);
        moved_view_race(&mem, "hugetlb");
        moved_back_to_back(&mem, "hugetlb");
        drop(mem);
        moved_during_a_handover("hugetlb", &|| {
            // The last round's file may be freed by its reader thread a moment after its
            // handles dropped (the thread holds it while it neutralises).
            let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let made = GuestMemfd::builder(SIZE)
                    .flags(Flags::MMAP | Flags::INIT_SHARED)
                    .backing(BackingChoice::HugeTlb(M2))
                    .create();
                match made {
                    Ok(mem) => return mem,
                    Err(e) if std::time::Instant::now() < until => {
                        assert_eq!(e.errno(), libc::ENOMEM, "create: {e:?}");
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    Err(e) => panic!("create: {e:?}"),
                }
            }
        });
    }
    let mem = GuestMemfd::create(SIZE, Flags::MMAP | Flags::INIT_SHARED).expect("create");
    mem.write_at(0, &pattern(0, SIZE as usize)).expect("fill");
    let mem = Arc::new(mem);
    moved_view_race(&mem, "shmem");
    moved_back_to_back(&mem, "shmem");
    moved_during_a_handover("shmem", &|| {
        GuestMemfd::create(SIZE, Flags::MMAP | Flags::INIT_SHARED).expect("create")
    });
}

/// Every page of the moved range at `at` must fault with `SIGBUS`.
fn assert_faults(at: *mut u8, what: &str) {
    for page in 0..SIZE / P {
        let t = touch(at.wrapping_add((page * P) as usize));
        assert_eq!(
            t.signal(),
            Some(libc::SIGBUS),
            "{what}: page {page} of the moved view: {t:?}"
        );
    }
}

/// Moves of a view of the 4 MiB file `mem` at random moments while it converts whole, then
/// while one page converts (300 each in release builds, 100 in debug ones); each moved range
/// must fault everywhere once the conversion in flight has ended, and the file shows as it
/// should in a fresh view at the end.
fn moved_view_race(mem: &Arc<GuestMemfd>, backing: &str) {
    for whole in [true, false] {
        let conv = Converter::spawn(
            mem,
            if whole { 0 } else { 7 * P },
            if whole { SIZE } else { P },
        );
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let (mut moved_n, mut refused) = (0, 0);
        for round in 0..ROUNDS {
            let what = format!("{backing}: round {round} (whole: {whole})");
            let view = mem.map(0, SIZE).expect("map");
            let to = Target::new(SIZE as usize);
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            for _ in 0..seed % 20_000 {
                std::hint::spin_loop();
            }
            let moved = move_view(&view, &to);
            conv.hold(&what);
            match moved {
                // A view of several mappings (its window mid-change) cannot move as a whole.
                Err(e) => {
                    assert_eq!(e, libc::EFAULT, "{what}: mremap refused");
                    refused += 1;
                }
                Ok(at) => {
                    moved_n += 1;
                    assert_faults(at, &what);
                }
            }
            drop(to);
            drop(view);
            conv.resume();
        }
        let n = conv.stop();
        eprintln!(
            "{backing}, whole: {whole}: {moved_n} views moved, {refused} refused, {n} conversions"
        );
    }
    assert_file_intact(mem);
}

/// Views moved one right after another while the file converts whole, none created or
/// dropped in between (which would wait for the control lock), then checked together once
/// the conversion in flight has ended. A move made while the reader looks at the mappings for
/// the one before it must not be let go unneutralised.
fn moved_back_to_back(mem: &Arc<GuestMemfd>, backing: &str) {
    const VIEWS: usize = 8;
    let conv = Converter::spawn(mem, 0, SIZE);
    let mut moved_n = 0;
    for round in 0..ROUNDS / 10 {
        let what = format!("{backing}: back to back, round {round}");
        conv.hold(&what);
        let views: Vec<HostView> = (0..VIEWS).map(|_| mem.map(0, SIZE).expect("map")).collect();
        let targets: Vec<_> = (0..VIEWS).map(|_| Target::new(SIZE as usize)).collect();
        conv.resume();
        let moved: Vec<_> = views
            .iter()
            .zip(&targets)
            .map(|(v, t)| move_view(v, t))
            .collect();
        conv.hold(&what);
        for (i, m) in moved.iter().enumerate() {
            if let Ok(at) = m {
                moved_n += 1;
                assert_faults(*at, &format!("{what}, view {i}"));
            }
        }
        drop(targets);
        drop(views);
        conv.resume();
    }
    let n = conv.stop();
    eprintln!("{backing}, back to back: {moved_n} views moved, {n} conversions");
    assert_file_intact(mem);
}

/// What the new owner's guest writes into every page once it owns.
const SECRET: u8 = 0xa5;

/// The old owner's view moved at a random moment of a live update to a new owner in a child
/// process (as a VMM upgrade is): once the new owner owns and the old one has released, the
/// new owner converts the whole file to private and its guest writes a secret everywhere;
/// neither the moved range nor the view's own range (when the move was refused) shows a
/// byte of it in the old owner.
///
/// The new owner is another process on purpose: in one process its mappings of the same
/// file could take the range a move left empty, which is the documented exception of
/// `gmem::HostView`.
fn moved_during_a_handover(backing: &str, make: &dyn Fn() -> GuestMemfd) {
    let mut seed = 0x853c_49e6_748f_ea9bu64;
    let (mut moved_n, mut refused, mut during) = (0, 0, 0u32);
    for round in 0..ROUNDS / 10 {
        let what = format!("{backing}: hand-over, round {round}");
        let old = make();
        old.write_at(0, &pattern(0, SIZE as usize)).expect("fill");
        let view = old.map(0, SIZE).expect("map");
        let to = Target::new(SIZE as usize);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let (a, b) = seqpacket_pair();
        let mut child = ChildProcess::spawn(TEST, "new-owner", b);
        assert_eq!(child.recv(), "ready", "{what}");
        let moved = std::thread::scope(|s| {
            let giver =
                s.spawn(|| hand_over(a.as_fd(), &[FileOffer::new(&old)], &Options::default()));
            for _ in 0..seed % 60_000 {
                std::hint::spin_loop();
            }
            during += u32::from(!giver.is_finished());
            let moved = move_view(&view, &to);
            giver.join().expect("giver").expect("hand_over");
            moved
        });
        assert_eq!(child.recv(), "written", "{what}");
        let at = match moved {
            Ok(at) => {
                moved_n += 1;
                at
            }
            Err(e) => {
                assert_eq!(e, libc::EFAULT, "{what}: mremap refused");
                refused += 1;
                view.as_ptr()
            }
        };
        for page in 0..SIZE / P {
            let t = touch(at.wrapping_add((page * P) as usize));
            assert!(
                t.is_fault(),
                "{what}: page {page} after the hand-over: {t:?}"
            );
        }
        child.send("exit");
        child.finish();
        drop(to);
        drop(view);
    }
    eprintln!(
        "{backing}, hand-over: {moved_n} views moved, {refused} refused, {during} moves began \
         before the old owner's hand_over returned"
    );
}

/// The new owner of `moved_during_a_handover`, in the child process: receives the file,
/// waits for the old owner's release, makes every page private and writes [`SECRET`] into
/// it through the guest view.
fn new_owner(mut side: ChildSide) {
    side.ctl.send("ready");
    let got = receive(side.peer.as_fd(), &Options::default()).expect("receive");
    assert!(
        got.wait_old_owner_released(std::time::Duration::from_secs(10)),
        "RELEASED"
    );
    let new = &got.files[0].mem;
    new.convert(0, SIZE, Attr::Private).expect("to private");
    new.guest()
        .expect("guest view")
        .write(0, &vec![SECRET; SIZE as usize])
        .expect("guest write");
    side.ctl.send("written");
    assert_eq!(side.ctl.recv(), "exit");
}

/// The file shows the pattern it was filled with, in a fresh view.
fn assert_file_intact(mem: &GuestMemfd) {
    let fresh = mem.map(0, SIZE).expect("map");
    for page in 0..SIZE / P {
        let t = touch(fresh.as_ptr().wrapping_add((page * P) as usize));
        assert_eq!(
            t,
            Touch::Ok(pattern(page * P, 1)[0]),
            "page {page} at the end"
        );
    }
}
