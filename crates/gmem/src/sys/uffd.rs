//! The userfaultfd calls gmem needs to enforce private pages in host views.
//!
//! gmem registers each host view in write-protect mode, which on its own intercepts nothing
//! (gmem never write-protects a page), and marks private pages with `UFFDIO_POISON` (Linux 6.6):
//! a poison marker in a page-table entry makes every access a real `SIGBUS` and every kernel
//! access through the address (GUP) fail with `EFAULT`. `MADV_DONTNEED` removes the markers;
//! punch-hole keeps them. The layout of `struct uffdio_poison` and the feature bit are defined
//! here because the libc crate does not carry them.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::cvt;

const UFFD_API: u64 = 0xaa;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFD_FEATURE_POISON: u64 = 1 << 14;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO: u64 = 0xAA;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioPoison {
    range: UffdioRange,
    mode: u64,
    updated: i64,
}

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}

const UFFDIO_API_IOCTL: u64 = iowr(0x3f, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_POISON: u64 = iowr(0x08, std::mem::size_of::<UffdioPoison>());
const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, std::mem::size_of::<UffdioWriteprotect>());
const UFFDIO_WAKE: u64 =
    (2 << 30) | ((std::mem::size_of::<UffdioRange>() as u64) << 16) | (UFFDIO << 8) | 0x02;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// A userfaultfd configured for poison markers on shmem and HugeTLB mappings.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Opens a userfaultfd and enables the poison and shmem write-protect features.
    ///
    /// Fails with `ENOSYS`/`EPERM` where userfaultfd is unavailable and `EINVAL` on kernels
    /// older than 6.6 (no `UFFD_FEATURE_POISON`).
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall with integer flags.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        let raw = libc::c_int::try_from(raw).map_err(|_| io::Error::last_os_error())?;
        let raw = cvt(raw)?;
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_POISON | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
            ioctls: 0,
        };
        // SAFETY: `api` is a valid `struct uffdio_api` for the duration of the call.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API_IOCTL, &mut api) })?;
        Ok(Uffd { fd })
    }

    /// Registers `[addr, addr + len)` (a shmem or HugeTLB mapping) in write-protect mode.
    pub fn register(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: addr as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: `reg` is a valid `struct uffdio_register` for the duration of the call.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) }).map(drop)
    }

    /// Write-protects `[addr, addr + len)` (`protect`), or lifts the protection and wakes
    /// the threads that faulted on it. A write to a protected page blocks the writing thread
    /// until the protection is lifted or [`Uffd::wake`] is called on it (nobody reads the
    /// events: gmem uses this only to hold writers off for a moment).
    pub fn write_protect(&self, addr: usize, len: usize, protect: bool) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start: addr as u64,
                len: len as u64,
            },
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        // SAFETY: `wp` is a valid `struct uffdio_writeprotect` for the duration of the call.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp) }).map(drop)
    }

    /// Wakes the threads waiting on a fault in `[addr, addr + len)`; they retry the access
    /// (on whatever is mapped there now).
    pub fn wake(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut r = UffdioRange {
            start: addr as u64,
            len: len as u64,
        };
        // SAFETY: `r` is a valid `struct uffdio_range` for the duration of the call.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut r) }).map(drop)
    }

    /// Installs poison markers on `[addr, addr + len)`, which must have no present entries.
    ///
    /// On failure returns the error and the number of bytes poisoned before it; `EEXIST` means
    /// the page at `addr + done` is mapped (a concurrent fault) and must be zapped first.
    pub fn poison(&self, addr: usize, len: usize) -> Result<(), (io::Error, usize)> {
        let mut p = UffdioPoison {
            range: UffdioRange {
                start: addr as u64,
                len: len as u64,
            },
            mode: 0,
            updated: 0,
        };
        // SAFETY: `p` is a valid `struct uffdio_poison` for the duration of the call.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_POISON, &mut p) };
        if ret == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        let done = usize::try_from(p.updated).unwrap_or(0);
        Err((err, done))
    }
}
