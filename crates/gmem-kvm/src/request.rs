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
//!    kernel attribute is set to match (if the kernel refuses, gmem's conversion is undone by
//!    converting the range back, and the request fails with the kernel's errno);
//! 4. the status goes back to the guest and `KVM_RUN` resumes.

use std::fmt;

use gmem::{Attr, PAGE_SIZE};
use kvm_bindings::{kvm_memory_attributes, KVM_MEMORY_ATTRIBUTE_PRIVATE};

use crate::vm::VmShared;

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
        gpa: u64,
    },
    /// The request was malformed or the range is not bound (`EINVAL`).
    Invalid {
        /// The guest-physical address the request named.
        gpa: u64,
    },
    /// The host failed to carry the request out (the errno: `ENOMEM`, the kernel's, ...).
    Failed {
        /// The guest-physical address the request named.
        gpa: u64,
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
    pub fn gpa(&self) -> u64 {
        match self {
            Status::Done => 0,
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
    pub gpa: u64,
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

/// Serves one request (the steps of the [module docs](self)).
pub(crate) fn serve(vm: &VmShared, source: Source, gpa: u64, size: u64, to: Attr) -> Report {
    let status = convert(vm, gpa, size, to);
    Report {
        source,
        gpa,
        size,
        to,
        status,
    }
}

fn convert(vm: &VmShared, gpa: u64, size: u64, to: Attr) -> Status {
    let invalid = Status::Invalid { gpa };
    if size == 0 || gpa % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 || gpa.checked_add(size).is_none()
    {
        return invalid;
    }
    let Some(r) = vm.slots().resolve(gpa, size) else {
        return invalid;
    };
    if let Err(e) = r.mem.convert(r.offset, size, to) {
        let at = e.error_offset().map_or(gpa, |o| r.gpa_of(o));
        return match e.errno() {
            libc::EAGAIN => Status::Busy { gpa: at },
            libc::EINVAL => Status::Invalid { gpa: at },
            errno => Status::Failed { gpa: at, errno },
        };
    }
    if vm.caps.kernel_private_attribute() {
        let attrs = kvm_memory_attributes {
            address: gpa,
            size,
            attributes: match to {
                Attr::Private => u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE),
                Attr::Shared => 0,
            },
            flags: 0,
        };
        if let Err(e) = vm.fd.set_memory_attributes(attrs) {
            let back = match to {
                Attr::Private => Attr::Shared,
                Attr::Shared => Attr::Private,
            };
            // To shared cannot fail on the reference check; to private may, and then the
            // range stays as the guest asked in gmem while the kernel kept the old attribute.
            let _ = r.mem.convert(r.offset, size, back);
            return Status::Failed {
                gpa,
                errno: e.errno(),
            };
        }
    }
    Status::Done
}
