//! The VMM's own `mremap` of a host view, for the cases that move views while gmem works on
//! them, and the socket a hand-over runs on.

use std::os::fd::{FromRawFd, OwnedFd};

use gmem::HostView;

/// A fresh anonymous read-only mapping of `len` bytes where the kernel chooses, for a view to
/// be moved onto (`MREMAP_FIXED` replaces it); unmapped, with whatever the move left there,
/// when dropped.
#[derive(Debug)]
pub struct Target {
    addr: *mut libc::c_void,
    len: usize,
}

impl Target {
    /// Maps the target.
    pub fn new(len: usize) -> Target {
        // SAFETY: a new private anonymous mapping; nothing else refers to it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "anonymous mmap");
        Target { addr, len }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // SAFETY: the range is this value's own (the target, or the view moved onto it).
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Moves the first `to.len` bytes of `view` onto `to` (`MREMAP_MAYMOVE | MREMAP_FIXED`), as
/// a VMM might: the new address, or the errno (`EFAULT` when the range is several mappings,
/// such as a HugeTLB view whose window is split).
pub fn move_view(view: &HostView, to: &Target) -> Result<*mut u8, i32> {
    // SAFETY: moves part of the view's own range onto the target, a mapping `to` owns; the
    // view's Rust value stays valid (gmem gives up a view it finds moved).
    let ret = unsafe {
        libc::mremap(
            view.as_ptr().cast(),
            to.len,
            to.len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            to.addr,
        )
    };
    if ret == libc::MAP_FAILED {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(ret.cast())
    }
}

/// A connected `SOCK_SEQPACKET` pair (close-on-exec), as `gmem::preserve::hand_over` and
/// `receive` expect.
pub fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: socketpair returned two fresh descriptors that nothing else owns.
    let a = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as for `a`.
    let b = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    (a, b)
}
