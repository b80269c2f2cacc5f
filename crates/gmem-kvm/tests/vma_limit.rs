//! The 131,072-run pattern of DESIGN §6 on the kernel guest_memfd: every other page of 1 GiB
//! private, in one host view. Guard markers need no mapping of their own, so the view stays
//! one mapping, the process stays far from `vm.max_map_count`, and it can still start
//! threads. Its own test binary: it maps 1 GiB and makes 131,072 conversions.

mod common;

use common::vm_or_skip;
use gmem::{Attr, Flags};
use gmem_conformance::touch;

const PAGE: u64 = 4096;

fn map_count() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .expect("maps")
        .lines()
        .count()
}

#[test]
fn kernel_view_holds_131072_private_runs_in_one_mapping() {
    let Some(vm) = vm_or_skip() else { return };
    let size = 1u64 << 30;
    let pages = size / PAGE;
    let mem = vm
        .create_guest_memfd(size, Flags::MMAP | Flags::INIT_SHARED)
        .expect("create");
    let view = mem.map(0, size).expect("view");
    let before = map_count();
    for p in (0..pages).step_by(2) {
        mem.convert(p * PAGE, PAGE, Attr::Private)
            .unwrap_or_else(|e| panic!("page {p}: {e}"));
    }
    assert_eq!(
        mem.run_count().expect("run count"),
        usize::try_from(pages).unwrap()
    );
    assert_eq!(map_count(), before, "no mapping per run");
    for p in (0..pages).step_by(997) {
        let r = touch::read_byte(&view, p * PAGE);
        assert_eq!(r.is_err(), p % 2 == 0, "page {p}: {r:?}");
    }
    // The process can still start a thread (a VMA for its stack and guard).
    std::thread::spawn(|| ()).join().expect("thread");
    mem.convert(0, size, Attr::Shared).expect("back to shared");
    assert_eq!(mem.run_count().expect("run count"), 1);
    assert_eq!(touch::read_byte(&view, 0), Ok(0));
}
