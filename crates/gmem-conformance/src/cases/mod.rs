//! The catalogue's cases, one function per case, each taking a [`Ctx`].
//!
//! - [`file`](mod@file): creation flags and sizes, identity, the refused file operations, size and
//!   block size (DESIGN §7 items 1 and 2).
//! - [`mmap`]: host mappings, `SIGBUS` past the end and on private pages, `ENODEV` without
//!   `MMAP`, copy-on-write refused (item 3).
//! - [`fallocate`]: the kernel selftest's allocate/punch sequence and invalid punches
//!   (item 4).
//! - [`convert`]: in-place conversion, per-page precision, unallocated pages, punch-hole and
//!   attributes, a second process, pinned pages (item 5).
//! - [`ranges`]: the ranges and patterns of the kernel's `private_mem_conversions_test`, on
//!   several threads at once (item 6).

pub mod convert;
pub mod fallocate;
pub mod file;
pub mod hardening;
pub mod mmap;
pub mod ranges;

use gmem::{Flags, PAGE_SIZE};

use crate::Ctx;

/// The base page: conversions, probes and byte checks work per 4 KiB page on every backing.
pub const PAGE: u64 = PAGE_SIZE;

/// [`PAGE`] as a buffer length.
pub const PAGE_BYTES: usize = 4096;

const _: () = assert!(PAGE_BYTES as u64 == PAGE);

/// gmem errors, by the errno the kernel gives for the same case.
pub use gmem::Errno;

/// Asserts that `res` failed with `errno`.
#[track_caller]
pub fn expect_errno<T: std::fmt::Debug, E: Errno + std::fmt::Display>(
    res: Result<T, E>,
    errno: i32,
    what: &str,
) {
    match res {
        Err(e) if e.errno() == errno => {}
        Err(e) => panic!(
            "{what}: expected errno {errno} ({}), got errno {} ({e})",
            errno_name(errno),
            e.errno()
        ),
        Ok(v) => panic!(
            "{what}: expected errno {errno} ({}), got success ({v:?})",
            errno_name(errno)
        ),
    }
}

/// A short name for the errnos the catalogue expects.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EINVAL => "EINVAL",
        libc::ENODEV => "ENODEV",
        libc::EAGAIN => "EAGAIN",
        libc::EFAULT => "EFAULT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EFBIG => "EFBIG",
        libc::EPERM => "EPERM",
        libc::ESPIPE => "ESPIPE",
        _ => "?",
    }
}

/// The flag sets the kernel selftest runs its file cases with (none, `MMAP`,
/// `MMAP|INIT_SHARED`), restricted to those the backing supports.
pub fn flag_sets(ctx: &Ctx<'_>) -> Vec<Flags> {
    [Flags::NONE, Flags::MMAP, Flags::MMAP | Flags::INIT_SHARED]
        .into_iter()
        .filter(|f| ctx.supports(*f))
        .collect()
}

/// True when the backing supports `flags`; otherwise prints why the case does nothing.
pub fn require(ctx: &Ctx<'_>, flags: Flags) -> bool {
    if ctx.supports(flags) {
        return true;
    }
    eprintln!(
        "skipped: backing {} does not support {flags:?}",
        ctx.backend().name()
    );
    false
}

/// Reads `len` bytes at `offset` through the guest view.
#[track_caller]
pub fn guest_read(mem: &gmem::GuestMemfd, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; usize::try_from(len).expect("len fits usize")];
    mem.guest()
        .expect("guest view")
        .read(offset, &mut buf)
        .unwrap_or_else(|e| panic!("guest read {offset:#x}+{len:#x}: {e}"));
    buf
}

/// Fills `len` bytes at `offset` with `value` through the guest view.
#[track_caller]
pub fn guest_fill(mem: &gmem::GuestMemfd, offset: u64, len: u64, value: u8) {
    let buf = vec![value; usize::try_from(len).expect("len fits usize")];
    mem.guest()
        .expect("guest view")
        .write(offset, &buf)
        .unwrap_or_else(|e| panic!("guest write {offset:#x}+{len:#x}: {e}"));
}

/// Asserts that the guest reads `value` in every byte of `[offset, offset + len)`.
#[track_caller]
pub fn guest_expect(mem: &gmem::GuestMemfd, offset: u64, len: u64, value: u8, what: &str) {
    let bytes = guest_read(mem, offset, len);
    if let Some((i, got)) = crate::touch::first_mismatch(&bytes, value) {
        panic!(
            "{what}: guest expected {value:#04x} at file offset {:#x}, got {got:#04x}",
            offset + i as u64
        );
    }
}

/// The attribute runs of the whole file as `(offset, len, private)` triples.
pub fn runs_of(mem: &gmem::GuestMemfd) -> Vec<(u64, u64, bool)> {
    mem.runs(0, mem.size())
        .expect("runs of the whole file")
        .into_iter()
        .map(|r| (r.offset, r.len, r.attr == gmem::Attr::Private))
        .collect()
}
