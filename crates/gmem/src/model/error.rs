//! The one trait every gmem error implements: the errno the kernel gives for the same case.

/// An error that names the errno the kernel's guest_memfd (or the syscall gmem stands in for)
/// returns for the same case, and the offending offset where there is one.
///
/// ```
/// use gmem::{Errno, Flags, GuestMemfd};
/// let err = GuestMemfd::create(4095, Flags::MMAP).unwrap_err();
/// assert_eq!(err.errno(), libc::EINVAL);
/// ```
pub trait Errno {
    /// The errno.
    fn errno(&self) -> i32;

    /// The first offending byte offset (the kernel's `error_offset`), where there is one.
    fn error_offset(&self) -> Option<u64> {
        None
    }
}

/// The errno of an OS error (`EIO` when it carries none).
pub(crate) fn os_errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}
