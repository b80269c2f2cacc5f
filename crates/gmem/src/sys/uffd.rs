//! The userfaultfd calls gmem needs: write-protection to hold writers off while a HugeTLB page
//! moves, and the events that tell gmem when the VMM itself moved or unmapped a view.
//!
//! gmem registers host views (shmem and HugeTLB) in write-protect mode, which on its own
//! intercepts nothing, with `UFFD_FEATURE_EVENT_REMAP` and `UFFD_FEATURE_EVENT_UNMAP`: an
//! `mremap` or `munmap` of a registered range by anyone then stops the calling thread until
//! gmem has read the event (see `engine::views::tracker`). gmem unregisters a view before it
//! unmaps it itself; the windows it replaces inside a live view raise events it announces to
//! the reader as its own. The layouts are defined here because the libc crate does not carry
//! them.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::cvt;

const UFFD_API: u64 = 0xaa;
const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO: u64 = 0xAA;

/// `UFFD_EVENT_REMAP`.
pub(crate) const EVENT_REMAP: u8 = 0x14;
/// `UFFD_EVENT_UNMAP`.
pub(crate) const EVENT_UNMAP: u8 = 0x16;

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
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg`: 32 bytes, the event in the first byte, the arguments from byte 8.
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved: [u8; 7],
    arg: [u64; 3],
}

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}

const UFFDIO_API_IOCTL: u64 = ioc(3, 0x3f, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(3, 0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: u64 = ioc(2, 0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ioc(2, 0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_WRITEPROTECT: u64 = ioc(3, 0x06, std::mem::size_of::<UffdioWriteprotect>());
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;

/// One event read from the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// A registered range moved (`mremap`): from, to, new length.
    Remap { from: u64, to: u64, len: u64 },
    /// A registered range was unmapped: start, end.
    Unmap { start: u64, end: u64 },
    /// Anything else (a write-protect fault nobody resolves: the writer waits for the wake).
    Other,
}

/// A userfaultfd with write-protection on shmem and HugeTLB and the remap/unmap events.
#[derive(Debug)]
pub(crate) struct Uffd {
    fd: OwnedFd,
}

/// How long [`Uffd::write_protect`] waits for an unread event to be taken.
pub const EVENT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn range(addr: usize, len: usize) -> UffdioRange {
    UffdioRange {
        start: addr as u64,
        len: len as u64,
    }
}

impl Uffd {
    /// Opens a userfaultfd (non-blocking reads) with write-protection on shmem and HugeTLB,
    /// and, with `events`, the remap and unmap events (then every `mremap`/`munmap` of a
    /// registered range waits until the event is read).
    ///
    /// Fails with `ENOSYS`/`EPERM` where userfaultfd is unavailable.
    pub fn new(events: bool) -> io::Result<Self> {
        // SAFETY: plain syscall with integer flags.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        let raw = libc::c_int::try_from(raw).map_err(|_| io::Error::last_os_error())?;
        let raw = cvt(raw)?;
        // SAFETY: `raw` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_WP_HUGETLBFS_SHMEM
                | if events {
                    UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_UNMAP
                } else {
                    0
                },
            ioctls: 0,
        };
        // SAFETY: `api` is a valid `struct uffdio_api` for the duration of the call.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API_IOCTL, &mut api) })?;
        Ok(Uffd { fd })
    }

    /// Registers `[addr, addr + len)` (a shmem or HugeTLB mapping) in write-protect mode.
    pub fn register(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: range(addr, len),
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: `reg` is a valid `struct uffdio_register` for the duration of the call.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) }).map(drop)
    }

    /// True when the mapping `[addr, addr + len)` is registered with *another* userfaultfd
    /// (`EBUSY` from the kernel's registration, which refuses to give a range two owners);
    /// false when it is registered with this one in write-protect mode, which the kernel
    /// takes as a no-op.
    ///
    /// A range registered with no userfaultfd is registered with this one as a side effect:
    /// ask only about ranges known to be registered with some userfaultfd (`uw` in smaps).
    pub fn registered_elsewhere(&self, addr: usize, len: usize) -> io::Result<bool> {
        match self.register(addr, len) {
            Ok(()) => Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Unregisters `[addr, addr + len)`, so that unmapping or remapping it raises no event.
    pub fn unregister(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut r = range(addr, len);
        // SAFETY: `r` is a valid `struct uffdio_range` for the duration of the call.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut r) }).map(drop)
    }

    /// Write-protects `[addr, addr + len)` (`protect`), or lifts the protection. A write to a
    /// protected page blocks the writing thread until the protection is lifted and
    /// [`Uffd::wake`] is called on it.
    ///
    /// The kernel answers `EAGAIN` while a remap or unmap event of this userfaultfd is unread
    /// (the address space is changing): the call is retried until the reader has taken it,
    /// for at most [`EVENT_WAIT`].
    pub fn write_protect(&self, addr: usize, len: usize, protect: bool) -> io::Result<()> {
        let started = std::time::Instant::now();
        loop {
            let mut wp = UffdioWriteprotect {
                range: range(addr, len),
                mode: if protect {
                    UFFDIO_WRITEPROTECT_MODE_WP
                } else {
                    0
                },
            };
            // SAFETY: `wp` is a valid `struct uffdio_writeprotect` for the duration of the
            // call.
            let r = cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp) });
            match r {
                Err(e)
                    if e.raw_os_error() == Some(libc::EAGAIN) && started.elapsed() < EVENT_WAIT =>
                {
                    std::thread::sleep(std::time::Duration::from_micros(20));
                }
                r => return r.map(drop),
            }
        }
    }

    /// Wakes the threads waiting on a fault in `[addr, addr + len)`; they retry the access
    /// (on whatever is mapped there now).
    pub fn wake(&self, addr: usize, len: usize) -> io::Result<()> {
        let mut r = range(addr, len);
        // SAFETY: `r` is a valid `struct uffdio_range` for the duration of the call.
        cvt(unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut r) }).map(drop)
    }

    /// True when an event is waiting to be read (one `poll` that does not wait).
    pub fn pending(&self) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
        n > 0 && fds[0].revents & libc::POLLIN != 0
    }

    /// Reads one pending event; `None` when there is none (the descriptor is non-blocking).
    pub fn read_event(&self) -> io::Result<Option<Event>> {
        let mut msg = std::mem::MaybeUninit::<UffdMsg>::zeroed();
        let size = std::mem::size_of::<UffdMsg>();
        // SAFETY: `msg` is valid for `size` writable bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr().cast(), size) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                io::ErrorKind::Interrupted => self.read_event(),
                _ => Err(e),
            };
        }
        if usize::try_from(n).ok() != Some(size) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        // SAFETY: the kernel wrote a whole `struct uffd_msg` (checked above); zeroed memory is
        // a valid `UffdMsg` anyway.
        let msg = unsafe { msg.assume_init() };
        Ok(Some(match msg.event {
            EVENT_REMAP => Event::Remap {
                from: msg.arg[0],
                to: msg.arg[1],
                len: msg.arg[2],
            },
            EVENT_UNMAP => Event::Unmap {
                start: msg.arg[0],
                end: msg.arg[1],
            },
            _ => Event::Other,
        }))
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
