//! HugeTLB backing: reservation at creation, alignment, block size, punch-hole that keeps it.
// Sizes here are small multiples of pages on a 64-bit host: casts to usize and u8 are exact.
#![allow(clippy::cast_possible_truncation)]

mod hugepool;

use gmem::Errno;
use gmem::{
    Attr, BackingChoice, CreateError, FallocMode, Flags, GuestMemfd, HugeTlbError, HUGE_1G, HUGE_2M,
};
use hugepool::{pattern, poke, pool, stats, Touch};

const M2: u64 = HUGE_2M;

fn huge(size: u64) -> Result<GuestMemfd, CreateError> {
    GuestMemfd::builder(size)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(BackingChoice::HugeTlb(M2))
        .create()
}

#[test]
fn creation_reserves_the_whole_size() {
    let Some(_pool) = pool(M2, 4) else { return };
    let before = stats(M2);
    let mem = huge(4 * M2).expect("create");
    let after = stats(M2);
    assert_eq!(
        after.reserved,
        before.reserved + 4,
        "every huge page reserved at creation"
    );
    assert_eq!(after.free, before.free, "nothing allocated yet");
    assert_eq!(mem.block_size(), M2);
    assert_eq!(mem.backing_kind(), gmem::BackingKind::HugeTlb(M2));
    assert_eq!(mem.stat().expect("stat"), (4 * M2, M2));
    // Touching every page is served from the reservation.
    for i in 0..4 {
        mem.write_at(i * M2, b"x").expect("write");
    }
    let used = stats(M2);
    assert_eq!(used.free, before.free - 4);
    assert_eq!(used.reserved, before.reserved);
    drop(mem);
    let gone = stats(M2);
    assert_eq!((gone.free, gone.reserved), (before.free, before.reserved));
}

#[test]
fn a_short_pool_fails_at_creation_naming_page_size_and_shortfall() {
    let Some(_pool) = pool(M2, 2) else { return };
    let avail = stats(M2).available();
    let want = avail + 3;
    let err = huge(want * M2).expect_err("pool is short");
    assert_eq!(err.errno(), libc::ENOMEM);
    match &err {
        CreateError::HugeTlb(HugeTlbError::PoolShort {
            page_size,
            needed,
            available,
            shortfall,
        }) => {
            assert_eq!(
                (*page_size, *needed, *available, *shortfall),
                (M2, want, avail, 3)
            );
        }
        other => panic!("unexpected error {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("2048 KiB") && msg.contains("short by 3"),
        "{msg}"
    );
    // Nothing stays reserved after the failure.
    assert_eq!(stats(M2).available(), avail);
}

#[test]
fn sizes_and_ranges_must_be_huge_page_aligned() {
    let Some(_pool) = pool(M2, 2) else { return };
    for size in [4096, M2 + 4096, M2 / 2] {
        let err = huge(size).expect_err("unaligned size");
        assert_eq!(err.errno(), libc::EINVAL, "size {size:#x}");
        assert!(matches!(err, CreateError::InvalidSize { block, .. } if block == M2));
    }
    let err = GuestMemfd::builder(M2)
        .backing(BackingChoice::HugeTlb(64 << 10))
        .create()
        .expect_err("page size");
    assert_eq!(err.errno(), libc::EINVAL);
    let mem = huge(2 * M2).expect("create");
    for (off, len) in [(4096, M2), (0, 4096), (M2, M2 - 4096)] {
        for mode in [FallocMode::KEEP_SIZE, FallocMode::PUNCH_HOLE] {
            let err = mem.fallocate(mode, off, len).expect_err("unaligned");
            assert_eq!(err.errno(), libc::EINVAL, "{off:#x}+{len:#x}");
        }
    }
    assert_eq!(mem.map(4096, M2).expect_err("view").errno(), libc::EINVAL);
    mem.fallocate(FallocMode::KEEP_SIZE, M2, M2)
        .expect("aligned allocate");
    // Conversions stay 4 KiB granular.
    mem.convert(4096, 4096, Attr::Private)
        .expect("4K conversion");
    assert_eq!(mem.attr(4096).expect("attr"), Attr::Private);
    assert_eq!(mem.attr(0).expect("attr"), Attr::Shared);
}

/// A punched huge page is zeroed in place: it stays allocated and reserved for the file (a
/// page handed back to the pool could be taken by another user before the file reserved it
/// again, and a later touch would be a `SIGBUS`), and what the pool can give to others does
/// not change.
#[test]
fn punch_hole_zeroes_whole_huge_pages_and_keeps_the_reservation() {
    let Some(_pool) = pool(M2, 2) else { return };
    let base = stats(M2);
    let mem = huge(2 * M2).expect("create");
    let data = pattern(0, 2 * M2 as usize);
    mem.write_at(0, &data).expect("fill");
    assert_eq!(stats(M2).free, base.free - 2);
    assert_eq!(stats(M2).available(), base.available() - 2);
    mem.fallocate(FallocMode::PUNCH_HOLE, 0, M2).expect("punch");
    let s = stats(M2);
    assert_eq!(
        (s.free, s.reserved),
        (base.free - 2, base.reserved),
        "the punched huge page stays the file's"
    );
    assert_eq!(s.available(), base.available() - 2);
    let mut buf = vec![0xffu8; M2 as usize];
    mem.read_at(0, &mut buf).expect("read");
    assert!(
        buf.iter().all(|&b| b == 0),
        "punched contents read back zero"
    );
    mem.read_at(M2, &mut buf).expect("read");
    assert_eq!(buf, data[M2 as usize..]);
    mem.write_at(0, b"again").expect("write after punch");
    assert_eq!(stats(M2).free, base.free - 2);
    drop(mem);
    let gone = stats(M2);
    assert_eq!((gone.free, gone.reserved), (base.free, base.reserved));
}

#[test]
fn one_gib_pages_when_the_pool_can_provide_one() {
    let Some(_pool) = pool(HUGE_1G, 1) else {
        return;
    };
    let base = stats(HUGE_1G);
    let mem = GuestMemfd::builder(HUGE_1G)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(BackingChoice::HugeTlb(HUGE_1G))
        .create()
        .expect("create 1 GiB");
    assert_eq!(stats(HUGE_1G).reserved, base.reserved + 1);
    assert_eq!(mem.block_size(), HUGE_1G);
    assert_eq!(huge_1g_unaligned().errno(), libc::EINVAL);
    mem.write_at(HUGE_1G - 8, b"lastword").expect("write");
    // A 4 KiB conversion splits the 1 GiB page and merges it back, contents intact.
    mem.convert(HUGE_1G - 4096, 4096, Attr::Private)
        .expect("split");
    let acct = mem.hugetlb_accounting().expect("accounting");
    assert_eq!(acct.split_pages(), 1);
    mem.convert(HUGE_1G - 4096, 4096, Attr::Shared)
        .expect("merge");
    assert_eq!((acct.split_pages(), acct.merges()), (0, 1));
    let mut b = [0u8; 8];
    mem.read_at(HUGE_1G - 8, &mut b).expect("read");
    assert_eq!(&b, b"lastword");
}

fn huge_1g_unaligned() -> CreateError {
    GuestMemfd::builder(M2)
        .backing(BackingChoice::HugeTlb(HUGE_1G))
        .create()
        .expect_err("2 MiB file with 1 GiB pages")
}

#[test]
fn a_created_file_never_faults_later_even_if_the_pool_is_shrunk() {
    let Some(_pool) = pool(M2, 4) else { return };
    let mem = huge(4 * M2).expect("create");
    let view = mem.map(0, 4 * M2).expect("map");
    // Someone shrinks the pool to nothing: the file's reserved pages stay (as surplus).
    std::fs::write("/proc/sys/vm/nr_hugepages", "0").expect("shrink the pool");
    assert_eq!(stats(M2).reserved, 4);
    for i in 0..4 {
        let p = view.as_ptr().wrapping_add((i * M2 + 5) as usize);
        assert_eq!(
            poke(p, 7),
            Touch::Ok(0),
            "huge page {i} is served from the reservation"
        );
    }
    mem.write_at(3 * M2 + 9, b"ok").expect("checked write");
    // A new file fails at creation instead.
    let err = huge(M2).expect_err("no pool left");
    assert_eq!(err.errno(), libc::ENOMEM);
    drop(view);
    drop(mem);
    assert_eq!(
        stats(M2).surplus,
        0,
        "the surplus pages went away with the file"
    );
}
