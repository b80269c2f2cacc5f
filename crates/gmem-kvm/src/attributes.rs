//! The kernel's memory attributes as a participant of gmem's conversions.
//!
//! Where the kernel has `KVM_SET_MEMORY_ATTRIBUTES` with the private attribute, every binding
//! of a file adds a [`KernelAttributes`] participant to it: each conversion of the bound range
//! sets the kernel's attribute inside gmem's transaction (after gmem revoked its own views, for
//! a conversion to private; before it lets them reach the pages, for one to shared), and a
//! kernel refusal rolls the whole conversion back, so gmem and the kernel never disagree.

use std::sync::Arc;

use gmem::{ByteRange, Participant, Step, StepError};
use kvm_bindings::{kvm_memory_attributes, KVM_MEMORY_ATTRIBUTE_PRIVATE};

use crate::gpa::Gpa;
use crate::vm::VmShared;

/// Keeps the kernel's attributes of one binding in step with gmem's.
#[derive(Debug)]
pub struct KernelAttributes {
    vm: Arc<VmShared>,
    gpa: Gpa,
    offset: u64,
    len: u64,
}

impl KernelAttributes {
    /// The participant for the binding of file range `[offset, offset + len)` at `gpa` in `vm`.
    pub(crate) fn new(vm: Arc<VmShared>, gpa: Gpa, offset: u64, len: u64) -> Self {
        KernelAttributes {
            vm,
            gpa,
            offset,
            len,
        }
    }

    /// The guest-physical range of the part of `r` (file bytes) this binding covers.
    fn gpa_range(&self, r: ByteRange) -> Option<(Gpa, u64)> {
        let end = self.offset.checked_add(self.len)?;
        let start = r.start.max(self.offset);
        let stop = r.end.min(end);
        if start >= stop {
            return None;
        }
        Some((self.gpa.checked_add(start - self.offset)?, stop - start))
    }

    fn set(&self, r: ByteRange, private: bool) -> Result<(), StepError> {
        let Some((gpa, size)) = self.gpa_range(r) else {
            return Ok(());
        };
        let attrs = kvm_memory_attributes {
            address: gpa.raw(),
            size,
            attributes: if private {
                u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE)
            } else {
                0
            },
            flags: 0,
        };
        self.vm
            .fd
            .set_memory_attributes(attrs)
            .map_err(|e| StepError {
                errno: e.errno(),
                offset: r.start.max(self.offset),
            })
    }
}

impl Participant for KernelAttributes {
    fn name(&self) -> &str {
        "kvm-attributes"
    }

    fn apply(&mut self, step: &Step) -> Result<(), StepError> {
        match *step {
            Step::Revoke(r) => self.set(r, true),
            Step::Restore(r) => self.set(r, false),
            _ => Ok(()),
        }
    }

    fn undo(&mut self, step: &Step) {
        let res = match *step {
            Step::Revoke(r) => self.set(r, false),
            Step::Restore(r) => self.set(r, true),
            _ => Ok(()),
        };
        if let Err(e) = res {
            eprintln!("gmem-kvm: undoing a kernel attribute change failed: {e}");
        }
    }
}
