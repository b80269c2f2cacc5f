//! Two engines of one file in one process (an owner and a follower it serves in-process, as a
//! VMM running a device backend in its own process would): when the VMM moves a view of one,
//! that engine neutralises only its own aliases. The other engine's views and guest mapping
//! are mappings of the same file registered with *its* userfaultfd, and must keep working.
//! (Replacing one of them would also stop the replacing thread until the other engine read
//! the unmap event, which a conversion waiting on that engine as a participant never lets
//! happen: a watchdog turns that deadlock into a failure.) Then the same while the owner
//! converts without pause (`GMEM_STRESS_SECS` per backing, default 2; `.ci/stress` runs it
//! in release).
// Sizes here are small multiples of pages on a 64-bit host: casts to usize are exact.
#![allow(clippy::cast_possible_truncation)]

mod hugepool;

use gmem::{Attr, BackingChoice, Flags, GuestMemfd, HostView, HUGE_2M};
use gmem_conformance::remap::{move_view, Target};
use gmem_conformance::stop::{watchdog, StopOnDrop};
use hugepool::{pattern, pool, touch, Touch};

const P: u64 = 4096;

/// Every page of `len` bytes at `at` faults with `SIGBUS`.
fn assert_faults(at: *mut u8, len: u64, what: &str) {
    for page in 0..len / P {
        let t = touch(at.wrapping_add((page * P) as usize));
        assert_eq!(t.signal(), Some(libc::SIGBUS), "{what}: page {page}: {t:?}");
    }
}

/// Every page of `view` reads the first byte of `expect`'s page, except `private`, which
/// faults with `SIGSEGV` (a guard marker, on shmem and on a split HugeTLB page alike).
fn assert_view(view: &HostView, expect: &[u8], private: u64, what: &str) {
    for page in 0..view.len() as u64 / P {
        let t = touch(view.as_ptr().wrapping_add((page * P) as usize));
        if page * P == private {
            assert_eq!(
                t.signal(),
                Some(libc::SIGSEGV),
                "{what}: private page {page}"
            );
        } else {
            assert_eq!(
                t,
                Touch::Ok(expect[(page * P) as usize]),
                "{what}: page {page}"
            );
        }
    }
}

/// The owner's and the follower's views and accessors after the first half of a view of
/// either engine moved: the moved range faults, everything else works, and the private page
/// is enforced in both engines' views.
fn one_file(owner: &GuestMemfd, size: u64, backing: &str) {
    let bytes = pattern(0, size as usize);
    owner.write_at(0, &bytes).expect("fill");
    // One page of the second half private: on HugeTLB this splits the second huge page,
    // which registers the owner's guest mapping with its write-protect userfaultfd. The
    // first half is what moves (one mapping on both backings: `mremap` refuses a range of
    // several).
    let private = size / 2 + 3 * P;
    let moved = size / 2;
    owner
        .convert(private, P, Attr::Private)
        .expect("to private");
    let follower = GuestMemfd::attach(owner.share_with_process().expect("share")).expect("attach");
    for mover in ["owner", "follower"] {
        let what = format!("{backing}: a view of the {mover} moved");
        let owner_view = owner.map(0, size).expect("owner view");
        let follower_view = follower.map(0, size).expect("follower view");
        let moving = match mover {
            "owner" => owner.map(0, size),
            _ => follower.map(0, size),
        }
        .expect("view to move");
        let to = Target::new(moved as usize);
        let at = move_view(&moving, &to).expect("mremap");
        // The moving engine neutralises at its next conversion at the latest.
        owner.convert(private, P, Attr::Shared).expect("to shared");
        owner
            .convert(private, P, Attr::Private)
            .expect("to private again");
        assert_faults(at, moved, &what);
        assert_view(
            &owner_view,
            &bytes,
            private,
            &format!("{what}, owner's view"),
        );
        assert_view(
            &follower_view,
            &bytes,
            private,
            &format!("{what}, follower's view"),
        );
        let mut buf = vec![0u8; P as usize];
        for (name, mem) in [("owner", owner), ("follower", &follower)] {
            mem.read_at(0, &mut buf).expect("read_at");
            assert_eq!(buf, bytes[..P as usize], "{what}: {name}'s read_at");
            assert_eq!(
                mem.read_at(private, &mut buf)
                    .map_err(|e| gmem::Errno::errno(&e)),
                Err(libc::EFAULT),
                "{what}: {name}'s read_at of the private page"
            );
        }
        // The owner's guest view (gmem's guest mapping) still reaches every page.
        let guest = owner.guest().expect("guest view");
        guest.read(private, &mut buf).expect("guest read");
        assert_eq!(
            buf,
            bytes[private as usize..(private + P) as usize],
            "{what}: guest"
        );
        drop(to);
    }
}

/// On shmem, then on HugeTLB when the pool can grow. One test, the only one of this binary:
/// a moved view leaves its address range empty until the move is neutralised, and another
/// test's mapping taking that range meanwhile would see gmem's work on it (the documented
/// exception of `gmem::HostView`).
#[test]
fn a_moved_view_leaves_the_other_engines_mappings_alone() {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = watchdog(std::time::Duration::from_secs(120), done.clone());
    both_backings();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    watch.join().expect("watchdog");
}

fn both_backings() {
    let size = 1 << 21;
    let owner = GuestMemfd::create(size, Flags::MMAP | Flags::INIT_SHARED).expect("create");
    one_file(&owner, size, "shmem");
    race(&owner, size, "shmem");
    drop(owner);
    let Some(_pool) = pool(HUGE_2M, 2) else {
        return;
    };
    let size = 2 * HUGE_2M;
    let owner = GuestMemfd::builder(size)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(BackingChoice::HugeTlb(HUGE_2M))
        .create()
        .expect("create");
    one_file(&owner, size, "hugetlb");
    race(&owner, size, "hugetlb");
}

/// Seconds each backing's race runs: `GMEM_STRESS_SECS`, or 2.
fn race_secs() -> u64 {
    std::env::var("GMEM_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2)
}

/// Views of the owner and of an in-process follower moved one after another while a thread
/// converts a page of the second half back and forth (on HugeTLB: splits and merges its huge
/// page, replacing that window in every view of both engines): every moved range faults, and
/// a view of each engine made before keeps reading the file's bytes throughout.
fn race(owner: &GuestMemfd, size: u64, backing: &str) {
    let follower = GuestMemfd::attach(owner.share_with_process().expect("share")).expect("attach");
    let private = size / 2 + 3 * P;
    // The converter starts from shared.
    owner.convert(private, P, Attr::Shared).expect("shared");
    let bytes = pattern(0, size as usize);
    owner.write_at(0, &bytes).expect("fill");
    let kept = [
        owner.map(0, size).expect("owner view"),
        follower.map(0, size).expect("follower view"),
    ];
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (moved, refused, pairs) = std::thread::scope(|s| {
        let conv = s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                owner
                    .convert(private, P, Attr::Private)
                    .expect("to private");
                owner.convert(private, P, Attr::Shared).expect("to shared");
                n += 1;
            }
            n
        });
        // Stops the converter however this scope is left (a failed check included).
        let stopper = StopOnDrop(&stop);
        let (mut moved, mut refused) = (0u64, 0u64);
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_secs(race_secs()) {
            for (who, mem) in [("owner", owner), ("follower", &follower)] {
                let what = format!("{backing}, race: a view of the {who} moved");
                let view = mem.map(0, size).expect("map");
                let to = Target::new((size / 2) as usize);
                match move_view(&view, &to) {
                    Ok(at) => {
                        moved += 1;
                        // Once the conversion in flight has ended, at the latest.
                        let t = touch(at);
                        if !t.is_fault() {
                            owner.convert(private, P, Attr::Shared).ok();
                            assert!(touch(at).is_fault(), "{what}: the moved range reads");
                        }
                    }
                    // A window mid-replacement is two mappings, which mremap refuses.
                    Err(e) => {
                        assert_eq!(e, libc::EFAULT, "{what}: mremap");
                        refused += 1;
                    }
                }
                // A byte that is not zero, so that an empty mapping cannot pass for it.
                let at = P as usize + 5;
                assert_ne!(bytes[at], 0);
                for (k, name) in kept.iter().zip(["owner", "follower"]) {
                    let t = touch(k.as_ptr().wrapping_add(at));
                    assert_eq!(t, Touch::Ok(bytes[at]), "{what}: the {name}'s kept view");
                }
            }
        }
        drop(stopper);
        (moved, refused, conv.join().expect("converter"))
    });
    eprintln!("{backing}: {moved} views moved, {refused} refused, {pairs} conversion pairs");
    assert!(moved > 0, "{backing}: no view moved");
}
