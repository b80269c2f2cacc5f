//! File-descriptor syscalls: memfd creation, sealing, fallocate, fstat.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::{cvt, to_off};

/// Creates a memfd with `MFD_CLOEXEC | MFD_ALLOW_SEALING | extra`.
pub fn memfd_create(name: &CStr, extra: libc::c_uint) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string; the flags are plain integers.
    let fd = unsafe {
        libc::memfd_create(
            name.as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | extra,
        )
    };
    let fd = cvt(fd)?;
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the file's size.
pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    let size = to_off(size)?;
    // SAFETY: plain syscall on a valid descriptor.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size) }).map(drop)
}

/// Adds seals to a memfd.
pub fn add_seals(fd: BorrowedFd<'_>, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) }).map(drop)
}

/// `fallocate(2)` with the raw mode bits.
pub fn fallocate(fd: BorrowedFd<'_>, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (offset, len) = (to_off(offset)?, to_off(len)?);
    // SAFETY: plain syscall on a valid descriptor.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset, len) }).map(drop)
}

/// `fstat(2)`.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `st` is a valid, writable `struct stat`.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it filled `st`; a zeroed stat is valid anyway.
    Ok(unsafe { st.assume_init() })
}

/// `read(2)` into `buf`, returning the byte count.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` writable bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// `write(2)` from `buf`, returning the byte count.
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` readable bytes.
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// `pread(2)` into `buf`, returning the byte count.
pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let offset = to_off(offset)?;
    // SAFETY: `buf` is valid for `buf.len()` writable bytes.
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// `pwrite(2)` from `buf`, returning the byte count.
pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
    let offset = to_off(offset)?;
    // SAFETY: `buf` is valid for `buf.len()` readable bytes.
    let n = unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), offset) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// The seals of a memfd (`F_GET_SEALS`); `EINVAL` for a file that cannot be sealed.
pub fn seals(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: plain syscall on a valid descriptor.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })
}

/// Fills `buf` from `offset` (retrying short reads and `EINTR`); `EIO` when the file ends
/// first.
pub fn pread_exact(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<()> {
    whole(buf.len(), offset, |done, at| {
        pread(fd, &mut buf[done..], at)
    })
}

/// Writes all of `buf` at `offset` (retrying short writes and `EINTR`).
pub fn pwrite_all(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<()> {
    whole(buf.len(), offset, |done, at| pwrite(fd, &buf[done..], at))
}

/// Calls `step(done, at)` (a positioned read or write of the bytes from `done` at file offset
/// `at`) until `len` bytes are through, retrying short transfers and `EINTR`; `EIO` when a
/// call transfers nothing.
fn whole(
    len: usize,
    offset: u64,
    mut step: impl FnMut(usize, u64) -> io::Result<usize>,
) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let at = offset
            .checked_add(u64::try_from(done).unwrap_or(u64::MAX))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        match step(done, at) {
            Ok(0) => return Err(io::Error::from_raw_os_error(libc::EIO)),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `cachestat(2)`'s syscall number (the same on every architecture; libc does not name it
/// for every target yet).
const SYS_CACHESTAT: libc::c_long = 451;

/// `struct cachestat_range` of `cachestat(2)`.
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat` of `cachestat(2)`.
#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Pages of `[offset, offset + len)` the file's page cache holds or that were evicted from it
/// (a shmem page in swap counts: it may still be in the swap cache), by `cachestat(2)`, which
/// reads the file's page cache alone: no mapping, no page-table walk, no bounce page as
/// `mincore(2)` takes. `ENOSYS` before Linux 6.5, `EOPNOTSUPP` on hugetlbfs.
pub fn cached_or_evicted(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<u64> {
    let range = CachestatRange { off: offset, len };
    let mut st = Cachestat::default();
    // SAFETY: `range` and `st` are valid, properly laid out structs that live across the
    // call; the kernel reads the first and writes the second.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            fd.as_raw_fd(),
            std::ptr::from_ref(&range),
            std::ptr::from_mut(&mut st),
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.nr_cache.saturating_add(st.nr_evicted))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    /// What the move's residency check relies on: a page written is counted, one never
    /// written or punched out is not, and the count covers exactly the range asked.
    #[test]
    fn cachestat_counts_exactly_the_resident_pages_of_the_range() {
        let fd = memfd_create(c"gmem-cachestat", 0).expect("memfd");
        ftruncate(fd.as_fd(), 8 * 4096).expect("ftruncate");
        assert_eq!(
            cached_or_evicted(fd.as_fd(), 0, 8 * 4096).expect("cachestat"),
            0
        );
        pwrite_all(fd.as_fd(), b"x", 3 * 4096).expect("write");
        pwrite_all(fd.as_fd(), b"y", 5 * 4096 + 7).expect("write");
        assert_eq!(
            cached_or_evicted(fd.as_fd(), 3 * 4096, 4096).expect("cachestat"),
            1
        );
        assert_eq!(
            cached_or_evicted(fd.as_fd(), 2 * 4096, 4096).expect("cachestat"),
            0
        );
        assert_eq!(
            cached_or_evicted(fd.as_fd(), 4 * 4096, 4096).expect("cachestat"),
            0
        );
        assert_eq!(
            cached_or_evicted(fd.as_fd(), 0, 8 * 4096).expect("cachestat"),
            2
        );
        let punch = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE;
        fallocate(fd.as_fd(), punch, 3 * 4096, 4096).expect("punch");
        assert_eq!(
            cached_or_evicted(fd.as_fd(), 3 * 4096, 4096).expect("cachestat"),
            0
        );
        assert_eq!(
            cached_or_evicted(fd.as_fd(), 0, 8 * 4096).expect("cachestat"),
            1
        );
    }
}
