//! Guest-physical addresses.
//!
//! [`Gpa`] keeps a guest-physical address apart from file offsets and lengths, which are bare
//! `u64`s: a binding maps `[gpa, gpa + len)` to `[offset, offset + len)` of a file, and mixing
//! the two up is exactly the kind of bug a type catches. Arithmetic is checked: every
//! operation that could wrap returns an `Option`, never a wrapped address.
//!
//! ```
//! use gmem_kvm::Gpa;
//!
//! let base = Gpa::new(0x10_0000);
//! let end = base.checked_add(0x4000).expect("no wrap");
//! assert_eq!(end.checked_offset_from(base), Some(0x4000));
//! assert_eq!(Gpa::new(u64::MAX).checked_add(1), None);
//! assert!(base.is_aligned(4096));
//! assert_eq!(format!("{base:#x}"), "0x100000");
//! ```

use std::fmt;

/// A guest-physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Gpa(u64);

impl Gpa {
    /// The address `raw`.
    pub const fn new(raw: u64) -> Gpa {
        Gpa(raw)
    }

    /// The address as a number (for the kernel's structures and the guest's registers).
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// `self + len`, or `None` when it wraps.
    pub const fn checked_add(self, len: u64) -> Option<Gpa> {
        match self.0.checked_add(len) {
            Some(v) => Some(Gpa(v)),
            None => None,
        }
    }

    /// How far `self` lies above `base` (`self - base`), or `None` when it lies below.
    pub const fn checked_offset_from(self, base: Gpa) -> Option<u64> {
        self.0.checked_sub(base.0)
    }

    /// True when the address is a multiple of `align` (a power of two).
    pub const fn is_aligned(self, align: u64) -> bool {
        self.0 % align == 0
    }

    /// Bits 0..31 of the address.
    pub fn low32(self) -> u32 {
        u32::try_from(self.0 & 0xffff_ffff).unwrap_or(u32::MAX)
    }

    /// Bits 32..63 of the address.
    pub fn high32(self) -> u32 {
        u32::try_from(self.0 >> 32).unwrap_or(u32::MAX)
    }

    /// The address made of `low` (bits 0..31) and `high` (bits 32..63).
    pub fn from_halves(low: u32, high: u32) -> Gpa {
        Gpa((u64::from(high) << 32) | u64::from(low))
    }

    /// True when `[self, self + len)` and `[other, other + other_len)` overlap (ranges that
    /// wrap are treated as reaching the top of the address space).
    pub fn overlaps(self, len: u64, other: Gpa, other_len: u64) -> bool {
        let end = self.0.saturating_add(len);
        let other_end = other.0.saturating_add(other_len);
        self.0 < other_end && other.0 < end
    }
}

impl From<u64> for Gpa {
    fn from(raw: u64) -> Gpa {
        Gpa(raw)
    }
}

impl From<Gpa> for u64 {
    fn from(gpa: Gpa) -> u64 {
        gpa.0
    }
}

impl fmt::LowerHex for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

impl fmt::Display for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gpa {:#x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpa_arithmetic_is_checked() {
        let g = Gpa::new(0x1000);
        assert_eq!(g.checked_add(0x1000), Some(Gpa::new(0x2000)));
        assert_eq!(Gpa::new(u64::MAX - 1).checked_add(2), None);
        assert_eq!(Gpa::new(0x3000).checked_offset_from(g), Some(0x2000));
        assert_eq!(g.checked_offset_from(Gpa::new(0x3000)), None);
        assert!(g.is_aligned(0x1000) && !Gpa::new(0x1800).is_aligned(0x1000));
    }

    #[test]
    fn gpa_halves_round_trip() {
        let g = Gpa::new(0xdead_beef_0000_3000);
        assert_eq!((g.low32(), g.high32()), (0x0000_3000, 0xdead_beef));
        assert_eq!(Gpa::from_halves(g.low32(), g.high32()), g);
    }

    #[test]
    fn gpa_overlap_is_half_open_and_saturates() {
        let a = Gpa::new(0x1000);
        assert!(a.overlaps(0x1000, Gpa::new(0x1fff), 1));
        assert!(!a.overlaps(0x1000, Gpa::new(0x2000), 0x1000));
        assert!(!Gpa::new(0x2000).overlaps(0x1000, a, 0x1000));
        assert!(Gpa::new(u64::MAX - 0xfff).overlaps(0x2000, Gpa::new(u64::MAX - 1), 1));
    }

    #[test]
    fn gpa_formats_as_hex() {
        assert_eq!(format!("{:#x}", Gpa::new(0x10_0000)), "0x100000");
        assert_eq!(Gpa::new(0x2000).to_string(), "gpa 0x2000");
        assert_eq!(u64::from(Gpa::from(7u64)), 7);
    }
}
