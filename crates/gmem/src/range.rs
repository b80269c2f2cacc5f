//! Validation of `(offset, len)` arguments, shared by every call that takes a range.
//!
//! Every range is checked the same way the kernel checks a guest_memfd range: the length is not
//! zero, both ends are aligned, `offset + len` does not wrap, and the range lies inside the file.
//! All of these are `EINVAL` in the kernel; the variants keep the reason apart for callers.

/// Why a range argument was refused. Every variant is `EINVAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// The length is zero.
    #[error("empty range at offset {offset:#x}")]
    Empty {
        /// Offset given.
        offset: u64,
    },
    /// Offset or length is not a multiple of the required alignment.
    #[error("range {offset:#x}+{len:#x} is not aligned to {align:#x}")]
    Unaligned {
        /// Offset given.
        offset: u64,
        /// Length given.
        len: u64,
        /// Alignment required.
        align: u64,
    },
    /// `offset + len` wraps around `u64`.
    #[error("range {offset:#x}+{len:#x} overflows")]
    Overflow {
        /// Offset given.
        offset: u64,
        /// Length given.
        len: u64,
    },
    /// The range ends past the end of the file.
    #[error("range {offset:#x}+{len:#x} ends past the file size {size:#x}")]
    OutOfBounds {
        /// Offset given.
        offset: u64,
        /// Length given.
        len: u64,
        /// Size of the file.
        size: u64,
    },
}

impl RangeError {
    /// The errno the kernel returns for this case (always `EINVAL`).
    pub fn errno(&self) -> i32 {
        libc::EINVAL
    }

    /// The offset that was refused.
    pub fn offset(&self) -> u64 {
        match *self {
            RangeError::Empty { offset }
            | RangeError::Unaligned { offset, .. }
            | RangeError::Overflow { offset, .. }
            | RangeError::OutOfBounds { offset, .. } => offset,
        }
    }
}

/// A validated, non-empty byte range `[start, end)` inside a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl ByteRange {
    /// Checks `(offset, len)` against `align` (a power of two, 1 for none) and `size`.
    pub fn checked(offset: u64, len: u64, align: u64, size: u64) -> Result<Self, RangeError> {
        if len == 0 {
            return Err(RangeError::Empty { offset });
        }
        if offset % align != 0 || len % align != 0 {
            return Err(RangeError::Unaligned { offset, len, align });
        }
        let end = offset
            .checked_add(len)
            .ok_or(RangeError::Overflow { offset, len })?;
        if end > size {
            return Err(RangeError::OutOfBounds { offset, len, size });
        }
        Ok(ByteRange { start: offset, end })
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Always false: a `ByteRange` is never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The overlap of two ranges, if any.
    pub fn intersect(&self, other: &ByteRange) -> Option<ByteRange> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start < end).then_some(ByteRange { start, end })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_rejects_each_class() {
        assert_eq!(
            ByteRange::checked(0, 0, 4096, 8192),
            Err(RangeError::Empty { offset: 0 })
        );
        assert!(matches!(
            ByteRange::checked(1, 4096, 4096, 8192),
            Err(RangeError::Unaligned { .. })
        ));
        assert!(matches!(
            ByteRange::checked(u64::MAX - 4095, 8192, 4096, u64::MAX),
            Err(RangeError::Overflow { .. })
        ));
        assert!(matches!(
            ByteRange::checked(4096, 8192, 4096, 8192),
            Err(RangeError::OutOfBounds { .. })
        ));
        assert_eq!(
            ByteRange::checked(4096, 4096, 4096, 8192),
            Ok(ByteRange {
                start: 4096,
                end: 8192
            })
        );
    }
}
