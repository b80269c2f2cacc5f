//! The adapter's contract: shared pages give slices, private/poisoned pages and holes give
//! errors naming the gpa (never a fault), slices hold their pages, layouts are validated,
//! snapshots swap, dirty pages are tracked.

use gmem::{Attr, Errno, Flags, GuestMemfd};
use gmem_vm_memory::{GmemAddressSpace, GmemMemory, HoldMode, LayoutError, Refusal, RegionSpec};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemory, Permissions, VolatileSlice};

const P: u64 = 4096;
const PU: usize = 4096;

fn file(pages: u64) -> GuestMemfd {
    GuestMemfd::builder(pages * P)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .create()
        .expect("create")
}

/// RAM of `pages` pages at `gpa`.
fn ram(gpa: u64, pages: u64) -> (GuestMemfd, GmemMemory) {
    let f = file(pages);
    let mem = GmemMemory::new([RegionSpec::new(gpa, f.clone(), 0, pages * P)]).expect("memory");
    (f, mem)
}

fn slices(
    mem: &GmemMemory,
    gpa: u64,
    len: usize,
    access: Permissions,
) -> Vec<VolatileSlice<'_, gmem_vm_memory::GmemSlice<'_>>> {
    mem.get_slices(GuestAddress(gpa), len, access)
        .expect("get_slices")
        .collect::<Result<Vec<_>, _>>()
        .expect("slices")
}

fn busy(f: &GuestMemfd, off: u64, len: u64) -> (i32, Option<u64>) {
    let e = f
        .convert(off, len, Attr::Private)
        .expect_err("conversion must be refused");
    (e.errno(), e.error_offset())
}

#[test]
fn shared_pages_read_and_write_the_guests_bytes() {
    let (f, mem) = ram(0x10_0000, 4);
    f.guest()
        .expect("guest view")
        .write(0x1ff8, &0x1122_3344_5566_7788u64.to_le_bytes())
        .expect("guest write");
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(0x10_1ff8)).expect("read"),
        0x1122_3344_5566_7788
    );
    // Across a page boundary.
    mem.write_slice(b"across", GuestAddress(0x10_0ffd))
        .expect("write");
    let mut buf = [0u8; 6];
    f.guest()
        .expect("guest view")
        .read(0xffd, &mut buf)
        .expect("guest read");
    assert_eq!(&buf, b"across");
    assert!(mem.check_range(GuestAddress(0x10_0000), 4 * 4096, Permissions::ReadWrite));
    assert_eq!(mem.refusals().count(), 0);
}

#[test]
fn private_page_refused_with_its_gpa_and_recorded() {
    let (f, mem) = ram(0x10_0000, 4);
    f.convert(2 * P, P, Attr::Private).expect("to private");
    assert!(!mem.check_range(GuestAddress(0x10_1ff0), 0x20, Permissions::Read));
    assert!(mem.check_range(GuestAddress(0x10_1000), 0x1000, Permissions::Read));
    assert_eq!(
        mem.check(0x10_1ff0, 0x20, Permissions::Read),
        Err(Refusal::Private { gpa: 0x10_2000 })
    );
    let err = mem
        .get_slices(GuestAddress(0x10_2010), 8, Permissions::Read)
        .expect("iterator")
        .next()
        .expect("a refused request yields an error, never nothing")
        .expect_err("private");
    assert_eq!(Refusal::of(&err), Some(Refusal::Private { gpa: 0x10_2010 }));
    assert_eq!(Refusal::of(&err).map(|r| r.errno()), Some(libc::EFAULT));
    let err = mem
        .read_obj::<u64>(GuestAddress(0x10_2ff8))
        .expect_err("read");
    assert_eq!(Refusal::of(&err), Some(Refusal::Private { gpa: 0x10_2ff8 }));
    let err = mem
        .store(
            7u32,
            GuestAddress(0x10_2000),
            std::sync::atomic::Ordering::Release,
        )
        .expect_err("store");
    assert_eq!(Refusal::of(&err), Some(Refusal::Private { gpa: 0x10_2000 }));
    let err = mem
        .load::<u16>(
            GuestAddress(0x10_2002),
            std::sync::atomic::Ordering::Acquire,
        )
        .expect_err("load");
    assert_eq!(Refusal::of(&err), Some(Refusal::Private { gpa: 0x10_2002 }));
    assert_eq!(mem.refusals().count(), 4);
    let last = mem.refusals().last().expect("recorded");
    assert_eq!(last.refusal, Refusal::Private { gpa: 0x10_2002 });
    assert_eq!(
        (last.gpa, last.len, last.access),
        (0x10_2002, 2, Permissions::Read)
    );
    assert_eq!(mem.refusals().take().map(|r| r.gpa), Some(0x10_2002));
    assert_eq!(mem.refusals().last(), None);
    // The guest still reaches the page; back to shared, the device does too.
    f.guest()
        .expect("guest view")
        .write(2 * P, b"guest")
        .expect("guest write");
    f.convert(2 * P, P, Attr::Shared).expect("to shared");
    let mut buf = [0u8; 5];
    mem.read_slice(&mut buf, GuestAddress(0x10_2000))
        .expect("read");
    assert_eq!(&buf, b"guest");
}

#[test]
fn a_request_over_shared_then_private_fails_whole() {
    let (f, mem) = ram(0, 4);
    f.convert(P, P, Attr::Private).expect("to private");
    let mut it = mem
        .get_slices(GuestAddress(0xff0), 0x20, Permissions::Read)
        .expect("iterator");
    let err = it
        .next()
        .expect("item")
        .expect_err("the slice touches a private page");
    assert_eq!(Refusal::of(&err), Some(Refusal::Private { gpa: 0x1000 }));
    assert!(it.next().is_none(), "fused after an error");
    let mut buf = [0u8; 0x20];
    let err = mem
        .read_slice(&mut buf, GuestAddress(0xff0))
        .expect_err("read");
    assert_eq!(Refusal::of(&err), Some(Refusal::Private { gpa: 0x1000 }));
}

#[test]
fn holes_and_wrapping_addresses_are_refused() {
    let (_f, mem) = ram(0x10_0000, 1);
    let err = mem
        .read_obj::<u64>(GuestAddress(0x20_0000))
        .expect_err("hole");
    assert!(matches!(
        err,
        vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(0x20_0000))
    ));
    assert_eq!(Refusal::of(&err), Some(Refusal::Hole { gpa: 0x20_0000 }));
    // Running off the end of the region into the hole.
    let mut buf = [0u8; 16];
    assert!(mem.read_slice(&mut buf, GuestAddress(0x10_0ff8)).is_err());
    assert!(!mem.check_range(GuestAddress(0x10_0ff8), 16, Permissions::Read));
    assert_eq!(
        mem.check(0x10_0ff8, 16, Permissions::Read),
        Err(Refusal::Hole { gpa: 0x10_1000 })
    );
    let err = mem
        .get_slices(GuestAddress(u64::MAX - 3), 8, Permissions::Read)
        .expect_err("wraps");
    assert_eq!(
        Refusal::of(&err),
        Some(Refusal::Wraps {
            gpa: u64::MAX - 3,
            len: 8
        })
    );
    assert_eq!(Refusal::Wraps { gpa: 0, len: 0 }.errno(), libc::EINVAL);
    assert!(!mem.check_range(GuestAddress(u64::MAX - 3), 8, Permissions::Read));
    // The last byte of the address space is a valid request end.
    assert_eq!(
        mem.check(u64::MAX - 7, 8, Permissions::Read),
        Err(Refusal::Hole { gpa: u64::MAX - 7 })
    );
    // Zero-length requests succeed anywhere, as with GuestMemoryMmap.
    assert_eq!(
        mem.read(&mut [], GuestAddress(0x5000_0000)).expect("empty"),
        0
    );
}

#[test]
fn poisoned_page_refused_with_ehwpoison() {
    let (f, mem) = ram(0, 4);
    f.inject_poison(3 * P).expect("poison");
    let err = mem
        .read_obj::<u8>(GuestAddress(3 * P + 5))
        .expect_err("poisoned");
    assert_eq!(
        Refusal::of(&err),
        Some(Refusal::Poisoned { gpa: 3 * P + 5 })
    );
    assert_eq!(Refusal::of(&err).map(|r| r.errno()), Some(libc::EHWPOISON));
    assert!(!mem.check_range(GuestAddress(3 * P), 1, Permissions::Read));
    mem.read_obj::<u8>(GuestAddress(2 * P)).expect("neighbour");
}

#[test]
fn poison_before_the_layout_and_a_punch_hole_clearing_it_are_followed() {
    let f = file(4);
    f.inject_poison(P).expect("poison");
    f.convert(2 * P, P, Attr::Private).expect("to private");
    f.inject_poison(2 * P).expect("poison a private page");
    let mem = GmemMemory::new([RegionSpec::new(0, f.clone(), 0, 4 * P)]).expect("mem");
    assert_eq!(
        mem.check(P + 8, 8, Permissions::Read),
        Err(Refusal::Poisoned { gpa: P + 8 })
    );
    assert_eq!(
        mem.check(2 * P, 8, Permissions::Read),
        Err(Refusal::Poisoned { gpa: 2 * P }),
        "poison is named before private"
    );
    let err = mem.read_obj::<u64>(GuestAddress(P)).expect_err("poisoned");
    assert_eq!(Refusal::of(&err), Some(Refusal::Poisoned { gpa: P }));
    // A punch-hole gives the page fresh memory and clears the record: devices reach it again.
    f.fallocate(gmem::FallocMode::PUNCH_HOLE, P, P)
        .expect("punch");
    assert_eq!(mem.read_obj::<u64>(GuestAddress(P)).expect("read"), 0);
    f.fallocate(gmem::FallocMode::PUNCH_HOLE, 2 * P, P)
        .expect("punch");
    assert_eq!(
        mem.check(2 * P, 8, Permissions::Read),
        Err(Refusal::Private { gpa: 2 * P }),
        "still private once the poison is gone"
    );
}

#[test]
fn a_layout_built_while_the_guest_converts_sees_every_page_as_it_is() {
    const PAGES: u64 = 64;
    for _ in 0..4 {
        let f = file(PAGES);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guest = {
            let (f, stop) = (f.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut x = 0x2545_f491_4f6c_dd1d_u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let to = if x & 1 == 0 {
                        Attr::Private
                    } else {
                        Attr::Shared
                    };
                    f.convert((x >> 8) % PAGES * P, P, to).expect("convert");
                }
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(5));
        let mem = GmemMemory::new([RegionSpec::new(0, f.clone(), 0, PAGES * P)]).expect("mem");
        std::thread::sleep(std::time::Duration::from_millis(5));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        guest.join().expect("guest");
        for p in 0..PAGES {
            let want = match f.attr(p * P).expect("attr") {
                Attr::Shared => Ok(()),
                Attr::Private => Err(Refusal::Private { gpa: p * P }),
            };
            assert_eq!(mem.check(p * P, 8, Permissions::Read), want, "page {p}");
        }
    }
}

#[test]
fn multi_region_layout_with_holes() {
    let a = file(4);
    let b = file(8);
    let mem = GmemMemory::new([
        RegionSpec::new(0x4000, b.clone(), 2 * P, 2 * P),
        RegionSpec::new(0, a.clone(), 0, 4 * P),
        RegionSpec::new(0x10_0000, b.clone(), 4 * P, 4 * P),
    ])
    .expect("layout");
    assert_eq!(
        mem.regions(),
        vec![
            (0, 4 * P, 0),
            (0x4000, 2 * P, 2 * P),
            (0x10_0000, 4 * P, 4 * P)
        ]
    );
    // Adjacent regions of different files: one request, two slices.
    mem.write_slice(&[7u8; 16], GuestAddress(0x3ff8))
        .expect("write across regions");
    let s = slices(&mem, 0x3ff8, 16, Permissions::Read);
    assert_eq!(s.iter().map(|s| s.len()).collect::<Vec<_>>(), vec![8, 8]);
    drop(s);
    let mut buf = [0u8; 8];
    b.guest()
        .expect("guest view")
        .read(2 * P, &mut buf)
        .expect("guest read");
    assert_eq!(buf, [7u8; 8]);
    a.guest()
        .expect("guest view")
        .read(4 * P - 8, &mut buf)
        .expect("guest read");
    assert_eq!(buf, [7u8; 8]);
    // A hole between 0x6000 and 0x10_0000.
    assert_eq!(
        mem.check(0x5ff0, 0x20, Permissions::Read),
        Err(Refusal::Hole { gpa: 0x6000 })
    );
    // The gpa named for a private page of the second mapping of `b`.
    b.convert(5 * P, P, Attr::Private).expect("to private");
    let err = mem
        .read_obj::<u64>(GuestAddress(0x10_1008))
        .expect_err("private");
    assert_eq!(Refusal::of(&err), Some(Refusal::Private { gpa: 0x10_1008 }));
}

#[test]
fn a_held_slice_makes_conversion_fail_with_eagain_until_dropped() {
    let (f, mem) = ram(0x10_0000, 8);
    let s = slices(&mem, 0x10_3010, 0x10, Permissions::Write);
    assert!(s[0].bitmap().holds_pages());
    assert_eq!(busy(&f, 0, 8 * P), (libc::EAGAIN, Some(3 * P)));
    // Nothing changed: every page still shared, others convert one by one.
    assert!(f
        .runs(0, 8 * P)
        .expect("runs")
        .iter()
        .all(|r| r.attr == Attr::Shared));
    f.convert(2 * P, P, Attr::Private).expect("a page not held");
    f.convert(4 * P, P, Attr::Private).expect("a page not held");
    s[0].write_obj(0xabcdu16, 0)
        .expect("the held slice still works");
    drop(s);
    f.convert(3 * P, P, Attr::Private)
        .expect("after the device let go");
    let mut buf = [0u8; 2];
    f.guest()
        .expect("guest view")
        .read(3 * P + 0x10, &mut buf)
        .expect("guest");
    assert_eq!(
        u16::from_le_bytes(buf),
        0xabcd,
        "contents survive conversion"
    );
}

#[test]
fn sub_slices_and_clones_keep_the_hold() {
    let (f, mem) = ram(0, 4);
    let parent = slices(&mem, P, 2 * PU, Permissions::Read).remove(0);
    let sub = parent.subslice(PU, 16).expect("subslice");
    let off = parent.offset(8).expect("offset");
    drop(parent);
    assert_eq!(
        busy(&f, P, P),
        (libc::EAGAIN, Some(P)),
        "sub-slices hold the whole parent"
    );
    drop(off);
    assert_eq!(busy(&f, 2 * P, P), (libc::EAGAIN, Some(2 * P)));
    let clone = sub.clone();
    drop(sub);
    assert_eq!(busy(&f, 2 * P, P), (libc::EAGAIN, Some(2 * P)));
    drop(clone);
    f.convert(P, 2 * P, Attr::Private).expect("all let go");
}

#[test]
fn a_slice_held_on_another_thread_is_seen() {
    let (f, mem) = ram(0, 4);
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let mem = &mem;
        s.spawn(move || {
            let held = slices(mem, 2 * P, 8, Permissions::Read);
            tx.send(()).expect("send");
            done_rx.recv().expect("recv");
            drop(held);
            tx.send(()).expect("send");
        });
        rx.recv().expect("held");
        assert_eq!(busy(&f, 0, 4 * P), (libc::EAGAIN, Some(2 * P)));
        done_tx.send(()).expect("send");
        rx.recv().expect("released");
        f.convert(0, 4 * P, Attr::Private)
            .expect("released on the other thread");
    });
}

#[test]
fn more_slices_than_thread_slots_fall_back_to_pins() {
    let (f, mem) = ram(0, 2);
    let n = gmem_vm_memory::hold::SLOTS + 8;
    let held: Vec<_> = (0..n)
        .map(|i| {
            let at = u64::try_from(i % 4096).expect("i");
            slices(&mem, at, 1, Permissions::Read).remove(0)
        })
        .collect();
    let pins = held.iter().filter(|s| s.bitmap().holds_pin()).count();
    assert!(pins >= 8, "{pins} slices hold gmem pins");
    // Drop every slot-held slice: the pins alone still hold page 0.
    let (pinned, slotted): (Vec<_>, Vec<_>) =
        held.into_iter().partition(|s| s.bitmap().holds_pin());
    drop(slotted);
    assert_eq!(busy(&f, 0, 2 * P), (libc::EAGAIN, Some(0)));
    drop(pinned);
    f.convert(0, 2 * P, Attr::Private).expect("all let go");
}

#[test]
fn reader_and_writer_slices_survive_until_dropped_and_never_see_private_bytes() {
    let (f, mem) = ram(0, 4);
    f.guest()
        .expect("guest view")
        .write(P, &[0x11; 64])
        .expect("guest");
    let s = slices(&mem, P, 64, Permissions::Read).remove(0);
    // The guest cannot take the page while the device reads it.
    assert_eq!(busy(&f, P, P), (libc::EAGAIN, Some(P)));
    let mut buf = [0u8; 64];
    s.read_slice(&mut buf, 0).expect("read");
    assert_eq!(buf, [0x11; 64]);
    drop(s);
    f.convert(P, P, Attr::Private).expect("to private");
    f.guest()
        .expect("guest view")
        .write(P, &[0xee; 64])
        .expect("the guest's secret");
    // A new request cannot reach it.
    let err = mem
        .read_slice(&mut buf, GuestAddress(P))
        .expect_err("private");
    assert_eq!(Refusal::of(&err), Some(Refusal::Private { gpa: P }));
    assert_eq!(buf, [0x11; 64], "nothing copied");
}

#[test]
fn layout_errors_are_typed_and_change_nothing() {
    let a = file(16);
    let b = file(4);
    let mem = GmemMemory::new([RegionSpec::new(0x10_0000, a.clone(), 0, 8 * P)]).expect("mem");
    let cases: Vec<(RegionSpec, i32, &str)> = vec![
        (
            RegionSpec::new(0x20_0000, b.clone(), 0, 0),
            libc::EINVAL,
            "empty",
        ),
        (
            RegionSpec::new(0x20_0001, b.clone(), 0, P),
            libc::EINVAL,
            "unaligned gpa",
        ),
        (
            RegionSpec::new(0x20_0000, b.clone(), 1, P),
            libc::EINVAL,
            "unaligned offset",
        ),
        (
            RegionSpec::new(0x20_0000, b.clone(), 0, P + 1),
            libc::EINVAL,
            "unaligned len",
        ),
        (
            RegionSpec::new(u64::MAX - P + 1, b.clone(), 0, 2 * P),
            libc::EINVAL,
            "gpa wraps",
        ),
        (
            RegionSpec::new(0x20_0000, b.clone(), u64::MAX - P + 1, 2 * P),
            libc::EINVAL,
            "offset wraps",
        ),
        (
            RegionSpec::new(0x20_0000, b.clone(), 2 * P, 4 * P),
            libc::EINVAL,
            "past the file",
        ),
        (
            RegionSpec::new(0x10_7000, b.clone(), 0, 2 * P),
            libc::EEXIST,
            "gpa overlap",
        ),
        (
            RegionSpec::new(0x0f_f000, b.clone(), 0, 2 * P),
            libc::EEXIST,
            "gpa overlap below",
        ),
        (
            RegionSpec::new(0x40_0000, a.clone(), 7 * P, 2 * P),
            libc::EINVAL,
            "same file overlap",
        ),
    ];
    for (spec, errno, what) in cases {
        let e = mem.insert_region(spec.clone()).expect_err(what);
        assert_eq!(e.errno(), errno, "{what}: {e}");
        assert_eq!(e.gpa(), spec.gpa, "{what}");
        let e = GmemMemory::new([RegionSpec::new(0x10_0000, a.clone(), 0, 8 * P), spec])
            .expect_err(what);
        assert_eq!(e.errno(), errno, "{what} (at construction)");
        assert_eq!(
            mem.regions(),
            vec![(0x10_0000, 8 * P, 0)],
            "{what}: unchanged"
        );
    }
    assert!(matches!(
        mem.insert_region(RegionSpec::new(0x10_7000, b.clone(), 0, P)),
        Err(LayoutError::Overlap {
            gpa: 0x10_7000,
            other: 0x10_0000,
            ..
        })
    ));
    let e = mem
        .remove_region(0x10_1000)
        .expect_err("not a region start");
    assert_eq!((e.errno(), e.gpa()), (libc::ENOENT, 0x10_1000));
    let unmappable = GuestMemfd::builder(4 * P)
        .flags(Flags::INIT_SHARED)
        .create()
        .expect("file");
    let e = mem
        .insert_region(RegionSpec::new(0, unmappable, 0, 4 * P))
        .expect_err("no MMAP");
    assert_eq!(e.errno(), libc::ENODEV);
    // Two files back to back, and the rest of `a` elsewhere: fine.
    let more = mem
        .insert_region(RegionSpec::new(0x10_8000, b.clone(), 0, 4 * P))
        .and_then(|m| m.insert_region(RegionSpec::new(0, a.clone(), 8 * P, 8 * P)))
        .expect("valid layout");
    assert_eq!(more.regions().len(), 3);
    assert_eq!(mem.regions().len(), 1, "the old snapshot is unchanged");
}

#[test]
fn address_space_swaps_snapshots_and_old_slices_keep_holding() {
    let a = file(4);
    let b = file(4);
    let space = GmemAddressSpace::new(
        GmemMemory::new([RegionSpec::new(0, a.clone(), 0, 4 * P)]).expect("mem"),
    );
    let old = space.memory();
    let held = slices(&old, P, 8, Permissions::Read);
    space
        .insert_region(RegionSpec::new(0x10_0000, b.clone(), 0, 4 * P))
        .expect("insert");
    assert!(space
        .memory()
        .check_range(GuestAddress(0x10_0000), 8, Permissions::Read));
    assert!(!old.check_range(GuestAddress(0x10_0000), 8, Permissions::Read));
    space.remove_region(0).expect("remove");
    let now = space.memory();
    assert_eq!(now.regions(), vec![(0x10_0000, 4 * P, 0)]);
    assert_eq!(
        Refusal::of(&now.read_obj::<u8>(GuestAddress(P)).expect_err("removed")),
        Some(Refusal::Hole { gpa: P })
    );
    // The device still holds the old snapshot's slice: the removed region's page stays held.
    assert_eq!(busy(&a, 0, 4 * P), (libc::EAGAIN, Some(P)));
    drop(held);
    drop(old);
    a.convert(0, 4 * P, Attr::Private).expect("released");
    // A refused update publishes nothing.
    let e = space
        .insert_region(RegionSpec::new(0x10_2000, a.clone(), 0, P))
        .expect_err("overlap");
    assert_eq!(e.errno(), libc::EEXIST);
    assert_eq!(space.memory().regions(), vec![(0x10_0000, 4 * P, 0)]);
    // Refusals are shared by the snapshots of one space.
    let before = space.memory().refusals().count();
    let _ = space.memory().read_obj::<u8>(GuestAddress(0));
    assert_eq!(now.refusals().count(), before + 1);
}

#[test]
fn dirty_pages_written_by_devices_are_tracked() {
    let f = file(8);
    let mem = GmemMemory::builder()
        .region(RegionSpec::new(0x10_0000, f.clone(), 0, 8 * P))
        .dirty_tracking(true)
        .build()
        .expect("mem");
    mem.read_obj::<u64>(GuestAddress(0x10_0000)).expect("read");
    assert!(mem.take_dirty().is_empty(), "reads dirty nothing");
    mem.write_obj(1u64, GuestAddress(0x10_1ffc))
        .expect("write across pages");
    mem.store(
        2u32,
        GuestAddress(0x10_5000),
        std::sync::atomic::Ordering::Release,
    )
    .expect("store");
    // Writes through a sub-slice of a long slice land on the right page.
    let s = slices(&mem, 0x10_6000, 2 * PU, Permissions::Write).remove(0);
    s.subslice(PU + 3, 4)
        .expect("sub")
        .write_obj(3u32, 0)
        .expect("write");
    drop(s);
    assert!(mem.is_dirty(0x10_7abc));
    assert!(!mem.is_dirty(0x10_6000));
    assert_eq!(
        mem.take_dirty(),
        vec![0x10_1000, 0x10_2000, 0x10_5000, 0x10_7000]
    );
    assert!(mem.take_dirty().is_empty(), "taking clears");
    // Without tracking nothing is recorded.
    let (_g, plain) = ram(0, 2);
    plain.write_obj(1u8, GuestAddress(0)).expect("write");
    assert!(plain.take_dirty().is_empty());
}

#[test]
fn dirty_pages_of_pinned_regions_and_file_offsets_land_on_the_right_page() {
    let f = file(16);
    let mem = GmemMemory::builder()
        .region(RegionSpec::new(0x10_0000, f.clone(), 4 * P, 4 * P))
        .region(RegionSpec {
            hold: Some(HoldMode::Pinned),
            ..RegionSpec::new(0x20_0000, f.clone(), 8 * P, 4 * P)
        })
        .dirty_tracking(true)
        .build()
        .expect("mem");
    mem.write_obj(1u8, GuestAddress(0x10_1010))
        .expect("tracked");
    mem.write_obj(2u32, GuestAddress(0x20_2ffe))
        .expect("pinned, across pages");
    let s = slices(&mem, 0x20_0000, 2 * PU, Permissions::Write).remove(0);
    assert!(s.bitmap().holds_pin());
    s.subslice(PU + 8, 4)
        .expect("sub")
        .write_obj(3u32, 0)
        .expect("write");
    drop(s);
    assert_eq!(
        mem.take_dirty(),
        vec![0x10_1000, 0x20_1000, 0x20_2000, 0x20_3000]
    );
    let mut buf = [0u8; 4];
    f.read_at(9 * P + 8, &mut buf).expect("read");
    assert_eq!(
        u32::from_le_bytes(buf),
        3,
        "the sub-slice wrote the right byte"
    );
}

#[test]
fn hold_modes_follow_the_backing_and_the_spec() {
    let f = file(4);
    let mem = GmemMemory::new([
        RegionSpec::new(0, f.clone(), 0, 2 * P),
        RegionSpec {
            hold: Some(HoldMode::Pinned),
            ..RegionSpec::new(0x10_0000, f.clone(), 2 * P, 2 * P)
        },
    ])
    .expect("mem");
    let tracked = if gmem_vm_memory::hold::fast_path_available() {
        HoldMode::Tracked
    } else {
        HoldMode::Pinned
    };
    assert_eq!(mem.hold_mode(0), Some(tracked));
    assert_eq!(mem.hold_mode(0x10_0000), Some(HoldMode::Pinned));
    assert_eq!(mem.hold_mode(0x20_0000), None);
    // A pinned region enforces the same rules.
    let s = slices(&mem, 0x10_0000, 8, Permissions::Read);
    assert!(s[0].bitmap().holds_pin());
    assert_eq!(busy(&f, 2 * P, P), (libc::EAGAIN, Some(2 * P)));
    drop(s);
    f.convert(3 * P, P, Attr::Private).expect("to private");
    let err = mem
        .read_obj::<u64>(GuestAddress(0x10_1000))
        .expect_err("private");
    assert_eq!(Refusal::of(&err), Some(Refusal::Private { gpa: 0x10_1000 }));
    f.inject_poison(2 * P).expect("poison");
    let err = mem
        .read_obj::<u64>(GuestAddress(0x10_0000))
        .expect_err("poisoned");
    assert_eq!(
        Refusal::of(&err),
        Some(Refusal::Poisoned { gpa: 0x10_0000 })
    );
}
