//! Units of guest memory: bytes, base pages and huge pages, with checked conversions.
//!
//! The public API speaks bytes (as the kernel's guest_memfd calls do); inside gmem a range is
//! validated once into a [`ByteRange`] and, where the unit is the base page, a [`PageRange`].
//! Every conversion between the two goes through this module, so no other module divides by
//! [`PAGE_SIZE`].
//!
//! Every range is checked the same way the kernel checks a guest_memfd range: the length is not
//! zero, both ends are aligned, `offset + len` does not wrap, and the range lies inside the file.
//! All of these are `EINVAL` in the kernel; the variants keep the reason apart for callers.

/// The base page size (4 KiB on every architecture gmem runs on).
pub const PAGE_SIZE: u64 = 4096;

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

impl super::error::Errno for RangeError {
    fn errno(&self) -> i32 {
        libc::EINVAL
    }

    fn error_offset(&self) -> Option<u64> {
        Some(self.offset())
    }
}

impl RangeError {
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

impl ByteRange {
    /// The range of `len` bytes from `start`; `None` when empty or wrapping.
    pub fn new(start: u64, len: u64) -> Option<Self> {
        let end = start.checked_add(len)?;
        (len > 0).then_some(ByteRange { start, end })
    }

    /// The base pages this range touches (rounded out to page boundaries).
    pub fn pages(&self) -> PageRange {
        PageRange {
            start: self.start / PAGE_SIZE,
            end: self.end.div_ceil(PAGE_SIZE),
        }
    }

    /// True when both ends are multiples of `align` (a power of two).
    pub fn is_aligned(&self, align: u64) -> bool {
        self.start % align == 0 && self.end % align == 0
    }
}

/// Base pages `[start, end)` of a file: indices, not bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageRange {
    /// First page.
    pub start: u64,
    /// One past the last page.
    pub end: u64,
}

impl PageRange {
    /// Pages `[start, end)`.
    pub fn new(start: u64, end: u64) -> Self {
        PageRange { start, end }
    }

    /// The one page `page`.
    pub fn one(page: u64) -> Self {
        PageRange {
            start: page,
            end: page.saturating_add(1),
        }
    }

    /// Number of pages.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// True when the range holds no page.
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// The range in bytes.
    pub fn bytes(&self) -> ByteRange {
        ByteRange {
            start: self.start.saturating_mul(PAGE_SIZE),
            end: self.end.saturating_mul(PAGE_SIZE),
        }
    }

    /// The overlap of two ranges, if any.
    pub fn intersect(&self, other: &PageRange) -> Option<PageRange> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start < end).then_some(PageRange { start, end })
    }

    /// The pages, in order.
    pub fn iter(&self) -> std::ops::Range<u64> {
        self.start..self.end
    }
}

impl super::attr::Run {
    /// The run's pages.
    pub fn pages(&self) -> PageRange {
        PageRange::new(self.start, self.end)
    }
}

/// Byte offset of base page `page`.
pub fn page_offset(page: u64) -> u64 {
    page.saturating_mul(PAGE_SIZE)
}

/// The base page holding byte `offset`.
pub fn page_of(offset: u64) -> u64 {
    offset / PAGE_SIZE
}

/// The huge pages of a file whose huge page holds `per` base pages: indices and their base
/// page ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HugeGeometry {
    /// Huge page size in bytes.
    pub size: u64,
}

impl HugeGeometry {
    /// Base pages per huge page.
    pub fn per(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// The huge page holding base page `page`.
    pub fn of_page(&self, page: u64) -> u64 {
        page / self.per()
    }

    /// The base pages of huge page `h`.
    pub fn pages(&self, h: u64) -> PageRange {
        let per = self.per();
        PageRange {
            start: h.saturating_mul(per),
            end: h.saturating_add(1).saturating_mul(per),
        }
    }

    /// The bytes of huge page `h`.
    pub fn bytes(&self, h: u64) -> ByteRange {
        self.pages(h).bytes()
    }

    /// The huge pages `r` touches.
    pub fn covering(&self, r: PageRange) -> std::ops::Range<u64> {
        let per = self.per();
        r.start / per..r.end.div_ceil(per)
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
