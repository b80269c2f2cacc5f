//! vhost-user: device backends in other processes.
//!
//! # Frontend (the VMM)
//!
//! [`mem_table`] turns a [`GmemMemory`] into the regions of `VHOST_USER_SET_MEM_TABLE`: each
//! region's descriptor is the gmem file itself (its backing descriptor), at the region's file
//! offset. The frontend's "user address" of a region is its guest-physical address
//! ([`frontend_addr`]): vhost-user only needs the ring addresses of `SET_VRING_ADDR` to be in
//! the same space as the table, and a gmem VMM has no unenforced mapping of guest memory to
//! name.
//!
//! # gmem-aware backend
//!
//! The backend is given, out of band (inherited or over `SCM_RIGHTS`), the socket of
//! [`gmem::GuestMemfd::share_with_process`] for each file, and attaches as a follower
//! ([`gmem::GuestMemfd::attach`]). On `SET_MEM_TABLE` it never maps the descriptors it
//! receives: [`BackendMemory::from_mem_table`] matches each one, by inode, with an attached
//! file and builds the same [`GmemMemory`] the VMM has, from [`RegionSpec::follower`]
//! regions. Its devices then get the adapter's guarantees: private pages are refused with the
//! gpa, held slices make the owner's conversion fail with `EAGAIN`, the follower's own
//! mappings lose private pages. A region whose descriptor is not an attached gmem file is
//! refused ([`VhostMemoryError::NotAttached`]): such a backend does not take raw memory.
//!
//! # Unaware backends
//!
//! An unmodified backend (rust-vmm's `vhost-user-backend`, `vhost-device-*`, QEMU's
//! backends) maps each descriptor whole with `mmap`. It works on shared memory, but outside
//! gmem's enforcement:
//!
//! - its mapping is not revoked on conversion: it can read and write the guest's *private*
//!   pages (on every backing this kernel offers: the kernel guest_memfd does not enforce
//!   private pages in mappings either);
//! - it holds no host reference: converting a buffer it is using succeeds, and it goes on
//!   using the page;
//! - it is told nothing of conversions, and its refusals are its own (a descriptor pointing
//!   at a private page is served, not refused).
//!
//! So an unaware backend is for trusted device code only, exactly as mapping all of guest
//! memory into a device is today. The way to narrow it without changing the backend is to
//! hand it only the shared runs (`VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS` with
//! `ADD_MEM_REGION`/`REM_MEM_REGION` on each conversion, acknowledged with `REPLY_ACK` before
//! the conversion completes); that is not implemented here.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};

use gmem::{Errno, FileId, GuestMemfd};
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vhost::VhostUserMemoryRegionInfo;

use crate::layout::{LayoutError, RegionSpec};
use crate::memory::GmemMemory;

/// The frontend's "user address" of guest-physical address `gpa` in the mem table
/// [`mem_table`] makes: the gpa itself.
pub fn frontend_addr(gpa: u64) -> u64 {
    gpa
}

/// The `SET_MEM_TABLE` regions of `mem`. The descriptors are borrowed from `mem`'s files:
/// send the table while `mem` lives.
pub fn mem_table(mem: &GmemMemory) -> Vec<VhostUserMemoryRegionInfo> {
    mem.region_files()
        .into_iter()
        .map(|(gpa, len, offset, file)| VhostUserMemoryRegionInfo {
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: frontend_addr(gpa),
            mmap_offset: offset,
            mmap_handle: file.as_fd().as_raw_fd(),
        })
        .collect()
}

/// Why a backend refused a mem table.
#[derive(Debug, thiserror::Error)]
pub enum VhostMemoryError {
    /// The region's descriptor is not one of the gmem files this backend attached to
    /// (`EPERM`): a gmem-aware backend does not map raw guest memory.
    #[error("region at {gpa:#x}: its descriptor is not an attached gmem file")]
    NotAttached {
        /// Guest-physical address of the region.
        gpa: u64,
    },
    /// The message carried a different number of descriptors than regions (`EINVAL`).
    #[error("{regions} regions but {files} descriptors")]
    Mismatch {
        /// Regions in the message.
        regions: usize,
        /// Descriptors received.
        files: usize,
    },
    /// The layout is invalid (the adapter's rules: alignment, overlap, inside the file).
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// `fstat` of a descriptor failed.
    #[error("region at {gpa:#x}: {source}")]
    Os {
        /// Guest-physical address of the region.
        gpa: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl VhostMemoryError {
    /// The errno for the error.
    pub fn errno(&self) -> i32 {
        match self {
            VhostMemoryError::NotAttached { .. } => libc::EPERM,
            VhostMemoryError::Mismatch { .. } => libc::EINVAL,
            VhostMemoryError::Layout(e) => e.errno(),
            VhostMemoryError::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

fn file_id(f: &File, gpa: u64) -> Result<FileId, VhostMemoryError> {
    use std::os::unix::fs::MetadataExt;
    let md = f
        .metadata()
        .map_err(|source| VhostMemoryError::Os { gpa, source })?;
    Ok(FileId {
        dev: md.dev(),
        ino: md.ino(),
    })
}

/// A backend's view of the VMM's memory, built from a `SET_MEM_TABLE`.
#[derive(Debug, Clone)]
pub struct BackendMemory {
    mem: GmemMemory,
    /// (frontend user address, gpa, len) per region.
    va: Vec<(u64, u64, u64)>,
}

impl BackendMemory {
    /// Builds the memory of a mem table: each region through the attached follower file
    /// whose inode its descriptor names. Nothing is mapped from `files`.
    pub fn from_mem_table(
        regions: &[VhostUserMemoryRegion],
        files: &[File],
        followers: &[GuestMemfd],
    ) -> Result<BackendMemory, VhostMemoryError> {
        if regions.len() != files.len() {
            return Err(VhostMemoryError::Mismatch {
                regions: regions.len(),
                files: files.len(),
            });
        }
        let mut ids = Vec::with_capacity(followers.len());
        for f in followers {
            let id = f.id().map_err(|e| VhostMemoryError::Os {
                gpa: 0,
                source: std::io::Error::from_raw_os_error(e.errno()),
            })?;
            ids.push(id);
        }
        let mut specs = Vec::with_capacity(regions.len());
        let mut va = Vec::with_capacity(regions.len());
        for (r, f) in regions.iter().zip(files) {
            let gpa = r.guest_phys_addr;
            let id = file_id(f, gpa)?;
            let follower = ids
                .iter()
                .position(|i| *i == id)
                .and_then(|i| followers.get(i))
                .ok_or(VhostMemoryError::NotAttached { gpa })?;
            specs.push(RegionSpec::follower(
                gpa,
                follower.clone(),
                r.mmap_offset,
                r.memory_size,
            ));
            va.push((r.user_addr, gpa, r.memory_size));
        }
        Ok(BackendMemory {
            mem: GmemMemory::new(specs)?,
            va,
        })
    }

    /// The memory, for the backend's devices.
    pub fn memory(&self) -> &GmemMemory {
        &self.mem
    }

    /// The guest-physical address of frontend user address `va` (ring addresses of
    /// `SET_VRING_ADDR`), if a region covers it.
    pub fn va_to_gpa(&self, va: u64) -> Option<u64> {
        self.va
            .iter()
            .find(|(u, _, len)| va >= *u && va - *u < *len)
            .map(|(u, gpa, _)| gpa + (va - u))
    }
}
