//! Host mappings (DESIGN §7 item 3; `guest_memfd_test.c`: `test_mmap_supported`,
//! `test_fault_overflow`, `test_fault_private`, `test_mmap_not_supported`, `test_mmap_cow`).

use gmem::{FallocMode, Flags, Sharing};

use super::{expect_errno, flag_sets, require, PAGE};
use crate::touch;
use crate::Ctx;
use gmem::Errno;

/// With `MMAP|INIT_SHARED`: write 0xaa everywhere, punch the first block, which reads 0 while
/// the rest still reads 0xaa; writing it again works.
pub fn shared_punch_rewrite(ctx: &Ctx<'_>) {
    let flags = Flags::MMAP | Flags::INIT_SHARED;
    if !require(ctx, flags) {
        return;
    }
    let block = ctx.block();
    let size = 4 * block;
    let mem = ctx.create(size, flags);
    let view = mem.map(0, size).expect("map the whole file");
    touch::fill(&view, 0, size, 0xaa).expect("write 0xaa everywhere");
    touch::expect_bytes(&view, 0, size, 0xaa, "after writing 0xaa");

    mem.fallocate(FallocMode::PUNCH_HOLE, 0, block)
        .expect("punching the first block");
    touch::expect_bytes(&view, 0, block, 0x00, "punched block");
    touch::expect_bytes(&view, block, size - block, 0xaa, "after the punched block");
    let mut b = [0xffu8; 16];
    mem.read_at(0, &mut b).expect("read_at a punched page");
    assert_eq!(b, [0u8; 16], "read_at sees the punched page as zero");

    touch::fill(&view, 0, block, 0xaa).expect("rewrite the punched block");
    touch::expect_bytes(&view, 0, size, 0xaa, "after rewriting");
    super::guest_expect(&mem, 0, size, 0xaa, "guest view after rewriting");
}

/// A mapping four times the file's size: writing it all stops with `SIGBUS` exactly at the
/// end of the file, every page past the end faults on read and write, and the bytes below
/// the end are intact.
pub fn past_end_sigbus(ctx: &Ctx<'_>) {
    let flags = Flags::MMAP | Flags::INIT_SHARED;
    if !require(ctx, flags) {
        return;
    }
    let size = 4 * ctx.block();
    let mem = ctx.create(size, flags);
    let view = mem
        .map(0, 4 * size)
        .expect("a mapping past the end is allowed");
    assert_eq!(view.len() as u64, 4 * size);
    match touch::fill(&view, 0, 4 * size, 0xaa) {
        Err(f) if f.at == size && f.is_access_error() => {}
        other => panic!("writing past the end: expected SIGBUS at {size:#x}, got {other:?}"),
    }
    match touch::read_byte(&view, size) {
        Err(f) if f.at == size && f.is_access_error() => {}
        other => panic!("reading at the end: expected SIGBUS, got {other:?}"),
    }
    touch::expect_fault(&view, size, 3 * size, "past the end");
    touch::expect_bytes(&view, 0, size, 0xaa, "below the end");
    assert_eq!(
        mem.stat().expect("fstat").0,
        size,
        "mapping past the end keeps the size"
    );
}

/// Without `INIT_SHARED` every page starts private: every host touch is `SIGBUS`, the
/// checked accessors refuse with `EFAULT` naming the first page, the guest reads zeros.
pub fn private_sigbus(ctx: &Ctx<'_>) {
    if !require(ctx, Flags::MMAP) {
        return;
    }
    let size = 4 * ctx.block();
    let mem = ctx.create(size, Flags::MMAP);
    let view = mem.map(0, size).expect("map");
    match touch::fill(&view, 0, size, 0xaa) {
        Err(f) if f.at == 0 && f.is_access_error() => {}
        other => panic!("writing a private file: expected SIGBUS at 0, got {other:?}"),
    }
    touch::expect_fault(&view, 0, size, "private file");
    let mut b = [0u8; 8];
    let e = mem
        .read_at(PAGE, &mut b)
        .expect_err("read_at of a private page");
    assert_eq!((e.errno(), e.error_offset()), (libc::EFAULT, Some(PAGE)));
    let e = mem.write_at(0, &b).expect_err("write_at of a private page");
    assert_eq!((e.errno(), e.error_offset()), (libc::EFAULT, Some(0)));
    super::guest_expect(&mem, 0, size, 0, "guest view of a fresh private file");
}

/// Without `MMAP` the file cannot be mapped (`ENODEV`), whatever the length or sharing.
pub fn needs_mmap_flag(ctx: &Ctx<'_>) {
    let size = 4 * ctx.block();
    let mut tried = 0;
    for flags in [Flags::NONE, Flags::INIT_SHARED] {
        if !ctx.supports(flags) {
            continue;
        }
        let mem = ctx.create(size, flags);
        for len in [PAGE, ctx.block(), size] {
            expect_errno(
                mem.map(0, len),
                libc::ENODEV,
                &format!("map {len:#x} with {flags:?}"),
            );
        }
        expect_errno(
            mem.map_with(0, size, Sharing::CopyOnWrite),
            libc::ENODEV,
            &format!("copy-on-write map with {flags:?}"),
        );
        tried += 1;
    }
    assert!(tried > 0, "every backing supports a file without MMAP");
}

/// A copy-on-write (private) mapping is refused with `EINVAL` for every flag set with
/// `MMAP`; a shared mapping of the same file still works afterwards.
pub fn copy_on_write_refused(ctx: &Ctx<'_>) {
    let size = 4 * ctx.block();
    let mut tried = 0;
    for flags in flag_sets(ctx)
        .into_iter()
        .filter(|f| f.contains(Flags::MMAP))
    {
        let mem = ctx.create(size, flags);
        for len in [PAGE, size] {
            expect_errno(
                mem.map_with(0, len, Sharing::CopyOnWrite),
                libc::EINVAL,
                &format!("copy-on-write map {len:#x} with {flags:?}"),
            );
        }
        let view = mem.map(0, size).expect("a shared mapping still works");
        assert_eq!(view.len() as u64, size);
        tried += 1;
    }
    if tried == 0 {
        eprintln!(
            "skipped: backing {} does not support MMAP",
            ctx.backend().name()
        );
    }
}
