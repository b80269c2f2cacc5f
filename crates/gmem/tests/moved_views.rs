//! The VMM moving a host view (`mremap`) while its pages convert: never an alias of the file
//! that nothing tracks, on HugeTLB and shmem.
// Sizes here are small multiples of pages on a 64-bit host: casts to usize are exact.
#![allow(clippy::cast_possible_truncation)]

mod hugepool;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use gmem::{Attr, BackingChoice, Flags, GuestMemfd, HostView, HUGE_2M};
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
/// two mappings, which `mremap` refuses with `EFAULT`), then on shmem (guard markers); on
/// each, views are also moved back to back (see `moved_back_to_back`). One test, the only
/// one of this binary: a view the VMM moves leaves its address range empty until gmem
/// neutralises the move, and another test's mapping taking that range meanwhile would see
/// gmem's work on it (the documented exception of `gmem::HostView`).
#[test]
fn a_view_moved_while_it_converts_leaves_no_alias() {
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
    }
    let mem = GuestMemfd::create(SIZE, Flags::MMAP | Flags::INIT_SHARED).expect("create");
    mem.write_at(0, &pattern(0, SIZE as usize)).expect("fill");
    let mem = Arc::new(mem);
    moved_view_race(&mem, "shmem");
    moved_back_to_back(&mem, "shmem");
}

/// A thread converting `mem` in a loop (all of it, or one 4 KiB page: split and merge on
/// HugeTLB), which the test can hold between two conversions.
struct Converter {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    /// Conversion pairs begun and ended: odd while one runs.
    busy: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Converter {
    fn spawn(mem: &Arc<GuestMemfd>, whole: bool) -> Converter {
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(AtomicU64::new(0));
        let thread = {
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
        Converter {
            stop,
            pause,
            busy,
            thread,
        }
    }

    /// Holds the thread once the conversions in flight (if any) have ended: a move released
    /// during one of them is neutralised by then.
    fn hold(&self, what: &str) {
        self.pause.store(true, Ordering::Release);
        let b = self.busy.load(Ordering::Acquire);
        if b % 2 == 1 {
            while self.busy.load(Ordering::Acquire) == b {
                assert!(!self.thread.is_finished(), "{what}: the converter failed");
                std::hint::spin_loop();
            }
        }
    }

    fn resume(&self) {
        self.pause.store(false, Ordering::Release);
    }

    /// Stops the thread; returns the number of conversion pairs it made.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("converter");
        self.busy.load(Ordering::Acquire) / 2
    }
}

/// A fresh anonymous mapping of the view's size where the kernel chooses, as a move target.
fn target() -> *mut libc::c_void {
    // SAFETY: a new private anonymous mapping; nothing else refers to it.
    let t = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SIZE as usize,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(t, libc::MAP_FAILED, "anonymous mmap");
    t
}

/// Moves `view` onto `to` (`MREMAP_FIXED`): the new address, or the errno.
fn move_view(view: &HostView, to: *mut libc::c_void) -> Result<*mut u8, i32> {
    // SAFETY: moves the view's own range onto `to`, a mapping of the caller's.
    let ret = unsafe {
        libc::mremap(
            view.as_ptr().cast(),
            SIZE as usize,
            SIZE as usize,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            to,
        )
    };
    if ret == libc::MAP_FAILED {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(ret.cast())
    }
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
        let conv = Converter::spawn(mem, whole);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let (mut moved_n, mut refused) = (0, 0);
        for round in 0..ROUNDS {
            let what = format!("{backing}: round {round} (whole: {whole})");
            let view = mem.map(0, SIZE).expect("map");
            let to = target();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            for _ in 0..seed % 20_000 {
                std::hint::spin_loop();
            }
            let moved = move_view(&view, to);
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
            // SAFETY: the target range is this test's (the moved view or the unused target).
            unsafe { libc::munmap(to, SIZE as usize) };
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
    let conv = Converter::spawn(mem, true);
    let mut moved_n = 0;
    for round in 0..ROUNDS / 10 {
        let what = format!("{backing}: back to back, round {round}");
        conv.hold(&what);
        let views: Vec<HostView> = (0..VIEWS).map(|_| mem.map(0, SIZE).expect("map")).collect();
        let targets: Vec<_> = (0..VIEWS).map(|_| target()).collect();
        conv.resume();
        let moved: Vec<_> = views
            .iter()
            .zip(&targets)
            .map(|(v, t)| move_view(v, *t))
            .collect();
        conv.hold(&what);
        for (i, m) in moved.iter().enumerate() {
            if let Ok(at) = m {
                moved_n += 1;
                assert_faults(*at, &format!("{what}, view {i}"));
            }
        }
        for t in targets {
            // SAFETY: the target range is this test's (a moved view or the unused target).
            unsafe { libc::munmap(t, SIZE as usize) };
        }
        drop(views);
        conv.resume();
    }
    let n = conv.stop();
    eprintln!("{backing}, back to back: {moved_n} views moved, {n} conversions");
    assert_file_intact(mem);
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
