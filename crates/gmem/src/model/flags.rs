//! Creation flags of a guest memory file, with the kernel's bit values.

use std::fmt;

/// Creation flags, bit-compatible with `KVM_CREATE_GUEST_MEMFD`'s `flags`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(u64);

impl Flags {
    /// The host may map the file (`GUEST_MEMFD_FLAG_MMAP`, bit 0).
    pub const MMAP: Flags = Flags(1 << 0);
    /// Every page starts shared (`GUEST_MEMFD_FLAG_INIT_SHARED`, bit 1); otherwise private.
    pub const INIT_SHARED: Flags = Flags(1 << 1);
    /// No flags.
    pub const NONE: Flags = Flags(0);
    /// Every flag gmem knows.
    pub const ALL: Flags = Flags(Self::MMAP.0 | Self::INIT_SHARED.0);

    /// Flags from raw bits, keeping unknown bits (creation refuses them with `EINVAL`).
    pub const fn from_bits_retain(bits: u64) -> Flags {
        Flags(bits)
    }

    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// True when every bit of `other` is set.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Bits that are not in `allowed`.
    pub const fn difference(self, allowed: Flags) -> Flags {
        Flags(self.0 & !allowed.0)
    }

    /// True when no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for Flags {
    type Output = Flags;
    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.contains(Flags::MMAP) {
            parts.push("MMAP".to_string());
        }
        if self.contains(Flags::INIT_SHARED) {
            parts.push("INIT_SHARED".to_string());
        }
        let rest = self.difference(Flags::ALL);
        if !rest.is_empty() {
            parts.push(format!("{:#x}", rest.0));
        }
        if parts.is_empty() {
            parts.push("NONE".to_string());
        }
        write!(f, "{}", parts.join("|"))
    }
}
