//! Thin, RAII wrappers over the syscalls gmem uses. Each `unsafe` block makes one syscall.
//! Private to the crate: the engine is their only user.

pub(crate) mod fd;
pub(crate) mod fork;
pub(crate) mod futex;
pub(crate) mod mapping;
pub(crate) mod numa;
pub(crate) mod proc;
pub(crate) mod uffd;

use std::io;

/// Converts a libc return value into `io::Result`, reading errno on `-1`.
pub(crate) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Converts a byte count to `usize`, failing with `EOVERFLOW` when it does not fit.
pub(crate) fn to_usize(v: u64) -> io::Result<usize> {
    usize::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// Converts a byte offset to `off_t`, failing with `EINVAL` as the kernel does for negative offsets.
pub(crate) fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}
