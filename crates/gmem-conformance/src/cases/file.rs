//! The file itself: creation flags and sizes, identity, refused operations, size and block
//! size (DESIGN §7 items 1 and 2; `guest_memfd_test.c`: `test_guest_memfd_flags`,
//! `test_create_guest_memfd_invalid_sizes`, `test_create_guest_memfd_multiple`,
//! `test_file_read_write`, `test_file_size`).

use gmem::Flags;

use super::{expect_errno, flag_sets, PAGE};
use crate::Ctx;

/// Each single flag bit 0..63: the backing's supported bits create a file with exactly that
/// flag, every other bit is refused with `EINVAL`; the supported bits together succeed too.
pub fn flags_single_bits(ctx: &Ctx<'_>) {
    let size = ctx.block();
    let supported = ctx.backend().supported_flags();
    let mut accepted = 0u64;
    for bit in 0..64 {
        let flags = Flags::from_bits_retain(1u64 << bit);
        let res = ctx.try_create(size, flags);
        if ctx.supports(flags) {
            let mem =
                res.unwrap_or_else(|e| panic!("flag bit {bit} is supported but refused: {e}"));
            assert_eq!(mem.flags(), flags, "flags of a file created with bit {bit}");
            assert_eq!(mem.size(), size);
            accepted |= 1 << bit;
        } else {
            expect_errno(res, libc::EINVAL, &format!("create with flag bit {bit}"));
        }
    }
    assert_eq!(
        accepted,
        supported.bits(),
        "single bits accepted vs supported flags"
    );
    let mem = ctx.create(size, supported);
    assert_eq!(mem.flags(), supported);
    // An unknown bit next to supported ones is refused just the same.
    for bit in [2u32, 31, 63] {
        let flags = Flags::from_bits_retain(supported.bits() | (1u64 << bit));
        if !ctx.supports(flags) {
            expect_errno(
                ctx.try_create(size, flags),
                libc::EINVAL,
                &format!("create with supported flags plus bit {bit}"),
            );
        }
    }
}

/// Sizes 0 and 1..page-1 are refused with `EINVAL` for every flag set, and so is every size
/// that is not a multiple of the block size (huge page for HugeTLB).
pub fn invalid_sizes(ctx: &Ctx<'_>) {
    let block = ctx.block();
    for flags in flag_sets(ctx) {
        expect_errno(ctx.try_create(0, flags), libc::EINVAL, "create size 0");
        for size in 1..PAGE {
            expect_errno(
                ctx.try_create(size, flags),
                libc::EINVAL,
                &format!("create size {size:#x} with {flags:?}"),
            );
        }
        let mut unaligned: Vec<u64> = vec![block + 1, block + PAGE - 1, u64::MAX];
        if block > PAGE {
            let pages = block / PAGE;
            // Every page multiple below one block (sampled beyond 512 of them), and a page
            // past one block.
            let step = (pages / 512).max(1);
            unaligned.extend(
                (1..pages)
                    .step_by(usize::try_from(step).unwrap_or(1))
                    .map(|k| k * PAGE),
            );
            unaligned.extend([block - PAGE, block + PAGE, 2 * block - PAGE]);
        }
        for size in unaligned {
            expect_errno(
                ctx.try_create(size, flags),
                libc::EINVAL,
                &format!("create size {size:#x} (block {block:#x}) with {flags:?}"),
            );
        }
        let mem = ctx.create(block, flags);
        assert_eq!(mem.size(), block, "a size of one block is valid");
    }
}

/// Two files are distinct objects (distinct identities) and creating the second does not
/// change the first's size.
pub fn distinct_files(ctx: &Ctx<'_>) {
    let block = ctx.block();
    let one = ctx.create(block, Flags::NONE);
    assert_eq!(one.stat().expect("fstat first").0, block);
    let two = ctx.create(2 * block, Flags::NONE);
    assert_eq!(two.stat().expect("fstat second").0, 2 * block);
    assert_eq!(one.stat().expect("fstat first again").0, block);
    assert_eq!((one.size(), two.size()), (block, 2 * block));
    let (a, b) = (one.id().expect("id first"), two.id().expect("id second"));
    assert_ne!(a, b, "two files must have distinct identities");
    assert_eq!(
        one.clone().id().expect("id of a clone"),
        a,
        "a clone is the same file"
    );
}

/// `read` and `write` on the file fail with `EINVAL`, `pread` and `pwrite` with `ESPIPE` (the
/// kernel guest_memfd is not seekable), for every flag set.
pub fn io_refused(ctx: &Ctx<'_>) {
    for flags in flag_sets(ctx) {
        let size = 4 * ctx.block();
        let mem = ctx.create(size, flags);
        let mut buf = [0u8; 64];
        let what = |op: &str| format!("{op} on a file with {flags:?}");
        expect_errno(mem.read(&mut buf), libc::EINVAL, &what("read"));
        expect_errno(mem.write(&buf), libc::EINVAL, &what("write"));
        expect_errno(mem.pread(&mut buf, 0), libc::ESPIPE, &what("pread"));
        expect_errno(mem.pwrite(&buf, 0), libc::ESPIPE, &what("pwrite"));
        expect_errno(
            mem.pread(&mut buf, PAGE),
            libc::ESPIPE,
            &what("pread at a page"),
        );
        expect_errno(
            mem.pwrite(&buf, PAGE),
            libc::ESPIPE,
            &what("pwrite at a page"),
        );
    }
}

/// The reported size is the size asked for, the block size is the backing's (page, or huge
/// page for HugeTLB) both from gmem and from `fstat`, and resizing fails with `EINVAL`
/// leaving the size unchanged.
pub fn size_and_block(ctx: &Ctx<'_>) {
    let block = ctx.block();
    for flags in flag_sets(ctx) {
        let size = 4 * block;
        let mem = ctx.create(size, flags);
        assert_eq!(mem.size(), size);
        assert_eq!(mem.block_size(), block);
        assert_eq!(
            mem.stat().expect("fstat"),
            (size, block),
            "fstat (st_size, st_blksize)"
        );
        for new in [
            0,
            block,
            size - block,
            size,
            size + block,
            2 * size,
            u64::MAX,
        ] {
            expect_errno(
                mem.set_len(new),
                libc::EINVAL,
                &format!("resize to {new:#x}"),
            );
        }
        assert_eq!(mem.size(), size);
        assert_eq!(mem.stat().expect("fstat after resizes").0, size);
    }
}
