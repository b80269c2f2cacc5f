//! Kernel references for tests: pages of a mapping vmspliced into a pipe (the kernel holds the
//! pages, no copy is made), and the pipe read back.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two descriptors.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: errno {}", errno());
    // SAFETY: the read end is fresh and owned by nobody else.
    let rd = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above, the write end.
    let wr = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    (rd, wr)
}

/// vmsplices the `len` bytes at `addr` (inside a live mapping the caller holds) into a new
/// pipe and returns its read end; panics unless the kernel took all of them.
pub fn splice(addr: *const u8, len: usize) -> OwnedFd {
    let (rd, wr) = pipe();
    let iov = libc::iovec {
        iov_base: addr.cast_mut().cast(),
        iov_len: len,
    };
    // SAFETY: one iovec over memory the caller keeps mapped; the pipe takes references to its
    // pages and nothing is written there.
    let n = unsafe { libc::vmsplice(wr.as_raw_fd(), &iov, 1, 0) };
    assert_eq!(
        n,
        isize::try_from(len).expect("fits"),
        "vmsplice: errno {}",
        errno()
    );
    rd
}

/// Reads `len` bytes from the pipe `rd`; panics if it ends first.
pub fn drain(rd: &OwnedFd, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut got = 0;
    while got < len {
        // SAFETY: reads into the live remainder of `out`.
        let n = unsafe { libc::read(rd.as_raw_fd(), out[got..].as_mut_ptr().cast(), len - got) };
        assert!(n > 0, "read from the pipe: {n}, errno {}", errno());
        got += usize::try_from(n).expect("positive");
    }
    out
}
