//! gmem's paravirtual conversion doorbell: how a guest asks for a conversion on hosts where
//! neither `KVM_EXIT_HYPERCALL` nor `KVM_EXIT_MEMORY_FAULT` can carry the request.
//!
//! On this machine kind (KVM on a software hypervisor), real-mode guest code runs in KVM's
//! instruction emulator, where `VMCALL` hangs `KVM_RUN`, and the only VM type has no private
//! memory; an I/O port read reaches the VMM from every guest mode.
//!
//! # ABI (version 1)
//!
//! The guest puts the request in registers and reads 32 bits from [`DOORBELL_PORT`]
//! (`in eax, dx` with `dx = 0xe00`). Only the low 32 bits of each register are read, in every
//! guest mode:
//!
//! | register | meaning |
//! |---|---|
//! | `EBX` | guest-physical address, bits 0..31 (page aligned) |
//! | `EDI` | guest-physical address, bits 32..63 |
//! | `ECX` | size in bytes (page aligned, not zero; at most 4 GiB - 4 KiB per request) |
//! | `ESI` | flags: bit 0 set = to private, clear = to shared; bits 1..31 must be zero |
//!
//! The value read (`EAX`) is the status: `0` done; `EAGAIN` (11) a page is in use by the host
//! (pinned, an accessor in flight, a device listener refused) and nothing converted;
//! `EINVAL` (22) a malformed request (unaligned, empty, wrapping, unknown flag bits, a range
//! not inside one memory binding); any other value is the errno of a host failure. After a
//! non-zero status, 32-bit reads of [`DOORBELL_ERROR_LO_PORT`] and [`DOORBELL_ERROR_HI_PORT`]
//! give the guest-physical address of the first page that failed (for `EAGAIN`: the first
//! busy page, so the guest may convert the other pages one by one); after success they read
//! 0. The status is per vCPU. Reads of other sizes on these ports give all ones; writes are
//! ignored.
//!
//! A request costs one exit to the VMM (two more to read the failing address).

use gmem::Attr;
use kvm_bindings::kvm_regs;

use crate::gpa::Gpa;

/// The doorbell: a 32-bit read carries a request and returns its status.
pub const DOORBELL_PORT: u16 = 0x0e00;
/// A 32-bit read gives bits 0..31 of the failing guest-physical address of the last request.
pub const DOORBELL_ERROR_LO_PORT: u16 = 0x0e04;
/// A 32-bit read gives bits 32..63 of the failing guest-physical address of the last request.
pub const DOORBELL_ERROR_HI_PORT: u16 = 0x0e08;
/// `ESI` bit 0: convert to private (clear: to shared).
pub const DOORBELL_TO_PRIVATE: u32 = 1;
/// The doorbell ABI version this crate implements.
pub const DOORBELL_ABI_VERSION: u32 = 1;

/// A decoded doorbell request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoorbellRequest {
    /// First guest-physical address.
    pub gpa: Gpa,
    /// Size in bytes.
    pub size: u64,
    /// Attribute asked for.
    pub to: Attr,
}

fn low32(v: u64) -> u64 {
    v & 0xffff_ffff
}

/// The low 32 bits of a register, as the guest wrote them in every mode.
fn reg32(v: u64) -> u32 {
    u32::try_from(low32(v)).unwrap_or(u32::MAX)
}

/// Decodes the request in `regs`; `Err(gpa)` when the flags have unknown bits.
pub fn decode(regs: &kvm_regs) -> Result<DoorbellRequest, Gpa> {
    let gpa = Gpa::from_halves(reg32(regs.rbx), reg32(regs.rdi));
    let flags = low32(regs.rsi);
    if flags & !u64::from(DOORBELL_TO_PRIVATE) != 0 {
        return Err(gpa);
    }
    Ok(DoorbellRequest {
        gpa,
        size: low32(regs.rcx),
        to: if flags & u64::from(DOORBELL_TO_PRIVATE) != 0 {
            Attr::Private
        } else {
            Attr::Shared
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_reads_low_halves_and_refuses_unknown_flags() {
        let regs = kvm_regs {
            rbx: 0xdead_0000_0000_3000,
            rdi: 0x1,
            rcx: 0xffff_ffff_0000_2000,
            rsi: 1,
            ..Default::default()
        };
        assert_eq!(
            decode(&regs),
            Ok(DoorbellRequest {
                gpa: Gpa::new(0x1_0000_3000),
                size: 0x2000,
                to: Attr::Private
            })
        );
        let shared = kvm_regs {
            rsi: 0xffff_ffff_0000_0000,
            ..regs
        };
        assert_eq!(decode(&shared).map(|r| r.to), Ok(Attr::Shared));
        let bad = kvm_regs { rsi: 3, ..regs };
        assert_eq!(decode(&bad), Err(Gpa::new(0x1_0000_3000)));
    }
}
