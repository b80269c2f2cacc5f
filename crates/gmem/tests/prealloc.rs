//! Preallocation: on and off, in parallel, with progress callbacks, on shmem and HugeTLB.
// Sizes here are small multiples of pages on a 64-bit host: casts to usize and u8 are exact.
#![allow(clippy::cast_possible_truncation)]

mod hugepool;

use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};

use gmem::{Attr, BackingChoice, Flags, GuestMemfd, Prealloc, Progress, HUGE_2M};
use hugepool::{pool, stats};

const M: u64 = 1 << 20;

/// Bytes the backing has allocated (`st_blocks`).
fn allocated(mem: &GuestMemfd) -> u64 {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `st` is a valid, writable stat buffer; the descriptor is live.
    let ret = unsafe { libc::fstat(mem.as_fd().as_raw_fd(), st.as_mut_ptr()) };
    assert_eq!(ret, 0);
    // SAFETY: fstat succeeded and filled the buffer.
    let st = unsafe { st.assume_init() };
    u64::try_from(st.st_blocks).expect("blocks") * 512
}

fn recorder() -> (Arc<Mutex<Vec<Progress>>>, Prealloc) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let p = Prealloc::new()
        .threads(2)
        .chunk(M)
        .on_progress(move |p| s.lock().expect("lock").push(p));
    (seen, p)
}

#[test]
fn preallocation_off_allocates_nothing() {
    let mem = GuestMemfd::builder(16 * M)
        .flags(Flags::MMAP)
        .prealloc(None)
        .create()
        .expect("create");
    assert_eq!(allocated(&mem), 0);
}

#[test]
fn preallocation_on_populates_every_page_with_progress() {
    let (seen, p) = recorder();
    let mem = GuestMemfd::builder(16 * M)
        .flags(Flags::MMAP)
        .prealloc(Some(p))
        .create()
        .expect("create");
    assert_eq!(allocated(&mem), 16 * M);
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 16, "one report per 1 MiB chunk");
    assert!(seen.iter().all(|p| p.total == 16 * M));
    let mut done: Vec<u64> = seen.iter().map(|p| p.done).collect();
    done.sort_unstable();
    assert_eq!(done, (1..=16).map(|i| i * M).collect::<Vec<_>>());
    // Contents are zero and private pages were allocated too (the file starts private).
    assert_eq!(mem.attr(0).expect("attr"), Attr::Private);
    let mut b = [0xffu8; 64];
    mem.guest()
        .expect("guest view")
        .read(5 * M, &mut b)
        .expect("guest read");
    assert_eq!(b, [0; 64]);
}

#[test]
fn preallocation_of_an_existing_file_keeps_contents() {
    let mem = GuestMemfd::builder(8 * M)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .create()
        .expect("create");
    mem.write_at(3 * M + 5, b"kept").expect("write");
    mem.preallocate(&Prealloc::new().threads(3).chunk(3 * M))
        .expect("prealloc");
    assert_eq!(allocated(&mem), 8 * M);
    let mut b = [0u8; 4];
    mem.read_at(3 * M + 5, &mut b).expect("read");
    assert_eq!(&b, b"kept");
}

#[test]
fn hugetlb_preallocation_takes_the_reserved_pages() {
    let Some(_pool) = pool(HUGE_2M, 8) else {
        return;
    };
    let base = stats(HUGE_2M);
    let (seen, p) = recorder();
    let mem = GuestMemfd::builder(8 * HUGE_2M)
        .flags(Flags::MMAP | Flags::INIT_SHARED)
        .backing(BackingChoice::HugeTlb(HUGE_2M))
        .prealloc(Some(p))
        .create()
        .expect("create");
    let s = stats(HUGE_2M);
    assert_eq!(s.free, base.free - 8, "every huge page allocated");
    assert_eq!(s.reserved, base.reserved, "from the file's own reservation");
    // Chunks are rounded up to the huge page: 8 reports of 2 MiB.
    assert_eq!(seen.lock().expect("lock").len(), 8);
    drop(mem);
    assert_eq!(stats(HUGE_2M).free, base.free);
}
