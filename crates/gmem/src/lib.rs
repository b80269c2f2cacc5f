//! # gmem: guest-first memory for Rust virtual machine monitors
//!
//! gmem gives a VMM the memory model of Linux's guest_memfd: every page of guest memory is
//! *shared* or *private*; the host maps and touches only shared pages (a host touch of a
//! private page faults); the guest converts pages in place, and conversion to private is
//! refused with `EAGAIN` while the host still holds a page. Every error names the errno the
//! kernel uses for the same case ([`Errno::errno`]), so the kernel and gmem can be compared
//! call for call.
//!
//! - [`GuestMemfd`]: the file; [`GuestMemfd::builder`] creates one.
//! - [`GuestMemfd::convert`]: in-place conversion.
//! - [`GuestMemfd::map`]: host views ([`HostView`]); the enforcement of each backing is in
//!   the [`HostView`] module docs (`verbs::map`, summarised in the README).
//! - [`GuestMemfd::read_at`], [`GuestMemfd::write_at`], [`GuestMemfd::pin`]: checked host
//!   access that returns an error for private pages instead of faulting.
//! - [`GuestMemfd::guest`]: the guest view, which reaches every page.
//! - [`GuestMemfd::fallocate`]: allocate and punch-hole with the kernel's rules.
//! - [`GuestMemfd::add_listener`], [`GuestMemfd::add_participant`]: who else hears of
//!   conversions; [`GuestMemfd::add_device_listener`]: a device layer's listener, which also
//!   hears of poison and starts from a snapshot no change slips past.
//! - [`GuestMemfd::share_with_process`] / [`GuestMemfd::attach`]: other processes
//!   ([`peer`]).
//! - [`BackingChoice::HugeTlb`]: 2 MiB / 1 GiB pages reserved at creation; mixed huge pages
//!   are split and merged back.
//! - [`GuestMemfd::inject_poison`]: memory failure; [`GuestMemfd::set_numa_policy`]:
//!   placement; [`GuestMemfd::preallocate`]: populating up front.
//! - [`preserve`]: live update to a new process.
//!
//! # Threat model
//!
//! Not trusted: the guest (conversion patterns, doorbell arguments, descriptors), bytes from
//! outside (a preserved state, peer messages, received descriptors: sizes and seals are
//! checked), and time (a peer that never answers: deadlines). Trusted to cooperate: the VMM
//! and the follower processes it admits, which gmem protects from accidents (their own
//! `madvise`, `mremap`, `vmsplice`, forks on its mappings) and the guest from their bugs, not
//! from deliberate raw access to the descriptor. What is promised, and each documented
//! exception per backing, is in `ARCHITECTURE.md` and the README.
//!
//! # Layers
//!
//! `model` (pure state) ← `sys` (syscalls) ← `backing` ← `engine` (the one owner of the
//! enforcement invariant) ← `verbs` (`impl GuestMemfd`) ← [`peer`], [`preserve`].
#![deny(missing_docs)]

pub mod backing;
pub(crate) mod engine;
pub mod model;
pub mod peer;
pub mod preserve;
pub(crate) mod sys;
pub(crate) mod verbs;

pub use backing::hugetlb::{HugeTlbError, PoolGuard, PoolStats, HUGE_1G, HUGE_2M};
pub use backing::{Backing, BackingKind};
pub use engine::access::AccessError;
pub use engine::convert::ConvertError;
pub use engine::gate::GateError;
pub use engine::listener::{Conversion, ConversionListener, ListenerId, Veto};
pub use engine::participant::{Participant, ParticipantId, Step, StepError};
pub use engine::poison::PoisonError;
pub use engine::prealloc::{Prealloc, PreallocError, Progress};
pub use engine::{CreateError, MAP_HEADROOM};
pub use model::attr::{Attr, AttrMap, Run};
pub use model::error::Errno;
pub use model::flags::Flags;
pub use model::huge::{Accounting, PIECE_CACHE_BYTES};
pub use model::numa::{NumaError, NumaPolicy};
pub use model::units::{ByteRange, PageRange, RangeError, PAGE_SIZE};
pub use verbs::access::Pin;
pub use verbs::create::{BackingChoice, Builder};
pub use verbs::device::{DeviceError, DeviceListener, DeviceListenerId, DeviceSnapshot};
pub use verbs::fallocate::{FallocMode, FallocateError};
pub use verbs::guest::GuestView;
pub use verbs::map::{HostFault, HostView, MapError, Sharing};
pub use verbs::numa::online_nodes;
pub use verbs::query::FileError;
pub use verbs::{AttrRun, FileId, GuestMemfd};
