//! Devices reading and holding guest memory while the guest converts it, bounded in time.
//!
//! The guest, on each page in turn: converts it to private (retrying while a device holds
//! it), writes a secret, overwrites the secret with a public pattern, converts it back. Device
//! threads read whole pages and hold slices across reads. A device touching a private page
//! through its slice would die of SIGBUS (the slices point into an enforced host view); a
//! device reading a byte of the secret would fail the test. Run in release too
//! (`cargo test --release -p gmem-vm-memory --test race`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gmem::{Attr, Errno, Flags, GuestMemfd};
use gmem_vm_memory::{GmemMemory, HoldMode, Refusal, RegionSpec};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

const P: u64 = 4096;
const PAGES: u64 = 16;
const SECRET: u8 = 0xee;
const RUN: Duration = Duration::from_millis(1500);

/// Whose memory the devices use, and how their slices hold it.
#[derive(Debug, Clone, Copy)]
enum Devices {
    /// The owner's file, tracked holds.
    Tracked,
    /// The owner's file, a gmem pin per slice.
    Pinned,
    /// A follower of the file (attached in this process, so the owner's steps go through
    /// the follower's agent, as they do for a backend in another process), tracked holds.
    Follower,
}

fn race(devices: Devices) {
    let file = GuestMemfd::builder(PAGES * P)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .create()
        .expect("create");
    let spec = match devices {
        Devices::Tracked => RegionSpec::new(0, file.clone(), 0, PAGES * P),
        Devices::Pinned => RegionSpec {
            hold: Some(HoldMode::Pinned),
            ..RegionSpec::new(0, file.clone(), 0, PAGES * P)
        },
        Devices::Follower => {
            let follower =
                GuestMemfd::attach(file.share_with_process().expect("share")).expect("attach");
            RegionSpec::follower(0, follower, 0, PAGES * P)
        }
    };
    let mem = GmemMemory::new([spec]).expect("memory");
    let want = match devices {
        Devices::Pinned => HoldMode::Pinned,
        Devices::Tracked | Devices::Follower => HoldMode::Tracked,
    };
    assert_eq!(mem.hold_mode(0), Some(want));
    let stop = AtomicBool::new(false);
    let (reads, refused, eagain, converted) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (mem, stop, reads, refused) = (&mem, &stop, &reads, &refused);
            s.spawn(move || {
                let mut page = vec![0u8; 4096];
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let gpa = (i % PAGES) * P;
                    i += 3;
                    // Hold a slice of the page for a few reads, as a device holds a buffer.
                    let slices = match mem.get_slices(GuestAddress(gpa), 4096, Permissions::Read) {
                        Ok(it) => it.collect::<Result<Vec<_>, _>>(),
                        Err(e) => Err(e),
                    };
                    match slices {
                        Ok(held) => {
                            for _ in 0..4 {
                                held[0].read_slice(&mut page, 0).expect("read a held slice");
                                assert!(
                                    !page.contains(&SECRET),
                                    "a device saw the guest's secret at {gpa:#x}"
                                );
                                reads.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            let r = Refusal::of(&e).expect("a refusal");
                            assert!(
                                matches!(r, Refusal::Private { .. } | Refusal::Converting { .. }),
                                "{r:?}"
                            );
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // And short reads through `Bytes`.
                    match mem.read_obj::<u64>(GuestAddress(gpa + 8)) {
                        Ok(v) => assert_ne!(v.to_le_bytes()[0], SECRET),
                        Err(e) => assert!(Refusal::of(&e).is_some()),
                    }
                }
            });
        }
        let start = Instant::now();
        let mut p = 0;
        while start.elapsed() < RUN {
            let off = (p % PAGES) * P;
            p += 1;
            match file.convert(off, P, Attr::Private) {
                Ok(()) => {}
                Err(e) => {
                    assert_eq!(e.errno(), libc::EAGAIN, "{e}");
                    assert_eq!(e.error_offset(), Some(off));
                    eagain.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
            converted.fetch_add(1, Ordering::Relaxed);
            let g = file.guest().expect("guest view");
            g.write(off, &[SECRET; 4096])
                .expect("guest writes its secret");
            g.write(off, &[0x5a; 4096]).expect("guest overwrites it");
            file.convert(off, P, Attr::Shared)
                .expect("to shared never fails");
        }
        stop.store(true, Ordering::Relaxed);
    });
    let (r, f, e, c) = (
        reads.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        eagain.load(Ordering::Relaxed),
        converted.load(Ordering::Relaxed),
    );
    println!("{devices:?}: {r} reads, {f} refusals, {c} conversions, {e} EAGAIN");
    assert!(r > 0 && c > 0, "both sides made progress");
}

#[test]
fn race_devices_against_conversions_tracked() {
    race(Devices::Tracked);
}

#[test]
fn race_devices_against_conversions_pinned() {
    race(Devices::Pinned);
}

#[test]
fn race_follower_devices_against_the_owners_conversions() {
    race(Devices::Follower);
}
