//! `fallocate` with the kernel guest_memfd's rules.
//!
//! Checked in the order the kernel checks them: `vfs_fallocate` first (zero length or
//! negative offset `EINVAL`, unknown mode bits `EOPNOTSUPP`, `offset + len` past the largest
//! file `EFBIG`), then guest_memfd (`KEEP_SIZE` required and only `PUNCH_HOLE` besides it,
//! `EOPNOTSUPP`; unaligned `EINVAL`; allocation past the end `EINVAL`; punch-hole past the
//! end clipped, and a no-op at or beyond it). Punch-hole discards contents (they read back
//! zero) and never changes attributes.

use std::io;

use super::GuestMemfd;
use crate::engine::gate::GateError;
use crate::model::error::Errno;
use crate::model::units::{ByteRange, RangeError};

/// `fallocate` mode bits, with the kernel's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FallocMode(pub i32);

impl FallocMode {
    /// Allocate without changing the size (`FALLOC_FL_KEEP_SIZE`); required.
    pub const KEEP_SIZE: FallocMode = FallocMode(libc::FALLOC_FL_KEEP_SIZE);
    /// Discard the range (`FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE`).
    pub const PUNCH_HOLE: FallocMode =
        FallocMode(libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE);
}

/// Bits `vfs_fallocate` knows at all; others are `EOPNOTSUPP` before the file is asked.
const VFS_SUPPORTED: i32 = libc::FALLOC_FL_KEEP_SIZE
    | libc::FALLOC_FL_PUNCH_HOLE
    | libc::FALLOC_FL_COLLAPSE_RANGE
    | libc::FALLOC_FL_ZERO_RANGE
    | libc::FALLOC_FL_INSERT_RANGE
    | libc::FALLOC_FL_UNSHARE_RANGE
    | 0x80; // FALLOC_FL_WRITE_ZEROES (6.17)

/// Mode words `vfs_fallocate` lets through to the file (measured on Linux 6.18): the modes
/// are exclusive, `PUNCH_HOLE` needs `KEEP_SIZE`, and only allocate, zero-range and
/// insert-range may carry `KEEP_SIZE`. Any other combination is `EOPNOTSUPP`, before the
/// `EFBIG` check.
const VFS_MODES: [i32; 10] = [0x0, 0x1, 0x3, 0x8, 0x10, 0x11, 0x20, 0x40, 0x41, 0x80];

/// Why `fallocate` was refused.
#[derive(Debug, thiserror::Error)]
pub enum FallocateError {
    /// Mode not supported on guest memory (`EOPNOTSUPP`).
    #[error("fallocate mode {mode:#x} is not supported")]
    Unsupported {
        /// The mode given.
        mode: i32,
    },
    /// Zero length, unaligned, or allocation past the end (`EINVAL`).
    #[error(transparent)]
    Range(#[from] RangeError),
    /// `offset + len` exceeds the largest file size (`EFBIG`).
    #[error("range {offset:#x}+{len:#x} exceeds the largest file")]
    TooBig {
        /// Offset given.
        offset: u64,
        /// Length given.
        len: u64,
    },
    /// This process may not allocate now (`EPERM`): frozen for a hand-over, handed over, a
    /// follower, a forked child.
    #[error(transparent)]
    Gate(#[from] GateError),
    /// The backing failed (`ENOSPC`, `ENOMEM`, ...).
    #[error("fallocate at {offset:#x}: {source}")]
    Os {
        /// Offset given.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Errno for FallocateError {
    fn errno(&self) -> i32 {
        match self {
            FallocateError::Unsupported { .. } => libc::EOPNOTSUPP,
            FallocateError::Range(_) => libc::EINVAL,
            FallocateError::TooBig { .. } => libc::EFBIG,
            FallocateError::Gate(e) => e.errno(),
            FallocateError::Os { source, .. } => crate::model::error::os_errno(source),
        }
    }

    fn error_offset(&self) -> Option<u64> {
        match self {
            FallocateError::Range(e) => Some(e.offset()),
            FallocateError::TooBig { offset, .. } | FallocateError::Os { offset, .. } => {
                Some(*offset)
            }
            _ => None,
        }
    }
}

impl GuestMemfd {
    /// Allocates or punches `[offset, offset + len)` with the kernel's rules (module docs).
    pub fn fallocate(&self, mode: FallocMode, offset: u64, len: u64) -> Result<(), FallocateError> {
        let inner = &self.inner;
        let max = u64::try_from(i64::MAX).unwrap_or(u64::MAX);
        if len == 0 || offset > max || len > max {
            return Err(RangeError::Empty { offset }.into_fallocate(offset, len));
        }
        if mode.0 & !VFS_SUPPORTED != 0 || !VFS_MODES.contains(&mode.0) {
            return Err(FallocateError::Unsupported { mode: mode.0 });
        }
        if offset.checked_add(len).is_none_or(|end| end > max) {
            return Err(FallocateError::TooBig { offset, len });
        }
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let punch = libc::FALLOC_FL_PUNCH_HOLE;
        if mode.0 & keep == 0 || mode.0 & !(keep | punch) != 0 {
            return Err(FallocateError::Unsupported { mode: mode.0 });
        }
        let block = inner.block_size();
        if offset % block != 0 || len % block != 0 {
            return Err(RangeError::Unaligned {
                offset,
                len,
                align: block,
            }
            .into());
        }
        let end = offset + len;
        let os = |source| FallocateError::Os { offset, source };
        // Frozen for a live-update hand-over (or handed over): `EPERM`, as the kernel's
        // live-update freeze answers.
        inner.gate().allocation()?;
        let size = inner.size();
        if mode.0 & punch != 0 {
            let end = end.min(size);
            if offset >= end {
                return Ok(());
            }
            inner.punch(ByteRange { start: offset, end }).map_err(os)
        } else {
            if end > size {
                return Err(RangeError::OutOfBounds { offset, len, size }.into());
            }
            inner
                .allocate(mode.0, ByteRange { start: offset, end })
                .map_err(os)
        }
    }
}

impl RangeError {
    /// The `EINVAL` vfs gives for a zero length or a negative offset or length.
    fn into_fallocate(self, offset: u64, len: u64) -> FallocateError {
        if len == 0 {
            FallocateError::Range(self)
        } else {
            FallocateError::Range(RangeError::Overflow { offset, len })
        }
    }
}
