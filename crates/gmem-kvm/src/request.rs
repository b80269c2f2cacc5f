//! Guest-driven conversion: a request from the guest, served by gmem, answered with a status.
//!
//! Requests arrive by three ways ([`Source`]): gmem's doorbell ([`crate::doorbell`]),
//! `KVM_EXIT_HYPERCALL` with `KVM_HC_MAP_GPA_RANGE`, and `KVM_EXIT_MEMORY_FAULT`. Each is
//! served the same way, while the vCPU that asked is stopped in userspace:
//!
//! 1. the range must be page aligned, non-empty, must not wrap, and must lie inside one
//!    binding of this VM (else [`Status::Invalid`], `EINVAL`);
//! 2. [`gmem::GuestMemfd::convert`] on the file range: listeners (the VMM's devices) are asked
//!    first and may veto, host mappings are revoked, host references are checked, attributes
//!    are recorded; a page still in use by the host fails the whole request with
//!    [`Status::Busy`] (`EAGAIN`) naming its guest-physical address, and nothing changes;
//! 3. where the kernel has `KVM_SET_MEMORY_ATTRIBUTES` with the private attribute, the range's
//!    kernel attribute is set inside the same transaction (the binding's
//!    [`crate::attributes::KernelAttributes`] participant): if the kernel refuses, the whole
//!    conversion is rolled back and the request fails with the kernel's errno;
//! 4. the status goes back to the guest and `KVM_RUN` resumes.

use std::fmt;

use gmem::{Attr, Errno, PAGE_SIZE};
use kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE;

use crate::gpa::Gpa;
use crate::uapi::{KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MAP_GPA_RANGE_VALID};
use crate::vm::VmShared;

/// `KVM_ENOSYS` (`kvm_para.h`): the hypercall return for an unknown hypercall.
pub const KVM_ENOSYS: u64 = 1000;

/// How a request reached the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// gmem's I/O-port doorbell.
    Doorbell,
    /// `KVM_EXIT_HYPERCALL` with `KVM_HC_MAP_GPA_RANGE`.
    Hypercall,
    /// `KVM_EXIT_MEMORY_FAULT` (an access that did not match the page's attribute).
    MemoryFault,
}

/// The answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The range converted (or already had the attribute).
    Done,
    /// A page still has a host user (a pin, an accessor in flight, a listener veto):
    /// nothing converted (`EAGAIN`). `gpa` is the first such page.
    Busy {
        /// Guest-physical address of the first busy page.
        gpa: Gpa,
    },
    /// The request was malformed or the range is not bound (`EINVAL`).
    Invalid {
        /// The guest-physical address the request named.
        gpa: Gpa,
    },
    /// The host failed to carry the request out (the errno: `ENOMEM`, the kernel's, ...).
    Failed {
        /// The guest-physical address the request named.
        gpa: Gpa,
        /// The errno.
        errno: i32,
    },
}

impl Status {
    /// The errno the guest receives: 0, `EAGAIN`, `EINVAL` or the failure's errno.
    pub fn errno(&self) -> i32 {
        match self {
            Status::Done => 0,
            Status::Busy { .. } => libc::EAGAIN,
            Status::Invalid { .. } => libc::EINVAL,
            Status::Failed { errno, .. } => *errno,
        }
    }

    /// The guest-physical address the guest receives with the status (0 for [`Status::Done`]).
    pub fn gpa(&self) -> Gpa {
        match self {
            Status::Done => Gpa::new(0),
            Status::Busy { gpa } | Status::Invalid { gpa } | Status::Failed { gpa, .. } => *gpa,
        }
    }
}

/// One request the guest made and what it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// How the request arrived.
    pub source: Source,
    /// First guest-physical address of the range.
    pub gpa: Gpa,
    /// Length of the range in bytes.
    pub size: u64,
    /// The attribute asked for.
    pub to: Attr,
    /// The answer.
    pub status: Status,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let to = match self.to {
            Attr::Private => "private",
            Attr::Shared => "shared",
        };
        write!(
            f,
            "{:?}: gpa {:#x}+{:#x} to {to}: ",
            self.source, self.gpa, self.size
        )?;
        match self.status {
            Status::Done => write!(f, "done"),
            Status::Busy { gpa } => write!(f, "EAGAIN at gpa {gpa:#x}"),
            Status::Invalid { gpa } => write!(f, "EINVAL at gpa {gpa:#x}"),
            Status::Failed { gpa, errno } => write!(f, "errno {errno} at gpa {gpa:#x}"),
        }
    }
}

/// Serves a `KVM_EXIT_HYPERCALL`: for `KVM_HC_MAP_GPA_RANGE` (`args = [gpa, npages,
/// attrs]`, `KVM_MAP_GPA_RANGE_ENCRYPTED` in `attrs` asking for private, unknown `attrs` bits
/// refused) the guest's return value is 0 or `-errno`, with the report; any other hypercall
/// returns `-KVM_ENOSYS` and no report.
pub(crate) fn map_gpa_range(vm: &VmShared, nr: u64, args: [u64; 6]) -> (u64, Option<Report>) {
    if nr != KVM_HC_MAP_GPA_RANGE {
        return (KVM_ENOSYS.wrapping_neg(), None);
    }
    let [gpa, npages, attrs, ..] = args;
    let gpa = Gpa::new(gpa);
    let to = if attrs & KVM_MAP_GPA_RANGE_ENCRYPTED != 0 {
        Attr::Private
    } else {
        Attr::Shared
    };
    let report = match npages.checked_mul(PAGE_SIZE) {
        Some(size) if attrs & !KVM_MAP_GPA_RANGE_VALID == 0 => {
            serve(vm, Source::Hypercall, gpa, size, to)
        }
        _ => Report {
            source: Source::Hypercall,
            gpa,
            size: npages.saturating_mul(PAGE_SIZE),
            to,
            status: Status::Invalid { gpa },
        },
    };
    let ret = u64::try_from(report.status.errno())
        .unwrap_or(0)
        .wrapping_neg();
    (ret, Some(report))
}

/// Serves a `KVM_EXIT_MEMORY_FAULT`: the range converts to what the guest accessed it as
/// (`KVM_MEMORY_EXIT_FLAG_PRIVATE` set: private).
pub(crate) fn memory_fault(vm: &VmShared, flags: u64, gpa: Gpa, size: u64) -> Report {
    let to = if flags & u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE) != 0 {
        Attr::Private
    } else {
        Attr::Shared
    };
    serve(vm, Source::MemoryFault, gpa, size, to)
}

/// Serves one request (the steps of the [module docs](self)).
pub(crate) fn serve(vm: &VmShared, source: Source, gpa: Gpa, size: u64, to: Attr) -> Report {
    let status = convert(vm, gpa, size, to);
    Report {
        source,
        gpa,
        size,
        to,
        status,
    }
}

fn convert(vm: &VmShared, gpa: Gpa, size: u64, to: Attr) -> Status {
    let invalid = Status::Invalid { gpa };
    if size == 0
        || !gpa.is_aligned(PAGE_SIZE)
        || size % PAGE_SIZE != 0
        || gpa.checked_add(size).is_none()
    {
        return invalid;
    }
    let Some(r) = vm.slots().resolve(gpa, size) else {
        return invalid;
    };
    if let Err(e) = r.mem.convert(r.offset, size, to) {
        // The error's file offset lies inside the binding: its address never wraps.
        let gpa = e.error_offset().and_then(|o| r.gpa_of(o)).unwrap_or(gpa);
        return match e.errno() {
            libc::EAGAIN => Status::Busy { gpa },
            libc::EINVAL => Status::Invalid { gpa },
            errno => Status::Failed { gpa, errno },
        };
    }
    Status::Done
}

#[cfg(test)]
mod tests {
    //! The hypercall and memory-fault paths on a real VM and file. This machine kind cannot
    //! make a guest produce those exits (see [`crate::doorbell`]), so the exits' contents are
    //! given here; everything after them is the real flow.

    use gmem::{Attr, Flags};

    use super::*;
    use crate::vm::{Vm, VmError};

    fn vm() -> Option<Vm> {
        match Vm::new() {
            Ok(vm) => Some(vm),
            Err(VmError::Open { errno }) => {
                eprintln!("skipped: /dev/kvm cannot be opened (errno {errno})");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn map_gpa_range_converts_and_returns_minus_errno() {
        let Some(vm) = vm() else { return };
        let mem = vm
            .create_guest_memfd(1 << 20, Flags::MMAP | Flags::INIT_SHARED)
            .expect("create");
        vm.bind(&mem, Gpa::new(0x10_0000), 0, 1 << 20)
            .expect("bind");
        let v = &vm.shared;
        let enc = KVM_MAP_GPA_RANGE_ENCRYPTED;

        let (ret, r) = map_gpa_range(v, KVM_HC_MAP_GPA_RANGE, [0x10_2000, 2, enc, 0, 0, 0]);
        assert_eq!(ret, 0);
        let r = r.expect("report");
        assert_eq!(
            (r.source, r.size, r.to, r.status),
            (Source::Hypercall, 0x2000, Attr::Private, Status::Done)
        );
        assert_eq!(mem.attr(0x2000).expect("attr"), Attr::Private);
        assert_eq!(mem.attr(0x4000).expect("attr"), Attr::Shared);

        let pin = mem.pin(0x5000, 1).expect("pin");
        let (ret, r) = map_gpa_range(v, KVM_HC_MAP_GPA_RANGE, [0x10_4000, 4, enc | 1, 0, 0, 0]);
        assert_eq!(ret, (libc::EAGAIN as u64).wrapping_neg());
        assert_eq!(
            r.expect("report").status,
            Status::Busy {
                gpa: Gpa::new(0x10_5000)
            }
        );
        drop(pin);

        let (ret, _) = map_gpa_range(v, KVM_HC_MAP_GPA_RANGE, [0x10_2000, 2, 0, 0, 0, 0]);
        assert_eq!(ret, 0, "back to shared");
        assert_eq!(mem.run_count().expect("run count"), 1);

        for bad in [
            [0x10_2000, 1, 1 << 5, 0, 0, 0],     // unknown attrs bit
            [0x10_2000, u64::MAX, enc, 0, 0, 0], // npages overflows
            [0x10_2000, 0, enc, 0, 0, 0],        // empty
            [0x10_2800, 1, enc, 0, 0, 0],        // unaligned
            [0x30_0000, 1, enc, 0, 0, 0],        // not bound
        ] {
            let (ret, r) = map_gpa_range(v, KVM_HC_MAP_GPA_RANGE, bad);
            assert_eq!(ret, (libc::EINVAL as u64).wrapping_neg(), "{bad:x?}");
            assert_eq!(
                r.expect("report").status,
                Status::Invalid {
                    gpa: Gpa::new(bad[0])
                }
            );
        }
        assert_eq!(mem.run_count().expect("run count"), 1, "nothing converted");

        let (ret, r) = map_gpa_range(v, KVM_HC_MAP_GPA_RANGE + 1, [0; 6]);
        assert_eq!((ret, r), (KVM_ENOSYS.wrapping_neg(), None));
    }

    #[test]
    fn memory_fault_converts_to_the_access_kind() {
        let Some(vm) = vm() else { return };
        let mem =
            gmem::GuestMemfd::create(1 << 20, Flags::MMAP | Flags::INIT_SHARED).expect("memfd");
        vm.bind(&mem, Gpa::new(0), 0, 1 << 20).expect("bind");
        let r = memory_fault(
            &vm.shared,
            u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE),
            Gpa::new(0x3000),
            0x1000,
        );
        assert_eq!(
            (r.source, r.to, r.status),
            (Source::MemoryFault, Attr::Private, Status::Done)
        );
        assert_eq!(mem.attr(0x3000).expect("attr"), Attr::Private);
        let r = memory_fault(&vm.shared, 0, Gpa::new(0x3000), 0x1000);
        assert_eq!((r.to, r.status), (Attr::Shared, Status::Done));
        assert_eq!(mem.attr(0x3000).expect("attr"), Attr::Shared);
        let r = memory_fault(&vm.shared, 0, Gpa::new(0x20_0000), 0x1000);
        assert_eq!(
            r.status,
            Status::Invalid {
                gpa: Gpa::new(0x20_0000)
            }
        );
    }
}
