//! `fallocate` (DESIGN §7 item 4; `guest_memfd_test.c`: `test_fallocate`,
//! `test_invalid_punch_hole`), with `p` the backing's block size.

use gmem::{FallocMode, Flags, GuestMemfd};

use super::{expect_errno, flag_sets, PAGE};
use crate::Ctx;

const ALLOC: FallocMode = FallocMode::KEEP_SIZE;
const PUNCH: FallocMode = FallocMode::PUNCH_HOLE;

fn ok(mem: &GuestMemfd, mode: FallocMode, off: u64, len: u64, what: &str) {
    mem.fallocate(mode, off, len)
        .unwrap_or_else(|e| panic!("{what} ({off:#x}, {len:#x}) should succeed: {e}"));
}

fn einval(mem: &GuestMemfd, mode: FallocMode, off: u64, len: u64, what: &str) {
    expect_errno(
        mem.fallocate(mode, off, len),
        libc::EINVAL,
        &format!("{what} ({off:#x}, {len:#x})"),
    );
}

/// The kernel selftest's sequence, for every flag set: allocate `(0, size)` ok; punch
/// `(p-1, p)` fails; allocate `(size, p)` and `(size+p, p)` fail; punch `(size, p)` and
/// `(size+p, p)` succeed; punch `(p, p-1)` fails; punch `(p, p)` ok; allocate `(p, p)` ok.
/// Every failure is `EINVAL`.
pub fn sequence(ctx: &Ctx<'_>) {
    let p = ctx.block();
    for flags in flag_sets(ctx) {
        let size = 4 * p;
        let mem = ctx.create(size, flags);
        ok(&mem, ALLOC, 0, size, "allocate the whole file");
        einval(&mem, PUNCH, p - 1, p, "punch at an unaligned offset");
        einval(&mem, ALLOC, size, p, "allocate at the end");
        einval(&mem, ALLOC, size + p, p, "allocate past the end");
        ok(&mem, PUNCH, size, p, "punch at the end");
        ok(&mem, PUNCH, size + p, p, "punch past the end");
        einval(&mem, PUNCH, p, p - 1, "punch an unaligned length");
        ok(&mem, PUNCH, p, p, "punch an aligned block");
        ok(&mem, ALLOC, p, p, "allocate the punched block again");
        assert_eq!(
            mem.stat().expect("fstat").0,
            size,
            "fallocate never changes the size"
        );
        // A range straddling the end: allocation is refused, punch-hole is clipped.
        einval(&mem, ALLOC, size - p, 2 * p, "allocate across the end");
        ok(&mem, PUNCH, size - p, 2 * p, "punch across the end");
    }
}

/// Punch-hole with an unaligned offset and/or length is `EINVAL`: `(0,1)`, `(0,p-1)`,
/// `(0,p+1)`, `(1,1)`, `(1,p-1)`, `(1,p)`, `(1,p+1)`, `(p,1)`, `(p,p-1)`, `(p,p+1)`; with
/// huge pages, base-page ranges are unaligned too.
pub fn invalid_punch(ctx: &Ctx<'_>) {
    let p = ctx.block();
    for flags in flag_sets(ctx) {
        let mem = ctx.create(4 * p, flags);
        let mut cases = vec![
            (0, 1),
            (0, p - 1),
            (0, p + 1),
            (1, 1),
            (1, p - 1),
            (1, p),
            (1, p + 1),
            (p, 1),
            (p, p - 1),
            (p, p + 1),
        ];
        if p > PAGE {
            cases.extend([(0, PAGE), (PAGE, PAGE), (PAGE, p), (p, PAGE)]);
            einval(
                &mem,
                ALLOC,
                0,
                PAGE,
                "allocate a base page of a huge-page file",
            );
            einval(
                &mem,
                ALLOC,
                PAGE,
                p,
                "allocate from a base page of a huge-page file",
            );
        }
        for (off, len) in cases {
            einval(&mem, PUNCH, off, len, &format!("punch with {flags:?}"));
        }
    }
}

/// Modes and argument classes the kernel refuses before looking at the range:
/// `KEEP_SIZE` is required and only `PUNCH_HOLE` may join it (`EOPNOTSUPP`); a zero length or
/// a negative offset is `EINVAL`; `offset + len` beyond the largest file is `EFBIG`.
pub fn modes(ctx: &Ctx<'_>) {
    let p = ctx.block();
    let mem = ctx.create(4 * p, Flags::NONE);
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    for (mode, what) in [
        (0, "allocate without KEEP_SIZE"),
        (libc::FALLOC_FL_PUNCH_HOLE, "punch without KEEP_SIZE"),
        (libc::FALLOC_FL_ZERO_RANGE, "zero range"),
        (
            libc::FALLOC_FL_ZERO_RANGE | keep,
            "zero range with KEEP_SIZE",
        ),
        (libc::FALLOC_FL_COLLAPSE_RANGE, "collapse range"),
        (libc::FALLOC_FL_INSERT_RANGE, "insert range"),
        (libc::FALLOC_FL_UNSHARE_RANGE | keep, "unshare range"),
        (0x100 | keep, "an unknown mode bit"),
    ] {
        expect_errno(
            mem.fallocate(FallocMode(mode), 0, p),
            libc::EOPNOTSUPP,
            &format!("fallocate mode {mode:#x}: {what}"),
        );
    }
    let i64_max = u64::try_from(i64::MAX).expect("i64::MAX fits u64");
    for mode in [ALLOC, PUNCH] {
        expect_errno(mem.fallocate(mode, 0, 0), libc::EINVAL, "zero length");
        expect_errno(
            mem.fallocate(mode, p, 0),
            libc::EINVAL,
            "zero length at a block",
        );
        expect_errno(
            mem.fallocate(mode, 1 << 63, p),
            libc::EINVAL,
            "negative offset",
        );
        expect_errno(
            mem.fallocate(mode, 0, 1 << 63),
            libc::EINVAL,
            "negative length",
        );
        let top = i64_max / p * p;
        expect_errno(
            mem.fallocate(mode, top, 2 * p),
            libc::EFBIG,
            "end beyond the largest file",
        );
    }
    assert_eq!(mem.stat().expect("fstat").0, 4 * p);
}
