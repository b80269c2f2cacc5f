//! The VMM moving a host view (`mremap`) while its pages convert: never an alias of the file
//! that nothing tracks, on HugeTLB and shmem.
// Sizes here are small multiples of pages on a 64-bit host: casts to usize are exact.
#![allow(clippy::cast_possible_truncation)]

mod hugepool;

use gmem::{Attr, BackingChoice, Flags, GuestMemfd, HUGE_2M};
use hugepool::{pattern, pool, touch, Touch};

const M2: u64 = HUGE_2M;
/// Two huge pages: a whole-page conversion replaces both windows as one run.
const SIZE: u64 = 2 * M2;
const P: u64 = 4096;
const ROUNDS: u32 = if cfg!(debug_assertions) { 100 } else { 300 };

/// The VMM moves a view (`mremap`) at a random moment while the view's huge page converts,
/// as a whole page (its window becomes a hole and back) and one 4 KiB page at a time (split
/// and merge): once the conversion in flight has ended, every page of the moved range faults.
/// A move that raced gmem's own remap of the window must not leave a mapping of the file
/// there that nothing tracks.
///
/// On HugeTLB (two 2 MiB pages: whole-page conversions replace both windows with one hole
/// and back, one-page ones split and merge the first; a view of a split and a whole window is
/// two mappings, which `mremap` refuses with `EFAULT`), then on shmem (guard markers). One test, the only one of
/// this binary: a view the VMM moves leaves its address range empty until gmem neutralises
/// the move, and another test's mapping taking that range meanwhile would see gmem's work on
/// it (the documented exception of `gmem::HostView`).
#[test]
fn a_view_moved_while_it_converts_leaves_no_alias() {
    if let Some(_pool) = pool(M2, 2) {
        let mem = GuestMemfd::builder(SIZE)
            .flags(Flags::MMAP | Flags::INIT_SHARED)
            .backing(BackingChoice::HugeTlb(M2))
            .create()
            .expect("create");
        mem.write_at(0, &pattern(0, SIZE as usize)).expect("fill");
        moved_view_race(mem, "hugetlb");
    }
    let mem = GuestMemfd::create(SIZE, Flags::MMAP | Flags::INIT_SHARED).expect("create");
    mem.write_at(0, &pattern(0, SIZE as usize)).expect("fill");
    moved_view_race(mem, "shmem");
}

/// Moves of a view of the 4 MiB file `mem` at random moments while it converts whole, then
/// while one page converts (300 each in release builds, 100 in debug ones); each moved range
/// must fault everywhere once the conversion in flight has ended, and the file shows as it
/// should in a fresh view at the end.
fn moved_view_race(mem: GuestMemfd, backing: &str) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let mem = Arc::new(mem);
    for whole in [true, false] {
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        // Conversions done; odd while one runs.
        let busy = Arc::new(AtomicU64::new(0));
        let converter = {
            let (mem, stop, pause, busy) = (mem.clone(), stop.clone(), pause.clone(), busy.clone());
            std::thread::spawn(move || {
                let (off, len) = if whole { (0, SIZE) } else { (7 * P, P) };
                while !stop.load(Ordering::Acquire) {
                    if pause.load(Ordering::Acquire) {
                        std::hint::spin_loop();
                        continue;
                    }
                    busy.fetch_add(1, Ordering::AcqRel);
                    mem.convert(off, len, Attr::Private).expect("to private");
                    mem.convert(off, len, Attr::Shared).expect("to shared");
                    busy.fetch_add(1, Ordering::AcqRel);
                }
            })
        };
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let (mut moved_n, mut refused) = (0, 0);
        for round in 0..ROUNDS {
            let view = mem.map(0, SIZE).expect("map");
            // SAFETY: a fresh anonymous mapping where the kernel chooses, as a move target.
            let target = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    SIZE as usize,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(target, libc::MAP_FAILED, "anonymous mmap");
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            for _ in 0..seed % 20_000 {
                std::hint::spin_loop();
            }
            // SAFETY: moves the view's own range onto `target`, which this test owns.
            let ret = unsafe {
                libc::mremap(
                    view.as_ptr().cast(),
                    SIZE as usize,
                    SIZE as usize,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    target,
                )
            };
            // Wait until the conversion in flight (if any) has ended.
            pause.store(true, Ordering::Release);
            let b = busy.load(Ordering::Acquire);
            if b % 2 == 1 {
                while busy.load(Ordering::Acquire) == b {
                    assert!(
                        !converter.is_finished(),
                        "round {round}: the converter failed"
                    );
                    std::hint::spin_loop();
                }
            }
            if ret == libc::MAP_FAILED {
                // A view of several mappings (its window mid-change) cannot move as a whole.
                let e = std::io::Error::last_os_error().raw_os_error();
                assert_eq!(e, Some(libc::EFAULT), "round {round}: mremap refused");
                refused += 1;
            } else {
                moved_n += 1;
                for page in 0..SIZE / P {
                    let t = touch(ret.cast::<u8>().wrapping_add((page * P) as usize));
                    assert_eq!(
                        t.signal(),
                        Some(libc::SIGBUS),
                        "{backing}: round {round} (whole: {whole}): page {page} of the moved view: {t:?}"
                    );
                }
            }
            // SAFETY: the target range is this test's (the moved view or the unused target).
            unsafe { libc::munmap(target, SIZE as usize) };
            drop(view);
            pause.store(false, Ordering::Release);
        }
        stop.store(true, Ordering::Release);
        converter.join().expect("converter");
        eprintln!(
            "{backing}, whole: {whole}: {moved_n} views moved, {refused} refused, {} conversions",
            busy.load(Ordering::Acquire) / 2
        );
    }
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
