//! Kernel references taken through a view before a conversion to private: a page vmspliced
//! into a pipe, an io_uring fixed buffer, `O_DIRECT` I/O.
//!
//! gmem cannot see these references. It keeps DESIGN §2's outcome instead: a conversion to
//! private moves the contents of every page a host view may have exposed to a fresh page, so
//! a stale reference holds an orphan that shows only what the page held while shared and
//! takes no write into the guest's page. One documented exception: a whole private huge page
//! of a HugeTLB file stays in place (moving it needs a spare huge page), so a reference to it
//! sees the guest's bytes: [`vmsplice_whole_huge_page_is_the_documented_exception`].

use std::os::fd::{AsRawFd, OwnedFd};

use crate::kref::drain;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use gmem::{Attr, BackingKind};

use super::{errno, guest_expect, guest_fill, Layout, SECRET, SHARED};
use crate::Ctx;

const PAGE: u64 = 4096;
const PAGE_BYTES: usize = 4096;

/// vmsplices `len` bytes of the view at `at` into a new pipe (a reference to the pages, no
/// copy) and returns the pipe's read end.
fn splice_from_view(l: &Layout, at: u64, len: usize) -> OwnedFd {
    let addr = l
        .view
        .as_ptr()
        .wrapping_add(usize::try_from(at).expect("fits"));
    crate::kref::splice(addr, len)
}

/// A shared page vmspliced into a pipe, converted to private and written by the guest: the
/// pipe yields the bytes the page held while shared, never the guest's. Back to shared, the
/// view shows the guest's bytes in place.
pub fn vmspliced_page_never_shows_private_bytes(ctx: &Ctx<'_>) {
    let Some(l) = Layout::new(ctx) else { return };
    let at = 2 * PAGE;
    let rd = splice_from_view(&l, at, PAGE_BYTES);
    l.mem
        .convert(at, PAGE, Attr::Private)
        .expect("spliced page to private");
    guest_fill(&l.mem, at, PAGE, SECRET);
    assert_eq!(
        drain(&rd, PAGE_BYTES),
        vec![SHARED; PAGE_BYTES],
        "the pipe's stale page"
    );
    guest_expect(&l.mem, at, PAGE, SECRET, "the guest's page");
    l.mem
        .convert(at, PAGE, Attr::Shared)
        .expect("back to shared");
    crate::touch::expect_bytes(&l.view, at, PAGE, SECRET, "shared again, in place");
}

/// A range of which only some pages were ever allocated, two of them vmspliced into pipes,
/// converted to private as one call and written by the guest: both pipes yield the
/// shared-time bytes. The conversion sees a range the page cache holds only in part, and
/// must find the resident pages one by one (`mincore`) rather than by the range's count.
pub fn vmspliced_pages_of_a_partly_resident_range_never_show_private_bytes(ctx: &Ctx<'_>) {
    let flags = gmem::Flags::MMAP | gmem::Flags::INIT_SHARED;
    if !crate::cases::require(ctx, flags) {
        return;
    }
    let size = (2 * ctx.block()).max(16 * PAGE);
    let mem = ctx.create(size, flags);
    let view = mem.map(0, size).expect("map the whole file");
    // Pages 2 and 4 are written (allocated) and spliced; 3 and 5 are never touched (on a
    // 4 KiB backing they stay unallocated).
    let (start, pages) = (2 * PAGE, 4);
    let mut pipes = Vec::new();
    for at in [2 * PAGE, 4 * PAGE] {
        crate::touch::fill(&view, at, PAGE, SHARED).expect("write the shared page");
        let addr = view
            .as_ptr()
            .wrapping_add(usize::try_from(at).expect("fits"));
        pipes.push(crate::kref::splice(addr, PAGE_BYTES));
    }
    mem.convert(start, pages * PAGE, Attr::Private)
        .expect("the range to private");
    guest_fill(&mem, start, pages * PAGE, SECRET);
    for (i, rd) in pipes.iter().enumerate() {
        assert_eq!(
            drain(rd, PAGE_BYTES),
            vec![SHARED; PAGE_BYTES],
            "{}: the stale page of pipe {i}",
            ctx.backend().name()
        );
    }
    guest_expect(&mem, start, pages * PAGE, SECRET, "the guest's pages");
}

/// A shared page that gmem's own mapping holds when it moves (a host accessor and the
/// guest view read it, so it is mapped there) and a pipe holds (vmspliced from the view),
/// converted to private: the view still faults on it, before and after the guest writes
/// it, and the pipe yields the shared-time bytes. The kernel's truncation of a folio that is
/// still mapped somewhere drops the guard markers of every mapping of it, so the move's
/// punch must find the page mapped nowhere: gmem unmaps it from its own mapping first where
/// the file's punch does not (the kernel guest_memfd), and a shmem punch unmaps every
/// mapping of the range before it truncates.
pub fn moved_page_gmem_mapped_keeps_the_view_blocked(ctx: &Ctx<'_>) {
    let Some(l) = Layout::new(ctx) else { return };
    let at = 3 * PAGE;
    let mut seen = vec![0u8; PAGE_BYTES];
    l.mem
        .read_at(at, &mut seen)
        .expect("a host accessor reads the shared page");
    assert_eq!(seen, vec![SHARED; PAGE_BYTES], "the accessor's bytes");
    guest_expect(&l.mem, at, PAGE, SHARED, "the guest view's bytes");
    let rd = splice_from_view(&l, at, PAGE_BYTES);
    l.mem
        .convert(at, PAGE, Attr::Private)
        .expect("the page to private");
    crate::touch::expect_fault(&l.view, at, PAGE, "the moved page, before the guest writes");
    guest_fill(&l.mem, at, PAGE, SECRET);
    crate::touch::expect_fault(&l.view, at, PAGE, "the moved page, after the guest wrote");
    assert_eq!(
        drain(&rd, PAGE_BYTES),
        vec![SHARED; PAGE_BYTES],
        "{}: the pipe's stale page",
        ctx.backend().name()
    );
    guest_expect(&l.mem, at, PAGE, SECRET, "the guest's page");
}

/// On HugeTLB, a reference into a huge page converted to private as a whole sees the
/// guest's bytes: the huge page stays in place. Pinned here so that a change is noticed;
/// `gmem probe` reports it. A part of a huge page converted alone is moved like a base page.
pub fn vmsplice_whole_huge_page_is_the_documented_exception(ctx: &Ctx<'_>) {
    let Some(l) = Layout::new(ctx) else { return };
    let BackingKind::HugeTlb(huge) = l.mem.backing_kind() else {
        eprintln!(
            "skipped: backing {} has no huge pages",
            ctx.backend().name()
        );
        return;
    };
    l.mem
        .convert(0, l.size(), Attr::Shared)
        .expect("all shared");
    let rd = splice_from_view(&l, 0, PAGE_BYTES);
    l.mem
        .convert(0, huge, Attr::Private)
        .expect("the whole huge page to private");
    guest_fill(&l.mem, 0, PAGE, SECRET);
    assert_eq!(
        drain(&rd, PAGE_BYTES),
        vec![SECRET; PAGE_BYTES],
        "the documented exception"
    );
}

/// An io_uring fixed buffer registered over a shared page, converted to private: a
/// `WRITE_FIXED` from it exports the shared-time bytes, a `READ_FIXED` into it never lands
/// in the guest's page.
pub fn io_uring_fixed_buffer_holds_an_orphan(ctx: &Ctx<'_>) {
    use io_uring::{opcode, types, IoUring};
    let Some(l) = Layout::new(ctx) else { return };
    let at = 2 * PAGE;
    let buf = l.view.as_ptr().wrapping_add(PAGE_BYTES * 2);
    let mut ring = IoUring::new(4).expect("io_uring_setup");
    let iov = libc::iovec {
        iov_base: buf.cast(),
        iov_len: PAGE_BYTES,
    };
    // SAFETY: the buffer is a live shared page of the view; the kernel pins it.
    let reg = unsafe { ring.submitter().register_buffers(&[iov]) };
    reg.expect("register a view page as a fixed buffer");
    l.mem
        .convert(at, PAGE, Attr::Private)
        .expect("registered page to private");
    guest_fill(&l.mem, at, PAGE, SECRET);
    let out = super::sink();
    let mut run = |sqe: io_uring::squeue::Entry| {
        // SAFETY: the entry names the registered buffer and a live descriptor.
        unsafe { ring.submission().push(&sqe).expect("push") };
        ring.submit_and_wait(1).expect("io_uring_enter");
        ring.completion().next().expect("a completion").result()
    };
    let len = u32::try_from(PAGE_BYTES).expect("fits");
    let w = opcode::WriteFixed::new(types::Fd(out.as_raw_fd()), buf, len, 0)
        .offset(0)
        .build();
    assert_eq!(run(w), 4096, "WRITE_FIXED");
    let mut got = vec![0u8; PAGE_BYTES];
    std::os::unix::fs::FileExt::read_exact_at(&out, &mut got, 0).expect("read back");
    assert_eq!(
        got,
        vec![SHARED; PAGE_BYTES],
        "WRITE_FIXED exported the orphan"
    );
    std::os::unix::fs::FileExt::write_all_at(&out, &[0x99; PAGE_BYTES], 0).expect("fill");
    let r = opcode::ReadFixed::new(types::Fd(out.as_raw_fd()), buf, len, 0)
        .offset(0)
        .build();
    assert_eq!(run(r), 4096, "READ_FIXED");
    guest_expect(
        &l.mem,
        at,
        PAGE,
        SECRET,
        "READ_FIXED did not reach the guest's page",
    );
    l.mem
        .convert(at, PAGE, Attr::Shared)
        .expect("back to shared");
    crate::touch::expect_bytes(&l.view, at, PAGE, SECRET, "shared again, in place");
}

/// `O_DIRECT` writes from a view page, racing conversions of that page: no byte the guest
/// wrote while the page was private reaches the file.
pub fn o_direct_racing_conversions_never_exports_private_bytes(ctx: &Ctx<'_>) {
    let Some(l) = Layout::new(ctx) else { return };
    let file = o_direct_scratch_file(ctx);
    let at = 2 * PAGE;
    let src = l.view.as_ptr().wrapping_add(2 * PAGE_BYTES) as usize;
    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| o_direct_writer(&file, src, &stop, &written));
        flip_page_until_written(&l, at, 200, &written);
        stop.store(true, Ordering::Relaxed);
    });
    assert!(
        written.load(Ordering::Relaxed) > 0,
        "the writer never wrote the shared page"
    );
    assert_no_private_byte_in(&file);
}

/// A new `O_DIRECT` file in the temporary directory, already unlinked.
fn o_direct_scratch_file(ctx: &Ctx<'_>) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::env::temp_dir();
    let path = dir.join(format!(
        "gmem-odirect-{}-{}",
        std::process::id(),
        ctx.backend().name()
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .expect("open an O_DIRECT file");
    let _ = std::fs::remove_file(&path);
    file
}

/// Until `stop`, writes the view page at address `src` to successive pages of `file` with
/// `O_DIRECT`, counting in `written` the writes that went through. Each write either writes
/// the whole page or fails with `EFAULT`.
fn o_direct_writer(file: &std::fs::File, src: usize, stop: &AtomicBool, written: &AtomicU64) {
    let write = |off: i64| {
        // SAFETY: O_DIRECT write of one aligned page of the live view.
        unsafe {
            libc::pwrite(
                file.as_raw_fd(),
                src as *const libc::c_void,
                PAGE_BYTES,
                off,
            )
        }
    };
    let mut off = 0;
    while !stop.load(Ordering::Relaxed) {
        let n = write(off * 4096);
        assert!(
            n == 4096 || (n == -1 && errno() == libc::EFAULT),
            "{n} {}",
            errno()
        );
        if n == 4096 {
            written.fetch_add(1, Ordering::Relaxed);
        }
        off = (off + 1) % 256;
    }
}

/// Converts the page at `at` to private, where the guest writes the secret for a while, and
/// back to shared, holding the shared bytes again, for at least `rounds` rounds and on until
/// the writer has written while the page was shared (a loaded machine may not schedule it at
/// first), within a bound.
fn flip_page_until_written(l: &Layout, at: u64, rounds: u32, written: &AtomicU64) {
    let start = std::time::Instant::now();
    let mut round = 0;
    while round < rounds
        || (written.load(Ordering::Relaxed) == 0
            && start.elapsed() < std::time::Duration::from_secs(20))
    {
        round += 1;
        l.mem.convert(at, PAGE, Attr::Private).expect("to private");
        guest_fill(&l.mem, at, PAGE, SECRET);
        // Leave the secret in place long enough for writes in flight to overlap it.
        std::thread::sleep(std::time::Duration::from_micros(100));
        guest_fill(&l.mem, at, PAGE, SHARED);
        l.mem.convert(at, PAGE, Attr::Shared).expect("to shared");
        // And the shared page long enough for the writer to use it.
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
}

/// Reads `file` back without `O_DIRECT`: the writer wrote something, and no private byte.
fn assert_no_private_byte_in(file: &std::fs::File) {
    let plain = std::fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .expect("the file without O_DIRECT");
    let mut all = Vec::new();
    std::io::Read::read_to_end(&mut &plain, &mut all).expect("read the file back");
    assert!(!all.is_empty(), "the writer wrote nothing");
    assert!(
        !all.contains(&SECRET),
        "an O_DIRECT write exported a private byte"
    );
}
