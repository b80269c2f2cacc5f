//! KVM integration for gmem: the kernel guest_memfd as a backing, memslot bindings, guest-driven
//! conversion, and a small VM runner.
//!
//! - [`caps`]: capability probe and the [`Mode`] in force (what the kernel provides, what gmem
//!   adds).
//! - [`guest_memfd`]: [`Vm::create_guest_memfd`] makes a [`gmem::GuestMemfd`] whose file is
//!   the kernel's guest_memfd.
//! - [`memslot`]: [`Vm::bind`] binds file ranges to guest-physical ranges with
//!   `KVM_SET_USER_MEMORY_REGION2` (gmem-only slots for kernel files, hva slots over gmem's
//!   guest view for others).
//! - [`request`], [`doorbell`]: conversions the guest asks for, by hypercall exit, memory
//!   fault exit, or gmem's I/O-port doorbell.
//! - [`gpa`]: [`Gpa`], guest-physical addresses with checked arithmetic.
//! - [`runner`]: vCPUs, the run loop and [`runner::demo_guest`]; [`payload`]: tiny real-mode
//!   guest programs.
//! - [`uapi`]: the guest_memfd constants kvm-bindings lacks.
//!
//! ```no_run
//! use gmem::Flags;
//! use gmem_kvm::{runner::Exit, Gpa, Vm};
//!
//! let vm = Vm::new()?;
//! println!("{}", vm.mode());
//! let mem = vm.create_guest_memfd(1 << 20, Flags::MMAP | Flags::INIT_SHARED)?;
//! vm.bind(&mem, Gpa::new(0), 0, 1 << 20)?;
//! let code = gmem_kvm::payload::check_and_fill(Gpa::new(0x8000), 16, 0, 0xff)?;
//! mem.guest()?.write(0x1000, &code)?;
//! let mut vcpu = vm.create_vcpu(0)?;
//! vcpu.set_real_mode_entry(Gpa::new(0x1000))?;
//! while vcpu.run()? != Exit::Halt {}
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod attributes;
pub mod caps;
pub mod doorbell;
pub mod gpa;
pub mod guest_memfd;
pub mod memslot;
pub mod payload;
pub mod request;
pub mod runner;
mod slots;
pub mod uapi;
pub mod vm;

/// The kvm-bindings this crate is built with, for raw ioctls through [`Vm::fd`].
pub use kvm_bindings;
/// The kvm-ioctls this crate is built with.
pub use kvm_ioctls;

pub use attributes::KernelAttributes;
pub use caps::{Capabilities, Mode, Provider, SlotKind};
pub use gpa::Gpa;
pub use guest_memfd::KernelGuestMemfd;
pub use memslot::{BindError, Binding};
pub use request::{Report, Source, Status};
pub use runner::{demo_guest, DemoReport, Exit, Vcpu, Watchdog};
pub use vm::{Vm, VmError};
