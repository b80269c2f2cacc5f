//! The VM: `/dev/kvm`, one VM of the default type, its capabilities and its memslots.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{kvm_enable_cap, KVM_CAP_EXIT_HYPERCALL};
use kvm_ioctls::{Kvm, VmFd};

use crate::caps::{Capabilities, Mode};
use crate::slots::{release_owner, SlotTable};
use crate::uapi::KVM_HC_MAP_GPA_RANGE;

/// Why the VM, or a vCPU of it, could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened (`ENOENT`, `EACCES`, ...).
    #[error("cannot open /dev/kvm: errno {errno}")]
    Open {
        /// The errno of `open`.
        errno: i32,
    },
    /// A KVM ioctl failed.
    #[error("{op} failed: errno {errno}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// Its errno.
        errno: i32,
    },
}

impl VmError {
    /// The errno of the failed call.
    pub fn errno(&self) -> i32 {
        match self {
            VmError::Open { errno } | VmError::Ioctl { errno, .. } => *errno,
        }
    }

    pub(crate) fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
        move |e| VmError::Ioctl {
            op,
            errno: e.errno(),
        }
    }
}

/// Where real-mode guests on Intel hosts without unrestricted guest keep their TSS: the three
/// pages below the BIOS area, outside every memory a gmem caller binds in the low 4 GiB
/// (`0xfffb_d000`, the address QEMU and Firecracker use).
pub const TSS_ADDRESS: usize = 0xfffb_d000;

static NEXT_VM: AtomicU64 = AtomicU64::new(1);

/// What the VM and its vCPUs share.
#[derive(Debug)]
pub(crate) struct VmShared {
    pub fd: VmFd,
    pub id: u64,
    pub caps: Capabilities,
    pub hypercall_exit: bool,
    pub slots: Mutex<SlotTable>,
}

impl VmShared {
    pub fn slots(&self) -> MutexGuard<'_, SlotTable> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for VmShared {
    fn drop(&mut self) {
        // Files this VM claimed (the non-kernel backings) may be bound by another VM now.
        release_owner(self.id);
    }
}

/// A KVM virtual machine of the default type, with the guest-memory capabilities probed.
///
/// Cloning gives another handle to the same VM. Guest memory files made by
/// [`Vm::create_guest_memfd`] belong to this VM for their whole life, as the kernel ties a
/// guest_memfd to the VM that created it; they may outlive it.
#[derive(Debug, Clone)]
pub struct Vm {
    pub(crate) shared: Arc<VmShared>,
}

impl Vm {
    /// Opens `/dev/kvm`, creates a VM of the default type and probes its capabilities.
    ///
    /// Where `KVM_CAP_EXIT_HYPERCALL` offers `KVM_HC_MAP_GPA_RANGE`, it is enabled, so a
    /// guest's `MAP_GPA_RANGE` hypercall arrives at the runner as a conversion request.
    pub fn new() -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(|e| VmError::Open { errno: e.errno() })?;
        let fd = kvm.create_vm().map_err(VmError::ioctl("KVM_CREATE_VM"))?;
        #[cfg(target_arch = "x86_64")]
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(VmError::ioctl("KVM_SET_TSS_ADDR"))?;
        let caps = Capabilities::probe(&kvm, &fd);
        let hypercall_exit = caps.map_gpa_range_exit() && {
            let cap = kvm_enable_cap {
                cap: KVM_CAP_EXIT_HYPERCALL,
                args: [1 << KVM_HC_MAP_GPA_RANGE, 0, 0, 0],
                ..Default::default()
            };
            fd.enable_cap(&cap).is_ok()
        };
        let slots = Mutex::new(SlotTable::new(caps.nr_memslots));
        Ok(Vm {
            shared: Arc::new(VmShared {
                fd,
                id: NEXT_VM.fetch_add(1, Ordering::Relaxed),
                caps,
                hypercall_exit,
                slots,
            }),
        })
    }

    /// The probed capabilities.
    pub fn capabilities(&self) -> &Capabilities {
        &self.shared.caps
    }

    /// Which semantics the kernel provides and which gmem adds.
    pub fn mode(&self) -> Mode {
        self.shared.caps.mode()
    }

    /// True when `KVM_EXIT_HYPERCALL` for `KVM_HC_MAP_GPA_RANGE` was enabled on this VM.
    pub fn hypercall_exit_enabled(&self) -> bool {
        self.shared.hypercall_exit
    }

    /// A number distinguishing this VM from every other VM of the process.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The VM descriptor, for ioctls gmem does not wrap. Memslots made through it are unknown
    /// to gmem: guest requests for their ranges are refused (`EINVAL`).
    pub fn fd(&self) -> &VmFd {
        &self.shared.fd
    }
}
