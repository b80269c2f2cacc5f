//! The documented limit of host views of the kernel guest_memfd: one mapping per private run,
//! so a view shows at most about `vm.max_map_count / 2` private runs. Past it a conversion
//! fails with `ENOMEM` and is rolled back. Its own test binary: it fills this process's
//! mapping table.

mod common;

use common::vm_or_skip;
use gmem::{Attr, Flags};
use gmem_conformance::touch;

const PAGE: u64 = 4096;

#[test]
fn kernel_view_runs_past_max_map_count_fail_with_enomem_and_roll_back() {
    let Some(vm) = vm_or_skip() else { return };
    let max: u64 = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .expect("max_map_count")
        .trim()
        .parse()
        .expect("a number");
    // Every other page private needs two mappings per private run.
    let pages = max + 4096;
    let size = pages * PAGE;
    let mem = vm
        .create_guest_memfd(size, Flags::MMAP | Flags::INIT_SHARED)
        .expect("create");
    let view = mem.map(0, size).expect("view");
    let mut converted = 0u64;
    let mut failed_at = None;
    for p in (0..pages).step_by(2) {
        match mem.convert(p * PAGE, PAGE, Attr::Private) {
            Ok(()) => converted += 1,
            Err(e) => {
                failed_at = Some((p, e.errno(), e.error_offset()));
                break;
            }
        }
    }
    let (p, errno, offset) = failed_at.expect("the mapping table must run out before the file");
    assert_eq!(errno, libc::ENOMEM, "page {p}");
    assert_eq!(offset, Some(p * PAGE));
    // Rolled back: the page is shared and reachable, its neighbour still private.
    assert_eq!(mem.attr(p * PAGE).expect("attr"), Attr::Shared);
    assert_eq!(touch::read_byte(&view, p * PAGE), Ok(0));
    assert!(touch::read_byte(&view, (p - 2) * PAGE).is_err());
    assert!(
        converted > max / 2 - 4096 && converted <= max / 2,
        "{converted} private runs for max_map_count {max}"
    );
    // The kernel let the last split take the process over the limit, so even mapping pages
    // back fails until mappings go: drop the view, and everything works again.
    drop(view);
    mem.convert(0, size, Attr::Shared)
        .expect("to shared without views");
    assert_eq!(mem.run_count(), 1);
    let view = mem.map(0, size).expect("view again");
    assert_eq!(touch::read_byte(&view, (p - 2) * PAGE), Ok(0));
    mem.convert(p * PAGE, PAGE, Attr::Private)
        .expect("to private again");
    assert!(touch::read_byte(&view, p * PAGE).is_err());
}
