//! The signal a host touch of an unreachable page raises.

/// How a host touch of a page of a view faults, by the mechanism that enforces it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostFault {
    /// `SIGSEGV` (`SEGV_MAPERR`): a guard marker on a private or poisoned 4 KiB
    /// page (shmem, the kernel guest_memfd, the pieces of a split HugeTLB page).
    Segv,
    /// `SIGBUS` (`BUS_ADRERR`): a hole (a wholly private HugeTLB huge page) or a touch past the
    /// end of the file.
    Bus,
}

impl HostFault {
    /// The signal number.
    pub fn signo(self) -> i32 {
        match self {
            HostFault::Segv => libc::SIGSEGV,
            HostFault::Bus => libc::SIGBUS,
        }
    }

    /// The signal's `si_code` as this kernel reports it: `SEGV_MAPERR` (1) for a guard
    /// marker, `BUS_ADRERR` (2) for a hole or past the end of the file.
    pub fn si_code(self) -> i32 {
        match self {
            HostFault::Segv => 1,
            HostFault::Bus => libc::BUS_ADRERR,
        }
    }
}
