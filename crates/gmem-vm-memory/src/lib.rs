//! # gmem-vm-memory: devices reach guest memory through gmem
//!
//! rust-vmm's device crates (virtio-queue, vhost, the device models built on them) reach guest
//! memory through vm-memory's [`GuestMemory`](vm_memory::GuestMemory). This crate implements
//! it (vm-memory 0.18's permissioned form: `check_range` and `get_slices` with an access) over a
//! VM's guest-physical layout of gmem files, so that unmodified device code
//!
//! - reads and writes shared pages through ordinary `VolatileSlice`s,
//! - gets an error, never a fault, for private pages (`EFAULT`), poisoned pages
//!   (`EHWPOISON`), pages being converted (`EAGAIN`) and holes, with the gpa named
//!   ([`Refusal`]), and every refusal counted and the last one kept for the device to query
//!   ([`RefusalLog`]), since virtio-queue drops some of these errors on its way;
//! - holds the pages of every slice it was given, for as long as the slice (or any clone or
//!   sub-slice of it) lives, as a GUP pin does: the guest's conversion of a held page to
//!   private fails with `EAGAIN` naming the page, and succeeds once the device lets go;
//! - marks the pages it writes in a per-region [`DirtyLog`] when the VMM migrates.
//!
//! ```
//! use gmem::{Attr, Errno, Flags, GuestMemfd};
//! use gmem_vm_memory::{GmemMemory, Refusal, RegionSpec};
//! use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
//!
//! let ram = GuestMemfd::builder(1 << 20).flags(Flags::MMAP | Flags::INIT_SHARED).create()?;
//! // 1 MiB of RAM at gpa 0x10_0000; everything else is a hole.
//! let mem = GmemMemory::new([RegionSpec::new(0x10_0000, ram.clone(), 0, 1 << 20)])?;
//!
//! mem.write_obj(0xfeed_u64, GuestAddress(0x10_0000))?;
//! ram.convert(0x1000, 0x1000, Attr::Private)?;          // the guest hides a page
//! assert!(!mem.check_range(GuestAddress(0x10_1000), 8, Permissions::Read));
//! let err = mem.read_obj::<u64>(GuestAddress(0x10_1000)).unwrap_err();
//! assert_eq!(Refusal::of(&err), Some(Refusal::Private { gpa: 0x10_1000 }));
//!
//! // A slice the device holds keeps its page shared.
//! let slices: Vec<_> = mem.get_slices(GuestAddress(0x10_2000), 64, Permissions::Write)?
//!     .collect::<Result<_, _>>()?;
//! let err = ram.convert(0x2000, 0x1000, Attr::Private).unwrap_err();
//! assert_eq!((err.errno(), err.error_offset()), (libc::EAGAIN, Some(0x2000)));
//! drop(slices);
//! ram.convert(0x2000, 0x1000, Attr::Private)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! How holds work without costing the device an atomic operation per access:
//! [`hold`]. How regions are validated: [`LayoutError`]. Address spaces whose
//! regions change: [`GmemAddressSpace`]. Backends in other processes attach with
//! [`gmem::GuestMemfd::attach`] and build their memory from [`RegionSpec::follower`]
//! regions ([`vhost_user`] has the vhost-user side).
#![deny(missing_docs)]

mod bitmap;
pub mod hold;
mod layout;
mod memory;
mod space;
mod tracker;
pub mod vhost_user;

pub use bitmap::{DirtyLog, GmemSlice, DIRTY_PAGE};
pub use layout::{HoldMode, LayoutError, RegionSpec};
pub use memory::{
    GmemMemory, GmemMemoryBuilder, GmemSlices, NoPhysicalMemory, Refusal, RefusalLog, RefusalRecord,
};
pub use space::GmemAddressSpace;

/// The README's code: the library example runs, the device-layer example compiles (it runs
/// in `tests/readme.rs`). Kept here, in the crate that depends on everything the README uses.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
