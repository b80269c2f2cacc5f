//! The conformance catalogue on the shmem backing, and the 131,072-run case.

use gmem::Errno;
use gmem::{Attr, Flags, GuestMemfd, HostView, PAGE_SIZE};
use gmem_conformance::touch;

gmem_conformance::conformance_suite!(shmem, gmem_conformance::Shmem);
gmem_conformance::hardening_suite!(shmem_hardening, gmem_conformance::Shmem);

const GIB: u64 = 1 << 30;

/// Mappings of this process: `(start, end)` of every line of `/proc/self/maps`.
fn vmas() -> Vec<(u64, u64)> {
    std::fs::read_to_string("/proc/self/maps")
        .expect("read /proc/self/maps")
        .lines()
        .map(|l| {
            let range = l.split_whitespace().next().expect("address range");
            let (a, b) = range.split_once('-').expect("start-end");
            (
                u64::from_str_radix(a, 16).expect("start"),
                u64::from_str_radix(b, 16).expect("end"),
            )
        })
        .collect()
}

fn stamp(page: u64) -> [u8; 8] {
    (page ^ 0x5eed_0000_0000_0000).to_le_bytes()
}

fn view_addr(view: &HostView) -> (u64, u64) {
    let start = view.as_ptr() as u64;
    (start, start + view.len() as u64)
}

/// 1 GiB with every other 4 KiB page private: 131,072 private runs between 131,072 shared
/// ones, made by one conversion call per page. Every private page faults (`SIGBUS`) through
/// a host view that stays one VMA, every shared page reads its own bytes, the guest reads
/// every page, and one bulk call makes the file one shared run again with every byte intact.
#[test]
fn conformance_shmem_every_other_page_private_1gib() {
    let pages = GIB / PAGE_SIZE;
    let vmas_before = vmas().len();
    let mem = GuestMemfd::create(GIB, Flags::MMAP | Flags::INIT_SHARED).expect("create 1 GiB");
    let view = mem.map(0, GIB).expect("map 1 GiB");
    let guest = mem.guest().expect("guest view");
    for p in 0..pages {
        guest.write(p * PAGE_SIZE, &stamp(p)).expect("stamp a page");
    }
    // Fault every page into the host view first, so revocation has real entries to remove.
    for p in 0..pages {
        assert_eq!(
            touch::read(&view, p * PAGE_SIZE, 8).expect("host reads a shared page"),
            stamp(p)
        );
    }

    for p in (1..pages).step_by(2) {
        mem.convert(p * PAGE_SIZE, PAGE_SIZE, Attr::Private)
            .unwrap_or_else(|e| panic!("convert page {p}: {e}"));
    }
    assert_eq!(
        mem.run_count().expect("run count") as u64,
        pages,
        "one run per page"
    );
    let runs = mem.runs(0, GIB).expect("runs");
    let private = runs.iter().filter(|r| r.attr == Attr::Private).count();
    assert_eq!(private, 131_072, "private runs");
    assert!(runs.iter().all(|r| r.len == PAGE_SIZE));

    // The view is still exactly one VMA, and the process gained few mappings overall (other
    // tests of this binary map and unmap concurrently, hence the loose bound).
    let (start, end) = view_addr(&view);
    let now = vmas();
    let covering = now.iter().filter(|(a, b)| *a < end && *b > start).count();
    assert_eq!(covering, 1, "the 1 GiB view must stay one VMA");
    assert_eq!(
        now.iter().find(|(a, b)| *a <= start && *b >= end).copied(),
        Some((start, end))
    );
    let grown = now.len().saturating_sub(vmas_before);
    assert!(grown < 1000, "the process gained {grown} mappings");

    // Every page: private ones fault on read (first and last byte), shared ones read their
    // own stamp; private ones also fault on write in a spread sample; the accessor names the
    // page; the guest reads every stamp.
    for p in 0..pages {
        let at = p * PAGE_SIZE;
        if p % 2 == 1 {
            for byte in [at, at + PAGE_SIZE - 1] {
                let f = touch::read_byte(&view, byte).expect_err("private page readable");
                assert!(f.at == byte && f.is_access_error(), "page {p}: {f:?}");
            }
            if p % 1021 == 1 || p == pages - 1 {
                let f = touch::write_byte(&view, at + 17, 0xee).expect_err("private page writable");
                assert!(f.is_access_error(), "page {p}: {f:?}");
                let e = mem
                    .read_at(at + 3, &mut [0u8; 4])
                    .expect_err("read_at private");
                assert_eq!((e.errno(), e.error_offset()), (libc::EFAULT, Some(at + 3)));
            }
        } else {
            let got = touch::read(&view, at, 8).unwrap_or_else(|f| panic!("page {p}: {f:?}"));
            assert_eq!(got, stamp(p), "shared page {p}");
        }
        let mut g = [0u8; 8];
        guest.read(at, &mut g).expect("guest read");
        assert_eq!(g, stamp(p), "guest view of page {p}");
    }

    // One bulk call back to shared: one run, every stamp intact in the same view.
    mem.convert(0, GIB, Attr::Shared).expect("bulk to shared");
    assert_eq!(mem.run_count().expect("run count"), 1);
    for p in 0..pages {
        let got =
            touch::read(&view, p * PAGE_SIZE, 8).unwrap_or_else(|f| panic!("page {p}: {f:?}"));
        assert_eq!(got, stamp(p), "page {p} after the bulk call");
    }
    let covering = vmas()
        .iter()
        .filter(|(a, b)| *a < end && *b > start)
        .count();
    assert_eq!(covering, 1, "the view is one VMA after the bulk call too");
}
