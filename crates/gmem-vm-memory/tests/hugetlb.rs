//! HugeTLB files: slices hold gmem pins, which restructuring honours: a 4 KiB conversion
//! that would split a huge page a device holds a page of fails with `EAGAIN`; a split huge
//! page stays split while a device holds one of its pieces.

use gmem::{Attr, BackingChoice, Errno, Flags, GuestMemfd, PoolGuard, HUGE_2M};
use gmem_vm_memory::{GmemMemory, HoldMode, LayoutError, Refusal, RegionSpec};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

const P: u64 = 4096;

/// A shared HugeTLB file of `pages` 2 MiB pages, with the pool grown for it, or `None` (with
/// `skipped:`) when the pool cannot be grown.
fn huge_file(pages: u64) -> Option<(PoolGuard, GuestMemfd)> {
    let pool = match PoolGuard::grow(HUGE_2M, pages) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("skipped: cannot reserve {pages} huge pages of 2 MiB: {e}");
            return None;
        }
    };
    let f = GuestMemfd::builder(pages * HUGE_2M)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(BackingChoice::HugeTlb(HUGE_2M))
        .create()
        .expect("create");
    Some((pool, f))
}

#[test]
fn hugetlb_regions_hold_pins_across_split_and_merge() {
    let Some((_pool, f)) = huge_file(2) else {
        return;
    };
    let mem =
        GmemMemory::new([RegionSpec::new(0x4000_0000, f.clone(), 0, 2 * HUGE_2M)]).expect("memory");
    assert_eq!(mem.hold_mode(0x4000_0000), Some(HoldMode::Pinned));
    mem.write_obj(0x1234u64, GuestAddress(0x4000_0000 + 5 * P))
        .expect("write");
    // A device holds page 5: the guest cannot make page 7 private, which would split the
    // huge page under the device's pin.
    let hold = || -> Vec<_> {
        mem.get_slices(GuestAddress(0x4000_0000 + 5 * P), 8, Permissions::ReadWrite)
            .expect("slices")
            .collect::<Result<_, _>>()
            .expect("held")
    };
    let held = hold();
    assert!(held[0].bitmap().holds_pin());
    let e = f
        .convert(7 * P, P, Attr::Private)
        .expect_err("a split under a held neighbour");
    assert_eq!((e.errno(), e.error_offset()), (libc::EAGAIN, Some(5 * P)));
    drop(held);
    f.convert(7 * P, P, Attr::Private)
        .expect("split once released");
    // Held again, as a piece of the split page.
    let held = hold();
    let e = f.convert(5 * P, P, Attr::Private).expect_err("held");
    assert_eq!((e.errno(), e.error_offset()), (libc::EAGAIN, Some(5 * P)));
    held[0]
        .write_obj(0x5678u64, 0)
        .expect("the held slice still works");
    let err = mem
        .read_obj::<u64>(GuestAddress(0x4000_0000 + 7 * P))
        .expect_err("private");
    assert_eq!(
        Refusal::of(&err),
        Some(Refusal::Private {
            gpa: 0x4000_0000 + 7 * P
        })
    );
    // Whole again, the page waits for the device to let go before it merges.
    f.convert(7 * P, P, Attr::Shared).expect("whole again");
    let acct = f.hugetlb_accounting().expect("accounting");
    assert_eq!((acct.split_pages(), acct.waiting_to_merge()), (1, 1));
    drop(held);
    assert_eq!((acct.split_pages(), acct.waiting_to_merge()), (0, 0));
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(0x4000_0000 + 5 * P))
            .expect("read"),
        0x5678
    );
    f.convert(5 * P, P, Attr::Private).expect("released");
}

/// Tracked holds on a HugeTLB file are refused (`EINVAL`): a split waits for pins only.
#[test]
fn tracked_holds_on_hugetlb_are_refused() {
    let Some((_pool, f)) = huge_file(1) else {
        return;
    };
    let spec = RegionSpec {
        hold: Some(HoldMode::Tracked),
        ..RegionSpec::new(0x4000_0000, f.clone(), 0, HUGE_2M)
    };
    let e = GmemMemory::new([spec]).expect_err("tracked on HugeTLB");
    assert!(
        matches!(e, LayoutError::TrackedHugeTlb { gpa: 0x4000_0000 }),
        "{e:?}"
    );
    assert_eq!((e.errno(), e.gpa()), (libc::EINVAL, 0x4000_0000));
    let pinned = RegionSpec {
        hold: Some(HoldMode::Pinned),
        ..RegionSpec::new(0x4000_0000, f, 0, HUGE_2M)
    };
    let mem = GmemMemory::new([pinned]).expect("pinned on HugeTLB");
    assert_eq!(mem.hold_mode(0x4000_0000), Some(HoldMode::Pinned));
}
